"""The kalman backward's two sequential sweeps as generated Triton kernels (ADJOINT_SWEEPS)
against the chunk-by-chunk PyTorch sweeps of designmodel.chunked_adjoint, which the float64
tests (tests/numeric/test_kalman_adjoint.py) check against autograd through the step-by-step
filter. Head dims that are not powers of two (masked blocks), with and without the final
state's gradients, a chunk-end decay per chunk or per key. And the parallel steps 4 and 6 as
a kernel (ADJOINT_STEPS) against the float64 PyTorch chunk adjoint. Each kernel also with its
"tf32x2" input precision, as the backward runs it for 16-bit inputs: the dots with the keys,
dO or a 16-bit chunk-start mean as loaded split only their other operand, the decays moved
off the input (the interpreter computes every dot in float32: the pieces must add back to
the whole; the inputs are rounded to bf16 values, exact in tf32 as on a GPU)."""
import pytest
import torch

import designmodel
from designmodel.chunked_adjoint import _chunk_adjoint, _chunk_quantities, _covariance_sweep, _mean_sweep

from .conftest import DEVICE
from .helpers import relative_error

# (precision, input precision) of a step kernel: float32 dots, and the 16-bit inputs' split
SPLITS = {"ieee": ("ieee", None), "tf32x2": ("tf32x3", "tf32x2")}


def _bf16_values(t):
    """t rounded to bf16 values, kept in its dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


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
@pytest.mark.parametrize("split", list(SPLITS))
def test_generated_sweeps_match_the_chunk_by_chunk_sweeps(K, V, end, per_key, split):
    model = "bayesian_layer_diag" if per_key else "bayesian_layer"
    mean_sweep, covariance_sweep = designmodel.compile(model).kernels.ADJOINT_SWEEPS
    Yt, Wk, Qh, W, dO, aC, src, dS_end, dP_end = _draw(2, 2, 3, 64, K, V, seed=K + V, per_key=per_key)
    dS_end, dP_end = (dS_end, dP_end) if end else (None, None)
    dO = _bf16_values(dO)
    precision, inputs = SPLITS[split]
    dev = lambda x: None if x is None else x.to(DEVICE)
    want = _mean_sweep(Yt, Wk, Qh, W, dO, aC, dS_end)
    got = mean_sweep(*map(dev, (Yt, Wk, Qh, W, dO, aC, dS_end)), precision=precision, input_precision=inputs)
    for g, w in zip(got, want):
        assert g.shape == w.shape and relative_error(g.cpu(), w) <= 1e-5
    want = _covariance_sweep(Yt, Wk, src, aC, dP_end)
    got = covariance_sweep(*map(dev, (Yt, Wk, src, aC, dP_end)))
    for g, w in zip(got, want):
        assert g.shape == w.shape and relative_error(g.cpu(), w) <= 1e-5


def _chunk_inputs(B, H, NC, C, K, V, seed):
    """Chunks of a filter in float64: inputs, the chunk-start states, and dP' at every chunk end."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    r = lambda *s: torch.randn(*s, generator=gen, dtype=d)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=d)
    x = dict(q=0.3 * r(B, H, NC, C, K), k=torch.nn.functional.normalize(r(B, H, NC, C, K), dim=-1),
             v=r(B, H, NC, C, V), g=-0.1 * u(B, H, NC, C), r=0.5 + u(B, H, NC, C), sigma=0.1 * u(B, H, NC, C))
    A = r(B, H, NC, K, K)
    P = A @ A.mT / K + 0.5 * torch.eye(K, dtype=d)
    dP = r(B, H, NC, K, K)
    return x, r(B, H, NC, K, V), P, dP + dP.mT


def _chunk_starts(S, P, layout):
    """The chunk-start mean and covariance [B, H, NC, K, *] as a step kernel gets them, and the
    float64 values the reference should use: contiguous float32 ("by_head"), or as the forward
    keeps its checkpoints ("chunk_major"): stored [B, NC, H, K, *] and passed as a transposed
    view, the mean in bfloat16."""
    if layout == "by_head":
        return S.float().to(DEVICE), P.float().to(DEVICE), S, P
    view = lambda t, d: t.transpose(1, 2).to(DEVICE, d).contiguous().transpose(1, 2)
    Sd, Pd = view(S, torch.bfloat16), view(P, torch.float32)
    assert not Sd.is_contiguous() and not Pd.is_contiguous()
    return Sd, Pd, Sd.cpu().double(), P


