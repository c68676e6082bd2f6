"""The statements of MATH.md sections 2-4, shown by sympy on the derived updates.

Each function returns a `Proof`: the statement, whether sympy showed it, and the residual it
reduced to zero. Matrix identities are shown on explicit symbolic matrices of a concrete size
(every entry its own symbol; the covariance a generic symmetric matrix), which is a proof for
that size; the derivation itself is size-free, so the tests run them at two sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from designmodel import structure as st
from designmodel.spec import (DesignModel, Input, Prior, Regression, Transition, Write, isotropic,
                              sigmoid)


@dataclass(frozen=True)
class Proof:
    """A statement and what sympy made of it."""

    statement: str
    holds: bool
    residual: object = 0

    def __str__(self):
        return f"[{'proved' if self.holds else 'FAILED'}] {self.statement}"


def _zero(m) -> bool:
    """Every entry is identically 0.

    Transcendental atoms (exp(g), sqrt(...)) are first replaced by fresh symbols, so that an
    identity between rational functions of them is decided exactly by `cancel`; only what
    that cannot decide goes to `simplify`.
    """
    m = sp.Matrix(m) if not isinstance(m, sp.Expr) else sp.Matrix([m])
    for x in m:
        atoms = {a: sp.Dummy(positive=True) for a in x.atoms(sp.Function, sp.Pow)
                 if isinstance(a, sp.Function) or not a.exp.is_Integer}
        if sp.cancel(x.xreplace(atoms)) != 0 and sp.simplify(x) != 0:
            return False
    return True


def _time_symbols(spec: DesignModel, t: int, key_dim: int) -> dict:
    """Renames each per-token input for token t (g -> g_t, g[m] -> g_t[m]); constants stay."""
    out = {}
    for x in spec.inputs:
        if not x.per_token:
            continue
        out[x] = sp.Symbol(f"{x.name}_{t}", **x.assumptions0)
        if x.per == "key":
            for m in range(key_dim):
                out[st.indexed(x, m)] = sp.Symbol(f"{x.name}_{t}[{m}]", **x.assumptions0)
    return out


def _token(t: int, key_dim: int, value_dim: int) -> dict:
    vec = lambda name, n: sp.Matrix([sp.Symbol(f"{name}_{t}{i}", real=True) for i in range(n)])
    return {st.k: vec("k", key_dim), st.v: vec("v", value_dim), st.q: vec("q", key_dim)}


def step(d, mean, cov, t: int, key_dim: int, value_dim: int):
    """One token of the derived filter on explicit matrices: returns (S_t, P_t)."""
    values = {st.S: mean, st.P: cov, **_token(t, key_dim, value_dim)}
    rename = _time_symbols(d.spec, t, key_dim)
    new_mean = st.explicit(d.mean, values, key_dim, value_dim).xreplace(rename)
    new_cov = None
    if d.covariance is not None:
        new_cov = st.explicit(d.covariance, values, key_dim, value_dim).xreplace(rename)
    return new_mean, new_cov


# --- section 2 -----------------------------------------------------------------------------

def covariance_free(d) -> Proof:
    """The write model's exact filter: the closed-form mean never involves P."""
    used = st.P in d.mean.free_symbols
    return Proof(f"{d.spec.name}: the mean update never involves the covariance P", not used,
                 st.P if used else 0)


def kalman_is_bayes(d, key_dim: int = 2, value_dim: int = 2) -> Proof:
    """The derived Kalman update equals the exact Gaussian posterior in information form.

    Posterior precision = (P^-)^{-1} + k k^T / r; posterior mean = cov ((P^-)^{-1} S^- + k v^T / r).
    """
    values = st.explicit_symbols(key_dim, value_dim)
    ex = lambda e: st.explicit(d.expand(e), values, key_dim, value_dim)
    from designmodel.derive import P_PRED, S_PRED
    p_pred, s_pred = ex(P_PRED), ex(S_PRED)
    k, v, r = values[st.k], values[st.v], d.spec.observation.noise
    # Multiplied through by P^- so that no symbolic inverse is needed:
    #   cov (P^-^{-1} + k k^T / r) = I       <=>  cov (I + k k^T P^- / r) = P^-
    #   (P^-^{-1} + k k^T / r) mean = P^-^{-1} S^- + k v^T / r
    #                                         <=>  (I + P^- k k^T / r) mean = S^- + P^- k v^T / r
    eye = sp.eye(key_dim)
    res_cov = ex(d.covariance) * (eye + k * k.T * p_pred / r) - p_pred
    res_mean = (eye + p_pred * k * k.T / r) * ex(d.mean) - s_pred - p_pred * k * v.T / r
    holds = _zero(res_mean) and _zero(res_cov)
    return Proof(f"{d.spec.name}: the derived update is the exact posterior (Kalman = information "
                 f"form) at K={key_dim}, V={value_dim}", holds, (res_mean, res_cov))


# --- section 3 -----------------------------------------------------------------------------

