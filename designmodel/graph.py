"""Drawing the zoo's relation graph: as text, and as a small SVG (no plotting dependency)."""
from __future__ import annotations

from html import escape

import networkx as nx

_FAMILY_COLUMN = {"write": 0, "reset": 2, "kalman": 1}
_DECAY_ROW = {"none": 0, "constant": 1, "scalar": 2, "per_key": 3}
_STYLE = {"specialization": "#555555", "reset": "#1f77b4", "limit": "#d62728"}


def relation_text(g: nx.MultiDiGraph) -> str:
    """One line per relation, grouped by kind."""
    lines = ["relations (a -> b):"]
    for kind, meaning in (("specialization", "a is a special case of b"),
                          ("reset", "b is the covariance reset of a"),
                          ("limit", "b is a's weak-evidence limit r -> infinity")):
        edges = sorted((a, b) for a, b, k in g.edges(data="relation") if k == kind)
        lines.append(f"  {kind} ({meaning}):")
        lines += [f"    {a} -> {b}" for a, b in edges]
    return "\n".join(lines)


def _positions(g) -> dict:
    """Columns by family (write, kalman, reset), rows by decay structure."""
    return {n: (40 + 240 * _FAMILY_COLUMN[d["family"]], 50 + 90 * _DECAY_ROW[d["decay"]])
            for n, d in g.nodes(data=True)}


def relation_svg(g: nx.MultiDiGraph) -> str:
    """The relation graph as an SVG document."""
    pos = _positions(g)
    w, h = 40 + 240 * 3, 60 + 90 * 4 + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">',
           '<defs><marker id="arrow" markerWidth="10" markerHeight="8" refX="10" refY="4" orient="auto">'
           '<path d="M0,0 L10,4 L0,8 z" fill="#333"/></marker></defs>']
    for i, (a, b, kind) in enumerate(sorted(g.edges(data="relation"))):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        bend = 30 if x1 == x2 else 0
        out.append(f'<path d="M{x1 + 80},{y1 + 14} Q{(x1 + x2) / 2 + 80 + bend},{(y1 + y2) / 2 + 14} '
                   f'{x2 + 80},{y2}" fill="none" stroke="{_STYLE[kind]}" stroke-width="1.6" '
                   f'marker-end="url(#arrow)"><title>{escape(kind)}</title></path>')
    for n, (x, y) in sorted(pos.items()):
        out.append(f'<rect x="{x}" y="{y - 4}" width="160" height="22" rx="5" fill="#f4f4f4" stroke="#333"/>')
        out.append(f'<text x="{x + 80}" y="{y + 12}" text-anchor="middle">{escape(n)}</text>')
    for i, (kind, color) in enumerate(_STYLE.items()):
        out.append(f'<text x="{40 + 200 * i}" y="{h - 12}" fill="{color}">&#8594; {kind}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
