"""The blocked per-key decayed products (designmodel.keywise) against the dense [C, C, K]
formulas in float64, and their written-out adjoints against autograd through those formulas."""
import pytest
import torch

from designmodel import keywise


def _dense_ratio(b):
    """Gamma_tj,m = exp(b_tm - b_jm) for t >= j, else 0: [.., C, C, K]."""
    C = b.shape[-2]
    low = torch.ones(C, C, dtype=torch.bool).tril()
    return (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~low[..., None], float("-inf")).exp()


def _dense_scores(X, Y, b):
    return torch.einsum("...tm,...jm,...tjm->...tj", X, Y, _dense_ratio(b))


def _dense_sums(b, Y):
    return torch.einsum("...tjm,...jm->...tm", _dense_ratio(b), Y)


def _inputs(C, K=6, lead=(2, 3), scale=1.0, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X, Y = (torch.randn(*lead, C, K, generator=gen, dtype=dtype) for _ in range(2))
    g = -scale * torch.rand(*lead, C, K, generator=gen, dtype=dtype)     # log decays <= 0
    return X, Y, g.cumsum(-2)


@pytest.mark.parametrize("C", [64, 16, 12, 5, 1])
def test_blocked_products_match_the_dense_formulas(C):
    X, Y, b = _inputs(C)
    torch.testing.assert_close(keywise.decayed_scores(X, Y, b), _dense_scores(X, Y, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(keywise.decayed_sums(b, Y), _dense_sums(b, Y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C", [64, 12, 5])
def test_written_adjoints_match_autograd_through_the_dense_formulas(C):
    X, Y, b = (x.requires_grad_() for x in _inputs(C, seed=1))
    dA = torch.randn(2, 3, C, C, dtype=torch.float64)
    dZ = torch.randn(2, 3, C, 6, dtype=torch.float64)
    want = torch.autograd.grad((_dense_scores(X, Y, b) * dA.tril()).sum(), (X, Y, b))
    got = keywise.decayed_scores_adjoint(X.detach(), Y.detach(), b.detach(), dA)
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_, w, rtol=1e-11, atol=1e-11)
    want = torch.autograd.grad((_dense_sums(b, Y) * dZ).sum(), (Y, b))
    Z = keywise.decayed_sums(b.detach(), Y.detach())
    got = keywise.decayed_sums_adjoint(b.detach(), Y.detach(), Z, dZ)
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_, w, rtol=1e-11, atol=1e-11)


def test_strong_decays_stay_finite_in_float32():
    """Log decays down to -30 per token (a_C as small as e^-1900): the ratios 1 / a_j that a
    factored a_t (1 / a_j) would need overflow float32; the blocked products stay finite and
    agree with the float64 dense ones of the same (float32-rounded) inputs: b near -1900 holds
    only about 1e-4 in float32, so comparing with the unrounded b would measure that rounding."""
    X, Y, b = _inputs(64, scale=30.0, seed=2)
    dA, dZ = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.randn(2, 3, 64, 6, dtype=torch.float64)
    f = [x.float() for x in (X, Y, b, dA, dZ)]
    A = keywise.decayed_scores(*f[:3])
    Z = keywise.decayed_sums(f[2], f[1])
    grads = keywise.decayed_scores_adjoint(*f[:3], f[3]) + keywise.decayed_sums_adjoint(f[2], f[1], Z, f[4])
    for x in (A, Z) + grads:
        assert torch.isfinite(x).all()
    X, Y, b = (x.double() for x in f[:3])
    torch.testing.assert_close(A.double(), _dense_scores(X, Y, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Z.double(), _dense_sums(b, Y), rtol=1e-5, atol=1e-5)
