"""Declaring a design model: prior, transition, observation and readout (MATH.md section 1).

A spec is written in a few lines of sympy::

    from designmodel.spec import *
    g = Input("g", domain="logdecay")            # per token, one per head
    beta = Input("beta", domain="unit")
    model = DesignModel(
        name="gated_deltanet",
        transition=Transition(decay=exp(g)),
        observation=Regression(noise=1 - beta, unit_keys=True),
        filter=reset(beta),
    )

Every check that can be made on the declaration alone is made here, and each failure is a
`SpecError` that names the offending part ("transition", "observation", ...), never a
sympy traceback.
"""
from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any

import sympy as sp
from sympy import exp, log, sqrt  # noqa: F401  (re-exported for spec files)

from designmodel.bounds import Bounds, bounds, domain_bounds

__all__ = [
    "SpecError", "Input", "Constant", "sigmoid", "softplus", "logsigmoid",
    "Prior", "Covariance", "isotropic", "diagonal", "full",
    "Transition", "Write", "Regression", "Readout", "Exact", "Reset", "exact", "reset",
    "DesignModel", "STATE", "exp", "log", "sqrt",
]

DOMAINS = ("real", "positive", "nonnegative", "unit", "logdecay")
PER = ("head", "key")

# The memory before the transition. A transition that mentions it is state-dependent.
STATE = sp.Symbol("S_{t-1}")


class SpecError(ValueError):
    """A design model that cannot be derived. `part` names the offending part of the spec."""

    def __init__(self, part: str, message: str):
        super().__init__(f"{part}: {message}")
        self.part = part


# --- per-token inputs --------------------------------------------------------------------

_ASSUMPTIONS = {
    "real": {"real": True},
    "positive": {"positive": True},
    "nonnegative": {"nonnegative": True},
    "unit": {"positive": True},
    "logdecay": {"nonpositive": True},
}


class Input(sp.Symbol):
    """A named input of the layer: a sympy symbol that also knows its layout and domain.

    per:       "head" (one number per head) or "key" (one per key dimension).
    domain:    "real", "positive", "nonnegative", "unit" (the open interval (0, 1)) or
               "logdecay" (<= 0).
    per_token: True for a per-token input [B, T, H(, K)], False for a constant [H(, K)].
    """

    def __new__(cls, name: str, per: str = "head", domain: str = "real", per_token: bool = True):
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise SpecError("inputs", f"input name {name!r} is not an identifier")
        if name in FUNCTIONS or name.startswith("__") or name == "state":
            raise SpecError("inputs", f"input name {name!r} is reserved (a function or the state)")
        if per not in PER:
            raise SpecError("inputs", f"input {name}: per must be one of {PER}, got {per!r}")
        if domain not in DOMAINS:
            raise SpecError("inputs", f"input {name}: domain must be one of {DOMAINS}, got {domain!r}")
        obj = sp.Symbol.__xnew__(cls, name, **_ASSUMPTIONS[domain])
        obj.per, obj.domain, obj.per_token = per, domain, bool(per_token)
        return obj

    def __getnewargs_ex__(self):
        return (self.name, self.per, self.domain, self.per_token), {}

    def _hashable_content(self):
        return super()._hashable_content() + (self.per, self.domain, self.per_token)

    @property
    def bounds(self) -> Bounds:
        """The interval the domain allows."""
        return domain_bounds(self.domain)


def Constant(name: str, per: str = "head", domain: str = "real") -> Input:
    """A per-head (or per-key) constant of the layer, not a per-token input (RetNet's gamma)."""
    return Input(name, per=per, domain=domain, per_token=False)


class _Elementary(sp.Function):
    """A function defined by its exp form, which is also how sympy evaluates it numerically."""

    def _eval_evalf(self, prec):
        return self.rewrite(sp.exp)._eval_evalf(prec)


class sigmoid(_Elementary):
    """The logistic function 1 / (1 + exp(-x))."""

    def fdiff(self, argindex=1):
        """d sigmoid(x)/dx = sigmoid(x)(1 - sigmoid(x))."""
        return sigmoid(self.args[0]) * (1 - sigmoid(self.args[0]))

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    def _eval_is_positive(self):
        return self.args[0].is_real

    def _latex(self, printer, exp=None):
        tex = r"\sigma\left(%s\right)" % printer._print(self.args[0])
        return tex if exp is None else f"{tex}^{{{exp}}}"


