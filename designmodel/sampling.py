"""Well-conditioned random inputs for a design model: what `designmodel check` and the tests use.

`random_inputs(derivation, B, T, H, K, V, seed)` draws (q, k, v, inputs) in float64 inside
every input's domain, in ranges that keep the problems well conditioned (decays in [0.5, 1],
noises in [0.1, 2]).
"""
from __future__ import annotations

import math

import torch

from designmodel.reference import input_shape

FULL_NAME = "P0"   # the run-time name the test grammar gives a named full prior covariance


# --- inputs --------------------------------------------------------------------------------

# Sampling ranges by domain: exp(g), unit gates and sigmoid(x + 3) land in [0.5, 1); noises
# given directly, exp(x) and softplus(x) in about [0.1, 2].
RANGES = {
    "logdecay": (math.log(0.5), 0.0),
    "unit": (0.5, 0.95),
    "positive": (0.1, 2.0),
    "nonnegative": (0.0, 2.0),
    "real": (math.log(0.1), math.log(2.0)),
}


def _uniform(gen: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _spd(gen: torch.Generator, H: int, K: int) -> torch.Tensor:
    """A well-conditioned symmetric positive definite matrix per head, [H, K, K]."""
    a = torch.randn(H, K, K, generator=gen, dtype=torch.float64)
    return a @ a.mT / K + 0.5 * torch.eye(K, dtype=torch.float64)


def random_inputs(derivation, B: int, T: int, H: int, K: int, V: int, seed: int = 0):
    """(q [B, T, H, K], k, v [B, T, H, V], inputs) in float64 for a derivation's spec."""
    spec = getattr(derivation, "spec", derivation)
    if spec.key_dim is not None and spec.key_dim != K:
        raise ValueError(f"the spec fixes key_dim = {spec.key_dim}, got K = {K}")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) / math.sqrt(K)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    # Unit keys when declared; otherwise norms spread around 1.
    k = k / k.norm(dim=-1, keepdim=True)
    if not spec.observation.unit_keys:
        k = k * _uniform(gen, (B, T, H, 1), 0.5, 1.5)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    inputs = {s.name: _uniform(gen, input_shape(s, B, T, H, K), *RANGES[s.domain]) for s in spec.inputs}
    cov = spec.prior.covariance
    if cov.kind == "full" and isinstance(cov.value, str):
        inputs[cov.value] = _spd(gen, H, K)
    return q, k, v, inputs


def random_initial(B: int, H: int, K: int, V: int, seed: int = 0):
    """(initial_state [B, H, K, V], initial_covariance [B, H, K, K]) for starting mid-sequence."""
    gen = torch.Generator().manual_seed(seed + 7919)
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    P0 = _spd(gen, B * H, K).reshape(B, H, K, K)
    return S0, P0
