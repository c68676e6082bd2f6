"""Time the kalman backward's per-chunk kernels (steps 2, 4 and 6) alone, one block
configuration per process, at a bench shape on a GPU.

    python3 bench/tune_kalman_steps.py [--shape 4,4096,16,128] [--budget 300]
        [--quantities "32,64,8;64,64,8"] [--mean "64,64,8;32,32,4"] [--covariance "64,64,8"]

Each configuration (BK, BV, warps; for step 2 also the factorization's warps, 0 for inside
the one kernel) of a step runs in a child process of its own (a kernel that
faults takes its CUDA context down with it, and the next configuration must not inherit it),
on random inputs of the shapes the op's backward gives the kernel: every chunk of B sequences
of T tokens and H heads at once, C the generated chunk, float32 with TF32 dots as for 16-bit
inputs. Prints ms per launch (triton.testing.do_bench) and the first call's seconds (mostly
compiling), then a table; the rows go to $OUT/tune_kalman_steps.txt as they come.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("DESIGNMODEL_TUNE_DEVICE", "cuda")   # "cpu" with TRITON_INTERPRET=1: a dry run of the calls
DEFAULTS = dict(quantities="32,64,8,0;32,64,8,2;32,64,8,4;64,64,8,4;32,32,4,4;64,64,4,0", mean="64,64,8;64,128,8;32,64,4",
                covariance="64,64,8;64,64,4;32,32,4")


def _inputs(B, T, H, K, V, C, seed=0):
    """Well-posed random inputs in the chunk layout [B, H, NC, C, *] and step 2's quantities."""
    import torch
    from designmodel.chunked_adjoint import _chunk_quantities
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    NC = -(-T // C)
    r = lambda *s: torch.randn(B, H, NC, *s, device=DEVICE, generator=g)
    u = lambda *s: torch.rand(B, H, NC, *s, device=DEVICE, generator=g)
    x = dict(q=r(C, K) * K ** -0.5, k=torch.nn.functional.normalize(r(C, K), dim=-1), v=r(C, V),
             g=-0.05 * u(C), r=0.5 + u(C), sigma=0.01 * u(C))
    A = r(K, K)
    P = A @ A.mT / K + 0.5 * torch.eye(K, device=DEVICE)
    S = r(K, V)
    c = _chunk_quantities(x["q"], x["k"], x["v"], x["g"], x["r"], x["sigma"], S, P, False)
    return x, c, S, P, dict(dO=r(C, V), dS=r(K, V), dP=r(K, K))


def child(step, config, shape, unsplit=False):
    """One configuration of one step: its first call and its time per launch, one line."""
    import torch
    import triton
    import designmodel
    module = designmodel.compile("bayesian_layer").kernels
    B, T, H, K = shape[:4]
    V = shape[4] if len(shape) > 4 else K
    x, c, S, P, cot = _inputs(B, T, H, K, V, module.CHUNK)
    bk, bv, warps = config[:3]
    if step == "quantities":
        module.CHUNK_QUANTITIES_BLOCKS = config                          # and the factorization's warps (0: inline)
        # as the backward runs it for 16-bit inputs: the chunk-start means in bf16, the dots with
        # an exact operand split ("tf32x2"); --unsplit: as for float32 inputs at tf32x3
        S_in, split = (S, None) if unsplit else (S.bfloat16(), "tf32x2")
        run = lambda: module.chunk_quantities(x, S_in, P, False, precision="tf32x3", input_precision=split)
    else:
        module.CHUNK_ADJOINT_BLOCKS[step] = (bk, bv, warps)
        # as the backward runs them: step 4 leaves the key gradient's last phase to step 6,
        # which takes what step 4 carries over
        mean = lambda: module.mean_chunk_adjoint(x, c, S, P, cot["dO"], cot["dS"], False, precision="tf32x3",
                                                 defer_keys=True)
        if step == "mean":
            run = mean
        else:
            carry = mean()[2]
            run = lambda: module.covariance_chunk_adjoint(x, c, S, P, cot["dP"], False, precision="tf32x3",
                                                          carry=carry)
    t0 = time.time()
    run()
    torch.cuda.synchronize()
    first = time.time() - t0
    ms = triton.testing.do_bench(run, warmup=5, rep=50)
    more = f" factor warps {config[3]}" if len(config) > 3 else ""
    print(f"{step:11s} {bk:>3d} {bv:>4d} {warps:>5d} {ms:9.3f} {first:8.1f}{more}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,4096,16,128")
    ap.add_argument("--budget", type=float, default=300, help="start no configuration after this many seconds")
    for step, configs in DEFAULTS.items():
        ap.add_argument(f"--{step}", default=configs, help="BK,BV,warps;... ('' skips the step)")
    ap.add_argument("--unsplit", action="store_true",
                    help="step 2 as for float32 inputs (no bf16 means, no tf32x2 split)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.child:
        child(args.child[0], tuple(int(s) for s in args.child[1].split(",")), shape, args.unsplit)
        return 0
    out = Path(os.environ.get("OUT", ".")) / "tune_kalman_steps.txt"
    start, rows = time.time(), []
    header = f"{'step':11s} {'BK':>3s} {'BV':>4s} {'warps':>5s} {'ms':>9s} {'first s':>8s}"
    print(header, flush=True)
    for step in DEFAULTS:
        for config in [c for c in getattr(args, step).split(";") if c]:
            if time.time() - start > args.budget:
                rows.append(f"{step:11s} {config}: skipped (budget)")
                continue
            run = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--child", step, config]
                                 + ["--unsplit"] * args.unsplit,
                                 capture_output=True, text=True, cwd=ROOT)
            lines = run.stdout.strip().splitlines()
            if run.returncode == 0 and lines:
                rows.append(lines[-1])
            else:
                err = (run.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append(f"{step:11s} {config}: failed ({err[:120]})")
            print(rows[-1], flush=True)
            with out.open("a") as f:
                f.write(rows[-1] + "\n")
    print()
    print(header)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