class softplus(_Elementary):
    """log(1 + exp(x))."""

    def fdiff(self, argindex=1):
        """d softplus(x)/dx = sigmoid(x)."""
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))

    def _eval_is_positive(self):
        return self.args[0].is_real


class logsigmoid(_Elementary):
    """log(sigmoid(x)) = -softplus(-x), the usual gate parameterization (always <= 0)."""

    def fdiff(self, argindex=1):
        """d logsigmoid(x)/dx = 1 - sigmoid(x)."""
        return 1 - sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return -sp.log(1 + sp.exp(-x))

    def _eval_is_nonpositive(self):
        return self.args[0].is_real


FUNCTIONS = {"exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "sigmoid": sigmoid,
             "softplus": softplus, "logsigmoid": logsigmoid}


def _sympify(part: str, value: Any) -> sp.Expr:
    if isinstance(value, bool):
        raise SpecError(part, f"expected an expression, got {value!r}")
    try:
        expr = sp.sympify(value, strict=True)
    except (sp.SympifyError, TypeError) as err:
        raise SpecError(part, f"expected a sympy expression, got {value!r}") from err
    if not isinstance(expr, sp.Expr) or isinstance(expr, sp.MatrixBase):
        raise SpecError(part, f"expected a scalar expression, got {value!r}")
    return expr


def inputs_of(expr) -> list[Input]:
    """The inputs an expression uses, sorted by name."""
    return sorted((s for s in expr.free_symbols if isinstance(s, Input)), key=lambda s: s.name)


def _check_symbols(part: str, expr: sp.Expr) -> None:
    if STATE in expr.free_symbols:
        raise SpecError(part, f"{expr} depends on the state {STATE}: a design model's transition "
                              "and noises must not depend on the memory")
    stray = [s for s in expr.free_symbols if not isinstance(s, Input)]
    if stray:
        names = ", ".join(sorted(str(s) for s in stray))
        raise SpecError(part, f"{expr} uses {names}, which is not a declared Input or Constant")


def _per(expr: sp.Expr) -> str:
    return "key" if any(s.per == "key" for s in inputs_of(expr)) else "head"


def _bounds_or_error(part: str, what: str, expr: sp.Expr) -> Bounds:
    try:
        return bounds(expr)
    except ValueError as err:
        raise SpecError(part, f"{what} {expr}: {err}") from None
    except TypeError:  # sympy could not order the ends (numbers too extreme to compare)
        raise SpecError(part, f"{what} {expr}: its range cannot be decided") from None


def _require(part: str, what: str, expr: sp.Expr, ok, wanted: str) -> None:
    b = _bounds_or_error(part, what, expr)
    try:
        good = bool(ok(b))
    except TypeError:  # sympy could not order the ends (numbers too extreme to compare)
        raise SpecError(part, f"{what} {expr}: its range cannot be decided") from None
    if not good:
        used = ", ".join(f"{s.name} in {s.bounds}" for s in inputs_of(expr)) or "constant"
        raise SpecError(part, f"{what} {expr} must be {wanted}, but can be anywhere in {b} "
                              f"(inputs: {used})")


# --- prior ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Covariance:
    """Key-side covariance of the prior: kind "isotropic" (p0 I), "diagonal" or "full"."""

    kind: str
    value: Any  # isotropic: scalar expr; diagonal: per-key expr or tuple; full: Matrix or name

    def __post_init__(self):
        if self.kind not in ("isotropic", "diagonal", "full"):
            raise SpecError("prior", f"unsupported covariance structure {self.kind!r}: "
                                     "use isotropic(p0), diagonal(d) or full(M)")


def isotropic(p0=1) -> Covariance:
    """Prior covariance p0 I."""
    return Covariance("isotropic", _sympify("prior", p0))


def diagonal(d) -> Covariance:
    """Diagonal prior covariance: a per-key Constant, or a list of numbers (one per key)."""
    if isinstance(d, (list, tuple)):
        return Covariance("diagonal", tuple(_sympify("prior", x) for x in d))
    return Covariance("diagonal", _sympify("prior", d))


