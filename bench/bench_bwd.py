"""Forward + backward of designmodel's ops against fla 0.6.0, with peak memory (GPU only).

    python bench/bench_bwd.py                                  # (4, 4096, 16, 128), every op
    python bench/bench_bwd.py --models deltanet,gla --shapes 4,4096,16,128

For each op: (a) its gradients at a small shape (1, 256, 4, 64), bf16 inputs, against torch
autograd through the float64 step-by-step filter (designmodel.reference.recurrent) on the same
rounded values, relative error max|ours - ref| / max|ref| per input; (b) fwd+bwd timed with
triton.testing.do_bench(return_mode='median') through torch autograd (`o.backward(do)` with a
random do), ours and fla's in the same run; (c) the peak memory of one fwd+bwd above the inputs
(torch.cuda.max_memory_allocated), ours and fla's. fla 0.6.0 refuses the backward of its gated
ops (chunk_simple_gla, chunk_gated_delta_rule) on Triton 3.4 to 3.7.0 on Hopper (its issue 640),
so mamba2 and gated_deltanet are compared with fla's ungated counterparts, chunk_linear_attn and
chunk_delta_rule, as BENCH.md says. Inputs as BENCH.md: bf16, L2-normalized keys,
g = logsigmoid(x + 4), beta = sigmoid(x).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from designmodel import ops  # noqa: E402

MODELS = ["linear_attention", "mamba2", "gla", "deltanet", "gated_deltanet", "kda", "bayesian_layer",
          "bayesian_layer_diag"]
# fla's op for the same model, or its ungated counterpart where fla refuses the gated backward
# (the Bayesian Layer's target is a multiple of fla's delta rule, issue 5)
FLA = {"linear_attention": "linear_attention", "mamba2": "linear_attention", "gla": "gla",
       "deltanet": "deltanet", "gated_deltanet": "deltanet", "kda": "kda", "bayesian_layer": "deltanet",
       "bayesian_layer_diag": "kda"}


def fla_call(name, q, k, v, x):
    """fla's chunk op for `name` on the same q, k, v and gates (ungated ones ignore gates)."""
    if name == "linear_attention":
        from fla.ops.linear_attn import chunk_linear_attn
        return chunk_linear_attn(q, k, v, normalize=False)[0]
    if name == "gla":
        from fla.ops.gla import chunk_gla
        return chunk_gla(q, k, v, g=x["g"])[0]
    if name == "deltanet":
        from fla.ops.delta_rule import chunk_delta_rule
        return chunk_delta_rule(q, k, v, beta=x["beta"])[0]
    if name == "kda":
        from fla.ops.kda import chunk_kda
        return chunk_kda(q, k, v, g=x["g"], beta=x["beta"])[0]
    raise KeyError(name)


