"""Forward + backward time and gradient parity of the write family against fla 0.6.0 (GPU only).

    python bench/bench_bwd.py                               # (4, 4096, 16, 128) bf16
    python bench/bench_bwd.py --models gla --profile        # also per-kernel CUDA times

For each op: (a) our gradients (generated module's `backward`) against fla's autograd
gradients on the same inputs, initial state and output gradient (relative error
max|ours - fla| / max|fla|), (b) forward + backward timed with
triton.testing.do_bench(return_mode='median') for both. Inputs as bench_fwd.py: bf16,
L2-normalized keys, g = logsigmoid(x + 4).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from bench.bench_fwd import inputs, rel  # noqa: E402
from designmodel import ops  # noqa: E402
from designmodel.codegen import runtime  # noqa: E402

MODELS = ["linear_attention", "retnet", "mamba2", "gla"]


def fla_fwd_bwd(model):
    """fla's chunk op forward + backward: a function of (q, k, v, gates, h0, do) -> grads."""
    if model == "linear_attention":
        from fla.ops.linear_attn import chunk_linear_attn as f
        call = lambda q, k, v, x, h0: f(q, k, v, initial_state=h0, normalize=False)  # noqa: E731
    elif model == "retnet":
        from fla.ops.retention import chunk_retention as f
        call = lambda q, k, v, x, h0: f(q, k, v, initial_state=h0)  # noqa: E731
    elif model == "mamba2":
        from fla.ops.simple_gla import chunk_simple_gla as f
        call = lambda q, k, v, x, h0: f(q, k, v, g=x["g"], initial_state=h0)  # noqa: E731
    else:
        from fla.ops.gla import chunk_gla as f
        call = lambda q, k, v, x, h0: f(q, k, v, g=x["g"], initial_state=h0)  # noqa: E731

    def run(q, k, v, x, h0, do):
        leaves = [q, k, v, *x.values(), h0]
        for t in leaves:
            t.grad = None
        o, _ = call(q, k, v, x, h0)
        o.backward(do)
        return [t.grad for t in leaves]
    return run


def ours_fwd_bwd(model):
    """Our forward (the op) + the generated module's backward."""
    op, module = getattr(ops, model), runtime.load_zoo(model)

    def run(q, k, v, x, h0, do, config=None):
        gates = {n: t for n, t in x.items()}
        o, _ = op(q, k, v, **gates, initial_state=h0, check_domain=False)
        if model == "retnet":
            gates = {"gamma": ops.retnet_gamma(q.shape[2], q.device)}
        return list(module.backward(q, k, v, *gates.values(), do, None, initial_state=h0, config=config))
    return run


def profile(fn):
    from torch.profiler import ProfilerActivity, profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in p.key_averages():
        if e.device_time_total > 0:
            out[e.key[:60]] = round(e.device_time_total / 5 / 1000, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,4096,16,128")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--configs", default="", help="JSON list of backward config overrides to time")
    args = ap.parse_args(argv)
    B, T, H, D = (int(s) for s in args.shape.split(","))
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for model in [m for m in args.models.split(",") if m]:
        q, k, v, x, h0 = inputs(model, B, T, H, D)
        h0 = h0.float()
        do = torch.randn_like(v)
        for t in (q, k, v, *x.values(), h0):
            t.requires_grad_(True)
        ours = ours_fwd_bwd(model)
        row = dict(model=model, shape=(B, T, H, D))
        got = ours(q.detach(), k.detach(), v.detach(), {n: t.detach() for n, t in x.items()}, h0.detach(), do)
        try:
            fla = fla_fwd_bwd(model)
            ref = fla(q, k, v, x, h0, do)
            names = ["dq", "dk", "dv", *[f"d{n}" for n in x], "dh0"]
            theirs = ref[:3 + len(x)] + [ref[-1]]
            mine = got[:3 + len(x)] + [got[-1]]
            row["err"] = {n: round(rel(a, b), 5) for n, a, b in zip(names, mine, theirs) if b is not None}
            row["fla_ms"] = triton.testing.do_bench(lambda: fla(q, k, v, x, h0, do), return_mode="median")
        except ImportError as err:
            row["fla_error"] = str(err)
        qd, kd, vd, hd = q.detach(), k.detach(), v.detach(), h0.detach()
        xd = {n: t.detach() for n, t in x.items()}
        row["ours_ms"] = triton.testing.do_bench(lambda: ours(qd, kd, vd, xd, hd, do), return_mode="median")
        if "fla_ms" in row:
            row["ratio"] = row["ours_ms"] / row["fla_ms"]
        print(json.dumps(row), flush=True)
        for cfg in json.loads(args.configs or "[]"):
            ms = triton.testing.do_bench(lambda: ours(qd, kd, vd, xd, hd, do, cfg), return_mode="median")
            print(json.dumps(dict(model=model, config=cfg, ours_ms=ms)), flush=True)
        if args.profile:
            print(json.dumps(dict(model=model, ours_kernels_ms=profile(lambda: ours(qd, kd, vd, xd, hd, do)))), flush=True)
            if "fla_ms" in row:
                print(json.dumps(dict(model=model, fla_kernels_ms=profile(lambda: fla(q, k, v, x, h0, do)))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
