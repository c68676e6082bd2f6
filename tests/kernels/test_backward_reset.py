"""The reset family's chunked backward core against torch.autograd through the float64 filter.

`backward_core(q, k, v, gain, log_decay, do, dht, scale, initial_state, cu_seqlens)` of a
generated reset module returns the gradients of sum(o * do) + sum(S_T * dht) with respect to
q, k, v, the gain beta, the log-decay and the initial state. The zoo reset models take beta
and g directly (gain = beta, log-decay = g), so the reference's gradients with respect to
its inputs are the expected values, computed by autograd through `reference.recurrent` in
float64 on the same rounded values.

One correction: the float64 filter evaluates the gain from the spec as c / (c |k|^2 + r)
with c = beta, r = 1 - beta, which equals beta on unit keys but depends on |k|^2 off them,
so autograd adds a radial term to dk. The core works with the derived gain beta (the spec
declares unit keys), whose dk has no such term: `reference.delta_gain_gradients` removes it.
"""
from __future__ import annotations

import pytest
import torch

import designmodel
from designmodel import reference
from designmodel.codegen import runtime
from designmodel.derive import derive
from designmodel.spec import DesignModel, Input, Readout, Regression, Transition, exp, reset

from .conftest import DEVICE, HAS_CUDA
from .helpers import make_inputs, relative_error

B, T, H, K, V = 1, 80, 2, 32, 16   # T not a multiple of the chunk (64); K != V
# float32 inputs: exact float32 dots in the interpreter; on a GPU tl.dot rounds float32
# operands to tf32 (10-bit mantissa), as in tests/kernels/test_gpu.py
FP32_TOL = 5e-3 if HAS_CUDA else 1e-4
BF16_TOL = 2e-2

_beta, _g = Input("beta", domain="unit"), Input("g", domain="logdecay")
# gated_deltanet read out before each token's own write (o_t = S_{t-1}^T q_t after the decay)
GATED_PRIOR = DesignModel("gated_deltanet_prior", transition=Transition(decay=exp(_g)),
                          observation=Regression(noise=1 - _beta, unit_keys=True), filter=reset(_beta),
                          readout=Readout(timing="prior"))
KDA_PRIOR = DesignModel("kda_prior", transition=Transition(decay=exp(Input("g", per="key", domain="logdecay"))),
                        observation=Regression(noise=1 - _beta, unit_keys=True), filter=reset(_beta),
                        readout=Readout(timing="prior"))


def _case(model, B=B, T=T, initial=True, cu_seqlens=None, seed=0, dtype=torch.float32, spec=None,
          decay_scale=1.0):
    """Inputs and upstream gradients; decay_scale multiplies the log-decay g."""
    d = derive(spec if spec is not None else model)
    q, k, v, ins = make_inputs(d.spec.inputs, B, T, H, K, V, seed=seed, unit_keys=True)
    if "g" in ins:
        ins["g"] = ins["g"] * decay_scale
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    gen = torch.Generator().manual_seed(seed + 1)
    S0 = torch.randn(N, H, K, V, generator=gen) if initial else None
    do = torch.randn(B, T, H, V, generator=gen)
    dht = torch.randn(N, H, K, V, generator=gen)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    q, k, v, do = (x.to(dtype) for x in (q, k, v, do))
    scale = K ** -0.5
    return d, (q, k, v, ins, S0, do, dht, cu, scale)


def _reference(d, q, k, v, ins, S0, do, dht, cu, scale):
    """Gradients of sum(o do) + sum(S_T dht) by autograd through the float64 filter."""
    k64 = k.double()
    k64 = k64 / k64.norm(dim=-1, keepdim=True)     # rounding to bf16 moves keys off the sphere
    leaves = {"q": q.double(), "k": k64, "v": v.double(),
              **{n: x.double() for n, x in ins.items()}}
    if S0 is not None:
        leaves["h0"] = S0.double()
    for x in leaves.values():
        x.requires_grad_(True)
    ref = reference.recurrent(d, leaves["q"] * scale, leaves["k"], leaves["v"],
                              {n: leaves[n] for n in ins}, initial_state=leaves.get("h0"),
                              cu_seqlens=None if cu is None else cu.long())
    loss = (ref.o * do.double()).sum() + (ref.state * dht.double()).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    # the spec's gain c / (c |k|^2 + r) against the derived gain beta (module docstring)
    grads["k"], grads["beta"] = reference.delta_gain_gradients(
        grads["k"], grads["beta"], leaves["k"].detach(), leaves["beta"].detach())
    return grads


