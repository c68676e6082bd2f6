"""Structured matrices on sympy: the symbols of one token's update and how to make them explicit.

The derivation works over matrix expressions of symbolic size (K keys, V values), so that one
derivation holds for every head dimension. A per-key quantity (a per-key gate exp(g), a
diagonal process noise) is a `PerKey` vector and enters as `Diag(...)`; a quantity such as
k^T P k is a `QuadraticForm`, a scalar. `explicit(...)` turns any such expression into an
explicit sympy Matrix at a concrete (K, V), which is how proofs and numeric checks read it.
"""
from __future__ import annotations

import sympy as sp

K, V = sp.symbols("K V", integer=True, positive=True)

# One token's symbols: the memory before the token, its key-side covariance, and the inputs.
S = sp.MatrixSymbol("S_{t-1}", K, V)   # posterior mean after the previous token (fla layout)
P = sp.MatrixSymbol("P_{t-1}", K, K)   # its key-side covariance
k = sp.MatrixSymbol("k_t", K, 1)
q = sp.MatrixSymbol("q_t", K, 1)
v = sp.MatrixSymbol("v_t", V, 1)
KEY_NORM2 = sp.Symbol(r"\|k_t\|^{2}", positive=True)   # k^T k, which the simplifier may set to 1

BASE = (S, P, k, q, v)


class PerKey(sp.MatrixExpr):
    """The K-vector whose m-th entry is `expr` with every per-key input taken at index m."""

    def __new__(cls, expr, n=K):
        return sp.Basic.__new__(cls, sp.sympify(expr), sp.sympify(n))

    @property
    def expr(self):
        return self.args[0]

    @property
    def shape(self):
        return (self.args[1], sp.Integer(1))

    def _entry(self, i, j, **kwargs):
        return self.expr.xreplace({x: indexed(x, i) for x in per_key_symbols(self.expr)})

    def _latex(self, printer):
        return r"\boldsymbol{%s}" % printer._print(self.expr)

    def _sympystr(self, printer):
        return "[%s]_key" % printer._print(self.expr)


class Diag(sp.MatrixExpr):
    """diag(x) of a K-vector x (symmetric, so its own transpose)."""

    def __new__(cls, vector):
        return sp.Basic.__new__(cls, vector)

    @property
    def shape(self):
        n = self.args[0].shape[0]
        return (n, n)

    def _entry(self, i, j, **kwargs):
        return sp.KroneckerDelta(i, j) * self.args[0]._entry(i, 0)

    def _eval_transpose(self):
        return self

    def _latex(self, printer):
        return r"\operatorname{diag}\left(%s\right)" % printer._print(self.args[0])

    def _sympystr(self, printer):
        return "diag(%s)" % printer._print(self.args[0])


class QuadraticForm(sp.Expr):
    """The scalar x^T M y of column vectors x, y."""

    is_commutative = True

    def __new__(cls, x, m, y):
        return sp.Expr.__new__(cls, x, m, y)

    def _latex(self, printer):
        x, m, y = (printer._print(a) for a in self.args)
        return f"{x}^{{T}} {m} {y}" if self.args[1] != sp.Identity(K) else f"{x}^{{T}} {y}"

    def _sympystr(self, printer):
        x, m, y = (printer._print(a) for a in self.args)
        return f"{x}'({m}){y}" if self.args[1] != sp.Identity(K) else f"{x}'{y}"

    def evaluate(self):
        """(x^T M y)[0, 0] once x, M, y are explicit."""
        x, m, y = self.args
        return (sp.Matrix(x).T * sp.Matrix(m) * sp.Matrix(y))[0, 0]


def per_key_symbols(expr):
    """The per-key inputs an expression uses."""
    from designmodel.spec import Input
    return [s for s in expr.free_symbols if isinstance(s, Input) and s.per == "key"]


def indexed(x, i) -> sp.Indexed:
    """The m-th entry of a per-key input, `g[m]` (an Indexed, so symbolic sums can expand it)."""
    return sp.IndexedBase(x.name, **_base_assumptions(x))[i]


def _base_assumptions(x) -> dict:
    keep = ("real", "positive", "nonnegative", "nonpositive")
    return {a: v for a, v in x.assumptions0.items() if a in keep and v}


def per_key(expr, n=K):
    """A scalar expression as the operator it stands for: expr I, or Diag(PerKey(expr))."""
    if per_key_symbols(expr):
        return Diag(PerKey(expr, n))
    return expr * sp.Identity(n)


def explicit_symbols(key_dim: int, value_dim: int) -> dict:
    """Explicit symbolic matrices for the base symbols, for proofs at a concrete size."""
    sym = lambda name, r, c: sp.Matrix(r, c, lambda i, j: sp.Symbol(f"{name}{i}{j}" if c > 1 else f"{name}{i}"))
    pm = sp.Matrix(key_dim, key_dim, lambda i, j: sp.Symbol(f"p{min(i, j)}{max(i, j)}"))  # symmetric
    return {S: sym("s", key_dim, value_dim), P: pm, k: sym("k", key_dim, 1),
            q: sym("q", key_dim, 1), v: sym("v", value_dim, 1)}


def explicit(expr, values: dict, key_dim: int, value_dim: int):
    """`expr` at size (key_dim, value_dim) with the base symbols replaced by `values`.

    values maps base MatrixSymbols to explicit matrices and may also map scalar symbols
    (inputs, indexed per-key symbols, KEY_NORM2) to numbers or expressions.
    """
    sized = {b: b.subs({K: key_dim, V: value_dim}) for b in BASE}
    e = sp.sympify(expr).subs({K: key_dim, V: value_dim})
    e = e.xreplace({sized[b]: sp.ImmutableMatrix(m) for b, m in values.items() if b in sized and m is not None})
    e = e.replace(lambda n: isinstance(n, QuadraticForm), lambda n: n.evaluate())
    if isinstance(e, sp.MatrixExpr) or isinstance(e, sp.MatrixBase):
        e = sp.Matrix(e.as_explicit())
    # Per-key inputs become indexed symbols only when PerKey entries are expanded above.
    scalars = {s: val for s, val in values.items() if s not in sized}
    return e.xreplace(scalars) if scalars else e
