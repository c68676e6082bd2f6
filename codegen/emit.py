"""Render the templates for a derivation and write the generated modules.

    python -m designmodel.codegen.emit            # regenerate generated/<model>/ for the zoo
    python -m designmodel.codegen.emit --check    # fail if generated/ is out of date

Each zoo model of the write and reset families gets generated/<model>/ with
  kernels.py       the Triton kernels and their launcher `forward(...)`, self-contained
  derivation.md    the derivation the kernels implement (`derive(name).to_markdown()`)
  __init__.py      re-exports `forward`
Output is deterministic: no timestamps, sorted iteration, so a regeneration is byte-identical.

Specs outside the zoo compile into a cache folder (see `cache_dir`), one folder per spec keyed
by a hash of the spec and the compiler version. Files are written atomically (a temporary
file, then os.replace), so two processes compiling one spec at once both succeed; a content
hash stored beside the kernels detects a damaged entry, which is then rebuilt.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import jinja2

from designmodel import __version__
from designmodel.atomic import write_text

from . import plan as planning

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
GENERATED = ROOT / "generated"


def _template_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(TEMPLATES.rglob("*.j2")):
        h.update(path.relative_to(TEMPLATES).as_posix().encode())
        h.update(path.read_bytes())
    for path in (Path(__file__).with_name("plan.py"), Path(__file__).with_name("printer.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


# The compiler version names what produced a kernel: the package version and a digest of the
# templates, planner and printer, so that a cache entry from other templates is never reused.
COMPILER_VERSION = f"{__version__}+{_template_digest()}"


def plain(expr) -> str:
    """An expression as plain text for docstrings and comments (no LaTeX, no backslashes)."""
    return str(expr).replace(r"\|k_t\|^{2}", "|k_t|^2").replace("\\", "")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["plain"] = plain
    return env


def render(derivation) -> dict[str, str]:
    """The generated files of one derivation: name -> text."""
    p = planning.plan(derivation)
    env = environment()
    # a family's backward is emitted once its templates hold a backward core
    has_backward_core = (TEMPLATES / p.family / "backward.py.j2").is_file()
    context = dict(plan=p, version=__version__, structure_line=derivation.structure.one_line(),
                   one_line=derivation.one_line(), has_backward_core=has_backward_core)
    module = "kalman/module.py.j2" if p.family == "kalman" else "common/module.py.j2"
    kernels = env.get_template(module).render(**context)
    kernels = _tidy(kernels)
    init = (f'"""{p.model}: generated chunked forward kernels ({p.family} family)."""\n'
            "from .kernels import forward\n\n__all__ = [\"forward\"]\n")
    return {"kernels.py": kernels, "derivation.md": derivation.to_markdown(), "__init__.py": init}


def _tidy(text: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines beyond two (template seams)."""
    lines = [line.rstrip() for line in text.splitlines()]
    out, blank = [], 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= 2:
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def zoo_models() -> list[str]:
    """The zoo models with chunked kernels here (write and reset families), in zoo order."""
    from designmodel import zoo
    from designmodel.family import classify
    return [n for n in zoo.NAMES if classify(zoo.SPECS[n]).family in planning.FAMILIES]


def write_model(name: str, root: Path = GENERATED) -> Path:
    """Regenerate root/<name>/ for a zoo model; returns the folder."""
    from designmodel.derive import derive
    files = render(derive(name))
    folder = Path(root) / name
    for fname, text in sorted(files.items()):
        write_text(folder / fname, text)
    return folder


def write_zoo(root: Path = GENERATED) -> list[Path]:
    """Regenerate every zoo model of the write and reset families under root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    init = root / "__init__.py"
    if not init.exists() or root != GENERATED:
        write_text(init, '"""Kernels emitted by designmodel for the zoo (committed, reproducible)."""\n')
    return [write_model(n, root) for n in zoo_models()]


# --- the cache for specs outside the zoo ---------------------------------------------------

def cache_dir() -> Path:
    """$DESIGNMODEL_CACHE, else $XDG_CACHE_HOME/designmodel, else ~/.cache/designmodel."""
    env = os.environ.get("DESIGNMODEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "designmodel"


def spec_key(spec) -> str:
    """A stable text naming everything about a spec that the kernels depend on."""
    from designmodel.spec import inputs_of  # noqa: F401
    import sympy as sp
    parts = [repr(spec)]
    for i in spec.inputs:
        parts.append(f"input {i.name} per={i.per} domain={i.domain} per_token={i.per_token}")
    exprs = [spec.transition.decay, spec.noise_expr()]
    if hasattr(spec.observation, "noise"):
        exprs.append(spec.observation.noise)
    if hasattr(spec.filter, "c"):
        exprs.append(spec.filter.c)
    parts += [sp.srepr(e) for e in exprs]
    return "\n".join(parts)


def spec_hash(spec) -> str:
    h = hashlib.sha256()
    h.update(COMPILER_VERSION.encode())
    h.update(b"\0")
    h.update(spec_key(spec).encode())
    return h.hexdigest()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_entry_ok(folder: Path) -> bool:
    """True when folder/kernels.py exists and matches the content hash stored beside it."""
    kernels, stamp = folder / "kernels.py", folder / "kernels.py.sha256"
    try:
        return stamp.read_text().strip() == _digest(kernels.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return False


def build(derivation, root: Path | None = None) -> Path:
    """The cache folder holding the kernels of `derivation`, building it if missing or damaged."""
    root = Path(root) if root is not None else cache_dir()
    name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in derivation.spec.name)
    folder = root / f"{name}-{spec_hash(derivation.spec)[:20]}"
    if cache_entry_ok(folder):
        return folder
    files = render(derivation)
    for fname in ("derivation.md", "kernels.py"):
        write_text(folder / fname, files[fname])
    # the stamp last: an entry without a matching stamp is rebuilt
    write_text(folder / "kernels.py.sha256", _digest(files["kernels.py"]) + "\n")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m designmodel.codegen.emit", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(GENERATED), help="folder to write (default: generated/)")
    ap.add_argument("--check", action="store_true", help="compare with the folder instead of writing")
    args = ap.parse_args(argv)
    if args.check:
        from designmodel.derive import derive
        stale = []
        for n in zoo_models():
            for fname, text in render(derive(n)).items():
                path = Path(args.out) / n / fname
                if not path.exists() or path.read_text(encoding="utf-8") != text:
                    stale.append(str(path))
        for s in stale:
            print(f"out of date: {s}")
        return 1 if stale else 0
    for folder in write_zoo(Path(args.out)):
        print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
