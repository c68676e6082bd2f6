"""The Bayesian Layer's error against float64 on hard inputs, per launch config (GPU).

    python3 bench/kalman_hard_cases.py [--configs JSON]

bench_kalman.py's stress grid only asks for finite outputs there; before a cheaper dot
precision becomes a default, this prints how far it moves the error where float32 itself
loses digits: tiny observation noise (r = 1e-4) with keys of norm 3 (r / |k|^2 ~ 1e-5), no
decay or strong decay, no process noise or a lot, against the float64 step-by-step filter
(designmodel.reference.recurrent, on the CPU), with fp32 and bf16 inputs. One row per case and
input dtype, one column per config (max relative error of o, then of the final P). With
--grads, the error of the gradients instead (the worst over q, k, v and the noises and decay,
of loss = sum(o * w) for a fixed random w), against autograd through the float64 filter.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from designmodel import ops  # noqa: E402
from designmodel.derive import derive  # noqa: E402
from designmodel.reference import recurrent  # noqa: E402

# (model, alpha, r, sigma, key norm): the stress grid's hard corners, and a calm one to compare
CASES = [
    ("rls", None, 1e-4, None, 3.0),
    ("bayesian_layer", 1.0, 1e-4, 0.0, 3.0),
    ("bayesian_layer", 1.0, 1e-3, 0.0, 3.0),
    ("bayesian_layer", 1.0, 1e-2, 0.0, 3.0),
    ("bayesian_layer", 1.0, 1e-4, 0.0, 1.0),
    ("bayesian_layer", 1.0, 1e-2, 0.0, 1.0),
    ("bayesian_layer", 0.9, 1e-4, 1.0, 3.0),
    ("bayesian_layer", 0.99, 1e-2, 1e-2, 1.0),
    ("bayesian_layer", 0.95, 1.0, 0.1, 1.0),
    # the per-key decay's kernel, one-pass tf32 at K = 128 until session 13 (1e1 off at r = 1e-3)
    ("bayesian_layer_diag", 1.0, 1e-3, 0.0, 3.0),
    ("bayesian_layer_diag", 1.0, 1e-2, 0.0, 3.0),
    ("bayesian_layer_diag", 1.0, 1e-2, 0.0, 1.0),
    ("bayesian_layer_diag", 0.9, 1e-4, 1.0, 3.0),
    ("bayesian_layer_diag", 0.99, 1e-2, 1e-2, 1.0),
]


def relative(a, b) -> float:
    """max |a - b| / max |b| (inf where a is not finite)."""
    a = a.double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def inputs(model, alpha, r, sigma, norm, B=1, T=512, H=2, K=128, seed=0):
    """float32 q, k, v and the op's other inputs for one case."""
    gen = torch.Generator().manual_seed(seed)
    q, v = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) * norm
    ins = {"r": torch.full((B, T, H), r)}
    if model != "rls":
        # the per-key decay model takes one log-decay per key
        ins["g"] = torch.full((B, T, H, K) if model.endswith("_diag") else (B, T, H), math.log(alpha))
        ins["sigma"] = torch.full((B, T, H), sigma)
    return q, k, v, ins


def case_errors(model, alpha, r, sigma, norm, dtype, configs, T=512, K=128, device="cuda", grads=False, seed=0):
    """One case with inputs in dtype, for each config: (error of o, error of the final P), or
    with grads (worst error over the inputs' gradients of sum(o w), its input's name)."""
    q, k, v, ins = inputs(model, alpha, r, sigma, norm, T=T, K=K, seed=seed)
    d = derive(model)
    d = derive(replace(d.spec, readout=replace(d.spec.readout, variance=True)))
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    # the float64 filter on the inputs as rounded to dtype (under autograd with grads)
    leaves = {"q": qd.double(), "k": kd.double(), "v": vd.double(), **{n: x.double() for n, x in ins.items()}}
    for x in leaves.values():
        x.requires_grad_(grads)
    ref = recurrent(d, leaves["q"] * K ** -0.5, leaves["k"], leaves["v"],
                    {**{n: leaves[n] for n in ins}, "p0": torch.ones(q.shape[2], dtype=torch.float64)})
    w = torch.randn(ref.o.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if grads:
        want = dict(zip(leaves, torch.autograd.grad((ref.o * w).sum(), list(leaves.values()))))
    out = []
    for cfg in configs:
        mine = {n: x.to(device).requires_grad_(grads) for n, x in (("q", qd), ("k", kd), ("v", vd), *ins.items())}
        o, (_, P) = getattr(ops, model)(**mine, output_final_state=True, check_domain=False, config=cfg)
        if grads:
            got = torch.autograd.grad((o.float() * w.float().to(device)).sum(), list(mine.values()))
            out.append(max((relative(g, want[n]), n) for g, n in zip(got, mine)))
        else:
            out.append((relative(o, ref.o.detach()), relative(P, ref.covariance.detach())))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default='{"default": null}', help="JSON {name: config or null}")
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--models", default="rls,bayesian_layer", help="the cases of these models only")
    ap.add_argument("--grads", action="store_true", help="the gradients' errors instead of the forward's")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="input dtypes (bf16x3 configs take bfloat16 only)")
    ap.add_argument("--seed", type=int, default=0, help="the inputs' (and the loss weights') random seed")
    ap.add_argument("--r-max", type=float, default=None, help="only the cases with r at most this")
    ap.add_argument("--device", default="cuda", help="cpu: a quick look in Triton's interpreter (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    configs = json.loads(args.configs)
    what = "grads" if args.grads else "o / P"
    print("| model | alpha | r | sigma | |k| | inputs | " + " | ".join(f"{n}: {what}" for n in configs) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(configs))
    for case in (c for c in CASES if c[0] in args.models.split(",") and (args.r_max is None or c[2] <= args.r_max)):
        for dtype in (getattr(torch, n) for n in args.dtypes.split(",")):
            errs = case_errors(*case, dtype, list(configs.values()), T=args.T, K=args.K, device=args.device,
                               grads=args.grads, seed=args.seed)
            cells = [f"{a:.1e} (d{b})" if args.grads else f"{a:.1e} / {b:.1e}" for a, b in errs]
            model, alpha, r, sigma, norm = case
            print(f"| {model} | {alpha} | {r:g} | {sigma} | {norm} | {str(dtype)[6:]} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
