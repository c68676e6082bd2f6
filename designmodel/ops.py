"""Forward ops of the zoo, drop-in for flash-linear-attention's (fla 0.6.0) chunk ops.

Each op takes the arguments of the matching fla op and returns (o, final_state):

| op | fla 0.6.0 | gate and gain |
|---|---|---|
| linear_attention(q, k, v) | chunk_linear_attn(..., normalize=False) | none |
| retnet(q, k, v) | chunk_retention | per-head decay 1 - 2^(-5 - h), computed from H |
| mamba2(q, k, v, g) | chunk_simple_gla(q, k, v, g) | g [B, T, H] log-decay |
| gla(q, k, v, g) | chunk_gla | g [B, T, H, K] log-decay |
| deltanet(q, k, v, beta) | chunk_delta_rule | beta [B, T, H] in (0, 1) |
| gated_deltanet(q, k, v, g, beta) | chunk_gated_delta_rule | g [B, T, H], beta [B, T, H] |
| kda(q, k, v, g, beta) | chunk_kda | g [B, T, H, K], beta [B, T, H] |

Common keyword arguments: scale=None (default K ** -0.5, applied to q), initial_state=None
([N, H, K, V]), output_final_state=False, cu_seqlens=None ([N + 1] cumulative lengths of
sequences packed along T, with B = 1). o is [B, T, H, V] in the input dtype; the final state
is [N, H, K, V] float32, or None. Keys of the delta-rule models are expected L2-normalized
(the zoo declares unit keys), as fla's ops expect unless told to normalize them.

Inputs outside their domain (a positive log-decay, beta outside (0, 1)) raise ValueError
before any launch; `check_domain=False` skips that check and its device-to-host sync.
The kernels are those committed under generated/<model>/, emitted from each derivation, called
through torch.library custom ops (designmodel.library), so that the ops compile with
torch.compile(fullgraph=True) and carry autograd where the kernels have a backward.
"""
from __future__ import annotations

import torch

from designmodel import library, zoo
from designmodel.codegen import runtime

__all__ = ["linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "kda",
           "retnet_gamma"]


# Registered when this module is imported (about 0.7 s), not on first use: a first call inside
# torch.compile(fullgraph=True) could not import the kernels' module while being traced.
_ZOO = {model: library.register(model, runtime.load_zoo(model)) for model in zoo.NAMES}


def _forward(model: str):
    """The zoo model's forward through its torch.library custom op (designmodel.library)."""
    return _ZOO[model].forward


def linear_attention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, **options):
    """Linear attention: S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t)."""
    return _forward("linear_attention")(q, k, v, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state,
                                        cu_seqlens=cu_seqlens, **options)


def retnet_gamma(H: int, device=None) -> torch.Tensor:
    """RetNet's per-head decays, as fla's chunk_retention computes them: 1 - 2^(-5 - h)."""
    return 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32, device=device))


def retnet(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
           **options):
    """Retention: S_t = gamma_h S_{t-1} + k_t v_t^T with the fixed decay gamma_h = 1 - 2^(-5 - h)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a [B, T, H, K] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    gamma = retnet_gamma(q.shape[2], q.device)
    # the gammas are ours, in (0, 1) by construction: no domain check (and no sync) for them
    options.setdefault("check_domain", False)
    return _forward("retnet")(q, k, v, gamma, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                              **options)


def mamba2(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
           cu_seqlens=None, **options):
    """Mamba-2 / SSD (fla's simple GLA): S_t = exp(g_t) S_{t-1} + k_t v_t^T, g [B, T, H] <= 0."""
    return _forward("mamba2")(q, k, v, g=g, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                              **options)


def gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        **options):
    """GLA: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, g [B, T, H, K] <= 0."""
    return _forward("gla")(q, k, v, g=g, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                           **options)


def deltanet(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
             cu_seqlens=None, **options):
    """DeltaNet: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, beta [B, T, H] in (0, 1)."""
    return _forward("deltanet")(q, k, v, beta=beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                **options)