def inputs(model, B, T, H, D, seed=0, requires_grad=True, device="cuda"):
    """bf16 q, k, v and the model's gates (float32), as leaves that require grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dev = device
    q = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, device=dev, generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    x = {}
    if model in ("mamba2", "gated_deltanet", "bayesian_layer"):
        x["g"] = F.logsigmoid(torch.randn(B, T, H, device=dev, generator=gen) + 4)
    if model in ("gla", "kda", "bayesian_layer_diag"):
        x["g"] = F.logsigmoid(torch.randn(B, T, H, D, device=dev, generator=gen) + 4)
    if model in ("deltanet", "gated_deltanet", "kda"):
        x["beta"] = torch.sigmoid(torch.randn(B, T, H, device=dev, generator=gen))
    if model.startswith("bayesian_layer"):   # noise and process noise as bench_kalman draws them
        x["r"] = 0.05 + torch.rand(B, T, H, device=dev, generator=gen)
        x["sigma"] = 0.1 * torch.rand(B, T, H, device=dev, generator=gen)
    leaves = [q, k, v, *x.values()]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return q, k, v, x


# the op's config for every model timed (--config), None for the defaults
CONFIG = None


def ours_call(model, q, k, v, x):
    return getattr(ops, model)(q, k, v, **x, check_domain=False, config=CONFIG)[0]


def fwd_bwd(fn, do):
    """A closure running fn() and backpropagating do through it."""
    def run():
        fn().backward(do)
    return run


def bench(run) -> float:
    run()
    torch.cuda.synchronize()
    return triton.testing.do_bench(run, return_mode="median", grad_to_none=None)


def peak_mb(run) -> float:
    """Peak memory of one call above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def profile(model, run, reps=5) -> dict:
    """Device time per kernel of one call of run (torch profiler), ms, largest first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    run()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    # kernels whose names agree in their first 60 characters are summed (PyTorch's elementwise
    # kernels differ only further on)
    res = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            res[e.key[:60]] = res.get(e.key[:60], 0.0) + e.device_time_total / reps / 1000
    res = dict(sorted(res.items(), key=lambda a: -a[1]))
    print(f"  profile {model:16s} {'all kernels':60s} {sum(res.values()):8.3f} ms", flush=True)
    for name, ms in res.items():
        print(f"  profile {model:16s} {name:60s} {ms:8.3f} ms", flush=True)
    return res


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def grad_check(model, shape=(1, 256, 4, 64), device="cuda"):
    """Relative error of every gradient against autograd through the float64 filter (also run
    by tests/kernels/test_gpu.py; on the CPU in Triton's interpreter it checks this check)."""
    from designmodel.derive import derive
    from designmodel.reference import delta_gain_gradients, recurrent
    q, k, v, x = inputs(model, *shape, seed=1, device=device)
    do = torch.randn_like(v)
    o = ours_call(model, q, k, v, x)
    leaves = [q, k, v, *x.values()]
    grads = torch.autograd.grad(o, leaves, do)
    # the float64 filter runs on the CPU, where it builds its own tensors
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    rq, rk, rv, *rx = ref_leaves
    names = list(x)
    inp = dict(zip(names, rx))
    if model == "retnet":   # the op computes its per-head decays from H; the filter takes them
        inp["gamma"] = ops.retnet_gamma(shape[2]).double()
    if model.startswith("bayesian_layer"):   # the op's default prior variance p0 = 1
        inp["p0"] = torch.ones(shape[2], dtype=torch.float64)
    scale = shape[-1] ** -0.5
    ref = recurrent(derive(model), rq * scale, rk, rv, inp, unit_key_tol=1e-2).o
    ref_grads = dict(zip(["q", "k", "v", *names], torch.autograd.grad(ref, ref_leaves, do.double().cpu())))
    if "beta" in ref_grads:   # the delta rule's gain is beta itself, not the spec's c / (c|k|^2 + r)
        ref_grads["k"], ref_grads["beta"] = delta_gain_gradients(
            ref_grads["k"], ref_grads["beta"], rk.detach(), inp["beta"].detach())
    return {n: rel(g.cpu(), ref_grads[n]) for n, g in zip(ref_grads, grads)}


def override_backward_config(models, overrides):
    """Make `overrides` ({kernel: {setting: value}}) the defaults of each model's generated
    backward (its default_backward_config, looked up at every call), to time a setting
    through autograd, which passes no config to the backward."""
    from designmodel.codegen import runtime
    for model in models:
        module = runtime.load_zoo(model)
        base = module.default_backward_config

        def patched(K, V, _base=base):
            cfg = _base(K, V)
            for kernel, settings in overrides.items():
                cfg[kernel] = {**cfg[kernel], **settings}
            return cfg
        module.default_backward_config = patched


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4,4096,16,128")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budget", type=float, default=1e9, help="stop starting new work after this many seconds")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 gradient check")
    ap.add_argument("--profile", action="store_true", help="device time per kernel of one fwd+bwd, ours and fla's")
    ap.add_argument("--backward-config", default=None,
                    help='JSON overrides of the generated backward\'s default_backward_config for every model, '
                         'e.g. \'{"dqk": {"diag": "grid"}}\' (ops take no backward config: this patches the defaults)')
    ap.add_argument("--config", default=None,
                    help='JSON config passed to the op (forward and, for the kalman family, backward), or "fast" for '
                         "the generated module's FAST_CONFIG (the Bayesian Layer's one-pass tf32 settings)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_bwd.json"))
    args = ap.parse_args(argv)
    global CONFIG
    if args.config == "fast":
        from designmodel.codegen import runtime
        CONFIG = runtime.load_zoo("bayesian_layer").FAST_CONFIG
    elif args.config:
        CONFIG = json.loads(args.config)
    if args.backward_config:
        override_backward_config([m for m in args.models.split(",") if m], json.loads(args.backward_config))
    if not torch.cuda.is_available():
        print("bench_bwd needs a CUDA GPU")
        return 1
    start = time.time()
    shapes = [tuple(int(s) for s in t.split(",")) for t in args.shapes.split(";") if t]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for model in [m for m in args.models.split(",") if m]:
        if time.time() - start > args.budget:
            print(f"budget spent: skipping {model}", flush=True)
            continue
        row = dict(model=model)
        try:
            # timings first, the check last: a call cut off by its time limit still has them
            for shape in shapes:
                q, k, v, x = inputs(model, *shape)
                do = torch.randn_like(v)
                ours = fwd_bwd(lambda: ours_call(model, q, k, v, x), do)
                row.update(shape=shape, ours_ms=bench(ours), ours_peak_mb=peak_mb(ours))
                print(f"{model} {shape}: ours {row['ours_ms']:.3f} ms, peak {row['ours_peak_mb']:.0f} MiB", flush=True)
                if args.profile:
                    row["ours_profile"] = profile(model, ours)
                try:
                    # the Bayesian Layer's inputs have no beta: fla's delta rules get one of their own
                    xf = x if "beta" in x or FLA[model] not in ("deltanet", "kda") else {
                        **x, "beta": torch.sigmoid(torch.randn_like(q[..., 0], dtype=torch.float32))}
                    fla = fwd_bwd(lambda: fla_call(FLA[model], q, k, v, xf), do)
                    row.update(fla_op=FLA[model], fla_ms=bench(fla), fla_peak_mb=peak_mb(fla))
                    row["ratio"] = row["ours_ms"] / row["fla_ms"]
                    if args.profile:
                        row["fla_profile"] = profile("fla " + FLA[model], fla)
                except Exception as err:  # noqa: BLE001 (fla refusing is reported)
                    row["fla_error"] = f"{type(err).__name__}: {str(err)[:160]}"
                print(json.dumps(row), flush=True)
                del q, k, v, x, do
                torch.cuda.empty_cache()
            if not args.no_check:
                row["grad_err"] = grad_check(model)
                print(model, "grad err", json.dumps(row["grad_err"]), flush=True)
        except Exception as err:  # noqa: BLE001 (one op failing must not hide the others)
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(json.dumps(row), flush=True)
        rows.append(row)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))            # after every model
    print()
    print(f"{'model':16s} {'max grad err':>12s} {'ours ms':>8s} {'fla op':>16s} {'fla ms':>8s} {'ratio':>6s} "
          f"{'ours MiB':>9s} {'fla MiB':>9s}")
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if isinstance(r.get(key), float) else "-"
        err = max(r["grad_err"].values()) if r.get("grad_err") else float("nan")
        print(f"{r['model']:16s} {err:12.1e} {f('ours_ms', '8.3f')} {r.get('fla_op', '-'):>16s} "
              f"{f('fla_ms', '8.3f')} {f('ratio', '6.2f')} {f('ours_peak_mb', '9.0f')} {f('fla_peak_mb', '9.0f')}"
              + (f"  {r['error'][:80]}" if "error" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
