"""Spec files: a DesignModel saved as plain TOML and read back without evaluating any code.

A spec file travels with a checkpoint or a paper, so it may come from anyone. Reading one
never runs Python and never calls sympy's string parsers (sympify / parse_expr call `eval`):
each expression is parsed with `ast.parse` and rebuilt node by node from a small grammar,
with limits on its size and on the numbers it can build, so a hostile file is refused with a
`SpecError` that names the part, instead of running code or exhausting the machine.

The schema (every table is required; optional keys and their defaults are listed below)::

    format = 1                         # optional; the version of this schema
    name = "gated_deltanet"
    description = "..."                # optional, default ""
    key_dim = 64                       # optional (and value_dim)

    [inputs]                           # every Input / Constant used by an expression
    g = { per = "head", domain = "logdecay", per_token = true }
    beta = { domain = "unit" }         # per defaults to "head", per_token to true

    [prior]
    mean = "zero"                      # or "given"
    covariance = "isotropic"           # "isotropic", "diagonal" or "full"
    value = "1"                        # isotropic: an expression; diagonal: an expression
                                       # or a list of them; full: a run-time name ("P0")
                                       # or a matrix as a list of rows of expressions
    [transition]
    decay = "exp(g)"                   # or map = "exp(g)*state" (linear in the state)
    noise = "0"                        # or "stationary"

    [observation]
    kind = "regression"                # or "write" (which has no noise)
    noise = "1 - beta"
    unit_keys = true                   # optional, default false

    [readout]
    timing = "posterior"               # or "prior"
    variance = false                   # optional, default false

    [filter]
    kind = "reset"                     # or "exact" (which has no other key)
    c = "beta"
    allow_gain_above_one = false       # optional, default false

Expressions are text in Python syntax: numbers, declared inputs, + - * / ** (numeric
exponents) and exp, log, sqrt, sigmoid, softplus, logsigmoid of one argument. A plain TOML
number is accepted where an expression is expected.

Limits (the MAX_* constants): 2000 characters and 400 operands and operations per expression,
50 levels of nesting, integer literals of 128 bits, exponents of magnitude 64, exact rationals
of 4096 bits, values (and interval ends over the inputs' domains) of magnitude 2^1024, full
prior matrices of 64 rows, files of 4 million characters.
"""
from __future__ import annotations

import ast
import keyword
import os
import re
import tempfile
import tomllib
import unicodedata
from functools import lru_cache
from pathlib import Path

import mpmath
import sympy as sp
from mpmath.ctx_iv import MPIntervalContext

from designmodel.spec import (FUNCTIONS, STATE, DesignModel, Exact, Input, Prior, Readout,
                              Regression, Reset, SpecError, Transition, Write, diagonal, full,
                              isotropic, logsigmoid, sigmoid, softplus)

__all__ = ["dumps", "save", "loads", "load", "parse_expression", "format_expression"]

FORMAT = 1
STATE_NAME = "state"          # how a transition map names the memory S_{t-1} in a file
MAX_FILE = 4_000_000          # characters of a whole file (a full prior matrix can be large)
MAX_TEXT = 2000               # characters of one expression
MAX_NODES = 400               # operands and operations (AST expression nodes) of one expression
MAX_DEPTH = 50                # AST depth; also bounds the recursion of the builder
MAX_INT_BITS = 128            # size of an integer literal
MAX_EXPONENT = 64             # |exponent| of a power
MAX_EXACT_BITS = 4096         # bound on the size of the exact rationals an expression builds
MAX_MAGNITUDE = mpmath.mpf(2) ** 1024   # bound on every finite value and interval end
MAX_MATRIX = 64               # rows of an explicit full prior (spec.py checks it exactly: slow)

_TABLES = ("inputs", "prior", "transition", "observation", "readout", "filter")
_TOP_KEYS = ("format", "name", "description", "key_dim", "value_dim") + _TABLES


# --- parsing expressions ----------------------------------------------------------------------

class _Refused(Exception):
    """Why an expression was refused; the caller turns it into a SpecError naming the part."""


def parse_expression(text: str, symbols: dict[str, sp.Symbol], part: str = "expression") -> sp.Expr:
    """The sympy expression written as `text`, whose names are looked up in `symbols`.

    Admits only numbers, the names in `symbols`, unary + and -, binary + - * / ** with
    numeric exponents, and exp/log/sqrt/sigmoid/softplus/logsigmoid of one argument.
    Nothing is evaluated: the text is parsed with `ast` and rebuilt node by node. Raises
    SpecError(part, reason) for anything else or for an expression too large to handle.
    """
    try:
        return _parse(text, symbols)
    except _Refused as err:
        raise SpecError(part, f"{err} in {_excerpt(text)}") from None


def _excerpt(text) -> str:
    text = str(text)
    return repr(text) if len(text) <= 60 else repr(text[:60]) + f"... ({len(text)} characters)"


def _parse(text, symbols) -> sp.Expr:
    if not isinstance(text, str):
        raise _Refused(f"expected an expression as text, got {_describe(text)}")
    if len(text) > MAX_TEXT:
        raise _Refused(f"the expression is {len(text)} characters long, more than the {MAX_TEXT} allowed")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        reason = getattr(err, "msg", None) or str(err) or type(err).__name__
        raise _Refused(f"not a valid expression ({reason})") from None
    _check_shape(tree)
    return _build(tree.body, symbols).expr


