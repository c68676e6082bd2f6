"""The kalman backward's two sequential sweeps as generated Triton kernels (ADJOINT_SWEEPS)
against the chunk-by-chunk PyTorch sweeps of designmodel.chunked_adjoint, which the float64
tests (tests/numeric/test_kalman_adjoint.py) check against autograd through the step-by-step
filter. Head dims that are not powers of two (masked blocks), with and without the final
state's gradients, a chunk-end decay per chunk or per key."""
import pytest
import torch

import designmodel
from designmodel.chunked_adjoint import _covariance_sweep, _mean_sweep

from .conftest import DEVICE
from .helpers import relative_error


def _draw(B, H, NC, C, K, V, seed, per_key=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    Yt, Wk, Qh = (0.3 * r(B, H, NC, C, K) for _ in range(3))
    W = 0.3 * r(B, H, NC, C, C).tril()
    dO = r(B, H, NC, C, V)
    aC = torch.rand(B, H, NC, *((K,) if per_key else ()), generator=gen) * 0.5 + 0.5
    src = r(B, H, NC, K, K)
    src = src + src.mT
    dS_end, dP_end = r(B, H, K, V), r(B, H, K, K)
    return Yt, Wk, Qh, W, dO, aC, src, dS_end, dP_end + dP_end.mT


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "per_key"])
@pytest.mark.parametrize("K,V", [(16, 16), (24, 8)])
@pytest.mark.parametrize("end", [True, False], ids=["end", "no_end"])
def test_generated_sweeps_match_the_chunk_by_chunk_sweeps(K, V, end, per_key):
    model = "bayesian_layer_diag" if per_key else "bayesian_layer"
    mean_sweep, covariance_sweep = designmodel.compile(model).kernels.ADJOINT_SWEEPS
    Yt, Wk, Qh, W, dO, aC, src, dS_end, dP_end = _draw(2, 2, 3, 64, K, V, seed=K + V, per_key=per_key)
    dS_end, dP_end = (dS_end, dP_end) if end else (None, None)
    dev = lambda x: None if x is None else x.to(DEVICE)
    want = _mean_sweep(Yt, Wk, Qh, W, dO, aC, dS_end)
    got = mean_sweep(*map(dev, (Yt, Wk, Qh, W, dO, aC, dS_end)))
    for g, w in zip(got, want):
        assert g.shape == w.shape and relative_error(g.cpu(), w) <= 1e-5
    want = _covariance_sweep(Yt, Wk, src, aC, dP_end)
    got = covariance_sweep(*map(dev, (Yt, Wk, src, aC, dP_end)))
    for g, w in zip(got, want):
        assert g.shape == w.shape and relative_error(g.cpu(), w) <= 1e-5