def _core(module, d, q, k, v, ins, S0, do, dht, cu, scale, config=None):
    """The generated backward core on the device; gradients by the reference's names."""
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    log_decay = ins.get("g")
    dq, dk, dv, dgain, dg, dh0 = module.backward_core(
        dev(q), dev(k), dev(v), dev(ins["beta"]), dev(log_decay), dev(do), dev(dht), scale,
        dev(S0), dev(cu), config=config)
    out = {"q": dq, "k": dk, "v": dv, "beta": dgain}
    if log_decay is not None:
        out["g"] = dg
    else:
        assert dg is None
    if S0 is not None:
        out["h0"] = dh0
    else:
        assert dh0 is None
    return out


def _errors(model, module=None, **kw):
    d, args = _case(model, **kw)
    assert args[0].dtype == kw.get("dtype", torch.float32)
    module = module if module is not None else runtime.load_zoo(model)
    got = _core(module, d, *args)
    want = _reference(d, *args)
    assert set(got) == set(want)
    for name, x in got.items():
        assert x.shape == want[name].shape, name
        assert x.dtype == torch.float32, name
    return {name: relative_error(got[name], want[name]) for name in want}


@pytest.mark.parametrize("model", ["deltanet", "gated_deltanet", "kda"])
@pytest.mark.parametrize("initial", [True, False])
def test_gradients_fp32(model, initial):
    errs = _errors(model, initial=initial)
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("model", ["deltanet", "gated_deltanet", "kda"])
def test_gradients_varlen(model):
    # three packed sequences: 17 tokens, exactly one chunk, and 19 tokens
    errs = _errors(model, T=100, cu_seqlens=[0, 17, 81, 100], seed=3)
    assert max(errs.values()) <= FP32_TOL, errs


def test_gradients_two_sequences_in_a_batch():
    errs = _errors("gated_deltanet", B=2, T=70, seed=5)
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("model", ["gated_deltanet", "kda"])
def test_gradients_strong_decay(model):
    # g about -2 per token: decays far below float32's range within a chunk, nothing may overflow
    errs = _errors(model, decay_scale=40.0, seed=6)
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("model", ["gated_deltanet", "kda"])
def test_gradients_bf16(model):
    errs = _errors(model, dtype=torch.bfloat16, seed=7)
    assert max(errs.values()) <= BF16_TOL, errs


def test_gradients_prior_readout(tmp_path):
    op = designmodel.compile(GATED_PRIOR, cache=tmp_path)
    assert op.plan.timing == "prior" and op.plan.family == "reset"
    errs = _errors("gated_deltanet_prior", module=op.kernels, spec=GATED_PRIOR, seed=2)
    assert max(errs.values()) <= FP32_TOL, errs
    errs = _errors("gated_deltanet_prior", module=op.kernels, spec=GATED_PRIOR, seed=4,
                   T=90, cu_seqlens=[0, 70, 90], initial=False)
    assert max(errs.values()) <= FP32_TOL, errs


def test_gradients_prior_readout_per_key(tmp_path):
    op = designmodel.compile(KDA_PRIOR, cache=tmp_path)
    assert op.plan.timing == "prior" and op.plan.decay == "per_key"
    errs = _errors("kda_prior", module=op.kernels, spec=KDA_PRIOR, seed=9, T=70, cu_seqlens=[0, 45, 70])
    assert max(errs.values()) <= FP32_TOL, errs


def test_bad_input_raises_value_error_before_any_launch():
    d, (q, k, v, ins, S0, do, dht, cu, scale) = _case("gated_deltanet", T=10)
    module = runtime.load_zoo("gated_deltanet")
    args = dict(q=q, k=k, v=v, gain=ins["beta"], log_decay=ins["g"], do=do, dht=dht, scale=scale,
                initial_state=S0, cu_seqlens=None)
    for name, bad, match in (("gain", ins["beta"][:, :5], "gain"), ("log_decay", None, "log_decay"),
                             ("do", do[..., :8], "do"), ("dht", dht[:, :1], "dht"),
                             ("initial_state", S0[..., :4], "initial_state"), ("scale", None, "scale"),
                             ("cu_seqlens", torch.tensor([0, 4, 9]), "cu_seqlens")):
        with pytest.raises(ValueError, match=match):
            module.backward_core(**{**args, name: bad})
    with pytest.raises(ValueError, match="no decay"):
        runtime.load_zoo("deltanet").backward_core(**args)


@pytest.mark.parametrize("model", ["gated_deltanet", "kda"])
def test_gradients_with_small_blocks(model):
    # blocks of 16 keys and values: every kernel loops over several key and value blocks, and
    # the scalar-decay dq/dk kernel sums its log-decay gradient over two key blocks
    small = dict(BK=16, BV=16)
    config = {name: small for name in ("prepare", "dv_local", "dqkw", "reset")}
    config.update(state=dict(BV=16), dh=dict(BV=16))
    d, args = _case(model, seed=8)
    module = runtime.load_zoo(model)
    got = _core(module, d, *args, config=config)
    want = _reference(d, *args)
    errs = {name: relative_error(got[name], want[name]) for name in want}
    assert max(errs.values()) <= FP32_TOL, errs