@pytest.mark.parametrize("K,V", [(16, 16), (24, 8), (80, 72)])   # one key block, masked, two (64 + 16)
@pytest.mark.parametrize("strict", [False, True], ids=["posterior", "prior"])
@pytest.mark.parametrize("variance", [False, True], ids=["", "variance"])
@pytest.mark.parametrize("layout", ["by_head", "chunk_major"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_generated_chunk_adjoint_steps_match_the_float64_chunk_adjoint(K, V, strict, variance, layout, split):
    """Steps 4 (the adjoint at dO, dS' and the variance readout's dvar) and 6 (at dP') as one
    kernel per chunk: every gradient and step 4's covariance source against _chunk_adjoint in
    float64, from step 2's quantities; the chunk starts contiguous or read in place from the
    forward's layout."""
    steps = designmodel.compile("bayesian_layer").kernels.ADJOINT_STEPS
    x, S, P, dP = _chunk_inputs(2, 2, 2, 64, K, V, seed=K)
    x["k"] = _bf16_values(x["k"])
    Sd, Pd, S, P = _chunk_starts(S, P, layout)
    gen = torch.Generator().manual_seed(K + 1)
    dO = _bf16_values(torch.randn(2, 2, 2, 64, V, generator=gen, dtype=torch.float64))
    precision, inputs = SPLITS[split]
    dS = torch.randn(2, 2, 2, K, V, generator=gen, dtype=torch.float64)
    dvar = torch.randn(2, 2, 2, 64, generator=gen, dtype=torch.float64) if variance else None
    c = _chunk_quantities(x["q"], x["k"], x["v"], x["g"], x["r"], x["sigma"], S, P, strict)
    dev = lambda t: t.float().to(DEVICE) if isinstance(t, torch.Tensor) else t
    xd, cd = {m: dev(t) for m, t in x.items()}, {m: dev(t) for m, t in c.items()}
    want, _, want_src = _chunk_adjoint(x["q"], x["k"], x["sigma"], S, P, c, dO, dvar, dS, None, strict,
                                       carry_mean=False)
    got, src = steps["mean"](xd, cd, Sd, Pd, dev(dO), dev(dS), strict, dvar=dev(dvar), precision=precision,
                             input_precision=inputs)
    assert set(got) == set(want)
    for m in want:
        assert got[m].shape == want[m].shape and relative_error(got[m].cpu().double(), want[m]) <= 1e-5, m
    assert relative_error(src.cpu().double(), want_src) <= 1e-5
    want, _, _ = _chunk_adjoint(x["q"], x["k"], x["sigma"], S, P, c, None, None, None, dP, strict,
                                carry_mean=False, carry_covariance=False)
    got = steps["covariance"](xd, cd, Sd, Pd, dev(dP), strict, precision=precision, input_precision=inputs)
    for m in ("k", "g", "r", "sigma"):
        assert got[m].shape == want[m].shape and relative_error(got[m].cpu().double(), want[m]) <= 1e-5, m


@pytest.mark.parametrize("K,V", [(24, 8), (80, 72)])   # masked, two key blocks
@pytest.mark.parametrize("variance", [False, True], ids=["", "variance"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_step_6_finishes_the_key_gradient_step_4_defers(K, V, variance, split):
    """Step 4 with defer_keys leaves its last phase's key gradient (dK^ and dk, linear in dU,
    dS_in and the readout's dK^) to step 6 with its carry: the two steps' sums of every
    gradient, and step 4's q, v and covariance source, against _chunk_adjoint in float64."""
    steps = designmodel.compile("bayesian_layer").kernels.ADJOINT_STEPS
    x, S, P, dP = _chunk_inputs(2, 2, 2, 64, K, V, seed=K + 7)
    x["k"] = _bf16_values(x["k"])
    Sd, Pd, S, P = _chunk_starts(S, P, "chunk_major")
    gen = torch.Generator().manual_seed(K + 8)
    dO = _bf16_values(torch.randn(2, 2, 2, 64, V, generator=gen, dtype=torch.float64))
    dS = torch.randn(2, 2, 2, K, V, generator=gen, dtype=torch.float64)
    dvar = torch.randn(2, 2, 2, 64, generator=gen, dtype=torch.float64) if variance else None
    precision, inputs = SPLITS[split]
    c = _chunk_quantities(x["q"], x["k"], x["v"], x["g"], x["r"], x["sigma"], S, P, False)
    dev = lambda t: t.float().to(DEVICE) if isinstance(t, torch.Tensor) else t
    xd, cd = {m: dev(t) for m, t in x.items()}, {m: dev(t) for m, t in c.items()}
    want4, _, want_src = _chunk_adjoint(x["q"], x["k"], x["sigma"], S, P, c, dO, dvar, dS, None, False,
                                        carry_mean=False)
    want6, _, _ = _chunk_adjoint(x["q"], x["k"], x["sigma"], S, P, c, None, None, None, dP, False,
                                 carry_mean=False, carry_covariance=False)
    got4, src, carry = steps["mean"](xd, cd, Sd, Pd, dev(dO), dev(dS), False, dvar=dev(dvar), precision=precision,
                                     input_precision=inputs, defer_keys=True)
    got6 = steps["covariance"](xd, cd, Sd, Pd, dev(dP), False, precision=precision, input_precision=inputs,
                               carry=carry)
    assert "k" not in got4 and relative_error(src.cpu().double(), want_src) <= 1e-5
    for m in ("q", "v"):
        assert relative_error(got4[m].cpu().double(), want4[m]) <= 1e-5, m
    for m in ("k", "g", "r", "sigma"):
        got = got6[m].cpu().double() + (got4[m].cpu().double() if m in got4 else 0.)
        assert relative_error(got, want4[m] + want6[m]) <= 1e-5, m


@pytest.mark.parametrize("K,V", [(16, 16), (24, 8), (80, 72)])   # one key block, masked, three (32 + 32 + 16)
@pytest.mark.parametrize("strict", [False, True], ids=["posterior", "prior"])
@pytest.mark.parametrize("factor_warps", [0, 2], ids=["one_kernel", "split"])
@pytest.mark.parametrize("layout", ["by_head", "chunk_major"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_generated_chunk_quantities_match_the_float64_chunk_quantities(K, V, strict, factor_warps, layout, split,
                                                                       monkeypatch):
    """Step 2 as one kernel per chunk (its own LDL for the Cholesky factor and its inverse), or
    in two parts around a factorization kernel: every quantity the sweeps and the chunk
    adjoints read, against _chunk_quantities in float64; the last chunk padded as the backward
    pads it (q = k = v = 0, g = sigma = 0, r = 1); the chunk starts contiguous or read in place
    from the forward's layout."""
    module = designmodel.compile("bayesian_layer").kernels
    monkeypatch.setattr(module, "CHUNK_QUANTITIES_BLOCKS", module.CHUNK_QUANTITIES_BLOCKS[:3] + (factor_warps,))
    steps = module.ADJOINT_STEPS
    x, S, P, _ = _chunk_inputs(2, 2, 2, 64, K, V, seed=K + 7)
    x["k"] = _bf16_values(x["k"])
    Sd, Pd, S, P = _chunk_starts(S, P, layout)
    for m, fill in (("q", 0.), ("k", 0.), ("v", 0.), ("g", 0.), ("r", 1.), ("sigma", 0.)):
        x[m][:, :, -1, 40:] = fill
    want = _chunk_quantities(x["q"], x["k"], x["v"], x["g"], x["r"], x["sigma"], S, P, strict)
    want["Wk"] = want["Li"] @ want["Kh"]
    dev = lambda t: t.float().to(DEVICE)
    precision, inputs = SPLITS[split]
    got = steps["quantities"]({m: dev(t) for m, t in x.items()}, Sd, Pd, strict, precision=precision,
                              input_precision=inputs)
    assert got.pop("per_key") is False
    assert set(got) <= set(want)
    for m in got:
        assert got[m].shape == want[m].shape and relative_error(got[m].cpu().double(), want[m]) <= 1e-5, m
