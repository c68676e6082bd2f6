"""Hypothesis strategies over the whole spec grammar, and well-conditioned random inputs.

`specs()` draws valid DesignModels: write or regression; exact or reset; decay none,
constant, scalar or per key (from log-decays, unit gates, real logits or constants, written
as a decay or as a transition map); process noise 0, isotropic, diagonal or stationary;
observation noise as a positive input, a constant, softplus of a logit, or 1 - beta (with
the delta rule's reset c = beta, or the gain-above-one variant c = 2 beta); reset c as a
positive input, exp of a logit or a number; prior isotropic, diagonal or full (explicit or
named); both readout timings, with or without variance; unit keys or not.

`random_inputs(derivation, B, T, H, K, V, seed)` draws (q, k, v, inputs) in float64 inside
every input's domain, in ranges that keep the problems well conditioned (decays in [0.5, 1],
noises in [0.1, 2]) for the input names the grammar uses.
"""
from __future__ import annotations

import sympy as sp
from hypothesis import strategies as st

from designmodel.spec import (Constant, DesignModel, Input, Prior, Readout, Regression, STATE,
                              Transition, Write, diagonal, exp, full, isotropic, reset, sigmoid,
                              softplus)

from designmodel.sampling import FULL_NAME  # the run-time name of a named full prior covariance

# The inputs the grammar draws from, one name per role so that names never clash.
g = Input("g", domain="logdecay")                          # scalar log-decay
alpha = Input("alpha", domain="unit")                      # scalar decay given directly
x = Input("x", domain="real")                              # scalar logit
gamma = Constant("gamma", domain="unit")                   # constant decay
lg = Constant("lg", domain="logdecay")                     # constant log-decay
gk = Input("gk", per="key", domain="logdecay")             # per-key log-decay
ak = Input("ak", per="key", domain="unit")                 # per-key decay given directly
gammak = Constant("gammak", per="key", domain="unit")      # per-key constant decay
sigma = Input("sigma", domain="nonnegative")               # isotropic process noise
sigma0 = Constant("sigma0", domain="positive")
sigmak = Input("sigmak", per="key", domain="nonnegative")  # diagonal process noise
r = Input("r", domain="positive")                          # observation noise
r0 = Constant("r0", domain="positive")
xr = Input("xr", domain="real")
c = Input("c", domain="positive")                          # reset covariance
xc = Input("xc", domain="real")
b = Input("b", domain="unit")                              # delta-rule gain
p0 = Constant("p0", domain="positive")                     # prior scale
pk = Constant("pk", per="key", domain="positive")          # diagonal prior

DECAYS = {
    "none": [1],
    "constant": [sp.Rational(9, 10), gamma, exp(lg)],
    "scalar": [exp(g), alpha, sigmoid(x + 3), exp(g) * gamma],
    "per_key": [exp(gk), ak, gammak, exp(gk) * alpha],
}


@st.composite
def priors(draw) -> tuple[Prior, int | None]:
    """A prior and the key_dim an explicit covariance fixes (None when it fixes none)."""
    kind = draw(st.sampled_from(["iso_number", "iso_constant", "diag_constant", "diag_numbers",
                                 "full_explicit", "full_named"]))
    mean = draw(st.sampled_from(["zero", "given"]))
    key_dim = None
    if kind == "iso_number":
        cov = isotropic(sp.Rational(draw(st.integers(1, 8)), 4))
    elif kind == "iso_constant":
        cov = isotropic(p0)
    elif kind == "diag_constant":
        cov = diagonal(pk)
    elif kind == "diag_numbers":
        key_dim = draw(st.integers(2, 4))
        cov = diagonal([sp.Rational(draw(st.integers(1, 8)), 4) for _ in range(key_dim)])
    elif kind == "full_explicit":
        key_dim = draw(st.integers(2, 4))
        a = sp.Matrix(key_dim, key_dim, draw(st.lists(st.integers(-2, 2), min_size=key_dim ** 2,
                                                      max_size=key_dim ** 2)))
        cov = full((a * a.T + sp.eye(key_dim)) / 4)   # symmetric positive definite
    else:
        cov = full(FULL_NAME)
    return Prior(covariance=cov, mean=mean), key_dim


@st.composite
def transitions(draw, isotropic_prior: bool) -> Transition:
    """A transition: decay of every structure, process noise 0 / isotropic / diagonal / stationary."""
    decay = draw(st.sampled_from(DECAYS[draw(st.sampled_from(list(DECAYS)))]))
    noises = [0, sigma, sigma0, sp.Rational(1, 5), sigmak, sigma * sigmak]
    if isotropic_prior:
        noises.append("stationary")
    noise = draw(st.sampled_from(noises))
    if decay != 1 and draw(st.booleans()):
        return Transition(map=decay * STATE, noise=noise)   # the same decay, as a map
    return Transition(decay=decay, noise=noise)


@st.composite
def observations(draw, family: str, unit_keys: bool) -> tuple:
    """(observation, filter) for the family: write, exact (Kalman) or reset."""
    if family == "write":
        return Write(unit_keys=unit_keys), "exact"
    noise_kind = draw(st.sampled_from(["input", "constant", "number", "softplus", "one_minus_b"]))
    noise = {"input": r, "constant": r0, "number": sp.Rational(1, 2), "softplus": softplus(xr),
             "one_minus_b": 1 - b}[noise_kind]
    if family == "exact":
        return Regression(noise=noise, unit_keys=unit_keys), "exact"
    if unit_keys and draw(st.integers(0, 4)) == 0:
        # beta = 2 b in (1, 2): negative eigenvalues, admitted only on request.
        return Regression(noise=1 - 2 * b, unit_keys=True), reset(2 * b, allow_gain_above_one=True)
    cs = [c, exp(xc), sp.Rational(3, 2)] + ([b] if noise_kind == "one_minus_b" else [])
    return Regression(noise=noise, unit_keys=unit_keys), reset(draw(st.sampled_from(cs)))


@st.composite
def specs(draw) -> DesignModel:
    """A random valid DesignModel from the whole grammar of designmodel.spec."""
    family = draw(st.sampled_from(["write", "exact", "reset"]))
    unit_keys = draw(st.booleans())
    prior, key_dim = draw(priors())
    transition = draw(transitions(prior.covariance.kind == "isotropic"))
    observation, filt = draw(observations(family, unit_keys))
    readout = Readout(timing=draw(st.sampled_from(["posterior", "prior"])), variance=draw(st.booleans()))
    return DesignModel(name="drawn", prior=prior, transition=transition, observation=observation,
                       readout=readout, filter=filt, key_dim=key_dim)


# --- inputs (the library's own sampler, re-exported for the tests) -------------------------

from designmodel.sampling import RANGES, random_initial, random_inputs  # noqa: E402,F401
