"""Forward parity and speed of designmodel.ops against fla 0.6.0's chunk ops (GPU only).

    python bench/bench_fwd.py                         # every op, the BENCH.md shapes
    python bench/bench_fwd.py --shapes 4,4096,16,128 --models mamba2,gla
    python bench/bench_fwd.py --sweep                 # also time other block sizes of ours
    python bench/bench_fwd.py --profile               # per-kernel times at the first shape

For each op and shape: (a) our output and final state against fla's on the same inputs
(relative error max|ours - fla| / max|fla|), (b) both timed with
triton.testing.do_bench(return_mode='median') in the same run, after a warm-up call that
compiles (and, for fla, autotunes). Inputs as BENCH.md says: bf16, L2-normalized keys,
g = logsigmoid(x + 4), beta = sigmoid(x), random data. The ratio ours / fla is printed last.
`ours` is timed with check_domain=False (no device-to-host sync, as fla has none); the
column `ours+check` includes the domain check of the gates.
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

SHAPES = [(4, 4096, 16, 128), (8, 2048, 32, 64), (1, 16384, 16, 128), (2, 65536, 8, 128)]
MODELS = ["linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "kda"]
GATES = {"linear_attention": (), "retnet": (), "mamba2": ("g",), "gla": ("gk",),
         "deltanet": ("beta",), "gated_deltanet": ("g", "beta"), "kda": ("gk", "beta")}


def fla_op(model):
    """fla 0.6.0's chunk op for a zoo model, as a function of (q, k, v, gates, h0, final)."""
    if model == "linear_attention":
        from fla.ops.linear_attn import chunk_linear_attn
        return lambda q, k, v, x, h0, fs: chunk_linear_attn(q, k, v, initial_state=h0, output_final_state=fs,
                                                            normalize=False)
    if model == "retnet":
        from fla.ops.retention import chunk_retention
        return lambda q, k, v, x, h0, fs: chunk_retention(q, k, v, initial_state=h0, output_final_state=fs)
    if model == "mamba2":
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda q, k, v, x, h0, fs: chunk_simple_gla(q, k, v, g=x["g"], initial_state=h0,
                                                           output_final_state=fs)
    if model == "gla":
        from fla.ops.gla import chunk_gla
        return lambda q, k, v, x, h0, fs: chunk_gla(q, k, v, g=x["g"], initial_state=h0, output_final_state=fs)
    if model == "deltanet":
        from fla.ops.delta_rule import chunk_delta_rule
        return lambda q, k, v, x, h0, fs: chunk_delta_rule(q, k, v, beta=x["beta"], initial_state=h0,
                                                           output_final_state=fs)
    if model == "gated_deltanet":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda q, k, v, x, h0, fs: chunk_gated_delta_rule(q, k, v, g=x["g"], beta=x["beta"],
                                                                 initial_state=h0, output_final_state=fs)
    if model == "kda":
        from fla.ops.kda import chunk_kda
        return lambda q, k, v, x, h0, fs: chunk_kda(q, k, v, g=x["g"], beta=x["beta"], initial_state=h0,
                                                    output_final_state=fs)
    raise KeyError(model)


def our_op(model, **options):
    op = getattr(ops, model)
    return lambda q, k, v, x, h0, fs: op(q, k, v, **x, initial_state=h0, output_final_state=fs, **options)


def inputs(model, B, T, H, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev, generator=g).to(dt)
    k = F.normalize(torch.randn(B, T, H, D, device=dev, generator=g), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device=dev, generator=g).to(dt)
    x = {}
    for name in GATES[model]:
        if name == "g":
            x["g"] = F.logsigmoid(torch.randn(B, T, H, device=dev, generator=g) + 4)
        elif name == "gk":
            x["g"] = F.logsigmoid(torch.randn(B, T, H, D, device=dev, generator=g) + 4)
        elif name == "beta":
            x["beta"] = torch.sigmoid(torch.randn(B, T, H, device=dev, generator=g))
    h0 = torch.randn(B, H, D, D, device=dev, generator=g) * 0.1
    return q, k, v, x, h0


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def bench(fn) -> float:
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, return_mode="median")