def full(m) -> Covariance:
    """Full prior covariance: an explicit sympy Matrix, or a name supplied at run time."""
    if isinstance(m, str):
        if not m.isidentifier():
            raise SpecError("prior", f"full covariance name {m!r} is not an identifier")
        return Covariance("full", m)
    try:
        mat = sp.ImmutableMatrix(m)
    except (TypeError, ValueError, sp.SympifyError) as err:
        raise SpecError("prior", f"full covariance must be a matrix, got {m!r}") from err
    return Covariance("full", mat)


@dataclass(frozen=True)
class Prior:
    """Memory before the first token: mean "zero" or "given" (an initial state), covariance."""

    covariance: Covariance = field(default_factory=isotropic)
    mean: str = "zero"

    def __post_init__(self):
        if self.mean not in ("zero", "given"):
            raise SpecError("prior", f"mean must be 'zero' or 'given', got {self.mean!r}")
        if not isinstance(self.covariance, Covariance):
            raise SpecError("prior", f"unsupported covariance {self.covariance!r}: "
                                     "use isotropic(p0), diagonal(d) or full(M)")


# --- transition ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transition:
    """S_t = F_t S_{t-1} + Xi_t, F_t = decay (I, gamma I, alpha_t I or diag(alpha_t)).

    decay: scalar expression; its inputs decide the structure (none, constant, scalar, per-key).
    noise: process-noise variance (0, sigma_t I, or diagonal when it uses per-key inputs), or
           "stationary" for Q_t = p0 (I - F_t F_t^T), which keeps an isotropic prior fixed.
    map:   alternatively, the transition written as an expression in STATE, e.g. exp(g)*STATE;
           it must be linear in the state.
    """

    decay: Any = 1
    noise: Any = 0
    map: Any = None

    def __post_init__(self):
        if self.map is not None:  # keep only the decay the map defines: equal maps, equal specs
            object.__setattr__(self, "decay", _decay_of_map(self.map))
            object.__setattr__(self, "map", None)
        object.__setattr__(self, "decay", _sympify("transition", self.decay))
        if not (isinstance(self.noise, str) and self.noise == "stationary"):
            object.__setattr__(self, "noise", _sympify("transition", self.noise))

    @property
    def decay_kind(self) -> str:
        """none, constant, scalar or per_key."""
        if self.decay == 1:
            return "none"
        used = inputs_of(self.decay)
        if any(s.per == "key" for s in used):
            return "per_key"
        if any(s.per_token for s in used):
            return "scalar"
        return "constant"


def _decay_of_map(m) -> sp.Expr:
    expr = _sympify("transition", m)
    if STATE not in expr.free_symbols:
        raise SpecError("transition", f"map {expr} does not mention the state {STATE}")
    coeff = sp.simplify(sp.diff(expr, STATE))
    if STATE in coeff.free_symbols:
        raise SpecError("transition", f"map {expr} is not linear in the state {STATE}: "
                                      "the transition of a design model is F_t S_{t-1}")
    if sp.simplify(expr.subs(STATE, 0)) != 0:
        raise SpecError("transition", f"map {expr} has a term free of the state: write "
                                      "additive terms as process noise, not in the map")
    return coeff


# --- observation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Write:
    """Model A: values are inputs; the token writes S_t = F_t S_{t-1} + k_t v_t^T."""

    unit_keys: bool = False
    kind = "write"


@dataclass(frozen=True)
class Regression:
    """Model B: v_t = S_t^T k_t + eps_t, eps_t ~ N(0, noise I)."""

    noise: Any = 1
    unit_keys: bool = False
    kind = "regression"

    def __post_init__(self):
        object.__setattr__(self, "noise", _sympify("observation", self.noise))


# --- readout and filter ----------------------------------------------------------------------

@dataclass(frozen=True)
class Readout:
    """y_t = S^T q_t with S the posterior after token t or the prediction before it."""

    timing: str = "posterior"
    variance: bool = False

    def __post_init__(self):
        if self.timing not in ("posterior", "prior"):
            raise SpecError("readout", f"timing must be 'posterior' or 'prior', got {self.timing!r}")


@dataclass(frozen=True)
class Exact:
    """The exact filter."""

    name = "exact"


