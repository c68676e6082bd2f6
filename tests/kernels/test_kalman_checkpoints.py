"""What the kalman family's forward keeps for a backward: forward(..., save_for_backward=True)
returns saved = (S_c, P_c), the mean and covariance at every chunk start [NS, H, K, *].

Checked against the float64 chunked reference designmodel.chunked_adjoint.kalman_checkpoints
(rls, bayesian_layer; packed sequences one by one, since it takes no cu_seqlens) and, for the
per-key bayesian_layer_diag (which kalman_checkpoints does not take), against the float64
step-by-step filter run up to each chunk start. Also: asking for them changes neither o nor
the final state. Tiny shapes (the interpreter): T = 70 spans two chunks of 64, the second
partial.
"""
import pytest
import torch

from designmodel.chunked_adjoint import kalman_checkpoints
from designmodel.codegen import runtime

from .conftest import DEVICE, HAS_CUDA
from .helpers import relative_error
from .test_kalman import draw, initial, reference, to_dev

# fp32 inputs against float64: 1e-4 in the interpreter; on a GPU test_kalman's 1e-3 (the
# covariance path runs tf32x3 dots)
TOL = 1e-3 if HAS_CUDA else 1e-4


def _forward(module, q, k, v, ins, p0, init, cu=None, save=True, **kw):
    """module.forward on the device with the final state (and saved when save)."""
    return module.forward(*to_dev(q, k, v), **{n: x.to(DEVICE) for n, x in ins.items()},
                          p0=p0.to(DEVICE), initial_state=None if init is None else tuple(to_dev(*init)),
                          output_final_state=True, cu_seqlens=None if cu is None else cu.to(DEVICE),
                          save_for_backward=save, **kw)


def _checkpoints(q, k, v, ins, p0, init, chunk):
    """float64 (S_c [NC + 1, B, H, K, V], P_c [NC + 1, B, H, K, K]) of the chunked filter."""
    d = torch.float64
    return kalman_checkpoints(q.to(d), k.to(d), v.to(d), None if "g" not in ins else ins["g"].to(d),
                              ins["r"].to(d), None if "sigma" not in ins else ins["sigma"].to(d),
                              p0.to(d), initial_state=None if init is None else tuple(x.to(d) for x in init),
                              chunk=chunk)


def _assert_close(what, got, want):
    err = relative_error(got.cpu(), want)
    assert err <= TOL, f"{what}: relative error {err:.2e} > {TOL}"


@pytest.mark.parametrize("h0", [False, True], ids=["prior", "h0"])
@pytest.mark.parametrize("model", ["rls", "bayesian_layer"])
def test_saved_chunk_states_match_checkpoints(model, h0):
    B, T, H, K, V = 2, 70, 1, 16, 16
    module = runtime.load_zoo(model)
    q, k, v, ins, p0 = draw(model, B, T, H, K, V, seed=3)
    init = initial(B, H, K, V, seed=4) if h0 else None
    o, final, (S_c, P_c) = _forward(module, q, k, v, ins, p0, init)
    NC = -(-T // module.CHUNK)
    shapes = module.saved_for_backward_shapes(q, v, B, False)
    assert [(tuple(x.shape), x.dtype) for x in (S_c, P_c)] == shapes == [((B * NC, H, K, V), v.dtype), ((B * NC, H, K, K), torch.float32)]
    S_ref, P_ref = _checkpoints(q, k, v, ins, p0, init, module.CHUNK)
    # [NC + 1, B, H, ..] -> [B * NC, H, ..]: chunk c of sequence b at b * NC + c
    _assert_close("S_c", S_c, S_ref[:NC].transpose(0, 1).reshape(B * NC, H, K, V))
    _assert_close("P_c", P_c, P_ref[:NC].transpose(0, 1).reshape(B * NC, H, K, K))
    # without the flag: the very same output and final state
    o2, final2 = _forward(module, q, k, v, ins, p0, init, save=False)
    assert torch.equal(o, o2) and torch.equal(final[0], final2[0]) and torch.equal(final[1], final2[1])


@pytest.mark.parametrize("model", ["rls", "bayesian_layer"])
def test_saved_chunk_states_packed_sequences(model):
    """Packed sequences (lengths 5 and 65: one and two chunks) against each sequence alone."""
    bounds = [0, 5, 70]
    H, K, V = 1, 16, 16
    module = runtime.load_zoo(model)
    q, k, v, ins, p0 = draw(model, 1, bounds[-1], H, K, V, seed=7)
    init = initial(2, H, K, V, seed=8)
    cu = torch.tensor(bounds, dtype=torch.int32)
    o, final, (S_c, P_c) = _forward(module, q, k, v, ins, p0, init, cu)
    assert [(tuple(x.shape), x.dtype) for x in (S_c, P_c)] == module.saved_for_backward_shapes(q, v, 2, True)
    offset = 0
    for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
        seg = slice(bos, eos)
        S_ref, P_ref = _checkpoints(q[:, seg], k[:, seg], v[:, seg], {i: x[:, seg] for i, x in ins.items()},
                                    p0, (init[0][n:n + 1], init[1][n:n + 1]), module.CHUNK)
        NC = -(-(eos - bos) // module.CHUNK)
        _assert_close(f"S_c of sequence {n}", S_c[offset:offset + NC], S_ref[:NC, 0])
        _assert_close(f"P_c of sequence {n}", P_c[offset:offset + NC], P_ref[:NC, 0])
        offset += NC
    o2, final2 = _forward(module, q, k, v, ins, p0, init, cu, save=False)
    assert torch.equal(o, o2) and torch.equal(final[0], final2[0]) and torch.equal(final[1], final2[1])


def test_saved_chunk_states_per_key_decay():
    """bayesian_layer_diag (chunk_covariance_kernel): the state at the second chunk's start is
    the float64 step-by-step filter's final state after the first chunk. With the variance,
    saved comes after it."""
    B, T, H, K, V = 1, 70, 1, 16, 16
    module = runtime.load_zoo("bayesian_layer_diag")
    q, k, v, ins, p0 = draw("bayesian_layer_diag", B, T, H, K, V, seed=11)
    init = initial(B, H, K, V, seed=12)
    o, final, var, (S_c, P_c) = _forward(module, q, k, v, ins, p0, init, output_variance=True)
    C = module.CHUNK
    assert S_c.shape == (2, H, K, V) and P_c.shape == (2, H, K, K)
    ref = reference("bayesian_layer_diag", q[:, :C], k[:, :C], v[:, :C], {n: x[:, :C] for n, x in ins.items()},
                    p0, *init)
    _assert_close("S_c", S_c, torch.stack([init[0][0].double(), ref.state[0]]))
    _assert_close("P_c", P_c, torch.stack([init[1][0].double(), ref.covariance[0]]))
    o2, final2, var2 = _forward(module, q, k, v, ins, p0, init, save=False, output_variance=True)
    assert torch.equal(o, o2) and torch.equal(final[0], final2[0]) and torch.equal(final[1], final2[1])
    assert torch.equal(var, var2)