_ADMITTED = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.UnaryOp, ast.UAdd, ast.USub,
             ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Call)
_OPERATORS = {ast.Mod: "%", ast.FloorDiv: "//", ast.MatMult: "@", ast.LShift: "<<",
              ast.RShift: ">>", ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&",
              ast.Not: "not", ast.Invert: "~"}
_SYNTAX = {ast.Attribute: "attribute access", ast.Subscript: "subscripts",
           ast.Lambda: "lambda", ast.ListComp: "comprehensions", ast.SetComp: "comprehensions",
           ast.DictComp: "comprehensions", ast.GeneratorExp: "comprehensions",
           ast.Compare: "comparisons", ast.BoolOp: "'and' / 'or'",
           ast.IfExp: "conditional expressions (x if c else y)", ast.JoinedStr: "f-strings",
           ast.FormattedValue: "f-strings", ast.NamedExpr: "assignment expressions (:=)",
           ast.List: "lists", ast.Tuple: "tuples", ast.Set: "sets", ast.Dict: "dicts",
           ast.Starred: "starred arguments (*x)", ast.keyword: "keyword arguments",
           ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield", ast.Slice: "slices"}


def _check_shape(tree: ast.AST) -> None:
    # Iterative, so that a deeply nested tree is refused before anything recurses into it.
    stack, count = [(tree, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += isinstance(node, ast.expr)
        if count > MAX_NODES:
            raise _Refused(f"the expression has more than {MAX_NODES} operands and operations")
        if depth > MAX_DEPTH:
            raise _Refused(f"the expression is nested more than {MAX_DEPTH} levels deep")
        if not isinstance(node, _ADMITTED):
            raise _Refused(_not_admitted(node))
        stack.extend((child, depth + _deeper(node, child))
                     for child in reversed(list(ast.iter_child_nodes(node))))


def _deeper(node: ast.AST, child: ast.AST) -> int:
    # a + b + c is parsed as ((a + b) + c), but the builder reads such a chain in a loop
    # (_chain), so a long sum or product is one level deep, not one level per term.
    same_chain = _chain_kind(node) and child is node.left and _chain_kind(child) == _chain_kind(node)
    return 0 if same_chain else 1


def _chain_kind(node: ast.AST):
    if isinstance(node, ast.BinOp):
        return {ast.Add: "sum", ast.Sub: "sum", ast.Mult: "product", ast.Div: "product"}.get(type(node.op))
    return None


def _not_admitted(node: ast.AST) -> str:
    if type(node) in _OPERATORS:
        return f"the operator {_OPERATORS[type(node)]!r} is not allowed"
    what = _SYNTAX.get(type(node), f"Python syntax {type(node).__name__}")
    if isinstance(node, ast.Attribute):
        what += f" (.{node.attr})"
    return (f"{what}: not allowed; an expression has only numbers, declared inputs, "
            f"+ - * / **, and {', '.join(FUNCTIONS)} of one argument")


class _Node:
    """A built subexpression and a bound on the bits of the exact rationals it holds."""

    def __init__(self, expr: sp.Expr, bits: int):
        if bits > MAX_EXACT_BITS:
            raise _Refused(f"the expression builds numbers of more than {MAX_EXACT_BITS} bits")
        _endpoints(expr)  # refuses values too large to check, before anything builds on them
        self.expr, self.bits = expr, bits


def _build(node: ast.AST, symbols) -> _Node:
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.Name):
        return _name(node.id, symbols)
    if isinstance(node, ast.UnaryOp):
        inner = _build(node.operand, symbols)
        if isinstance(node.op, ast.UAdd):
            return inner
        return _Node(sp.Mul(sp.Integer(-1), inner.expr), inner.bits + 1)
    if isinstance(node, ast.BinOp):
        return _binop(node, symbols)
    if isinstance(node, ast.Call):
        return _call(node, symbols)
    raise _Refused(_not_admitted(node))  # not reached: _check_shape admits only the above


def _constant(value) -> _Node:
    if isinstance(value, bool) or value is None or value is ...:
        raise _Refused(f"{value!r} is not a number")
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise _Refused(f"the integer literal has more than {MAX_INT_BITS} bits")
        return _Node(sp.Integer(value), max(1, value.bit_length()))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _Refused(f"{value!r} is not a finite number")
        return _Node(sp.Float(value), 53)
    if isinstance(value, complex):
        raise _Refused("complex numbers are not allowed")
    kind = {str: "strings", bytes: "bytes"}.get(type(value), f"{type(value).__name__} literals")
    raise _Refused(f"{kind} are not allowed, only numbers")


def _name(name: str, symbols) -> _Node:
    if name in symbols:
        return _Node(symbols[name], 1)
    if name in FUNCTIONS:
        raise _Refused(f"the function {name} must be called with one argument, as {name}(x)")
    if name.startswith("__"):
        raise _Refused(f"the name {name} is not allowed")
    declared = ", ".join(sorted(symbols)) or "none"
    raise _Refused(f"unknown name {name!r}: it is not a declared input (declared: {declared}) "
                   f"nor one of the functions {', '.join(FUNCTIONS)}")


def _binop(node: ast.BinOp, symbols) -> _Node:
    if isinstance(node.op, ast.Pow):
        return _power(node, symbols)
    if isinstance(node.op, (ast.Add, ast.Sub)):
        terms = [_term(t, minus, symbols) for t, minus in _chain(node, (ast.Add, ast.Sub), ast.Sub)]
        return _combine(sp.Add, terms)
    if isinstance(node.op, (ast.Mult, ast.Div)):
        chain = _chain(node, (ast.Mult, ast.Div), ast.Div)
        return _combine(sp.Mul, [f for t, inverse in chain for f in _factors(t, inverse, symbols)])
    raise _Refused(_not_admitted(node.op))


def _chain(node: ast.AST, ops, inverse) -> list[tuple[ast.AST, bool]]:
    """The operands of a chain a op b op c ..., each with whether it is subtracted (divided)."""
    # sympy's canonical sums and products come from one n-ary Add or Mul: building
    # 4*(r + 1)/beta pairwise would distribute the 4 over the sum, which Mul(4, r + 1, 1/beta)
    # keeps, so the text would not read back equal.
    out = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ops):
        out.append((node.right, isinstance(node.op, inverse)))
        node = node.left
    out.append((node, False))
    return out[::-1]


def _term(node: ast.AST, minus: bool, symbols) -> _Node:
    built = _build(node, symbols)
    return _Node(sp.Mul(sp.Integer(-1), built.expr), built.bits + 1) if minus else built


def _factors(node: ast.AST, inverse: bool, symbols) -> list[_Node]:
    # A minus sign on a factor is a factor -1 of the product, as sympy prints -(r + 1)/beta.
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return [_Node(sp.Integer(-1), 1)] + _factors(node.operand, inverse, symbols)
    built = _build(node, symbols)
    if not inverse:
        return [built]
    if built.expr.is_zero:
        raise _Refused("division by zero")
    return [_Node(sp.Pow(built.expr, sp.Integer(-1)), built.bits)]


def _combine(op, nodes: list[_Node]) -> _Node:
    # Sums of rationals multiply denominators, so the bits of the operands add.
    return _Node(op(*(n.expr for n in nodes)), sum(n.bits for n in nodes))


def _power(node: ast.BinOp, symbols) -> _Node:
    # sympy computes Integer**Integer at once, so the exponent is checked before the Pow exists.
    e = _build(node.right, symbols)
    if not e.expr.is_Number:
        raise _Refused(f"the exponent {e.expr!s} is not a number")
    if abs(e.expr) > MAX_EXPONENT:
        raise _Refused(f"the exponent {e.expr!s} is larger than {MAX_EXPONENT} in magnitude")
    base = _build(node.left, symbols)
    if base.expr.is_zero and e.expr < 0:
        raise _Refused("division by zero")
    bits = base.bits * max(1, int(abs(e.expr)) + 1) + e.bits
    if bits > MAX_EXACT_BITS:  # checked before sympy computes the power
        raise _Refused(f"the power builds numbers of more than {MAX_EXACT_BITS} bits")
    return _Node(sp.Pow(base.expr, e.expr), bits)


def _call(node: ast.Call, symbols) -> _Node:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in FUNCTIONS:
        called = name or type(node.func).__name__
        raise _Refused(f"calling {called} is not allowed: only {', '.join(FUNCTIONS)} can be called")
    if node.keywords or len(node.args) != 1:
        raise _Refused(f"{name} takes exactly one argument, got {len(node.args)} "
                       f"and {len(node.keywords)} keyword arguments")
    arg = _build(node.args[0], symbols)
    return _Node(FUNCTIONS[name](arg.expr), arg.bits)


# --- the magnitude guard ------------------------------------------------------------------------
#
# Validating a spec compares interval ends (bounds.py) with sympy, which evaluates numbers to
# the precision it needs; exp(-exp(exp(64))) needs about 10^28 bits and never returns. So
# every subexpression is first bounded here the way bounds.py bounds it, with each finite end
# enclosed by rigorous interval arithmetic, and refused if some end can exceed 2^1024 or is too
# close to 0 for a division to be bounded. Infinite ends (from the inputs' domains) are exact.

_IV = MPIntervalContext()
_IV.prec = 128
_INF, _NINF = _IV.mpf(["inf", "inf"]), _IV.mpf(["-inf", "-inf"])
_ZERO = _IV.mpf(0)


def _ends(x):
    return mpmath.mpf(x._mpi_[0]), mpmath.mpf(x._mpi_[1])


def _is_inf(x) -> bool:
    a, b = _ends(x)
    return a == b and mpmath.isinf(a)


def _sign(x):
    """+1 or -1 when the enclosure excludes 0, 0 when it is exactly 0, None when unsure."""
    a, b = _ends(x)
    return 1 if a > 0 else -1 if b < 0 else 0 if a == b == 0 else None


def _checked(x):
    if _is_inf(x):
        return x
    a, b = _ends(x)
    if mpmath.isinf(a) or mpmath.isinf(b) or mpmath.isnan(a) or mpmath.isnan(b):
        raise _Refused("a value of the expression cannot be bounded (it divides by a quantity "
                       "too close to 0 to check)")
    if max(abs(a), abs(b)) > MAX_MAGNITUDE:
        raise _Refused("a value of the expression can exceed 2^1024, too large to check")
    return x


def _lowest(xs):
    return _IV.mpf([min(_ends(x)[0] for x in xs), min(_ends(x)[1] for x in xs)])


def _highest(xs):
    return _IV.mpf([max(_ends(x)[0] for x in xs), max(_ends(x)[1] for x in xs)])


def _times(x, y):
    if _sign(x) == 0 or _sign(y) == 0:
        return _ZERO  # as bounds.py: a zero end times an infinite one is 0
    return _checked(x * y)


def _inverse(x):
    """1/x for an end of known sign (never the exact 0: the callers take that side apart)."""
    if _sign(x) is None:
        raise _Refused("the expression divides by a quantity too close to 0 to check")
    return _ZERO if _is_inf(x) else _checked(1 / x)


@lru_cache(maxsize=4096)
def _endpoints(expr: sp.Expr):
    """Enclosures of the ends of bounds(expr), or _Refused when they are too large to check."""
    if isinstance(expr, Input):
        lo, hi = {"real": (_NINF, _INF), "positive": (_ZERO, _INF), "nonnegative": (_ZERO, _INF),
                  "unit": (_ZERO, _IV.mpf(1)), "logdecay": (_NINF, _ZERO)}[expr.domain]
        return lo, hi
    if expr == STATE:
        return _NINF, _INF
    if expr.is_number:
        x = _checked(_number(expr))
        return x, x
    if isinstance(expr, (sp.Add, sp.Mul)):
        out = _endpoints(expr.args[0])
        for arg in expr.args[1:]:
            out = _interval_op(expr, out, _endpoints(arg))
        return out
    if isinstance(expr, sp.Pow) and expr.args[1].is_Number:
        return _interval_pow(_endpoints(expr.args[0]), expr.args[1])
    if expr.func in _MONOTONE:
        lo, hi = _endpoints(expr.args[0])
        if expr.func == sp.log and _sign(lo) not in (0, 1):
            return _NINF, _INF  # bounds.py refuses the log of a quantity that can be <= 0
        return _checked(_MONOTONE[expr.func](lo)), _checked(_MONOTONE[expr.func](hi))
    raise _Refused(f"{expr} is not an admitted expression")


def _interval_op(expr, a, b):
    if isinstance(expr, sp.Add):
        return _checked(a[0] + b[0]), _checked(a[1] + b[1])
    products = [_times(x, y) for x in a for y in b]
    return _lowest(products), _highest(products)


def _integer(e: sp.Expr):
    """e as an int when it is an integer (2.0 included, as bounds.py may treat it), else None."""
    if e.is_Integer or (e.is_Float and float(e).is_integer()):
        return int(e)
    return None


def _interval_pow(base, e):
    lo, hi = base
    n = _integer(e)
    if n == 0:
        return _IV.mpf(1), _IV.mpf(1)
    if n is not None and n > 0:
        if _sign(lo) in (0, 1) or _sign(hi) in (0, -1):  # one sign: the ends map to the ends
            ends = [_checked(lo ** n), _checked(hi ** n)]
            return _lowest(ends), _highest(ends)
        top = _checked(_highest([abs(lo), abs(hi)]) ** n)  # across 0: as wide as bounds.py can be
        return -top, top
    if n is not None or e < 0:
        return _interval_reciprocal(_interval_pow(base, -e))
    if _sign(lo) not in (0, 1):
        return _NINF, _INF  # bounds.py refuses a fractional power of what can be negative
    power = _number(e)
    return tuple(x if _is_inf(x) or _sign(x) == 0 else _checked(_IV.exp(power * _IV.log(x)))
                 for x in (lo, hi))


def _interval_reciprocal(ends):
    lo, hi = ends
    s_lo, s_hi = _sign(lo), _sign(hi)
    if s_lo == 1 or s_hi == -1:
        return _inverse(hi), _inverse(lo)
    if s_lo == 0 and s_hi == 1:
        return _inverse(hi), _INF
    if s_hi == 0 and s_lo == -1:
        return _NINF, _inverse(lo)
    if s_lo == -1 and s_hi == 1:
        return _NINF, _INF  # bounds.py refuses a division by what can be 0
    raise _Refused("the expression divides by a quantity too close to 0 to check")


def _pos_inf(x) -> bool:
    return _is_inf(x) and _sign(x) == 1


def _neg_inf(x) -> bool:
    return _is_inf(x) and _sign(x) == -1


def _iv_exp(x):
    return _INF if _pos_inf(x) else _ZERO if _neg_inf(x) else _IV.exp(x)


def _iv_sigmoid(x):
    return _IV.mpf(1) if _pos_inf(x) else _ZERO if _neg_inf(x) else 1 / (1 + _IV.exp(-x))


def _iv_softplus(x):
    return _INF if _pos_inf(x) else _ZERO if _neg_inf(x) else _IV.log(1 + _IV.exp(x))


def _iv_logsigmoid(x):
    return _NINF if _neg_inf(x) else _ZERO if _pos_inf(x) else -_IV.log(1 + _IV.exp(-x))


def _iv_log(x):
    return _NINF if _sign(x) == 0 else _INF if _pos_inf(x) else _IV.log(x)


_MONOTONE = {sp.exp: _iv_exp,
             sp.log: _iv_log, sigmoid: _iv_sigmoid, softplus: _iv_softplus,
             logsigmoid: _iv_logsigmoid}


def _number(expr: sp.Expr):
    """A rigorous enclosure of a number built by the parser."""
    if expr.is_Rational:
        return _IV.mpf(int(expr.p)) / int(expr.q)
    if expr.is_Float:
        return _IV.mpf(mpmath.mpf(expr._mpf_))
    if expr == sp.E:
        return _IV.e
    if isinstance(expr, (sp.Add, sp.Mul)):
        out = _number(expr.args[0])
        for arg in expr.args[1:]:
            out = _checked(out + _number(arg) if isinstance(expr, sp.Add) else out * _number(arg))
        return out
    if isinstance(expr, sp.Pow) and expr.args[1].is_Number:
        base, e = _checked(_number(expr.args[0])), expr.args[1]
        if _integer(e) is not None:
            n = _integer(e)
            return base ** n if n >= 0 else 1 / _nonzero(base) ** -n
        if _sign(base) != 1:
            raise _Refused(f"{expr} is not a real number (or too close to 0 to check)")
        return _IV.exp(_number(e) * _IV.log(base))
    if expr.func in _MONOTONE and len(expr.args) == 1:
        x = _checked(_number(expr.args[0]))
        if expr.func == sp.log and _sign(x) != 1:
            raise _Refused(f"{expr}: the log of a quantity that is not certainly > 0")
        return _MONOTONE[expr.func](x)
    raise _Refused(f"{expr} is not a finite real number")


def _nonzero(x):
    if _sign(x) in (None, 0):
        raise _Refused("the expression divides by a quantity too close to 0 to check")
    return x


# --- printing expressions -------------------------------------------------------------------

# sympy's str() groups denominators (1/(2*(beta + g)) for Mul(1/2, 1/(beta + g))), and the
# parser, which rebuilds each sum and product with one n-ary Add or Mul, would read that back
# as a different tree. So each product is written factor by factor: numerators joined by *,
# then one /d for each factor with a negative rational exponent: 1/2/(beta + g).

def _text(e: sp.Expr) -> str:
    if e.is_Add:
        return _text_sum(e)
    if e.is_Mul or (e.is_Rational and not e.is_Integer) or _is_denominator(e):
        return _text_product(list(e.args) if e.is_Mul else [e])
    if e.is_Pow:
        return _text_power(e.base, e.exp)
    if e.is_Integer:
        return str(int(e))
    if e.is_Float:
        return _text_float(e)
    if e == sp.E:
        return "exp(1)"
    if e.is_Symbol:
        return STATE_NAME if e == STATE else e.name
    if isinstance(e, sp.Function) and FUNCTIONS.get(type(e).__name__) is e.func and len(e.args) == 1:
        return f"{type(e).__name__}({_text(e.args[0])})"
    raise _Refused(f"{e!s} is not a number, an input or one of the functions {', '.join(FUNCTIONS)}")


def _text_float(e: sp.Float) -> str:
    value = float(e)
    if e._prec != 53 or sp.Float(value) != e:  # not a double (or inf, or a subnormal)
        raise _Refused(f"the float {e!s} is not a double, so it cannot be written exactly")
    return repr(value)


def _is_negative(e: sp.Expr) -> bool:
    coeff = e.as_coeff_Mul()[0]
    return coeff.is_Number and coeff < 0


def _is_denominator(e: sp.Expr) -> bool:
    return e.is_Pow and e.exp.is_Rational and e.exp < 0


def _text_sum(e: sp.Add) -> str:
    terms = e.as_ordered_terms()
    out = _text(terms[0])
    for t in terms[1:]:
        out += f" - {_text(-t)}" if _is_negative(t) else f" + {_text(t)}"
    return out


def _text_product(factors: list[sp.Expr]) -> str:
    sign = ""
    if factors[0].is_Number and factors[0] < 0:
        sign, factors = "-", [-factors[0]] + factors[1:]
    nums, dens = [], []
    for f in factors:
        if f.is_Rational and not f.is_Integer:
            nums += [str(f.p)] if f.p != 1 else []
            dens.append(str(f.q))
        elif _is_denominator(f):
            dens.append(_operand(sp.Pow(f.base, -f.exp), "/"))
        elif f != 1 or len(factors) == 1:
            nums.append(_operand(f, "*"))
    return sign + ("*".join(nums) or "1") + "".join("/" + d for d in dens)


def _text_power(base: sp.Expr, e: sp.Expr) -> str:
    if e == sp.Rational(1, 2):
        return f"sqrt({_text(base)})"
    exponent = str(int(e)) if e.is_Integer and e > 0 else f"({_text(e)})"
    return f"{_operand(base, '**')}**{exponent}"


def _operand(e: sp.Expr, op: str) -> str:
    """The text of e, in parentheses where `op` binds tighter than e's own form."""
    text = _text(e)
    atom = e.is_Symbol or isinstance(e, sp.Function) or e == sp.E or (
        (e.is_Integer or e.is_Float) and e >= 0)
    loose = not atom and (op == "**" or e.is_Add or (op == "/" and not _is_power_text(e)))
    return f"({text})" if loose else text


def _is_power_text(e: sp.Expr) -> bool:
    return e.is_Pow and not _is_denominator(e)


def format_expression(expr: sp.Expr, part: str = "expression") -> str:
    """`expr` as text that `parse_expression` reads back as an equal expression.

    Raises SpecError(part, reason) when it cannot be written so (an unadmitted function or
    constant, a symbolic or large exponent, an expression too large).
    """
    symbols = {s.name: s for s in expr.free_symbols if isinstance(s, Input)}
    if STATE in expr.free_symbols:
        symbols[STATE_NAME] = STATE
    try:
        text = _text(expr)
        back = _parse(text, symbols)
    except _Refused as err:
        raise SpecError(part, f"{expr!s} cannot be written to a spec file: {err}") from None
    if back != expr:
        raise SpecError(part, f"{expr!s} cannot be written to a spec file: its text {text!r} reads "
                              f"back as {back!s}")
    return text


# --- writing ------------------------------------------------------------------------------------

def dumps(spec: DesignModel) -> str:
    """The TOML text of `spec`; `loads` reads it back as an equal DesignModel."""
    if not isinstance(spec, DesignModel):
        raise SpecError("spec", f"expected a DesignModel, got {_describe(spec)}")
    _check_top(spec)
    lines = ["# A designmodel spec (designmodel.specfile): read it with designmodel.loading.load_spec.",
             f"format = {FORMAT}", f"name = {_q(spec.name)}"]
    if spec.description:
        lines.append(f"description = {_q(spec.description)}")
    for key in ("key_dim", "value_dim"):
        if getattr(spec, key) is not None:
            lines.append(f"{key} = {getattr(spec, key)}")
    for section in (_inputs_lines(spec), _prior_lines(spec.prior), _transition_lines(spec.transition),
                    _observation_lines(spec.observation), _readout_lines(spec.readout),
                    _filter_lines(spec.filter)):
        lines += [""] + section
    text = "\n".join(lines) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SpecError("spec", f"the spec holds text that is not valid Unicode: {err}") from None
    if loads(text) != spec:  # a file that reads back differently is never written
        raise SpecError("spec", f"{spec.name} does not read back equal from its TOML text")
    return text


def _check_top(spec: DesignModel) -> None:
    # DesignModel does not check these types itself; a file must hold what loads accepts.
    for key in ("name", "description"):
        if not isinstance(getattr(spec, key), str):
            raise SpecError("spec", f"{key}: expected text, got {_describe(getattr(spec, key))}")
    for key in ("key_dim", "value_dim"):
        n = getattr(spec, key)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise SpecError("spec", f"{key}: expected a positive integer, got {_describe(n)}")


def save(spec: DesignModel, path) -> Path:
    """Write `spec` to `path` as TOML, atomically: a reader sees the old file or the new one."""
    text = dumps(spec)
    path = Path(path)
    # The temporary file is in the same folder, so os.replace is a rename within one file system.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); a shared spec keeps the old file's mode or 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _q(text: str) -> str:
    """A TOML basic string."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _q(name)


def _inputs_lines(spec: DesignModel) -> list[str]:
    lines, seen = ["[inputs]"], {}
    for s in spec.inputs:
        if s.name in seen:
            raise SpecError("inputs", f"two different inputs are named {s.name}; a spec file "
                                      "names each input once")
        seen[s.name] = s
        _check_input_name(s.name)
        lines.append(f"{_key(s.name)} = {{ per = {_q(s.per)}, domain = {_q(s.domain)}, "
                     f"per_token = {_bool(s.per_token)} }}")
    return lines


def _prior_lines(prior: Prior) -> list[str]:
    cov = prior.covariance
    lines = ["[prior]", f"mean = {_q(prior.mean)}", f"covariance = {_q(cov.kind)}"]
    if cov.kind == "full" and isinstance(cov.value, str):
        return lines + [f"value = {_q(cov.value)}"]
    if cov.kind == "full":
        rows = ["  [" + ", ".join(_expr(x, "prior", f"value[{i}][{j}]")
                                  for j, x in enumerate(cov.value.row(i))) + "],"
                for i in range(cov.value.rows)]
        return lines + ["value = ["] + rows + ["]"]
    if isinstance(cov.value, tuple):
        return lines + ["value = [" + ", ".join(_expr(x, "prior", f"value[{i}]")
                                                for i, x in enumerate(cov.value)) + "]"]
    return lines + [f"value = {_expr(cov.value, 'prior', 'value')}"]


def _transition_lines(t: Transition) -> list[str]:
    lines = ["[transition]"]
    if t.map is not None:
        lines.append(f"map = {_expr(t.map, 'transition', 'map')}")
    else:
        lines.append(f"decay = {_expr(t.decay, 'transition', 'decay')}")
    if isinstance(t.noise, str):
        lines.append('noise = "stationary"')
    else:
        noise = _expr(t.noise, "transition", "noise")
        # An input named "stationary" must not read back as the stationary noise.
        lines.append('noise = "(stationary)"' if noise == '"stationary"' else f"noise = {noise}")
    return lines


def _observation_lines(obs) -> list[str]:
    lines = ["[observation]", f"kind = {_q(obs.kind)}"]
    if isinstance(obs, Regression):
        lines.append(f"noise = {_expr(obs.noise, 'observation', 'noise')}")
    return lines + [f"unit_keys = {_bool(obs.unit_keys)}"]


def _readout_lines(readout: Readout) -> list[str]:
    return ["[readout]", f"timing = {_q(readout.timing)}", f"variance = {_bool(readout.variance)}"]


def _filter_lines(f) -> list[str]:
    if isinstance(f, Exact):
        return ["[filter]", 'kind = "exact"']
    return ["[filter]", 'kind = "reset"', f"c = {_expr(f.c, 'filter', 'c')}",
            f"allow_gain_above_one = {_bool(f.allow_gain_above_one)}"]


def _expr(expr: sp.Expr, part: str, key: str) -> str:
    """The TOML string of an expression of `part`; an error names the key."""
    try:
        return _q(format_expression(expr, part))
    except SpecError as err:
        raise SpecError(part, f"{key}: {str(err).removeprefix(part + ': ')}") from None


def _bool(x) -> str:
    return "true" if x else "false"


# --- reading ------------------------------------------------------------------------------------

def load(path) -> DesignModel:
    """The DesignModel in the TOML file `path` (see the module docstring for the schema)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(4 * MAX_FILE + 1)  # UTF-8 takes at most 4 bytes a character
    except OSError as err:
        raise SpecError("spec", f"cannot read {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError("toml", f"{path} is not UTF-8 text: {err}") from None
    return loads(text)


def loads(text: str) -> DesignModel:
    """The DesignModel written as TOML `text`. Nothing in the text is evaluated as code."""
    if not isinstance(text, str):
        raise SpecError("toml", f"expected TOML text, got {_describe(text)}")
    if len(text) > MAX_FILE:
        raise SpecError("toml", f"the file has {len(text)} characters, more than the {MAX_FILE} allowed")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError("toml", f"not valid TOML: {err}") from None
    except (RecursionError, MemoryError):
        raise SpecError("toml", "the TOML is nested too deeply") from None
    return _from_data(data)


_MISSING = object()


class _Table:
    """One TOML table of a spec, read key by key; every error names the part."""

    def __init__(self, part: str, data, allowed):
        if not isinstance(data, dict):
            raise SpecError(part, f"expected a table, got {_describe(data)}")
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise SpecError(part, f"unknown key {unknown[0]!r} (the keys here are {', '.join(allowed)})")
        self.part, self.data = part, data

    def get(self, key: str, kind: type, default=_MISSING):
        """The value of `key`, which must be of type `kind` (bool is not an int here)."""
        if key not in self.data:
            if default is _MISSING:
                raise SpecError(self.part, f"missing key {key!r}")
            return default
        value = self.data[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise SpecError(self.part, f"{key}: expected {_KIND_NAMES[kind]}, got {_describe(value)}")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        """A string key that must be one of `options`."""
        value = self.get(key, str)
        if value not in options:
            raise SpecError(self.part, f"{key}: expected one of {', '.join(map(repr, options))}, "
                                       f"got {value!r}")
        return value

    def expr(self, key: str, symbols, value=_MISSING) -> sp.Expr:
        """An expression: text in the admitted grammar, or a plain TOML number."""
        value = self.data.get(key, _MISSING) if value is _MISSING else value
        if value is _MISSING:
            raise SpecError(self.part, f"missing key {key!r}")
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return _constant(value).expr
            if not isinstance(value, str):
                raise _Refused(f"expected an expression (text or a number), got {_describe(value)}")
            return _parse(value, symbols)
        except _Refused as err:
            shown = f" in {_excerpt(value)}" if isinstance(value, str) else ""
            raise SpecError(self.part, f"{key}: {err}{shown}") from None


_KIND_NAMES = {str: "text", bool: "true or false", int: "an integer", list: "a list", dict: "a table"}


def _describe(value) -> str:
    names = {str: "text", bool: "a boolean", int: "an integer", float: "a float", list: "a list",
             dict: "a table"}
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    return f"{names.get(type(value), type(value).__name__)} {shown}"


def _from_data(data: dict) -> DesignModel:
    top = _Table("spec", data, _TOP_KEYS)
    if top.get("format", int, FORMAT) != FORMAT:
        raise SpecError("spec", f"format: this reader knows format {FORMAT}, got {data['format']!r}")
    for table in _TABLES:
        if table not in data:
            raise SpecError(table, f"missing table [{table}]")
    symbols = _read_inputs(data["inputs"])
    parts = dict(prior=_read_prior(data["prior"], symbols),
                 transition=_read_transition(data["transition"], symbols),
                 observation=_read_observation(data["observation"], symbols),
                 readout=_read_readout(data["readout"]), filter=_read_filter(data["filter"], symbols))
    dims = {k: _dimension(top, k) for k in ("key_dim", "value_dim")}
    try:
        return DesignModel(name=top.get("name", str), description=top.get("description", str, ""),
                           **parts, **dims)
    except SpecError:
        raise
    except (ValueError, TypeError, ArithmeticError, RecursionError) as err:
        # Validation compares numbers with sympy, which gives up on some (a TypeError).
        raise SpecError("spec", f"the spec cannot be checked: {err}") from None


def _dimension(top: _Table, key: str):
    n = top.get(key, int, None)
    if n is not None and not 0 < n <= 1 << 20:
        raise SpecError("spec", f"{key}: expected a positive dimension, got {n}")
    return n


def _check_input_name(name: str) -> None:
    # A name must read back as itself: Python NFKC-normalizes identifiers, and keywords,
    # dunders, the functions and the state's name mean something else in an expression.
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError("inputs", f"input name {name!r} is not an identifier")
    if unicodedata.normalize("NFKC", name) != name:
        raise SpecError("inputs", f"input name {name!r} is not in NFKC normal form")
    if keyword.iskeyword(name) or name.startswith("__") or name in FUNCTIONS or name == STATE_NAME:
        raise SpecError("inputs", f"{name!r} cannot name an input (it is a keyword, a dunder, "
                                  f"a function or {STATE_NAME!r})")


def _read_inputs(data) -> dict[str, Input]:
    if not isinstance(data, dict):
        raise SpecError("inputs", f"expected a table, got {_describe(data)}")
    symbols = {}
    for name, entry in data.items():
        _check_input_name(name)
        try:
            t = _Table("inputs", entry, ("per", "domain", "per_token"))
            symbols[name] = Input(name, per=t.get("per", str, "head"), domain=t.get("domain", str),
                                  per_token=t.get("per_token", bool, True))
        except SpecError as err:
            raise SpecError("inputs", f"{name}: {str(err).removeprefix('inputs: ')}") from None
    return symbols


def _read_prior(data, symbols) -> Prior:
    t = _Table("prior", data, ("mean", "covariance", "value"))
    mean = t.choice("mean", ("zero", "given"))
    kind = t.choice("covariance", ("isotropic", "diagonal", "full"))
    value = t.data.get("value", _MISSING)
    if kind == "isotropic":
        return Prior(isotropic(t.expr("value", symbols)), mean)
    if kind == "diagonal" and isinstance(value, list):
        if not 0 < len(value) <= MAX_MATRIX:
            raise SpecError("prior", f"value: a diagonal needs 1 to {MAX_MATRIX} entries, got {len(value)}")
        return Prior(diagonal([t.expr(f"value[{i}]", symbols, x) for i, x in enumerate(value)]), mean)
    if kind == "diagonal":
        return Prior(diagonal(t.expr("value", symbols)), mean)
    if isinstance(value, str):
        return Prior(full(value), mean)
    return Prior(full(_read_matrix(t, value, symbols)), mean)


def _read_matrix(t: _Table, value, symbols) -> list[list[sp.Expr]]:
    if value is _MISSING:
        raise SpecError("prior", "missing key 'value'")
    if not (isinstance(value, list) and 0 < len(value) <= MAX_MATRIX
            and all(isinstance(row, list) and len(row) == len(value) for row in value)):
        raise SpecError("prior", f"value: a full covariance is a run-time name or a square matrix (a list "
                                 f"of 1 to {MAX_MATRIX} rows of equal length), got {_describe(value)}")
    return [[t.expr(f"value[{i}][{j}]", symbols, x) for j, x in enumerate(row)]
            for i, row in enumerate(value)]


def _read_transition(data, symbols) -> Transition:
    t = _Table("transition", data, ("decay", "map", "noise"))
    noise = t.data.get("noise", _MISSING)
    noise = "stationary" if noise == "stationary" else t.expr("noise", symbols)
    if ("decay" in t.data) == ("map" in t.data):
        raise SpecError("transition", "give exactly one of 'decay' and 'map'")
    if "map" in t.data:
        return Transition(map=t.expr("map", {**symbols, STATE_NAME: STATE}), noise=noise)
    return Transition(decay=t.expr("decay", symbols), noise=noise)


def _read_observation(data, symbols) -> Write | Regression:
    kind = _Table("observation", data, ("kind", "noise", "unit_keys")).choice("kind", ("write", "regression"))
    if kind == "write":
        t = _Table("observation", data, ("kind", "unit_keys"))
        return Write(unit_keys=t.get("unit_keys", bool, False))
    t = _Table("observation", data, ("kind", "noise", "unit_keys"))
    return Regression(noise=t.expr("noise", symbols), unit_keys=t.get("unit_keys", bool, False))


def _read_readout(data) -> Readout:
    t = _Table("readout", data, ("timing", "variance"))
    return Readout(timing=t.choice("timing", ("posterior", "prior")), variance=t.get("variance", bool, False))


def _read_filter(data, symbols) -> Exact | Reset:
    kind = _Table("filter", data, ("kind", "c", "allow_gain_above_one")).choice("kind", ("exact", "reset"))
    if kind == "exact":
        _Table("filter", data, ("kind",))
        return Exact()
    t = _Table("filter", data, ("kind", "c", "allow_gain_above_one"))
    return Reset(t.expr("c", symbols), t.get("allow_gain_above_one", bool, False))
