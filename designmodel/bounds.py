"""Interval bounds of a spec's expressions, from the domains of its inputs.

The checks of a spec ("the decay lies in (0, 1]", "the noise is > 0") are questions about the
range of an expression over the inputs' domains. sympy's assumptions cannot answer "<= 1",
and its AccumBounds are closed, so (0, 1) - (0, 1) would admit 0. This is a small interval
arithmetic with open and closed ends; it is conservative (an expression that uses an input
twice may get a wider interval than its true range), never optimistic.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

oo = sp.oo


@dataclass(frozen=True)
class Bounds:
    """The interval (lo, hi), each end open or closed."""

    lo: sp.Expr
    hi: sp.Expr
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self):
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    @property
    def positive(self) -> bool:
        """Every point is > 0."""
        return self.lo > 0 or (self.lo == 0 and self.lo_open)

    def contains_zero(self) -> bool:
        """0 lies in the interval."""
        above = self.lo < 0 or (self.lo == 0 and not self.lo_open)
        below = self.hi > 0 or (self.hi == 0 and not self.hi_open)
        return above and below


def domain_bounds(domain: str) -> Bounds:
    """The interval of an input's domain."""
    return {
        "real": Bounds(-oo, oo, True, True),
        "positive": Bounds(sp.Integer(0), oo, True, True),
        "nonnegative": Bounds(sp.Integer(0), oo, False, True),
        "unit": Bounds(sp.Integer(0), sp.Integer(1), True, True),
        "logdecay": Bounds(-oo, sp.Integer(0), True, False),
    }[domain]


def _point(x) -> Bounds:
    return Bounds(x, x, False, False)


def _add(a: Bounds, b: Bounds) -> Bounds:
    return Bounds(a.lo + b.lo, a.hi + b.hi, a.lo_open or b.lo_open, a.hi_open or b.hi_open)


def _mul(a: Bounds, b: Bounds) -> Bounds:
    # Products of the ends, each with its openness; 0 * oo is taken as 0 (a closed end at 0).
    cands = []
    for x, xo in ((a.lo, a.lo_open), (a.hi, a.hi_open)):
        for y, yo in ((b.lo, b.lo_open), (b.hi, b.hi_open)):
            if (x == 0 and not xo) or (y == 0 and not yo):
                cands.append((sp.Integer(0), False))
            elif x == 0 or y == 0:
                cands.append((sp.Integer(0), True))
            else:
                cands.append((x * y, xo or yo))
    lo = min(v for v, _ in cands)
    hi = max(v for v, _ in cands)
    lo_open = all(o for v, o in cands if v == lo)
    hi_open = all(o for v, o in cands if v == hi)
    return Bounds(lo, hi, lo_open, hi_open)


def _monotone(f, b: Bounds) -> Bounds:
    return Bounds(f(b.lo), f(b.hi), b.lo_open, b.hi_open)


def _reciprocal(b: Bounds) -> Bounds:
    if b.contains_zero():
        raise ValueError(f"divides by a quantity that can be 0 (it lies in {b})")
    if b.lo == 0:  # (0, hi]
        return Bounds(1 / b.hi, oo, b.hi_open, True)
    if b.hi == 0:  # [lo, 0)
        return Bounds(-oo, 1 / b.lo, True, b.lo_open)
    return Bounds(1 / b.hi, 1 / b.lo, b.hi_open, b.lo_open)


def _pow(base: Bounds, e: sp.Expr) -> Bounds:
    if not e.is_number:
        raise ValueError("exponents must be numbers")
    if e.is_integer and e > 0:
        out = base
        for _ in range(int(e) - 1):
            out = _mul(out, base)
        if int(e) % 2 == 0 and out.lo < 0:  # even power of an interval across 0
            hi = max(abs(base.lo), abs(base.hi)) ** e
            return Bounds(sp.Integer(0), hi, False, True if hi == oo else out.hi_open)
        return out
    if e.is_integer and e < 0:
        return _reciprocal(_pow(base, -e))
    if base.lo < 0:
        raise ValueError(f"takes a fractional power of a quantity that can be negative ({base})")
    if e > 0:
        return _monotone(lambda x: x ** e, base)
    return _reciprocal(_monotone(lambda x: x ** (-e), base))


def _log(b: Bounds) -> Bounds:
    if not b.positive:
        raise ValueError(f"takes the log of a quantity that can be <= 0 (it lies in {b})")
    return _monotone(sp.log, b)


def _sigmoid(x):
    return 1 / (1 + sp.exp(-x)) if x not in (oo, -oo) else (sp.Integer(1) if x == oo else sp.Integer(0))


def bounds(expr: sp.Expr) -> Bounds:
    """The interval in which `expr` lies when each input ranges over its domain."""
    from designmodel.spec import Input, logsigmoid, sigmoid, softplus

    if isinstance(expr, Input):
        return expr.bounds
    if expr.is_number:
        if not expr.is_real:
            raise ValueError("is not a real number")
        return _point(expr)
    if isinstance(expr, sp.Add):
        out = bounds(expr.args[0])
        for a in expr.args[1:]:
            out = _add(out, bounds(a))
        return out
    if isinstance(expr, sp.Mul):
        out = bounds(expr.args[0])
        for a in expr.args[1:]:
            out = _mul(out, bounds(a))
        return out
    if isinstance(expr, sp.Pow):
        base, e = expr.args
        if base == sp.E:
            return _monotone(sp.exp, bounds(e))
        return _pow(bounds(base), e)
    monotone = {sp.exp: sp.exp, sigmoid: _sigmoid, logsigmoid: lambda x: sp.log(_sigmoid(x)) if x != -oo else -oo,
                softplus: lambda x: sp.log(1 + sp.exp(x)) if x != oo else oo}
    if expr.func in monotone:
        return _monotone(monotone[expr.func], bounds(expr.args[0]))
    if expr.func == sp.log:
        return _log(bounds(expr.args[0]))
    raise ValueError(f"uses {expr.func}, which is not an admitted function")