def reset_matches_kalman(d, key_dim: int = 3, value_dim: int = 2) -> Proof:
    """The simplified reset update (delta rule) equals the Kalman update with P^- = c I."""
    values = st.explicit_symbols(key_dim, value_dim)
    if d.spec.observation.unit_keys:  # the simplifier used |k|^2 = 1: impose it on k
        k = values[st.k]
        values[st.k] = sp.Matrix(list(k[:-1]) + [sp.sqrt(1 - sum(x ** 2 for x in k[:-1]))])
    norm2 = sum(x ** 2 for x in values[st.k])
    values[st.KEY_NORM2] = norm2
    lhs = st.explicit(d.mean, values, key_dim, value_dim)
    rhs = st.explicit(d.raw_mean, values, key_dim, value_dim)
    res = lhs - rhs
    return Proof(f"{d.spec.name}: the delta-rule form equals the Kalman update with a reset "
                 f"covariance at K={key_dim}, V={value_dim}", _zero(res), res)


def reset_gain_is_sigmoid(spec: DesignModel | None = None) -> Proof:
    """With unit keys, c / (c + r) = sigmoid(log c - log r); for a spec, its own c and r."""
    if spec is None:
        c, r = sp.symbols("c r", positive=True)
    else:
        c, r = spec.filter.c, spec.observation.noise
    from designmodel.derive import reset_gain
    gain = c / (c + r) if spec is None else reset_gain(spec)
    logit = sp.log(c) - sp.log(r)
    res = sp.simplify((gain - sigmoid(logit)).rewrite(sp.exp))
    name = "c, r > 0" if spec is None else spec.name
    return Proof(f"{name}: with unit keys the reset gain c/(c+r) = sigmoid(log c - log r)",
                 res == 0, res)


# --- section 4 -----------------------------------------------------------------------------

def stationary_version(spec: DesignModel) -> DesignModel:
    """The regression spec with a stationary prior p0 I and Q = p0 (I - F F^T), noise r."""
    p0 = Input("p0", per="head", domain="positive", per_token=False)
    r = Input("r", per="head", domain="positive", per_token=False)
    return replace(spec, name=f"{spec.name}_stationary", prior=Prior(covariance=isotropic(p0)),
                   transition=Transition(decay=spec.transition.decay, noise="stationary"),
                   observation=Regression(noise=r), readout=replace(spec.readout, variance=False))


def write_version(spec: DesignModel) -> DesignModel:
    """The write model with the same transition."""
    return replace(spec, name=f"{spec.name}_write", observation=Write(),
                   transition=Transition(decay=spec.transition.decay),
                   prior=Prior(), filter="exact", readout=replace(spec.readout, variance=False))


def weak_evidence_limit(spec: DesignModel, tokens: int = 2, key_dim: int = 2) -> Proof:
    """(r/p0) S_T of the stationary regression model tends to the write model's S_T as r -> oo.

    Both are unrolled over `tokens` tokens from S_0 = 0 with the derived updates; r = 1/eps and
    the limit eps -> 0 is taken entry by entry.
    """
    from designmodel.derive import derive
    kal = derive(stationary_version(spec), filter="exact")
    wri = derive(write_version(spec))
    value_dim = 1
    mean, cov = sp.zeros(key_dim, value_dim), None
    p0 = next(x for x in kal.spec.inputs if x.name == "p0")
    r = next(x for x in kal.spec.inputs if x.name == "r")
    cov = p0 * sp.eye(key_dim)
    wmean = sp.zeros(key_dim, value_dim)
    for t in range(1, tokens + 1):
        mean, cov = step(kal, mean, cov, t, key_dim, value_dim)
        wmean, _ = step(wri, wmean, None, t, key_dim, value_dim)
    eps = sp.Symbol("epsilon", positive=True)
    scaled = (mean * r / p0).xreplace({r: 1 / eps})
    res = sp.zeros(key_dim, value_dim)
    for i in range(key_dim):
        num, den = sp.fraction(sp.together(scaled[i, 0]))
        num, den = sp.expand(num), sp.expand(den)
        if den.subs(eps, 0) == 0:
            lim = sp.limit(num / den, eps, 0)
        else:
            lim = num.subs(eps, 0) / den.subs(eps, 0)
        res[i, 0] = sp.simplify(lim - wmean[i, 0])
    return Proof(f"{spec.name}: (r/p0) S_T -> write-model S_T as r -> infinity "
                 f"(stationary prior, {tokens} tokens, K={key_dim})", _zero(res), res)


def applicable(d) -> list:
    """The proofs that apply to a derivation (run by `designmodel derive --prove`)."""
    fam = d.structure.family
    out = [covariance_free(d)] if fam != "kalman" else []
    if fam == "kalman":
        out.append(kalman_is_bayes(d))
        if d.spec.prior.covariance.kind == "isotropic":
            out.append(weak_evidence_limit(d.spec))
    if fam == "reset":
        out.append(reset_matches_kalman(d))
        if d.spec.observation.unit_keys:
            out.append(reset_gain_is_sigmoid(d.spec))
    return out
