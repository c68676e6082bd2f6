"""Reset-family backward core on a GPU: gradients and fwd+bwd time against fla 0.6.0.

    python bench/bench_bwd_reset.py                       # gated_deltanet, deltanet at (4, 4096, 16, 128)
    python bench/bench_bwd_reset.py --models kda --profile
    python bench/bench_bwd_reset.py --sweep               # backward_core under other launch settings

First, per model, our bf16 gradients at K = V = 128 (T = 700, initial state, final-state
gradient) against autograd through a float64 step-by-step recurrence on the GPU. Then ours:
the generated module's forward (check_domain=False) + backward_core with gain = beta,
log_decay = g (the zoo reset models take them directly), timed against fla's
chunk_delta_rule forward + backward (the speed target for every model); gradients against
fla's op of the same model where fla runs (fla 0.6.0 refuses its gated backward on Hopper
with Triton < 3.7.1). Inputs bf16, L2-normalized keys, g = logsigmoid(x + 4), beta = sigmoid(x).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from designmodel.codegen import runtime  # noqa: E402


def rel(x, ref):
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def run(model, B, T, H, D, profile=False):
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, T, H, D, device=dev, generator=gen).to(dt)
    k = F.normalize(torch.randn(B, T, H, D, device=dev, generator=gen), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device=dev, generator=gen).to(dt)
    beta = torch.sigmoid(torch.randn(B, T, H, device=dev, generator=gen))
    gshape = (B, T, H, D) if model == "kda" else (B, T, H)
    g = F.logsigmoid(torch.randn(*gshape, device=dev, generator=gen) + 4) if model != "deltanet" else None
    do = torch.randn(B, T, H, D, device=dev, generator=gen).to(dt)
    scale = D ** -0.5
    mod = runtime.load_zoo(model)
    gates = (beta, g) if g is not None else (beta,)

    def ours():
        o, _ = mod.forward(q, k, v, *gates, scale=scale, check_domain=False)
        return mod.backward_core(q, k, v, beta, g, do, None, scale, None, None)

    # the speed target is fla's chunk_delta_rule fwd+bwd; gradients are compared with fla's
    # op of the same model where fla runs (its gated backward refuses Triton < 3.7.1 on Hopper)
    from fla.ops.delta_rule import chunk_delta_rule
    fla_fn = {"deltanet": chunk_delta_rule}.get(model)
    if model == "gated_deltanet":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_fn
    elif model == "kda":
        from fla.ops.kda import chunk_kda as fla_fn
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, beta)] + ([g.clone().requires_grad_(True)] if g is not None else [])

    def fla(fn=fla_fn, with_g=g is not None):
        kw = dict(beta=leaves[3], scale=scale)
        if with_g:
            kw["g"] = leaves[4]
        o, _ = fn(leaves[0], leaves[1], leaves[2], **kw)
        o.backward(do)

    got = ours()
    names = ["q", "k", "v", "beta", "g"]
    try:
        fla()
        errs = {n: rel(got[i], leaves[i].grad) for i, n in enumerate(names[:len(leaves)])}
        print(f"{model} {(B, T, H, D)}: grad rel. err vs fla {', '.join(f'{n} {e:.1e}' for n, e in errs.items())}")
    except RuntimeError as e:
        print(f"{model}: fla's backward did not run: {str(e)[:100]}")
    t_ours = triton.testing.do_bench(ours, return_mode="median")
    t_fwd = triton.testing.do_bench(lambda: mod.forward(q, k, v, *gates, scale=scale, check_domain=False), return_mode="median")
    t_fla = triton.testing.do_bench(lambda: fla(chunk_delta_rule, False), grad_to_none=leaves, return_mode="median")
    print(f"  ours fwd+bwd {t_ours:.3f} ms (fwd {t_fwd:.3f}, bwd {t_ours - t_fwd:.3f}); "
          f"fla chunk_delta_rule fwd+bwd {t_fla:.3f} ms; ratio {t_ours / t_fla:.2f}")
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                ours()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15))


def naive_check(model, B=1, T=700, H=2, D=128):
    """Our bf16 gradients at K = V = 128 against autograd through a float64 recurrence on the GPU."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, device=dev, generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    beta = torch.sigmoid(torch.randn(B, T, H, device=dev, generator=gen))
    gshape = (B, T, H, D) if model == "kda" else (B, T, H)
    g = F.logsigmoid(torch.randn(*gshape, device=dev, generator=gen) + 2) if model != "deltanet" else None
    do = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    h0 = torch.randn(B, H, D, D, device=dev, generator=gen)
    dht = torch.randn(B, H, D, D, device=dev, generator=gen)
    scale = D ** -0.5
    got = runtime.load_zoo(model).backward_core(q, k, v, beta, g, do, dht, scale, h0, None)
    x = [t.double().requires_grad_(True) for t in (q, k, v, beta, g if g is not None else beta, h0)]
    S, outs = x[5], []
    for t in range(T):
        if g is not None:
            a = x[4][:, t].exp()
            S = S * (a[..., None, None] if model != "kda" else a[..., :, None])
        kt, vt, bt = x[1][:, t], x[2][:, t], x[3][:, t]
        innov = vt - (S * kt[..., :, None]).sum(-2)
        S = S + bt[..., None, None] * kt[..., :, None] * innov[..., None, :]
        outs.append((S * x[0][:, t][..., :, None]).sum(-2) * scale)
    loss = (torch.stack(outs, 1) * do.double()).sum() + (S * dht.double()).sum()
    want = torch.autograd.grad(loss, x, allow_unused=True)
    names = ["q", "k", "v", "beta", "g", "h0"]
    idx = [0, 1, 2, 3, 4, 5] if g is not None else [0, 1, 2, 3, 5]
    errs = {names[i]: rel(got[i], want[i]) for i in idx}
    print(f"{model} bf16 {(B, T, H, D)} vs float64 autograd: {', '.join(f'{n} {e:.1e}' for n, e in errs.items())}")


SWEEP = [{}, {"dqkw": dict(num_warps=8)}, {"reset": dict(num_warps=8)}, {"dh": dict(BV=64)},
         {"dh": dict(num_warps=8, BV=64)}, {"dqkw": dict(BK=128, num_warps=8)},
         {"reset": dict(BK=32, BV=32, num_warps=8)}, {"state": dict(BV=64)}, {"prepare": dict(num_warps=2)},
         {"dv_local": dict(num_warps=8)}]


def sweep(B, T, H, D, model="gated_deltanet"):
    """backward_core alone under each launch setting of SWEEP."""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev).to(dt)
    k = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device=dev).to(dt)
    beta = torch.sigmoid(torch.randn(B, T, H, device=dev))
    g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 4)
    do = torch.randn(B, T, H, D, device=dev).to(dt)
    mod = runtime.load_zoo(model)
    for cfg in SWEEP:
        t = triton.testing.do_bench(lambda: mod.backward_core(q, k, v, beta, g, do, None, D ** -0.5, None, None, config=cfg),
                                    return_mode="median")
        print(f"  bwd {t:.3f} ms  {cfg}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4,4096,16,128")
    ap.add_argument("--models", default="gated_deltanet,deltanet")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time backward_core under other launch settings")
    a = ap.parse_args()
    if a.sweep:
        sweep(*map(int, a.shapes.split(";")[0].split(",")))
        return
    for m in a.models.split(","):
        naive_check(m)
    for s in a.shapes.split(";"):
        B, T, H, D = map(int, s.split(","))
        for m in a.models.split(","):
            run(m, B, T, H, D, a.profile)


if __name__ == "__main__":
    main()
