"""Forward of the Bayesian Layer kernels (kalman family): correctness, stress and speed (GPU).

    python bench/bench_kalman.py                 # checks, stress grid, timings, a table last
    python bench/bench_kalman.py --quick --budget 500   # bayesian_layer first, fewest compiles,
                                                        # optional stages while 500 s last
    python bench/bench_kalman.py --lean --stress --variants precision   # config variants (here
        # PRECISION_MIXES) beside the default: each checked against float64 with fp32 and bf16
        # inputs, the stress grid and T = 65536 (all in parallel processes), then timed; a table last

(1) Correctness: ours (fp32 and bf16 inputs) against the float64 step-by-step filter
(designmodel.reference.recurrent, on the CPU) for rls, bayesian_layer, bayesian_layer_diag,
with variance, initial state and final state. (2) Stress: alpha in {0.01, 1}, r in {1e-4, 1e2},
sigma in {0, 1}, keys normalized or not; T = 65536 with no decay and r = 1e-4: no NaN or inf.
(3) Speed, in one run, at the BENCH.md shapes (bf16, keys L2-normalized, g = logsigmoid(x + 4)):
ours against fla 0.6.0's chunk_gated_delta_rule forward and against
`designmodel.chunked.kalman_chunked`, a plain-PyTorch chunked version of the same filter in fp32 (MATH.md 6.3), timed with
triton.testing.do_bench(return_mode='median') after a warm-up call.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from designmodel.chunked import kalman_chunked  # noqa: E402  (the plain-PyTorch chunked filter)


# the shapes of ../shared/design/BENCH.md, (B, T, H, D)
SHAPES = [(4, 4096, 16, 128), (8, 2048, 32, 64), (1, 16384, 16, 128), (2, 65536, 8, 128)]


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def draw(model, B, T, H, K, V, dev, seed=0, alpha=None, r=None, sigma=None, unit_keys=True):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    if not unit_keys:
        k = k * (0.25 + 4 * torch.rand(B, T, H, 1, generator=g))
    v = torch.randn(B, T, H, V, generator=g)
    gshape = (B, T, H, K) if model == "bayesian_layer_diag" else (B, T, H)
    x = {}
    x["r"] = torch.full((B, T, H), r) if r is not None else 0.05 + torch.rand(B, T, H, generator=g)
    if model != "rls":
        x["g"] = (torch.full(gshape, math.log(alpha)) if alpha is not None
                  else F.logsigmoid(torch.randn(*gshape, generator=g) + 4))
        x["sigma"] = torch.full((B, T, H), sigma) if sigma is not None else 0.1 * torch.rand(B, T, H, generator=g)
    return [t.to(dev) for t in (q, k, v)], {n: t.to(dev) for n, t in x.items()}


def ours(model, q, k, v, x, **kw):
    from designmodel import ops
    return getattr(ops, model)(q, k, v, **x, **kw)


def check_correctness(dev, rows, cases=(("rls", (torch.float32, torch.bfloat16)), ("bayesian_layer", (torch.float32, torch.bfloat16)),
                                         ("bayesian_layer_diag", (torch.float32, torch.bfloat16))), config=None, label=""):
    """Ours (with `config`; rows named by `label` when given) against the float64 filter."""
    from dataclasses import replace
    from designmodel.derive import derive
    from designmodel.reference import recurrent
    B, T, H, K, V = 1, 300, 2, 128, 64
    for model, dtypes in cases:
        (q, k, v), x = draw(model, B, T, H, K, V, "cpu", seed=1)
        gen = torch.Generator().manual_seed(2)
        S0 = torch.randn(B, H, K, V, generator=gen)
        a = torch.randn(B, H, K, K, generator=gen)
        P0 = a @ a.mT / K + 0.5 * torch.eye(K)
        d = derive(model)
        d = derive(replace(d.spec, readout=replace(d.spec.readout, variance=True)))
        for dtype in dtypes:
            try:
                _check_one(model, d, dtype, q, k, v, x, S0, P0, K, H, dev, rows, config=config, label=label)
            except Exception as e:  # reported, not fatal: the timings still run
                rows.append(("check", label or model, str(dtype).split(".")[-1], False, repr(e)[:300]))
                print(f"check {label or model} {dtype}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def _check_one(model, d, dtype, q, k, v, x, S0, P0, K, H, dev, rows, config=None, label=""):
    from designmodel.reference import recurrent
    if True:
        if True:
            qq, kk, vv = (t.to(dtype) for t in (q, k, v))
            ref = recurrent(d, qq.double() * K ** -0.5, kk.double(), vv.double(),
                            {**{n: t.double() for n, t in x.items()}, "p0": torch.ones(H, dtype=torch.float64)},
                            initial_state=S0.double(), initial_covariance=P0.double())
            o, (S, P), var = ours(model, qq.to(dev), kk.to(dev), vv.to(dev), {n: t.to(dev) for n, t in x.items()},
                                  initial_state=(S0.to(dev), P0.to(dev)), output_final_state=True, output_variance=True,
                                  config=config)
            errs = dict(o=rel(o, ref.o), S=rel(S, ref.state), P=rel(P, ref.covariance), var=rel(var, ref.variance))
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            ok = all(e <= tol for e in errs.values())
            rows.append(("check", label or model, str(dtype).split(".")[-1], ok, errs))
            print(f"check {label or model:20s} {str(dtype):15s} " + " ".join(f"{n} {e:.1e}" for n, e in errs.items())
                  + ("  ok" if ok else f"  FAIL (> {tol})"), flush=True)


def stress(dev, rows, long_T=65536, models=("bayesian_layer", "bayesian_layer_diag"), config=None, label="",
           grid=True, long=True):
    """The stress grid (bf16, T = 1024) over `models` and rls at T = long_T with r = 1e-4, all
    with `config`: no NaN or inf anywhere. One row ("stress", cases, bad, long finite, |P - P^T|
    / |P|, label); grid=False or long=False leaves that half out (None in its place)."""
    B, T, H, K = 1, 1024, 4, 128
    bad = []
    n = 0
    for alpha in ((0.01, 1.0) if grid else ()):
        for r in (1e-4, 1e2):
            for sigma in (0.0, 1.0):
                for unit in (True, False):
                    for model in models:
                        (q, k, v), x = draw(model, B, T, H, K, K, dev, seed=3, alpha=alpha, r=r, sigma=sigma, unit_keys=unit)
                        q, k, v = (t.bfloat16() for t in (q, k, v))
                        try:
                            o, (S, P), var = ours(model, q, k, v, x, output_final_state=True, output_variance=True,
                                                  config=config)
                        except Exception as e:  # a variant that does not launch is reported per case
                            bad.append((model, alpha, r, sigma, unit, type(e).__name__))
                            continue
                        n += 1
                        if not all(torch.isfinite(t).all() for t in (o, S, P, var)):
                            bad.append((model, alpha, r, sigma, unit))
    long_ok = sym = None
    if long:
        (q, k, v), x = draw("rls", 1, long_T, 2, K, K, dev, seed=4, r=1e-4)
        o, (S, P), var = ours("rls", q.bfloat16(), k.bfloat16(), v.bfloat16(), x, output_final_state=True, output_variance=True,
                              config=config)
        long_ok = all(torch.isfinite(t).all().item() for t in (o, S, P, var))
        sym = ((P - P.mT).abs().max() / P.abs().max()).item()
    rows.append(("stress", n, bad, long_ok, sym, label))
    print(f"stress {label}: grid {n} cases, non-finite in {bad or 'none'}; T={long_T} rls r=1e-4: "
          f"{'-' if long_ok is None else 'finite' if long_ok else 'NON-FINITE'}, "
          f"|P - P^T| / |P| = {'-' if sym is None else f'{sym:.1e}'}", flush=True)


# --variants precision: the Riccati kernel's dots by group (innovation: K^ P, S_in, q^^T P q^;
# factor: the LDL's panels; solve: Y = L^-1 U^; update: P'), tf32x3 where named, else tf32.
# tf32x3 in the innovation group is what spills (bench/compile_report.py: 5.1 KB per thread
# with it, 2.7 KB without), so most mixes keep it tf32
# --variants forward: the forward's other launch settings. update16: the update of P by LDL
# blocks, one 16-row dot each (the default until an H100 at (4, 4096, 16, 128) bf16 timed the
# forward at 7.360 ms with it against 7.237 with the chunk's one dot per quarter); 8 warps:
# fewer spills (bench/compile_report.py), but 8 warps with update16 hit a CUDA illegal memory
# access at the check shape (T = 300, initial state), so no variant has both. The mean
# kernel's programs at 8 warps and 255 registers fit one per SM: with BV 32 its 256 programs
# (NV = 4 value blocks x 64 heads) run in two waves on 132 SMs, with BV 64 (the default since
# it timed 0.885 against 0.979 ms) 128 in one; BV 32 at 4 warps fits two per SM (ptxas sm_90:
# spills 624 B at BV 32, 1036 at BV 64, 1304 at BV 32 and 4 warps)
FORWARD_VARIANTS = {
    "update16": {"covariance": {"update_rows": 16}},
    "w8": {"covariance": {"num_warps": 8}},
    "mean_bv32": {"mean": {"BV": 32}},
    "mean_bv32_w4": {"mean": {"BV": 32, "num_warps": 4}},
}

PRECISION_MIXES = {
    "tf32": {"covariance": {"precision": "tf32"}},
    "x3_update": {"covariance": {"precision": "tf32", "precision_update": "tf32x3"}},
    "x3_update_solve": {"covariance": {"precision": "tf32", "precision_update": "tf32x3",
                                       "precision_solve": "tf32x3"}},
    "x3_all_but_innovation": {"covariance": {"precision": "tf32x3", "precision_innovation": "tf32"}},
    "x3_update_innovation": {"covariance": {"precision": "tf32", "precision_update": "tf32x3",
                                            "precision_innovation": "tf32x3"}},
}


# the parts of one bayesian_layer variant's accuracy run, each a task of its own (the Riccati
# kernel compiles for about 90 s per specialization on Triton 3.6, and every part is one)
ACCURACY_TASKS = ("fp32", "bf16", "hard", "grid", "long", "warm")

# --variants' "hard" task: bf16 inputs where the filter grows ill-conditioned (no decay, no
# process noise; bench/kalman_hard_cases.py), the first in issue 4's well-conditioned range
# r >= 1e-2 (one-pass tf32 was 1.6e-1 off there, session 12), the others below it
HARD_CASES = [("bayesian_layer", 1.0, 1e-2, 0.0, 3.0), ("bayesian_layer", 1.0, 1e-3, 0.0, 3.0),
              ("bayesian_layer", 1.0, 1e-4, 0.0, 1.0)]


def accuracy_task(name, cfg, task):
    """One part of variant `name` (bayesian_layer with config `cfg`), on the GPU: its check
    against float64 with fp32 or bf16 inputs, with bf16 inputs on HARD_CASES (no decay), the
    stress grid, rls at T = 65536 and r = 1e-4,
    or ("warm") one call at the timing shape so that the timing later finds its kernels
    compiled. Returns (rows, seconds); an exception is a row ("error", name, task, text)."""
    torch.set_num_threads(1)   # the float64 reference on the CPU, beside the other workers
    t0 = time.time()
    rows = []
    try:
        if task in ("fp32", "bf16"):
            dtype = torch.float32 if task == "fp32" else torch.bfloat16
            check_correctness("cuda", rows, cases=(("bayesian_layer", (dtype,)),), config=cfg, label=name)
        elif task == "hard":
            from kalman_hard_cases import case_errors
            errs = [case_errors(*c, torch.bfloat16, [cfg])[0][0] for c in HARD_CASES]
            rows.append(("hard", name, errs))
        elif task == "grid":
            stress("cuda", rows, models=("bayesian_layer",), config=cfg, label=name, long=False)
        elif task == "long":
            stress("cuda", rows, config=cfg, label=name, grid=False)
        else:
            B, T, H, D = SHAPES[0]
            (q, k, v), x = draw("bayesian_layer", B, T, H, D, D, "cuda", seed=5)
            ours("bayesian_layer", *(t.bfloat16() for t in (q, k, v)), x, check_domain=False, config=cfg)
            torch.cuda.synchronize()
    except Exception as e:  # reported in the table, not fatal
        rows.append(("error", name, task, f"{type(e).__name__}: {str(e)[:300]}"))
        print(f"{name} {task}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return rows, time.time() - t0


def accuracy(variants, rows, with_stress, workers):
    """Every variant's accuracy tasks (the stress ones only with `with_stress`), in `workers`
    processes at once (spawned: each its own CUDA context; Triton's on-disk cache hands what
    they compile to the parent), or one after another here when workers <= 1."""
    tasks = [(n, c, t) for n, c in variants.items() for t in ACCURACY_TASKS
             if with_stress or t not in ("grid", "long")]
    if workers <= 1:
        results = [accuracy_task(*t) for t in tasks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(accuracy_task, *t) for t in tasks]
            results = []
            for (n, _, t), f in zip(tasks, futures):
                try:
                    results.append(f.result())
                except Exception as e:  # a worker that died (a crash in a kernel): that task's row
                    results.append(([("error", n, t, f"{type(e).__name__}: {str(e)[:300]}")], 0.))
    for (n, _, t), (r, sec) in zip(tasks, results):
        rows.extend(r)
        print(f"  {n} {t}: {sec:.0f} s", flush=True)


def variant_table(variants, rows, with_stress):
    """One line per variant: its errors against float64 (o/S/P/var), stress, time."""
    times = {k: v for row in rows if row[0] == "time" for k, v in row[2].items()}
    riccati = {row[3]: t for row in rows if row[0] == "breakdown" for name, t in row[2].items()
               if "riccati" in name or "covariance" in name}
    print("\n| variant | config | fp32 err o/S/P/var (<= 1e-3) | bf16 err o/S/P/var (<= 2e-2) "
          "| bf16 no decay, o err at r = 1e-2 (<= 2e-2) / below | stress grid | rls T=65536 r=1e-4 | ms | Riccati ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, c in variants.items():
        cells = []
        for dt in ("float32", "bfloat16"):
            r = [row for row in rows if row[0] == "check" and row[1] == n and row[2] == dt]
            if not r or not isinstance(r[0][4], dict):
                cells.append("error")
                continue
            errs = "/".join(f"{e:.1e}" for e in r[0][4].values())
            cells.append(errs + (" ok" if r[0][3] else " FAIL"))
        hard = [row for row in rows if row[0] == "hard" and row[1] == n]
        cells.append("error" if not hard else f"{hard[0][2][0]:.1e}{' ok' if hard[0][2][0] <= 2e-2 else ' FAIL'} / "
                     + ", ".join(f"{e:.1e}" for e in hard[0][2][1:]))
        st = [row for row in rows if row[0] == "stress" and row[-1] == n]
        grid = [row for row in st if row[3] is None]
        long = [row for row in st if row[3] is not None]
        cells.append("-" if not with_stress else f"{grid[0][1]} finite" if grid and not grid[0][2]
                     else f"NON-FINITE {grid[0][2]}" if grid else "error")
        cells.append("-" if not with_stress else ("finite" if long[0][3] else "NON-FINITE") if long else "error")
        errors = [f"{row[2]}: {row[3][:80]}" for row in rows if row[0] == "error" and row[1] == n]
        t = times.get("ours_bl" if c is None else f"ours_bl_{n}")
        cells.append(f"{t:.3f}" if t is not None else "error")
        cells.append(f"{riccati[n]:.3f}" if n in riccati else "-")
        print(f"| {n} | {json.dumps(c)} | " + " | ".join(cells) + " |" + (f" {'; '.join(errors)}" if errors else ""))


def bench(fn):
    import triton
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, return_mode="median")


def timings(shapes, rows, variants, with_torch=True):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    for si, (B, T, H, D) in enumerate(shapes):
        (q, k, v), x = draw("bayesian_layer", B, T, H, D, D, "cuda", seed=5)
        q, k, v = (t.bfloat16() for t in (q, k, v))
        beta = torch.sigmoid(torch.randn(B, T, H, device="cuda"))
        t_fla = bench(lambda: chunk_gated_delta_rule(q, k, v, g=x["g"], beta=beta))
        t_fla2 = bench(lambda: chunk_gated_delta_rule(q, k, v, g=x["g"], beta=beta))
        res = {"fla_gdn": t_fla, "fla_gdn_again": t_fla2}
        o_ref = None
        if with_torch and si == 0:
            o_ref = kalman_chunked(q, k, v, x["g"], x["r"], x["sigma"])[0]
            res["torch_chunked"] = bench(lambda: kalman_chunked(q, k, v, x["g"], x["r"], x["sigma"]))
        for name, (model, cfg) in variants.items():
            xx = x
            if model == "bayesian_layer_diag":
                xx = {**x, "g": x["g"][..., None].expand(B, T, H, D).contiguous()}
            elif model == "rls":
                xx = {"r": x["r"]}
            fn = lambda: ours(model, q, k, v, xx, check_domain=False, config=cfg)
            try:
                res[name] = bench(fn)
                if o_ref is not None and model != "rls":
                    res[name + "_err_vs_torch"] = rel(fn()[0], o_ref)
            except Exception as e:  # a variant that fails to compile is reported, not fatal
                print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        rows.append(("time", (B, T, H, D), res))
        print(f"time {(B, T, H, D)}: " + ", ".join(f"{n} {t:.3f}" for n, t in res.items()), flush=True)


def breakdown(shape, rows, reps=5, config=None, label=""):
    """Per-kernel device time of ours_bl with `config` (torch profiler), ms per call."""
    from torch.profiler import ProfilerActivity, profile
    B, T, H, D = shape
    (q, k, v), x = draw("bayesian_layer", B, T, H, D, D, "cuda", seed=5)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    fn = lambda: ours("bayesian_layer", q, k, v, x, check_domain=False, config=config)
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
    res = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.)
        if t:
            res[e.key[:40]] = t / reps / 1000.
    rows.append(("breakdown", shape, res, label))
    print(f"breakdown {label} {shape}: " + ", ".join(f"{n} {t:.3f}" for n, t in sorted(res.items(), key=lambda a: -a[1])), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bayesian_layer and rls only, fewest compiles")
    ap.add_argument("--lean", action="store_true",
                    help="only time bayesian_layer (default and FAST_CONFIG) at the first shape, "
                         "with its error against the PyTorch chunked filter and the per-kernel split")
    ap.add_argument("--variants", default=None,
                    help='with --lean: JSON {name: config} of bayesian_layer launch settings to check against '
                         'float64 (fp32 and bf16 inputs) and time beside the default instead of the 4-warp Riccati, '
                         'e.g. \'{"tf32": {"covariance": {"precision": "tf32"}}, '
                         '"upd3": {"covariance": {"precision": "tf32", "precision_update": "tf32x3"}}}\', '
                         'or "precision" for PRECISION_MIXES (the Riccati kernel\'s dots by group), '
                         'or "forward" for FORWARD_VARIANTS (the forward\'s other launch settings)')
    ap.add_argument("--without", default="",
                    help="with --variants: comma-separated substrings; variants whose name has one are left out "
                         "(e.g. w8, to time the others after a variant failed)")
    ap.add_argument("--stress", action="store_true",
                    help="with --lean: then the stress grid at T = 65536 (with --variants: for every variant)")
    ap.add_argument("--workers", type=int, default=min(16, max(1, (os.cpu_count() or 2) - 2)),
                    help="with --variants: processes that run the variants' checks (and compiles) at once")
    ap.add_argument("--diag", action="store_true",
                    help="with --lean: time bayesian_layer_diag instead (default and one-pass tf32 covariance)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: skip optional stages past this")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kalman.json"))
    args = ap.parse_args(argv)
    import triton
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    t0 = time.time()
    left = lambda: args.budget - (time.time() - t0)
    if args.lean and args.variants:
        # the default and every variant: checks (and stress) in parallel processes, which also
        # compile every kernel the timing needs, then the timings here one after another
        extra = dict(precision=PRECISION_MIXES, forward=FORWARD_VARIANTS).get(args.variants) or json.loads(args.variants)
        drop = [w for w in args.without.split(",") if w]
        variants = {"default": None, **{n: c for n, c in extra.items() if not any(w in n for w in drop)}}
        accuracy(variants, rows, args.stress, args.workers)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        timings(SHAPES[:1], rows, {("ours_bl" if c is None else f"ours_bl_{n}"): ("bayesian_layer", c)
                                   for n, c in variants.items()})
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        for n, c in variants.items():
            try:
                breakdown(SHAPES[0], rows, config=c, label=n)
            except Exception as e:
                print(f"breakdown {n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        variant_table(variants, rows, args.stress)
    elif args.lean and args.diag:
        # the per-key kernel's default beside one-pass tf32 in its covariance kernel
        timings(SHAPES[:1], rows, {"ours_diag": ("bayesian_layer_diag", None),
                                   "ours_diag_tf32": ("bayesian_layer_diag", {"covariance": {"precision": "tf32"}})})
    elif args.lean:
        # the generated module's FAST_CONFIG (one-pass tf32 dots) beside the default
        from designmodel.codegen import runtime
        extra = {"fast": runtime.load_zoo("bayesian_layer").FAST_CONFIG}
        timings(SHAPES[:1], rows, {"ours_bl": ("bayesian_layer", None),
                                   **{f"ours_bl_{n}": ("bayesian_layer", c) for n, c in extra.items()}})
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        breakdown(SHAPES[0], rows)
        if args.stress and left() > 120:
            try:
                stress("cuda", rows, long_T=65536, models=("bayesian_layer",))
            except Exception as e:
                print(f"stress: {type(e).__name__}: {str(e)[:300]}", flush=True)
    elif args.quick:
        # each specialization of the Riccati kernel compiles for about 90 s on an H100 host:
        # the fewest that cover a check (K = 128, variance, initial state) before the timings,
        # the rest while the budget lasts
        check_correctness("cuda", rows, cases=(("bayesian_layer", (torch.float32,)),))
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        timings(SHAPES[:1], rows, {"ours_bl": ("bayesian_layer", None)})
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        try:
            breakdown(SHAPES[0], rows)
        except Exception as e:
            print(f"breakdown: {type(e).__name__}: {str(e)[:300]}", flush=True)
        timings([SHAPES[2]], rows, {"ours_bl": ("bayesian_layer", None)}, with_torch=False)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        for cases in ((("bayesian_layer", (torch.bfloat16,)),), (("rls", (torch.float32,)),)):
            if left() > 120:
                check_correctness("cuda", rows, cases=cases)
                print(f"[{time.time() - t0:.0f}s]", flush=True)
        for shape in (SHAPES[1], SHAPES[3]):
            if left() > 120:
                timings([shape], rows, {"ours_bl": ("bayesian_layer", None)}, with_torch=False)
                print(f"[{time.time() - t0:.0f}s]", flush=True)
        if left() > 150:
            try:
                stress("cuda", rows, long_T=65536, models=("bayesian_layer",))
            except Exception as e:
                print(f"stress: {type(e).__name__}: {str(e)[:300]}", flush=True)
    else:
        check_correctness("cuda", rows)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        try:
            stress("cuda", rows, long_T=65536)
        except Exception as e:
            print(f"stress: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        variants = {
            "ours_bl": ("bayesian_layer", None),
            "ours_bl_cov_w4": ("bayesian_layer", {"covariance": {"num_warps": 4}}),
            "ours_bl_cov_tf32": ("bayesian_layer", {"covariance": {"precision": "tf32"}}),
            "ours_bl_gain_w8": ("bayesian_layer", {"gain": {"num_warps": 8}}),
            "ours_bl_meantf32": ("bayesian_layer", {"mean": {"precision": "tf32"}}),
            "ours_diag": ("bayesian_layer_diag", None),
            "ours_rls": ("rls", None),
        }
        timings(SHAPES[:1], rows, variants)
        try:
            breakdown(SHAPES[0], rows)
        except Exception as e:
            print(f"breakdown: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
        timings(SHAPES[1:], rows, {"ours_bl": variants["ours_bl"]}, with_torch=False)
    with open(args.json, "w") as f:
        json.dump(rows, f, default=str, indent=1)
    # fla's first timing of a shape can include its autotuning's leftovers: the ratio takes the faster
    print("\n| shape | what | ms | ours / fla_gdn (faster of two) | torch_chunked / ours |")
    print("|---|---|---|---|---|")
    for row in rows:
        if row[0] != "time":
            continue
        shape, res = row[1], row[2]
        for n, t in res.items():
            if n.endswith("_err_vs_torch"):
                continue
            fla = min(res["fla_gdn"], res.get("fla_gdn_again", res["fla_gdn"]))
            ratio = f"{t / fla:.2f}" if n.startswith("ours") else ""
            tr = f"{res['torch_chunked'] / t:.1f}" if n.startswith("ours") and "torch_chunked" in res else ""
            print(f"| {shape} | {n} | {t:.3f} | {ratio} | {tr} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
