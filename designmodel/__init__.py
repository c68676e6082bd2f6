"""designmodel: a symbolic-to-kernel compiler for probabilistic sequence layers."""
from pathlib import Path as _Path

# Run from a checkout (PYTHONPATH=.), the pipeline's top-level folders (codegen/, generated/,
# templates/) are not inside this package; the installed distribution maps them in. Extend the
# package path so that `designmodel.codegen` resolves the same way in both cases.
_root = _Path(__file__).resolve().parent.parent
if (_root / "codegen" / "__init__.py").is_file() and str(_root) not in __path__:
    __path__.append(str(_root))

__version__ = "0.1.0"
from designmodel.codegen.compiler import compile  # noqa: E402,F401,A001  (designmodel.compile)