@dataclass(frozen=True)
class Reset:
    """Covariance reset: the predicted covariance is replaced by c I before every update.

    allow_gain_above_one: admit noises for which the gain c/(c|k|^2 + r) can exceed 1
    (negative eigenvalues of the delta rule); such a layer has no Bayesian reading.
    """

    c: Any = 1
    allow_gain_above_one: bool = False
    name = "reset"

    def __post_init__(self):
        object.__setattr__(self, "c", _sympify("filter", self.c))


def exact() -> Exact:
    """The exact Bayesian filter."""
    return Exact()


def reset(c=1, allow_gain_above_one: bool = False) -> Reset:
    """The covariance-reset reduction with reset covariance c I (c may be an input)."""
    return Reset(c, allow_gain_above_one)


def as_filter(f) -> Exact | Reset:
    """Accepts "exact", "reset", exact() or reset(c)."""
    if isinstance(f, (Exact, Reset)):
        return f
    if f == "exact":
        return Exact()
    if f == "reset":
        return Reset()
    raise SpecError("filter", f"filter must be 'exact' or reset(c), got {f!r}")


# --- the design model ---------------------------------------------------------------------

@dataclass(frozen=True)
class DesignModel:
    """A linear-Gaussian design model: the four parts of MATH.md section 1 and a default filter.

    key_dim / value_dim are optional; they are checked against explicit prior matrices.
    """

    name: str = "model"
    prior: Prior = field(default_factory=Prior)
    transition: Transition = field(default_factory=Transition)
    observation: Write | Regression = field(default_factory=Write)
    readout: Readout = field(default_factory=Readout)
    filter: Exact | Reset = field(default_factory=Exact)
    key_dim: int | None = None
    value_dim: int | None = None
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("spec", f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise SpecError("spec", f"description must be a string, got {self.description!r}")
        for dim in ("key_dim", "value_dim"):
            n = getattr(self, dim)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise SpecError("spec", f"{dim} must be a positive integer, got {n!r}")
        for part, value, kinds in (("prior", self.prior, Prior), ("transition", self.transition, Transition),
                                   ("observation", self.observation, (Write, Regression)),
                                   ("readout", self.readout, Readout)):
            if not isinstance(value, kinds):
                raise SpecError(part, f"expected {_names(kinds)}, got {value!r}")
        object.__setattr__(self, "filter", as_filter(self.filter))
        self.validate()

    @property
    def inputs(self) -> list[Input]:
        """Every input and constant the spec uses, sorted by name."""
        exprs = [self.transition.decay, self.noise_expr("transition")]
        if isinstance(self.observation, Regression):
            exprs.append(self.observation.noise)
        if isinstance(self.filter, Reset):
            exprs.append(self.filter.c)
        exprs += _covariance_exprs(self.prior.covariance)
        found = {s for e in exprs for s in inputs_of(e)}
        return sorted(found, key=lambda s: s.name)

    def noise_expr(self, part: str = "transition") -> sp.Expr:
        """The process-noise variance as an expression (resolving "stationary")."""
        q = self.transition.noise
        if isinstance(q, str):  # stationary: Q = p0 (I - F F^T)
            return self.prior.covariance.value * (1 - self.transition.decay ** 2)
        return q

    # --- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise SpecError for the first problem found, naming the part."""
        self._validate_symbols()
        self._validate_prior()
        self._validate_transition()
        self._validate_observation()
        self._validate_filter()

    def _validate_symbols(self):
        names = [s.name for s in self.inputs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SpecError("inputs", f"two different inputs are named {', '.join(twice)}: "
                                      "an input has one layout and one domain")
        _check_symbols("transition", self.transition.decay)
        if not isinstance(self.transition.noise, str):
            _check_symbols("transition", self.transition.noise)
        if isinstance(self.observation, Regression):
            _check_symbols("observation", self.observation.noise)
            if _per(self.observation.noise) == "key":
                raise SpecError("observation", "observation noise is one number per head: it "
                                               "cannot use per-key inputs")
        if isinstance(self.filter, Reset):
            _check_symbols("filter", self.filter.c)
            if _per(self.filter.c) == "key":
                raise SpecError("filter", "reset covariance c I is isotropic: c cannot use per-key inputs")
        for e in _covariance_exprs(self.prior.covariance):
            _check_symbols("prior", e)
            if any(s.per_token for s in inputs_of(e)):
                raise SpecError("prior", f"prior covariance {e} uses a per-token input; "
                                         "the prior is fixed before the first token")

    def _validate_prior(self):
        cov = self.prior.covariance
        if cov.kind == "isotropic":
            if _per(cov.value) == "key":
                raise SpecError("prior", "isotropic covariance p0 I takes a per-head p0; use diagonal()")
            _require("prior", "covariance scale", cov.value, lambda b: b.lo >= 0,
                     "positive semidefinite (p0 >= 0)")
        elif cov.kind == "diagonal":
            entries = cov.value if isinstance(cov.value, tuple) else (cov.value,)
            if isinstance(cov.value, tuple):
                self._check_dim("prior", "diagonal covariance", len(entries))
            for e in entries:
                _require("prior", "diagonal covariance entry", e, lambda b: b.lo >= 0,
                         "positive semidefinite (entries >= 0)")
        elif isinstance(cov.value, sp.MatrixBase):
            m = cov.value
            if m.rows != m.cols:
                raise SpecError("prior", f"full covariance must be square, got {m.rows}x{m.cols}")
            self._check_dim("prior", "full covariance", m.rows)
            if m.free_symbols:
                raise SpecError("prior", "an explicit full covariance must be numeric; "
                                         "pass a name for one supplied at run time")
            if any(m[i, j] - m[j, i] != 0 for i in range(m.rows) for j in range(i)):
                raise SpecError("prior", "full covariance is not symmetric")
            if not _positive_semidefinite(m):
                raise SpecError("prior", "full covariance is not positive semidefinite")
        if self.transition.noise == "stationary" and cov.kind != "isotropic":
            raise SpecError("transition", "stationary noise p0 (I - F F^T) needs an isotropic prior")

    def _check_dim(self, part, what, n):
        if self.key_dim is not None and n != self.key_dim:
            raise SpecError(part, f"{what} has dimension {n}, but key_dim is {self.key_dim}")

    def _validate_transition(self):
        decay = self.transition.decay
        _require("transition", "decay", decay, lambda b: b.positive and b.hi <= 1,
                 "in (0, 1] (a contraction)")
        noise = self.noise_expr()
        _require("transition", "process noise", noise, lambda b: b.lo >= 0, ">= 0")

    def _validate_observation(self):
        obs = self.observation
        if isinstance(obs, Write):
            if isinstance(self.filter, Reset):
                raise SpecError("filter", "the covariance reset applies to the regression observation; "
                                          "the write model has no update to reset")
            return
        allow = isinstance(self.filter, Reset) and self.filter.allow_gain_above_one
        if not allow:
            b = _bounds_or_error("observation", "noise", obs.noise)
            if not b.positive:
                hint = ""
                if isinstance(self.filter, Reset):
                    hint = (": with noise <= 0 the reset gain c/(c|k|^2 + r) can exceed 1, which has "
                            "no Bayesian reading; pass reset(c, allow_gain_above_one=True) to allow it")
                raise SpecError("observation", f"noise {obs.noise} must be > 0, but can be anywhere "
                                               f"in {b}{hint}")

    def _validate_filter(self):
        if not isinstance(self.filter, Reset):
            return
        c = self.filter.c
        _require("filter", "reset covariance c", c, lambda b: b.positive, "> 0")
        if self.filter.allow_gain_above_one:
            if not self.observation.unit_keys:
                raise SpecError("filter", "a gain above one is only admitted with unit keys "
                                          "(the innovation variance c|k|^2 + r must stay > 0)")
            _require("filter", "innovation variance c + r", sp.simplify(c + self.observation.noise),
                     lambda b: b.positive, "> 0")


def _positive_semidefinite(m: sp.MatrixBase) -> bool:
    """Eigenvalues >= 0, up to float64 rounding (an exact check is far too slow at K = 128)."""
    import torch
    a = torch.tensor([[float(x) for x in m.row(i)] for i in range(m.rows)], dtype=torch.float64)
    eig = torch.linalg.eigvalsh(a)
    return bool(eig.min() >= -1e-12 * max(1.0, float(eig.abs().max())))


def _covariance_exprs(cov: Covariance) -> list[sp.Expr]:
    if cov.kind == "isotropic":
        return [cov.value]
    if cov.kind == "diagonal":
        return list(cov.value) if isinstance(cov.value, tuple) else [cov.value]
    return []


def _names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(k.__name__ for k in kinds)
