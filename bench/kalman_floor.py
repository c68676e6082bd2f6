"""How fast could the chunked Bayesian Layer forward be if every chunk ran at once? (GPU)

    python3 bench/kalman_floor.py [--shape 4,4096,16,128] [--reps 5]

The forward's covariance and mean kernels walk the chunks of a sequence one after another (one
program per sequence and head); only the gain and readout kernels take every chunk at once.
Any faster design of the same chunked algorithm (MATH.md 6.3), an associative scan over the
chunks for instance, still has to do each chunk's own work: factorize its innovation covariance
given P at its start, and make its gains, its state update and its readout. This script times
that work alone, with the cross-chunk dependence removed:

  (a) the forward as it runs, at (B, T, H, D), saving the mean S_c and covariance P_c at every
      chunk start (`save_for_backward=True`);
  (b) the same tokens packed as B * T / C sequences of one chunk each (cu_seqlens every C
      tokens), each started from (a)'s S_c and P_c: every kernel now runs one program per chunk
      and head, all chunks at once, and the outputs must equal (a)'s up to the bf16 rounding of
      the saved means (the check below).

(b)'s time is the floor of this algorithm's per-chunk kernels when a perfect cross-chunk
method supplies every chunk's start for free; a scan would add its own passes on top. Both are
timed against fla 0.6.0's chunk_gated_delta_rule forward in the same run (bf16, L2-normalized
keys, g = logsigmoid(x + 4), as BENCH.md), with per-kernel device times from the profiler.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from bench_bwd import profile  # noqa: E402  (device time per kernel, torch profiler)


def draw(B, T, H, D, seed=5):
    """bf16 q, k (L2-normalized), v and float32 g, r, sigma on the GPU, as bench_kalman draws them."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = F.normalize(k, dim=-1)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4)
    r = torch.exp(torch.randn(B, T, H, generator=gen) * 0.5)
    sigma = 0.1 * torch.rand(B, T, H, generator=gen)
    return ([t.bfloat16().cuda() for t in (q, k, v)], [t.cuda() for t in (g, r, sigma)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,4096,16,128")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    B, T, H, D = map(int, args.shape.split(","))
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from generated.bayesian_layer import kernels
    C = kernels.CHUNK
    assert T % C == 0, "T must be a multiple of the chunk"
    (q, k, v), (g, r, sigma) = draw(B, T, H, D)
    p0 = torch.ones(H, device="cuda")
    beta = torch.sigmoid(torch.randn(B, T, H, device="cuda"))

    def whole():
        return kernels.forward(q, k, v, g, p0, r, sigma, check_domain=False)

    with torch.no_grad():
        o_a, _, (S_c, P_c) = kernels.forward(q, k, v, g, p0, r, sigma, check_domain=False, save_for_backward=True)
        # (b): sequence n = b * T / C + i is chunk i of batch row b, the order of the checkpoints
        pack = lambda x: x.reshape(1, B * T, *x.shape[2:])
        qp, kp, vp, gp, rp, sp = (pack(x) for x in (q, k, v, g, r, sigma))
        cu = torch.arange(0, B * T + 1, C, device="cuda", dtype=torch.int32)
        S0, P0 = S_c.float().contiguous(), P_c.contiguous()

        def chunks():
            return kernels.forward(qp, kp, vp, gp, p0, rp, sp, initial_state=(S0, P0), cu_seqlens=cu,
                                   check_domain=False)

        o_b = chunks()[0].reshape(B, T, H, D)
        err = ((o_b.float() - o_a.float()).abs().max() / o_a.float().abs().max()).item()
        gdn = lambda: chunk_gated_delta_rule(q, k, v, g=g, beta=beta)
        times = {}
        for name, fn in (("fla_gdn", gdn), ("ours", whole), ("ours_all_chunks_at_once", chunks), ("fla_gdn_again", gdn)):
            fn()
            torch.cuda.synchronize()
            times[name] = triton.testing.do_bench(fn, return_mode="median")
        prof = {name: profile(name, fn, args.reps) for name, fn in (("ours", whole), ("ours_all_chunks_at_once", chunks))}
    print(f"\nmax|o_b - o_a| / max|o_a| = {err:.2e} (the saved means are bf16)")
    gdn_ms = (times["fla_gdn"] + times["fla_gdn_again"]) / 2
    print(f"\n(B, T, H, D) = {(B, T, H, D)}, bf16; fla chunk_gated_delta_rule {times['fla_gdn']:.3f} / "
          f"{times['fla_gdn_again']:.3f} ms")
    print("| forward | ms | / fla GDN | kernels (profiler, ms) |")
    print("|---|---|---|---|")
    for name in ("ours", "ours_all_chunks_at_once"):
        ks = ", ".join(f"{n.split('_kernel')[0]} {t:.3f}" for n, t in prof[name].items() if t >= 0.01)
        print(f"| {name} | {times[name]:.3f} | {times[name] / gdn_ms:.1f}x | {ks} |")
    # the gain and readout kernels take every chunk at once in (a) already, and in (b) their grids
    # (chunks of the longest sequence x sequences) are mostly programs that exit: each kernel's
    # floor is the lesser of its two times
    ours = [n for n in prof["ours"] if n.startswith("chunk_")]
    floor = {n: min(prof["ours"][n], prof["ours_all_chunks_at_once"].get(n, float("inf"))) for n in ours}
    print(f"| floor: each kernel's lesser time | {sum(floor.values()):.3f} | {sum(floor.values()) / gdn_ms:.1f}x | "
          + ", ".join(f"{n.split('_kernel')[0]} {t:.3f}" for n, t in floor.items()) + " |")
    return 0 if err < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