_FUSED = [
    {"path": "fused", "fused": dict(BV=32, num_warps=4, num_stages=2)},
    {"path": "fused", "fused": dict(BV=32, num_warps=4, num_stages=3)},
    {"path": "fused", "fused": dict(BV=32, num_warps=8, num_stages=2)},
    {"path": "fused", "fused": dict(BV=64, num_warps=4, num_stages=2)},
    {"path": "fused", "fused": dict(BV=64, num_warps=8, num_stages=2)},
    {"path": "fused", "fused": dict(BV=16, num_warps=4, num_stages=2)},
]
SWEEP = {
    "write": _FUSED + [
        {"path": "two_pass"},
        {"path": "two_pass", "state": dict(BK=64, BV=64, num_warps=4, num_stages=3)},
        {"path": "two_pass", "state": dict(BK=32, BV=64, num_warps=2, num_stages=3)},
        {"path": "two_pass", "state": dict(BK=64, BV=32, num_warps=4, num_stages=3)},
        {"path": "two_pass", "output": dict(BK=128, BV=64, num_warps=8, num_stages=2)},
        {"path": "two_pass", "output": dict(BK=128, BV=128, num_warps=8, num_stages=2)},
        {"attention": dict(BK=16, num_warps=4, num_stages=2)},
        {"attention": dict(BK=32, num_warps=8, num_stages=2)},
        {"attention": dict(BK=64, num_warps=8, num_stages=2)},
        {"attention": dict(BK=32, num_warps=4, num_stages=2)},
        {"attention": dict(diag="grid", BK=64, num_warps=4, num_stages=2, diag_warps=1)},
        {"attention": dict(diag="grid", BK=64, num_warps=4, num_stages=1, diag_warps=1)},
        {"attention": dict(diag="grid", BK=32, num_warps=4, num_stages=2, diag_warps=1)},
        {"attention": dict(diag="grid", BK=128, num_warps=8, num_stages=1, diag_warps=1)},
        {"attention": dict(diag="grid", BK=64, num_warps=8, num_stages=2, diag_warps=1)},
        {"attention": dict(diag="grid", BK=64, num_warps=4, num_stages=2, diag_warps=2)},
    ],
    "reset": _FUSED + [
        {"path": "two_pass"},
        {"path": "two_pass", "state": dict(BV=64, num_warps=4, num_stages=2)},
        {"path": "two_pass", "output": dict(BK=128, BV=64, num_warps=8, num_stages=2)},
        {"reset": dict(BK=32, BV=32, num_warps=4, num_stages=2)},
        {"reset": dict(BK=64, BV=64, num_warps=8, num_stages=2)},
        {"reset": dict(BK=128, BV=128, num_warps=8, num_stages=2)},
        {"reset": dict(BK=32, BV=32, num_warps=2, num_stages=2)},
        {"reset": dict(BK=32, BV=32, num_warps=1, num_stages=2)},
        {"reset": dict(BK=64, BV=64, num_warps=1, num_stages=2)},
        {"reset": dict(BK=32, BV=32, num_warps=1, num_stages=1)},
    ],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-models", default="gla,deltanet,gated_deltanet")
    ap.add_argument("--sweep-filter", default="", help="sweep only the configurations whose JSON holds one of these comma-separated texts")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--budget", type=float, default=1e9, help="stop starting new work after this many seconds")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_fwd.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fwd needs a CUDA GPU")
        return 1
    start = time.time()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    models = [m for m in args.models.split(",") if m]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    rows, sweeps = [], []
    for shape in shapes:
        for model in models:
            if time.time() - start > args.budget:
                print(f"budget spent: skipping {model} {shape}", flush=True)
                continue
            B, T, H, D = shape
            q, k, v, x, h0 = inputs(model, *shape)
            row = dict(model=model, shape=shape)
            try:
                fla = fla_op(model)
            except Exception as err:  # noqa: BLE001
                fla, row["fla_error"] = None, f"{type(err).__name__}: {err}"
            ours, ours_checked = our_op(model, check_domain=False), our_op(model)
            fo = fs = None
            with torch.no_grad():
                o, s = ours(q, k, v, x, h0, True)
                if fla is not None:
                    try:
                        fo, fs = fla(q, k, v, x, h0, True)
                        row["err_o"], row["err_state"] = rel(o, fo), rel(s, fs)
                    except Exception as err:  # noqa: BLE001
                        fla, row["fla_error"] = None, f"{type(err).__name__}: {err}"[:200]
            row["ours_ms"] = bench(lambda: ours(q, k, v, x, None, False))
            row["ours_check_ms"] = bench(lambda: ours_checked(q, k, v, x, None, False))
            if fla is not None:
                row["fla_ms"] = bench(lambda: fla(q, k, v, x, None, False))
                row["ratio"] = row["ours_ms"] / row["fla_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile and shape == shapes[0]:
                profile(model, ours, fla, q, k, v, x)
            if args.sweep and shape == shapes[0] and model in args.sweep_models.split(","):
                family = "reset" if model in ("deltanet", "gated_deltanet", "kda") else "write"
                from designmodel.codegen import runtime
                kernels = runtime.load_zoo(model).default_config(D, D)
                for cfg in SWEEP[family]:
                    if any(name not in kernels for name in cfg if name != "path"):
                        continue
                    if not any(f in json.dumps(cfg) for f in args.sweep_filter.split(",")):
                        continue
                    if model in ("gla", "kda") and cfg.get("path") == "fused":
                        continue  # per-key decay: two passes (see FUSED_MIN_WAVES)
                    errs = {}
                    try:
                        fn = our_op(model, check_domain=False, config=cfg)
                        if fo is not None:  # the variant's outputs against fla's, as for the default
                            with torch.no_grad():
                                o2, s2 = fn(q, k, v, x, h0, True)
                            errs = dict(err_o=rel(o2, fo), err_state=rel(s2, fs))
                        ms = bench(lambda: fn(q, k, v, x, None, False))
                        if args.profile:  # each variant's kernels too
                            profile(f"{model} {json.dumps(cfg)}", fn, None, q, k, v, x)
                    except Exception as err:  # noqa: BLE001
                        ms = f"{type(err).__name__}: {str(err)[:120]}"
                    sweeps.append(dict(model=model, shape=shape, config=cfg, ms=ms, **errs))
                    print("sweep", json.dumps(sweeps[-1]), flush=True)
            del q, k, v, x, h0
            torch.cuda.empty_cache()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(rows=rows, sweeps=sweeps), indent=1))
    print()
    print(f"{'model':16s} {'shape':20s} {'err_o':>8s} {'err_S':>8s} {'ours ms':>8s} {'+check':>8s} "
          f"{'fla ms':>8s} {'ours/fla':>8s}")
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if isinstance(r.get(key), float) else "-"
        print(f"{r['model']:16s} {str(r['shape']):20s} {f('err_o', '8.1e')} {f('err_state', '8.1e')} "
              f"{f('ours_ms', '8.3f')} {f('ours_check_ms', '8.3f')} {f('fla_ms', '8.3f')} {f('ratio', '8.2f')}"
              + (f"  fla: {r['fla_error'][:60]}" if "fla_error" in r else ""))
    return 0


def profile(model, ours, fla, q, k, v, x):
    """CUDA time per kernel of one forward call, ours and fla's."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for name, fn in (("ours", ours), ("fla", fla)):
        if fn is None:
            continue
        with torch.no_grad():
            fn(q, k, v, x, None, False)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn(q, k, v, x, None, False)
                torch.cuda.synchronize()
        for e in prof.key_averages():
            if e.device_time_total > 0:
                print(f"  profile {model} {name:4s} {e.key[:60]:60s} {e.device_time_total / 5 / 1000:8.3f} ms",
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
