"""A Bayesian Layer that reads out *before* each update, with its predictive variance.

The zoo's Bayesian Layer reads the memory after token t has been written (the posterior
S_t). This spec reads it before (the prediction S_t^- = alpha_t S_{t-1}): the output at t is
the layer's forecast of v_t from everything up to t - 1, and the variance q_t^T P_t^- q_t is
how unsure that forecast is. Why want it:

- the readout never sees the token's own value, so y_t is an honest prediction of v_t (no
  copy of v_t leaks into it), as for a next-token memory or an anomaly score
  (v_t - y_t)^2 / (variance + r_t);
- the variance says which queries the memory has evidence for, and grows again where the gate
  forgets (the stationary process noise p0 (1 - alpha_t^2) returns forgotten directions to
  the prior p0 I).

Inputs: a per-token log-decay g (the gate alpha_t = exp(g_t)), a per-token observation noise
r > 0, and a learned prior variance p0 > 0 per head.
"""
from designmodel.spec import *

g = Input("g", domain="logdecay")          # log-decay per token and head
r = Input("r", domain="positive")          # observation noise variance
p0 = Constant("p0", domain="positive")     # prior variance per head

model = DesignModel(
    name="bayesian_prior_readout",
    prior=Prior(covariance=isotropic(p0)),
    transition=Transition(decay=exp(g), noise="stationary"),
    observation=Regression(noise=r),
    readout=Readout("prior", variance=True),
    filter=exact(),
    description="exact filter, scalar gate, stationary process noise, readout before the update with variance",
)
