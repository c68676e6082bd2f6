"""sympy -> Triton expressions.

A derivation's per-token scalars (the log-decay, the reset gain c / (c |k|^2 + r), ...) are
sympy expressions over the spec's inputs. `TritonPrinter` prints them as Triton code over
register blocks: every input symbol is replaced by the name of the block that holds it
(`b_g`, `b_beta[:, None]`, ...), chosen by the caller, and the functions of the spec
language map to `tl.*` calls or to the small numerically stable helpers that every
generated module defines (`softplus`, `logsigmoid`).

    >>> from designmodel.spec import Input, sigmoid
    >>> a = Input("a")
    >>> triton_code(sp.log(sigmoid(a)), {a: "b_a"})
    'logsigmoid(b_a)'
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.precedence import precedence
from sympy.printing.pycode import PythonCodePrinter

from designmodel.spec import logsigmoid, sigmoid, softplus

# Helpers every generated module defines (see templates/common/helpers.py.j2).
HELPERS = ("softplus", "logsigmoid")


class TritonPrinter(PythonCodePrinter):
    """Print a scalar sympy expression as a Triton expression over register blocks.

    names: maps each free symbol to the code that reads it (a register block, possibly
    broadcast, e.g. "b_beta[:, None]"). A symbol without a name is an error: a kernel must
    never see a stray symbol.
    """

    printmethod = "_tritoncode"
    language = "Triton"

    _kf = {
        "exp": "tl.exp",
        "log": "tl.log",
        "sqrt": "tl.sqrt",
        "Abs": "tl.abs",
        "sigmoid": "tl.sigmoid",
        "softplus": "softplus",
        "logsigmoid": "logsigmoid",
        "Max": "tl.maximum",
        "Min": "tl.minimum",
    }

    def __init__(self, names: dict, settings=None):
        super().__init__(settings or {})
        self.names = {sym: code for sym, code in names.items()}

    # --- leaves ---------------------------------------------------------------------------
    def _print_Symbol(self, expr):
        if expr in self.names:
            return self.names[expr]
        raise ValueError(f"no register block for symbol {expr} (known: "
                         f"{', '.join(sorted(str(s) for s in self.names))})")

    _print_Dummy = _print_Symbol

    def _print_Integer(self, expr):
        return f"{float(expr.p)!r}"

    def _print_Rational(self, expr):
        return repr(float(expr.p) / float(expr.q))

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Half(self, expr):
        return "0.5"

    def _print_One(self, expr):
        return "1.0"

    def _print_Zero(self, expr):
        return "0.0"

    def _print_NegativeOne(self, expr):
        return "-1.0"

    def _print_Exp1(self, expr):
        return repr(float(sp.E))

    def _print_Pi(self, expr):
        return repr(float(sp.pi))

    # --- functions --------------------------------------------------------------------------
    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in self._kf:
            return f"{self._kf[name]}({', '.join(self._print(a) for a in expr.args)})"
        raise ValueError(f"{name} has no Triton translation")

    def _call(self, fn: str, *args: str) -> str:
        """The target's function `fn` (a key of _kf) applied to printed arguments."""
        return f"{self._kf[fn]}({', '.join(args)})"

    def _print_exp(self, expr):
        return self._call("exp", self._print(expr.args[0]))

    def _print_log(self, expr):
        arg = expr.args[0]
        # log(sigmoid(x)) and log(exp(x)) have stable closed forms.
        if isinstance(arg, sigmoid):
            return self._call("logsigmoid", self._print(arg.args[0]))
        if isinstance(arg, sp.exp):
            return self._print(arg.args[0])
        return self._call("log", self._print(arg))

    def _print_sigmoid(self, expr):
        return self._call("sigmoid", self._print(expr.args[0]))

    def _print_softplus(self, expr):
        return self._call("softplus", self._print(expr.args[0]))

    def _print_logsigmoid(self, expr):
        return self._call("logsigmoid", self._print(expr.args[0]))

    def parenthesize(self, item, level, strict=False):
        """As sympy's, but an integer power printed as a product (x * x) is parenthesized
        wherever it is an operand: sympy ranks a power above a product, and in a denominator
        a / x * x would divide by x only."""
        if isinstance(item, sp.Pow) and item.exp.is_Integer and 1 < abs(item.exp) <= 4:
            return f"({self._print(item)})"
        return super().parenthesize(item, level, strict)

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        if base == sp.E:
            return self._call("exp", self._print(e))
        b = self.parenthesize(base, precedence(expr), strict=False)
        if e.is_Integer and 0 < e <= 4:
            return " * ".join([b] * int(e)) if e > 1 else b
        if e.is_Integer and -4 <= e < 0:
            return f"1.0 / ({' * '.join([b] * int(-e))})"
        if e == sp.S.Half:
            return self._call("sqrt", self._print(base))
        if e == -sp.S.Half:
            return f"1.0 / {self._call('sqrt', self._print(base))}"
        # x**e = exp(e log x); the bounds checks of the spec keep x > 0 here.
        return self._call("exp", f"{self._print(e)} * {self._call('log', self._print(base))}")

    def _print_Abs(self, expr):
        return self._call("Abs", self._print(expr.args[0]))

    def _print_Max(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = self._call("Max", out, self._print(a))
        return out

    def _print_Min(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = self._call("Min", out, self._print(a))
        return out

    def _print_Piecewise(self, expr):
        raise ValueError("piecewise expressions have no Triton translation")


def _fold_numbers(expr):
    """Every symbol-free subexpression (sqrt(2), log(3), ...) as one float constant."""
    if expr.is_number and not expr.is_Number:
        return sp.Float(sp.N(expr, 17))
    if not expr.args or expr.is_Atom:
        return expr
    return expr.func(*[_fold_numbers(a) for a in expr.args])


def triton_code(expr, names: dict) -> str:
    """`expr` as Triton code, each symbol read through `names`."""
    return TritonPrinter(names).doprint(_fold_numbers(sp.sympify(expr)))


class TorchPrinter(TritonPrinter):
    """Print a scalar sympy expression as PyTorch code over tensors (the launcher's prior
    covariance): the Triton printer with the functions mapped to torch's."""

    printmethod = "_torchcode"
    language = "PyTorch"

    _kf = {
        "exp": "torch.exp",
        "log": "torch.log",
        "sqrt": "torch.sqrt",
        "Abs": "torch.abs",
        "sigmoid": "torch.sigmoid",
        "softplus": "torch.nn.functional.softplus",
        "logsigmoid": "torch.nn.functional.logsigmoid",
        "Max": "torch.maximum",
        "Min": "torch.minimum",
    }


def torch_code(expr, names: dict) -> str:
    """`expr` as PyTorch code, each symbol read through `names`."""
    return TorchPrinter(names).doprint(_fold_numbers(sp.sympify(expr)))


__all__ = ["TritonPrinter", "TorchPrinter", "triton_code", "torch_code", "HELPERS"]
