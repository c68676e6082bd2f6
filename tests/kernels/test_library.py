"""The ops as torch.library custom ops (designmodel.library): torch.compile(fullgraph=True)
traces through them (backend aot_eager on the CPU: inductor would need a C++ compiler, and
aot_eager also traces the autograd graph), registration is idempotent, bad input still raises
the op's ValueError, and autograd reaches the kernels' backward.

The autograd wiring is tested with a stand-in backward for linear_attention computed by
torch.autograd through the float64 reference, monkeypatched onto the module (the generated
backward itself, through the ops, is tested in test_backward_write.py).
"""
from dataclasses import replace

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import designmodel
from designmodel import library, ops
from designmodel.codegen import runtime
from designmodel.derive import derive
from designmodel.reference import recurrent as reference
from designmodel.spec import DesignModel, Input, Readout, Transition, Write, exp, softplus

from .conftest import DEVICE
from .helpers import compare, relative_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# against float64: fp32 as the forward's bound; bf16 and fp16 at the bf16 bound
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
KALMAN_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def compiled(fn):
    """fn under torch.compile, one graph or an error (fullgraph), fresh compile caches."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def no_graph_break(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count == 0 and explanation.graph_count == 1


def gates(B, T, H, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {"g": F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3.0),
           "beta": torch.sigmoid(torch.randn(B, T, H, generator=gen)),
           "r": 0.1 + torch.rand(B, T, H, generator=gen),
           "sigma": 0.3 * torch.rand(B, T, H, generator=gen)}
    return {n: x.to(DEVICE) for n, x in out.items()}


def qkv(B, T, H, K, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def f64(x):
    """x as float64 on the CPU (the reference's device)."""
    return x.detach().cpu().double()


class GatedDeltaNetBlock(torch.nn.Module):
    """A small model around the zoo op: a projection of the output, the final state too."""

    def __init__(self, V):
        super().__init__()
        self.out = torch.nn.Linear(V, V, bias=False)

    def forward(self, q, k, v, g, beta, h0):
        o, state = ops.gated_deltanet(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        return self.out(o.float()), state


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_gated_deltanet_model_compiles_without_graph_break(dtype):
    B, T, H, K, V = 1, 24, 2, 16, 16
    q, k, v = qkv(B, T, H, K, V, dtype)
    gt = gates(B, T, H, K)
    h0 = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    model = GatedDeltaNetBlock(V).to(DEVICE)
    args = (q, k, v, gt["g"], gt["beta"], h0)
    eager = model(*args)
    out = compiled(model)(*args)
    for x, y in zip(out, eager):
        assert torch.equal(x, y)
    assert no_graph_break(model, *args)
    # and the op is right: against the float64 filter on the values it saw
    o, state = ops.gated_deltanet(q, k, v, gt["g"], gt["beta"], initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and state.dtype == torch.float32
    d = derive("gated_deltanet")
    kd = f64(k) / f64(k).norm(dim=-1, keepdim=True)   # unit keys, renormalized after rounding
    ref = reference(d, f64(q) * K ** -0.5, kd, f64(v), {"g": f64(gt["g"]), "beta": f64(gt["beta"])},
                    initial_state=f64(h0))
    assert relative_error(o, ref.o) <= TOL[dtype] and relative_error(state, ref.state) <= TOL[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_bayesian_layer_compiles_with_variance_and_state(dtype):
    B, T, H, K, V = 1, 20, 2, 16, 16
    q, k, v = qkv(B, T, H, K, V, dtype, seed=1)
    gt = gates(B, T, H, K, seed=1)

    def layer(q, k, v, g, r, sigma):
        o, (S, P), var = ops.bayesian_layer(q, k, v, g, r, sigma, p0=0.7, output_final_state=True,
                                            output_variance=True)
        return o, S, P, var

    args = (q, k, v, gt["g"], gt["r"], gt["sigma"])
    eager = layer(*args)
    out = compiled(layer)(*args)
    for x, y in zip(out, eager):
        assert torch.equal(x, y)
    assert no_graph_break(layer, *args)
    o, S, P, var = eager
    spec = derive("bayesian_layer").spec
    ref = reference(derive(replace(spec, readout=replace(spec.readout, variance=True))),
                    f64(q) * K ** -0.5, f64(k), f64(v),
                    {n: f64(gt[n]) for n in ("g", "r", "sigma")} | {"p0": torch.full((H,), 0.7, dtype=torch.float64)})
    tol = KALMAN_TOL[dtype]
    for x, y in ((o, ref.o), (S, ref.state), (P, ref.covariance), (var, ref.variance)):
        assert relative_error(x, y) <= tol


def test_spec_outside_the_zoo_compiles_forward_and_recurrent(tmp_path):
    ak, dt = Input("ak", per="key"), Input("dt", domain="positive")
    spec = DesignModel("softplus_per_key", transition=Transition(decay=exp(-softplus(ak) * dt)),
                       observation=Write(), readout=Readout(timing="prior"))
    op = designmodel.compile(spec, cache=tmp_path)
    assert op.library.name.startswith("softplus_per_key_") and op.library.name != "softplus_per_key"
    B, T, H, K, V = 1, 19, 2, 16, 16
    q, k, v = qkv(B, T, H, K, V, torch.float32, seed=2)
    gen = torch.Generator().manual_seed(3)
    ins = {"ak": torch.randn(B, T, H, K, generator=gen).to(DEVICE),
           "dt": (0.1 + torch.rand(B, T, H, generator=gen)).to(DEVICE)}

    def both(q, k, v, ak, dt):
        o1, s1 = op(q, k, v, ak=ak, dt=dt, output_final_state=True)
        o2, s2 = op.recurrent(q, k, v, ak=ak, dt=dt, output_final_state=True)
        return o1, s1, o2, s2

    args = (q, k, v, ins["ak"], ins["dt"])
    eager = both(*args)
    out = compiled(both)(*args)
    for x, y in zip(out, eager):
        assert torch.equal(x, y)
    ref = reference(op.derivation, f64(q) * K ** -0.5, f64(k), f64(v), {n: f64(x) for n, x in ins.items()})
    for x, y in ((eager[0], ref.o), (eager[1], ref.state), (eager[2], ref.o), (eager[3], ref.state)):
        assert relative_error(x, y) <= 1e-5


def test_registration_is_idempotent(tmp_path):
    before = set(library.registered())
    op1 = designmodel.compile("gated_deltanet")
    op2 = designmodel.compile("gated_deltanet")
    assert op1.library is op2.library and op1.library.name == "gated_deltanet"
    lam = Input("lam", domain="logdecay")
    spec = DesignModel("twice", transition=Transition(decay=exp(lam)), observation=Write())
    a = designmodel.compile(spec, cache=tmp_path / "a")
    b = designmodel.compile(spec, cache=tmp_path / "b")     # another cache folder, same kernels
    assert a.library is b.library
    new = set(library.registered()) - before
    assert new <= {"gated_deltanet", a.library.name}
    for name in (a.library.name, f"{a.library.name}_recurrent", f"{a.library.name}_backward"):
        assert hasattr(torch.ops.designmodel, name)


def test_bad_input_raises_the_ops_value_error():
    B, T, H, K, V = 1, 8, 1, 16, 16
    q, k, v = qkv(B, T, H, K, V, torch.float32)
    gt = gates(B, T, H, K)
    bad_g = -gt["g"] + 0.5                                   # a positive log-decay
    model = compiled(lambda q, k, v, g, beta: ops.gated_deltanet(q, k, v, g, beta)[0])
    for fn in (lambda *a: ops.gated_deltanet(*a)[0], model):
        with pytest.raises(ValueError, match="g must be <= 0"):
            fn(q, k, v, bad_g, gt["beta"])
        with pytest.raises(ValueError, match="beta must be"):
            fn(q, k, v, gt["g"], gt["beta"][:, :, :, None])    # wrong shape
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        ops.gated_deltanet(q, k, v, 0.5, gt["beta"])
    op = designmodel.compile("gated_deltanet")
    with pytest.raises(ValueError, match="r must be > 0"):
        ops.bayesian_layer(q, k, v, gt["g"], -gt["r"], gt["sigma"])
    with pytest.raises(ValueError, match="missing input"):
        op.recurrent(q, k, v, g=gt["g"])


# --- autograd ------------------------------------------------------------------------------

def standin_backward(q, k, v, do, dht=None, scale=None, initial_state=None, cu_seqlens=None, config=None):
    """linear_attention's gradients by torch.autograd through the float64 reference (test only)."""
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    with torch.enable_grad():   # a backward runs with grad mode off
        x = [f64(t).requires_grad_() for t in (q, k, v)]
        h0 = None if initial_state is None else f64(initial_state).requires_grad_()
        ref = reference(derive("linear_attention"), x[0] * scale, x[1], x[2], {}, initial_state=h0,
                        cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu().long())
        outs, grads = [ref.o], [f64(do)]
        if dht is not None:
            outs.append(ref.state), grads.append(f64(dht))
        wrt = x + ([h0] if h0 is not None else [])
        g = torch.autograd.grad(outs, wrt, grads)
    dev = q.device
    return (*[t.to(dev, torch.float32) for t in g[:3]], g[3].to(dev, torch.float32) if h0 is not None else None)


def expected_gradients(q, k, v, h0, w_o, w_s):
    """d/d(q, k, v, h0) of sum(o w_o) + sum(S_T w_s), through the float64 reference directly."""
    x = [f64(t).requires_grad_() for t in (q, k, v, h0)]
    ref = reference(derive("linear_attention"), x[0] * q.shape[-1] ** -0.5, x[1], x[2], {}, initial_state=x[3])
    loss = (ref.o * f64(w_o)).sum() + (ref.state * f64(w_s)).sum()
    return torch.autograd.grad(loss, x)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_autograd_reaches_the_modules_backward(mode, monkeypatch):
    monkeypatch.setattr(runtime.load_zoo("linear_attention"), "backward", standin_backward, raising=False)
    B, T, H, K, V = 1, 12, 2, 16, 16
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(DEVICE).requires_grad_() for D in (K, K, V))
    h0 = torch.randn(B, H, K, V, generator=gen).to(DEVICE).requires_grad_()
    w_o, w_s = (torch.randn(B, T, H, V, generator=gen).to(DEVICE),
                torch.randn(B, H, K, V, generator=gen).to(DEVICE))

    def loss_fn(q, k, v, h0):
        o, state = ops.linear_attention(q, k, v, initial_state=h0, output_final_state=True)
        return (o * w_o).sum() + (state * w_s).sum()

    fn = compiled(loss_fn) if mode == "compiled" else loss_fn
    fn(q, k, v, h0).backward()
    for name, x, g in zip("q k v h0".split(), (q, k, v, h0), expected_gradients(q, k, v, h0, w_o, w_s)):
        assert x.grad is not None and x.grad.dtype == x.dtype, name
        assert relative_error(x.grad, g) <= 1e-6, f"d{name}: {relative_error(x.grad, g):.2e}"


def test_fp16_inputs_forward_matches_float64_filter():
    """The chunked kernels take float16 q, k, v (outputs in float16) at the bf16 tolerance."""
    for model in ("gla", "gated_deltanet"):
        op = getattr(ops, model)

        def run(q, k, v, inputs, h0, cu, op=op):
            return op(q, k, v, **inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)

        err_o, err_s = compare(derive(model), run, 1, 40, 2, 32, 16, dtype=torch.float16)
        assert err_o <= 1e-2 and err_s <= 1e-2, (model, err_o, err_s)


def test_first_call_of_an_op_inside_a_compiled_function(tmp_path):
    """A fresh process whose very first use of an op is inside torch.compile(fullgraph=True):
    the zoo ops are registered when designmodel.ops is imported, so tracing needs no import."""
    import subprocess
    import sys
    script = tmp_path / "first_call.py"
    script.write_text(
        "import os\n"
        "import torch\n"
        "if not torch.cuda.is_available():\n"
        "    os.environ.setdefault('TRITON_INTERPRET', '1')\n"
        "from designmodel import ops\n"
        "d = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "q = torch.randn(1, 8, 1, 16, device=d)\n"
        "k = torch.nn.functional.normalize(torch.randn(1, 8, 1, 16, device=d), dim=-1)\n"
        "g = torch.full((1, 8, 1), -0.1, device=d); beta = torch.full((1, 8, 1), 0.5, device=d)\n"
        "f = torch.compile(lambda q, k, g, beta: ops.gated_deltanet(q, k, q, g, beta)[0], fullgraph=True,\n"
        "                  backend='aot_eager')\n"
        "torch.testing.assert_close(f(q, k, g, beta), ops.gated_deltanet(q, k, q, g, beta)[0])\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.skipif(__import__("shutil").which("g++") is None and DEVICE == "cpu",
                    reason="inductor on CPU needs a C++ compiler")
def test_inductor_compiles_forward_and_backward_around_an_op():
    """torch.compile's default backend (inductor) around an op, fullgraph: the same loss and
    gradients as eager."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, K = 1, 20, 2, 16
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    k = F.normalize(k, dim=-1)
    gt = gates(B, T, H, K, seed=5)

    def loss(q, k, v, g, beta):
        o, _ = ops.gated_deltanet(2 * q, k, v, g, beta)
        return torch.tanh(o).pow(2).sum()   # no cancellation: a relative error means something

    torch._dynamo.reset()
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (q, k, v, gt["g"], gt["beta"])]
        value = fn(*leaves)
        value.backward()
        results.append((value.detach(), [t.grad for t in leaves]))
    (v0, g0), (v1, g1) = results
    assert relative_error(v1, v0) <= 1e-5
    for a, b in zip(g1, g0):
        assert relative_error(a, b) <= 1e-5