def gated_deltanet(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, **options):
    """Gated DeltaNet: S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T."""
    return _forward("gated_deltanet")(q, k, v, beta=beta, g=g, scale=scale,
                                      initial_state=initial_state,
                                      output_final_state=output_final_state,
                                      cu_seqlens=cu_seqlens, **options)


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, **options):
    """Kimi Delta Attention: the delta rule with a per-key decay, g [B, T, H, K] <= 0."""
    return _forward("kda")(q, k, v, beta=beta, g=g, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                           **options)


# --- kalman family: the exact filter, keeping the covariance (MATH.md 6.3) ------------------

__all__ += ["bayesian_layer", "bayesian_layer_diag", "rls"]


def _prior_variance(p0, q) -> torch.Tensor:
    """p0 as the per-head tensor [H] the kernels take (a number is the same for every head)."""
    if isinstance(p0, torch.Tensor):
        return p0
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a [B, T, H, K] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    return torch.full((q.shape[2],), float(p0), dtype=torch.float32, device=q.device)


def _process_noise(sigma, r):
    """sigma, or zeros like r when None (no process noise)."""
    if sigma is not None:
        return sigma
    if not isinstance(r, torch.Tensor):
        raise ValueError(f"r must be a torch.Tensor [B, T, H], got {type(r).__name__}")
    return torch.zeros_like(r)


def bayesian_layer(q, k, v, g, r, sigma=None, p0=1.0, scale=None, initial_state=None,
                   output_final_state=False, output_variance=False, cu_seqlens=None, **options):
    """The Bayesian Layer: the exact Kalman filter over a matrix memory (MATH.md 2, 6.3).

    S_t, P_t from predict (F = exp(g_t) I, Q = sigma_t I) and update with v_t = S_t^T k_t + eps,
    eps ~ N(0, r_t I); o_t = S_t^T (scale q_t). g [B, T, H] <= 0; r [B, T, H] > 0; sigma
    [B, T, H] >= 0 (None: no process noise); p0 the prior variance (a number or [H]).
    initial_state: S [N, H, K, V] or (S, P [N, H, K, K]). Returns (o, final_state) with
    final_state = (S, P) float32 or None, and the predictive variance q^T P_t q [B, T, H] as a
    third element when output_variance.
    """
    return _forward("bayesian_layer")(q, k, v, g=g, p0=_prior_variance(p0, q), r=r,
                                      sigma=_process_noise(sigma, r), scale=scale,
                                      initial_state=initial_state,
                                      output_final_state=output_final_state,
                                      output_variance=output_variance, cu_seqlens=cu_seqlens,
                                      **options)


def bayesian_layer_diag(q, k, v, g, r, sigma=None, p0=1.0, scale=None, initial_state=None,
                        output_final_state=False, output_variance=False, cu_seqlens=None,
                        **options):
    """The Bayesian Layer with a per-key decay: F = diag(exp(g_t)), g [B, T, H, K] <= 0."""
    return _forward("bayesian_layer_diag")(q, k, v, g=g, p0=_prior_variance(p0, q), r=r,
                                           sigma=_process_noise(sigma, r), scale=scale,
                                           initial_state=initial_state,
                                           output_final_state=output_final_state,
                                           output_variance=output_variance,
                                           cu_seqlens=cu_seqlens, **options)


def rls(q, k, v, r, p0=1.0, scale=None, initial_state=None, output_final_state=False,
        output_variance=False, cu_seqlens=None, **options):
    """Recursive least squares (online ridge regression, lambda = r / p0): the Kalman filter
    without decay or process noise. r [B, T, H] > 0."""
    return _forward("rls")(q, k, v, p0=_prior_variance(p0, q), r=r, scale=scale,
                           initial_state=initial_state, output_final_state=output_final_state,
                           output_variance=output_variance, cu_seqlens=cu_seqlens, **options)
