"""Command line: designmodel derive | zoo | check | compile.

Every user error (a bad spec, a missing file) is printed as one line `error: part: problem`
with exit status 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import sys

from designmodel.codegen.plan import PlanError
from designmodel.spec import SpecError


def _parse_filter(text: str | None):
    """`exact`, `reset` or `reset:C` (C a number) from the command line."""
    from designmodel.spec import reset
    if text is None:
        return None
    if text.startswith("reset:"):
        try:
            return reset(float(text.split(":", 1)[1]))
        except ValueError:
            raise SpecError("filter", f"reset:C takes a number, got {text!r}") from None
    return text


def cmd_derive(args) -> int:
    """Print the derivation as Markdown, with its sympy proofs on request."""
    from designmodel.derive import derive
    d = derive(args.spec, filter=_parse_filter(args.filter))
    text = d.to_markdown()
    if args.prove:
        from designmodel.proofs import applicable
        text += "\n## Proofs (sympy)\n\n" + "\n".join(f"- {p}" for p in applicable(d)) + "\n"
    if args.save:
        from designmodel.specfile import save
        save(d.spec, args.save)
    print(text, end="")
    return 0


def cmd_zoo(args) -> int:
    """List the zoo with each model's update, and draw the relation graph."""
    from designmodel import zoo
    from designmodel.derive import derive
    from designmodel.graph import relation_svg, relation_text
    for name in zoo.NAMES:
        d = derive(name)
        print(f"{name:20s} {d.structure.one_line()}")
        print(f"{'':20s} {d.one_line()}")
    print()
    print(relation_text(zoo.relations()))
    if args.graph:
        from designmodel.atomic import write_text
        write_text(args.graph, relation_svg(zoo.relations()))
        print(f"\nwrote {args.graph}")
    return 0


def cmd_check(args) -> int:
    """Derive, prove, and check the float64 references (and kernels where available)."""
    from designmodel.check import check
    rows = check(args.spec, seed=args.seed)
    width = max(len(r[0]) for r in rows)
    for what, ok, detail in rows:
        print(f"{what:{width}s}  {'pass' if ok else ('FAIL' if ok is False else 'skip')}  {detail}")
    return 0 if all(ok is not False for _, ok, _ in rows) else 1


def cmd_compile(args) -> int:
    """Emit a spec's kernels, its derivation, the spec itself and a layer module into a folder."""
    from pathlib import Path

    from designmodel.atomic import write_text
    from designmodel.codegen import emit
    from designmodel.derive import derive
    from designmodel.specfile import dumps
    d = derive(args.spec, filter=_parse_filter(args.filter))
    out = Path(args.out)
    # render plans first: a spec these kernels cannot implement fails there, before any write
    files = dict(emit.render(d))
    files["spec.toml"] = dumps(d.spec)
    files["layer.py"] = layer_source(d.spec.name)
    # the folder is a package exporting the kernels' forward and the layer
    files["__init__.py"] = (f'"""{d.spec.name}: compiled by designmodel ({d.structure.family} family)."""\n'
                            "from .kernels import forward\nfrom .layer import layer\n\n"
                            '__all__ = ["forward", "layer"]\n')
    for name, text in sorted(files.items()):
        write_text(out / name, text)
    print(f"wrote {out}: {', '.join(sorted(files))}")
    print(f"load it with designmodel.codegen.runtime.load_file({str(out / 'kernels.py')!r}), "
          f"or designmodel.compile({str(out / 'spec.toml')!r}); "
          f"{out.name}.layer(hidden_size, num_heads, head_dim) builds the nn.Module")
    return 0


def layer_source(name: str) -> str:
    """The text of a compiled folder's layer.py: builds the spec's DesignLayer from spec.toml."""
    name = " ".join(name.replace("\\", "/").replace('"', "'").split())  # safe in a docstring
    return (f'"""The sequence layer of {name}: an nn.Module built from this folder\'s spec.toml.\n\n'
            "Written by `designmodel compile`. With the folder's parent on sys.path:\n\n"
            "    from DIR import layer\n"
            "    module = layer(hidden_size=64, num_heads=2, head_dim=16)\n"
            '"""\n'
            "from pathlib import Path\n\n"
            "import designmodel\n\n"
            'SPEC = Path(__file__).resolve().parent / "spec.toml"\n\n\n'
            "def layer(hidden_size: int, num_heads: int, head_dim: int, **options):\n"
            '    """A designmodel.layers.DesignLayer of this spec (options as DesignLayer\'s)."""\n'
            "    return designmodel.compile(str(SPEC)).module(hidden_size, num_heads, head_dim, **options)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `designmodel` command."""
    p = argparse.ArgumentParser(prog="designmodel", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("derive", help="derive a spec's filter and print it as Markdown")
    d.add_argument("spec", help="a zoo name, a .py file defining `model`, or a .toml spec")
    d.add_argument("--filter", help="exact, reset, or reset:C (default: the spec's own)")
    d.add_argument("--prove", action="store_true", help="append the sympy proofs that apply")
    d.add_argument("--save", metavar="FILE.toml", help="also save the spec as TOML")
    d.set_defaults(func=cmd_derive)
    z = sub.add_parser("zoo", help="list the built-in models and how they relate")
    z.add_argument("--graph", metavar="FILE.svg", help="also draw the relation graph as SVG")
    z.set_defaults(func=cmd_zoo)
    c = sub.add_parser("check", help="derive, prove and check a spec numerically")
    c.add_argument("spec")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_check)
    k = sub.add_parser("compile", help="write a spec's kernels, derivation, spec file and layer module to a folder")
    k.add_argument("spec")
    k.add_argument("-o", "--out", required=True, metavar="DIR")
    k.add_argument("--filter", help="exact, reset, or reset:C (default: the spec's own)")
    k.set_defaults(func=cmd_compile)
    return p


def main(argv=None) -> int:
    """Entry point of the `designmodel` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PlanError as err:
        print(f"error: plan: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
