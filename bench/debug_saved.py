"""Where the reset backward's saved path goes wrong on a device (a debugging aid).

    python3 bench/debug_saved.py [--model gated_deltanet] [--shape 1,256,4,64]

For bf16 inputs like bench_bwd's gradient check, prints the relative difference of
  (a) each saved tensor of forward(..., save_for_backward=True) against float64 torch:
      the reset's inverse Ai = (I + stril(diag(beta) (K K^T o Gamma)))^-1 per chunk and
      W = Ai (beta a K); and V_n between the two_pass and fused forward paths;
  (b) every gradient of backward(saved=...) against backward(saved=None) (the recomputing path).
On a CPU it runs in the Triton interpreter.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.nn.functional as F  # noqa: E402

from designmodel.codegen import runtime  # noqa: E402


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def reference_inverse(k, beta, g, BT):
    """float64 Ai [B, T, H, BT] and W [B, T, H, K] per chunk (g None: no decay)."""
    B, T, H, K = k.shape
    Ai = torch.zeros(B, T, H, BT, dtype=torch.float64)
    W = torch.zeros(B, T, H, K, dtype=torch.float64)
    kd, bd = k.double().cpu(), beta.double().cpu()
    gd = None if g is None else g.double().cpu()
    for b in range(B):
        for h in range(H):
            for s in range(0, T, BT):
                e = min(s + BT, T)
                kc, bc = kd[b, s:e, h], bd[b, s:e, h]
                gc = torch.zeros(e - s, dtype=torch.float64) if gd is None else gd[b, s:e, h].cumsum(0)
                gamma = torch.exp(gc[:, None] - gc[None, :])
                A = torch.tril(bc[:, None] * (kc @ kc.T) * gamma, -1)
                inv = torch.linalg.inv(torch.eye(e - s, dtype=torch.float64) + A)
                Ai[b, s:e, h, :e - s] = inv
                W[b, s:e, h] = inv @ (bc[:, None] * torch.exp(gc)[:, None] * kc)
    return Ai, W


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gated_deltanet")
    ap.add_argument("--shape", default="1,256,4,64")
    args = ap.parse_args(argv)
    B, T, H, D = (int(x) for x in args.shape.split(","))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, device=dev, generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    beta = torch.sigmoid(torch.randn(B, T, H, device=dev, generator=gen))
    g = F.logsigmoid(torch.randn(B, T, H, device=dev, generator=gen) + 4) if args.model == "gated_deltanet" else None
    gates = (beta,) if g is None else (beta, g)
    mod = runtime.load_zoo(args.model)
    do = torch.randn_like(v)
    saved = {}
    for path in ("two_pass", "fused"):
        o, _, s = mod.forward(q, k, v, *gates, check_domain=False, save_for_backward=True, config={"path": path})
        saved[path] = dict(zip(mod.SAVED_FOR_BACKWARD, s))
    Ai, W = reference_inverse(k, beta, g, mod.CHUNK)
    for path, s in saved.items():
        print(f"{path}: Ai vs float64 {rel(s['Ai'].cpu(), Ai):.2e}, W vs float64 {rel(s['w'].cpu(), W):.2e}")
    print(f"V_n two_pass vs fused {rel(saved['two_pass']['v_new'], saved['fused']['v_new']):.2e}")
    names = ["q", "k", "v", "beta"] + ([] if g is None else ["g"])
    base = mod.backward(q, k, v, *gates, do, saved=None)
    for path, s in saved.items():
        got = mod.backward(q, k, v, *gates, do, saved=tuple(s[n] for n in mod.SAVED_FOR_BACKWARD))
        print(f"backward(saved from {path}) vs backward(saved=None): "
              + ", ".join(f"d{n} {rel(a, b):.1e}" for n, a, b in zip(names, got, base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
