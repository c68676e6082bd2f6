"""The reset family's backward from what its forward kept (save_for_backward / saved).

`forward(..., save_for_backward=True)` of deltanet and gated_deltanet returns, besides (o, ht),
W, the reset's inverse Ai and the innovations V_n; `backward(..., saved=...)` then skips the
reset's recompute and rebuilds the chunk-start states from V_n. The gradients are checked
against torch.autograd through the float64 filter (test_backward_reset._reference), on both
forward paths (fused: the state and readout kernel stores V_n; two_pass: the state kernel's),
with packed sequences, and through the custom op, where the forward keeps them only when a
gradient is needed.
"""
from __future__ import annotations

import pytest
import torch

from designmodel import ops
from designmodel.codegen import runtime

from .conftest import DEVICE
from .test_backward_reset import BF16_TOL, FP32_TOL, _case, _reference
from .helpers import relative_error


def _dev(x):
    return None if x is None else x.to(DEVICE)


def _saved_gradients(model, path, **kw):
    """Relative errors of backward(saved=forward's) against the float64 reference, and saved."""
    d, (q, k, v, ins, S0, do, dht, cu, scale) = _case(model, **kw)
    module = runtime.load_zoo(model)
    args = [_dev(x) for x in (q, k, v)] + [_dev(ins[n]) for n in module.INPUTS]
    o, ht, saved = module.forward(*args, scale=scale, initial_state=_dev(S0), output_final_state=True,
                                  cu_seqlens=_dev(cu), config={"path": path}, save_for_backward=True)
    out = module.backward(*args, _dev(do), dht=_dev(dht), scale=scale, initial_state=_dev(S0),
                          cu_seqlens=_dev(cu), saved=saved)
    got = dict(zip(["q", "k", "v", *module.INPUTS, "h0"], out))
    for name, x in zip(["q", "k", "v"], (q, k, v)):
        assert got[name].dtype == x.dtype, name
    want = _reference(d, q, k, v, ins, S0, do, dht, cu, scale)
    assert set(got) == set(want)
    return {n: relative_error(got[n], want[n]) for n in want}, saved


@pytest.mark.parametrize("path", ["fused", "two_pass"])
@pytest.mark.parametrize("model", ["deltanet", "gated_deltanet"])
def test_gradients_from_saved(model, path):
    errs, saved = _saved_gradients(model, path)
    assert len(saved) == 3
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("model", ["deltanet", "gated_deltanet"])
def test_gradients_from_saved_bf16(model):
    # bf16 inputs: the gradients come back in bf16, written by the kernels in that dtype
    errs, _ = _saved_gradients(model, "fused", dtype=torch.bfloat16, seed=7)
    assert max(errs.values()) <= BF16_TOL, errs


@pytest.mark.parametrize("path", ["fused", "two_pass"])
def test_gradients_from_saved_varlen(path):
    # packed sequences: 17 tokens, exactly one chunk, 19 tokens
    errs, _ = _saved_gradients("gated_deltanet", path, T=100, cu_seqlens=[0, 17, 81, 100], seed=3)
    assert max(errs.values()) <= FP32_TOL, errs


def test_saved_of_the_wrong_shape_raises():
    d, (q, k, v, ins, S0, do, dht, cu, scale) = _case("deltanet", T=20)
    module = runtime.load_zoo("deltanet")
    q, k, v, beta, do = (_dev(x) for x in (q, k, v, ins["beta"], do))
    _, _, saved = module.forward(q, k, v, beta, save_for_backward=True)
    with pytest.raises(ValueError, match="saved Ai"):
        module.backward(q, k, v, beta, do, saved=(saved[0], saved[1][:, :10], saved[2]))
    with pytest.raises(ValueError, match="saved v_new"):
        module.backward(q, k, v, beta, do, saved=(saved[0], saved[1], saved[2].double()))
    with pytest.raises(ValueError, match="saved must be"):
        module.backward(q, k, v, beta, do, saved=saved[:2])


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_op_keeps_for_backward_only_when_grad_is_needed(mode, monkeypatch):
    module = runtime.load_zoo("gated_deltanet")
    calls = []
    real = module.backward

    def spy(*args, saved=None, **kw):
        calls.append(saved)
        return real(*args, saved=saved, **kw)

    monkeypatch.setattr(module, "backward", spy)
    d, (q, k, v, ins, S0, do, dht, cu, scale) = _case("gated_deltanet", T=70, seed=4)
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, ins["g"], ins["beta"], S0)]

    def loss(q, k, v, g, beta, h0):
        o, ht = ops.gated_deltanet(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        return (o * _dev(do)).sum() + (ht * _dev(dht)).sum()

    if mode == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(loss, fullgraph=True, backend="aot_eager")
    else:
        fn = loss
    grads = torch.autograd.grad(fn(*leaves), leaves)
    assert len(calls) == 1 and calls[0] is not None and len(calls[0]) == 3
    want = _reference(d, q, k, v, ins, S0, do, dht, cu, scale)
    for name, g in zip(["q", "k", "v", "g", "beta", "h0"], grads):
        assert relative_error(g, want[name]) <= FP32_TOL, (name, relative_error(g, want[name]))
    # without a gradient to compute nothing is kept (the forward op's extra outputs are empty)
    with torch.no_grad():
        o, _ = ops.gated_deltanet(*leaves[:5])
    assert o.shape == v.shape
