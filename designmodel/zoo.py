"""The built-in design models and the graph of how they relate (specialization, reset, limit)."""
from __future__ import annotations

from functools import lru_cache

import networkx as nx

from designmodel.family import classify
from designmodel.spec import (Constant, DesignModel, Input, Prior, Readout, Regression, Transition,
                              Write, exp, isotropic, reset)

# The inputs of the zoo, named as in fla's ops.
g = Input("g", domain="logdecay")                 # log-decay, one per head
g_key = Input("g", per="key", domain="logdecay")  # log-decay, one per key dimension
beta = Input("beta", domain="unit")               # delta-rule gain
gamma = Constant("gamma", domain="unit")          # RetNet's fixed decay per head
r = Input("r", domain="positive")                 # observation noise variance
sigma = Input("sigma", domain="nonnegative")      # process noise variance
p0 = Constant("p0", domain="positive")            # prior variance

# The delta rule's beta is the gain of a reset Kalman step with c = beta and r = 1 - beta on
# unit keys: c / (c + r) = beta (MATH.md section 3).
_delta = dict(observation=Regression(noise=1 - beta, unit_keys=True), filter=reset(beta))
_kalman_prior = Prior(covariance=isotropic(p0))

SPECS = {
    "linear_attention": DesignModel("linear_attention", observation=Write(),
                                    description="write model, no decay"),
    "retnet": DesignModel("retnet", transition=Transition(decay=gamma), observation=Write(),
                          description="write model, constant decay gamma per head"),
    "mamba2": DesignModel("mamba2", transition=Transition(decay=exp(g)), observation=Write(),
                          description="write model, scalar gate per token (Mamba-2 / SSD, simple GLA)"),
    "gla": DesignModel("gla", transition=Transition(decay=exp(g_key)), observation=Write(),
                       description="write model, per-key gate"),
    "deltanet": DesignModel("deltanet", **_delta, description="reset of the regression model, no decay"),
    "gated_deltanet": DesignModel("gated_deltanet", transition=Transition(decay=exp(g)), **_delta,
                                  description="reset of the regression model, scalar gate"),
    "kda": DesignModel("kda", transition=Transition(decay=exp(g_key)), **_delta,
                       description="reset of the regression model, per-key gate (Kimi Delta Attention)"),
    "rls": DesignModel("rls", prior=_kalman_prior, observation=Regression(noise=r),
                       description="exact filter, no decay: recursive least squares (ridge lambda = r/p0)"),
    "bayesian_layer": DesignModel("bayesian_layer", prior=_kalman_prior,
                                  transition=Transition(decay=exp(g), noise=sigma),
                                  observation=Regression(noise=r),
                                  description="exact filter, scalar gate, isotropic process noise"),
    "bayesian_layer_diag": DesignModel("bayesian_layer_diag", prior=_kalman_prior,
                                       transition=Transition(decay=exp(g_key), noise=sigma),
                                       observation=Regression(noise=r),
                                       description="exact filter, per-key gate, isotropic process noise"),
}

NAMES = tuple(SPECS)
_DECAY_RANK = {"none": 0, "constant": 1, "scalar": 2, "per_key": 3}


def spec(name: str) -> DesignModel:
    """The zoo spec called `name`."""
    return SPECS[name]


@lru_cache(maxsize=None)
def _signatures() -> dict:
    return {classify(s).mean_signature(): name for name, s in SPECS.items()}


def identify(derivation) -> str | None:
    """The zoo model whose update has the same form as `derivation`'s, if any."""
    return _signatures().get(derivation.structure.mean_signature())


@lru_cache(maxsize=None)
def relations() -> nx.MultiDiGraph:
    """How the zoo relates, computed from the models' structures.

    specialization  a -> b: same family, b's decay is the next more general structure
    reset           a -> b: the covariance reset of the exact filter a is b (same decay)
    limit           a -> b: b is a's weak-evidence limit r -> infinity (same decay, MATH 4)
    """
    g = nx.MultiDiGraph()
    st = {name: classify(s) for name, s in SPECS.items()}
    for name, s in st.items():
        g.add_node(name, family=s.family, decay=s.decay)
    for fam in ("write", "reset", "kalman"):
        chain = sorted((n for n in st if st[n].family == fam), key=lambda n: _DECAY_RANK[st[n].decay])
        for a, b in zip(chain, chain[1:]):
            g.add_edge(a, b, relation="specialization")
    for a, sa in st.items():
        if sa.family != "kalman":
            continue
        for b, sb in st.items():
            if sb.decay == sa.decay and sb.family == "reset":
                g.add_edge(a, b, relation="reset")
            if sb.decay == sa.decay and sb.family == "write":
                g.add_edge(a, b, relation="limit")
    return g
