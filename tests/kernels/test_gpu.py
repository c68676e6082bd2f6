"""On a GPU: each zoo op against the float64 filter in bf16, and against fla 0.6.0 when installed."""
import pytest
import torch

from designmodel import ops
from designmodel.derive import derive

from .helpers import compare

MODELS = ["linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "kda"]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["two_pass", "fused"])
@pytest.mark.parametrize("model", MODELS)
def test_zoo_op_on_gpu_matches_float64_filter(model, path):
    op = getattr(ops, model)

    def run(q, k, v, inputs, initial_state, cu_seqlens):
        inputs = {n: x for n, x in inputs.items() if n != "gamma"}
        return op(q, k, v, **inputs, initial_state=initial_state, output_final_state=True,
                  cu_seqlens=cu_seqlens, config={"path": path})

    extra = {"gamma": ops.retnet_gamma(4)} if model == "retnet" else None
    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 2e-2)):   # tf32 dots on the GPU
        err_o, err_s = compare(derive(model), run, 2, 300, 4, 64, 64, dtype=dtype, extra_inputs=extra)
        assert err_o <= tol and err_s <= tol, (dtype, err_o, err_s)
        err_o, err_s = compare(derive(model), run, 1, 300, 4, 64, 32, dtype=dtype, extra_inputs=extra,
                               cu_seqlens=[0, 100, 129, 300])
        assert err_o <= tol and err_s <= tol, (dtype, "varlen", err_o, err_s)


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_zoo_op_on_gpu_matches_fla(model):
    pytest.importorskip("fla")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from bench_fwd import fla_op, inputs, our_op, rel
    q, k, v, x, h0 = inputs(model, 2, 1000, 4, 128)
    with torch.no_grad():
        o, s = our_op(model)(q, k, v, x, h0, True)
        fo, fs = fla_op(model)(q, k, v, x, h0, True)
    assert rel(o, fo) <= 2e-2 and rel(s, fs) <= 2e-2



def gradient_errors(model, device, B=1, T=256, H=4, D=64):
    """Relative error of each bf16 gradient of the op (through its autograd, as users train it)
    against autograd through the float64 filter on the CPU, on the same rounded values."""
    import torch.nn.functional as F

    from designmodel.reference import delta_gain_gradients, recurrent
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(B, T, H, D, device=device, generator=gen).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, device=device, generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device=device, generator=gen).bfloat16()
    x = {}
    if model in ("mamba2", "gated_deltanet"):
        x["g"] = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen) + 4)
    if model in ("gla", "kda"):
        x["g"] = F.logsigmoid(torch.randn(B, T, H, D, device=device, generator=gen) + 4)
    if model in ("deltanet", "gated_deltanet", "kda"):
        x["beta"] = torch.sigmoid(torch.randn(B, T, H, device=device, generator=gen))
    leaves = [t.requires_grad_() for t in (q, k, v, *x.values())]
    do = torch.randn_like(v)
    grads = torch.autograd.grad(getattr(ops, model)(q, k, v, **x, check_domain=False)[0], leaves, do)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    rq, rk, rv, *rx = ref_leaves
    inp = dict(zip(x, rx))
    if model == "retnet":
        inp["gamma"] = ops.retnet_gamma(H).double()
    ref = recurrent(derive(model), rq * D ** -0.5, rk, rv, inp, unit_key_tol=1e-2).o
    names = ["q", "k", "v", *x]
    ref_grads = dict(zip(names, torch.autograd.grad(ref, ref_leaves, do.double().cpu())))
    if "beta" in ref_grads:   # the delta rule's gain is beta itself, not the spec's c / (c|k|^2 + r)
        ref_grads["k"], ref_grads["beta"] = delta_gain_gradients(
            ref_grads["k"], ref_grads["beta"], rk.detach(), inp["beta"].detach())
    return {n: float((g.double().cpu() - ref_grads[n]).abs().max() / ref_grads[n].abs().max())
            for n, g in zip(names, grads)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_zoo_gradients_on_gpu_match_float64_filter(model):
    """Issue 5's GPU check: bf16 gradients within 2e-2 of the float64 filter's."""
    errors = gradient_errors(model, "cuda")
    assert max(errors.values()) <= 2e-2, (model, errors)
