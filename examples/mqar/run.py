"""Multi-query associative recall with the compiled layers, inside and beyond the training regime.

    python3 -m examples.mqar.run [--smoke] [--out DIR] [--models a,b] [--lrs 1e-3,3e-3] [--steps N]
    python3 -m examples.mqar.run --merge a/mqar.json,b/mqar.json [--out DIR]

The second form keeps, per model, the best run among several partial studies (one model or one
learning rate each, run side by side on one GPU: these models are too small to fill it).

Two-layer models (embedding; per layer a pre-norm residual mixer with a short causal
convolution, then a pre-norm MLP; a linear head) with one of linear attention, Mamba-2, Gated
DeltaNet and the Bayesian Layer as the mixer, at matched state size (the same heads, key and
value dimensions, so the same mean state H x K x V; the Bayesian Layer carries its covariance
K x K per head besides). Each is trained on MQAR (data.py) with sequence lengths and pair
counts inside a training range, at a few learning rates; the best learning rate by accuracy on
held-out data of the training regime is reported. Then every model is evaluated beyond the
training regime: more pairs and longer sequences than it was trained on.

Outputs beside this file (or --out): mqar.md (table), mqar.json, mqar.png (accuracy against
pairs, skipped without matplotlib); --smoke (a tiny configuration, a few steps, for the CPU
test) writes mqar_smoke.*. Training shows a progress bar with rate and time left.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton must see this before it is first imported (the layers' kernels import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402

from designmodel import layers  # noqa: E402
from examples.mqar.data import IGNORE, mqar_batch  # noqa: E402
from examples.progress import Progress  # noqa: E402

HERE = Path(__file__).resolve().parent
MIXERS = {"linear_attention": "LinearAttention", "mamba2": "Mamba2", "gated_deltanet": "GatedDeltaNet",
          "bayesian_layer": "BayesianLayer"}


def config(smoke: bool) -> dict:
    """The study's sizes: the full one for a GPU, a tiny one for the CPU test."""
    if smoke:
        return dict(vocab=64, d_model=32, heads=1, head_dim=16, batch=4, steps=2, lrs=[3e-3],
                    train_T=[18], train_pairs=[2, 4], eval_T=[18, 30], eval_pairs=[2, 4, 8], eval_batch=4)
    # batch 256: sessions 4 and 5 trained batches of 64 at 2 to 6 launch-bound steps per
    # second and no model left the log-4096 plateau; a larger batch costs little time per step
    return dict(vocab=8192, d_model=128, heads=2, head_dim=64, batch=256, steps=3000,
                lrs=[1e-3, 3e-3, 1e-2], train_T=[64, 128, 256], train_pairs=[4, 8, 16, 32],
                eval_T=[256, 512], eval_pairs=[4, 8, 16, 32, 48, 64], eval_batch=256)


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, mixer: nn.Module, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    """Two blocks around one kind of mixer (a designmodel zoo layer with a short convolution)."""

    def __init__(self, mixer: str, cfg: dict):
        super().__init__()
        d = cfg["d_model"]
        cls = getattr(layers, MIXERS[mixer])
        self.embed = nn.Embedding(cfg["vocab"], d)
        self.blocks = nn.ModuleList(
            Block(cls(hidden_size=d, num_heads=cfg["heads"], head_dim=cfg["head_dim"], use_short_conv=True,
                      layer_idx=i), d) for i in range(2))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, cfg["vocab"])

    def forward(self, tokens, at=None):
        """Logits [B, T, vocab], or only at the positions where the mask `at` [B, T] is true
        ([N, vocab]): MQAR is scored at its queries alone, and the logits of every position
        (B x T x 8192 floats) would dominate a step's memory and time."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        if at is not None:
            x = x[at]
        return self.head(self.norm(x))


def loss_and_accuracy(model, tokens, targets):
    """Cross-entropy and accuracy at the query positions."""
    at = targets != IGNORE
    logits = model(tokens, at)
    answers = targets[at]
    loss = nn.functional.cross_entropy(logits, answers)
    acc = (logits.argmax(-1) == answers).float().mean()
    return loss, acc


class WarmupCosine:
    """The learning-rate factor at a step: linear warm-up over the first tenth of the steps, then a
    cosine to zero. `total` may be set after training has begun (a run with a time budget learns
    its step count from its measured rate)."""

    def __init__(self, total: int):
        self.total = total

    def __call__(self, step: int) -> float:
        warm = max(1, self.total // 10)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.total - warm))))


def _steps_in_time(step: int, total: int, rate: float, left: float) -> int:
    """The step count a timed run ends at: what `rate` (steps per second) fits into the `left`
    seconds, no step past the deadline, and `total` while no rate is known yet."""
    if left <= 0:
        return step
    return max(step + 1, int(step + rate * left)) if rate > 0 else total


def train(mixer: str, lr: float, cfg: dict, device, seed: int = 0, bar: Progress | None = None,
          seconds: float | None = None):
    """A model trained on the training regime; returns (model, the losses).

    cfg["steps"] steps, or, with `seconds`, as many as fit in that time: every 25 steps from
    step 10 on (the first steps compile kernels) the step count is re-estimated from the rate
    since step 10 (for the learning-rate schedule), and training stops at the deadline whatever
    the estimate (processes that
    share a GPU slow each other down as they leave compiling behind, so an early rate runs long).
    """
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = Model(mixer, cfg).to(device)
    # fused: one kernel for the whole update (these small models are launch-bound on a GPU)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=device.type == "cuda")
    shape = WarmupCosine(cfg["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    losses = []   # on the device: reading each loss would wait for the GPU every step
    start = time.perf_counter()
    step = 0
    while step < shape.total:
        T = cfg["train_T"][step % len(cfg["train_T"])]
        pairs = [p for p in cfg["train_pairs"] if 3 * p <= T]
        tokens, targets = mqar_batch(gen, cfg["batch"], T, pairs[step % len(pairs)], cfg["vocab"])
        loss, _ = loss_and_accuracy(model, tokens.to(device), targets.to(device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        step += 1
        if seconds is not None and step >= 10:
            now, old_total = time.perf_counter(), shape.total
            if step == 10:
                t10 = now
            if now - start >= seconds or step % 25 == 10:
                shape.total = _steps_in_time(step, shape.total, (step - 10) / max(now - t10, 1e-9),
                                             seconds - (now - start))
            if bar is not None:
                bar.total += shape.total - old_total
        if step % 200 == 0:
            print(f"{mixer} lr {lr:g} step {step}/{shape.total}: loss {float(loss.detach()):.3f}", flush=True)
        if bar is not None:
            bar.update(1)
    return model, [float(x) for x in torch.stack(losses).cpu()]


@torch.no_grad()
def evaluate(model, cfg: dict, device, seed: int = 1234) -> dict:
    """Accuracy at the query positions for every (T, pairs) of the evaluation grid."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for T in cfg["eval_T"]:
        for pairs in cfg["eval_pairs"]:
            if 3 * pairs > T:
                continue
            tokens, targets = mqar_batch(gen, cfg["eval_batch"], T, pairs, cfg["vocab"])
            out[f"{T},{pairs}"] = _accuracy(model, tokens.to(device), targets.to(device))
    return out


def _accuracy(model, tokens, targets, rows: int = 64) -> float:
    """Accuracy at the query positions, `rows` sequences at a time (several processes share
    one GPU in a study)."""
    right = asked = 0
    for i in range(0, tokens.shape[0], rows):
        at = targets[i:i + rows] != IGNORE
        logits = model(tokens[i:i + rows], at)
        right += int((logits.argmax(-1) == targets[i:i + rows][at]).sum())
        asked += int(at.sum())
    return right / max(asked, 1)


def in_training_regime(key: str, cfg: dict) -> bool:
    T, pairs = (int(x) for x in key.split(","))
    return T <= max(cfg["train_T"]) and pairs <= max(cfg["train_pairs"])


def study(cfg: dict, models: list[str], device, seconds: float | None = None) -> dict:
    """Train every model at every learning rate (each for cfg["steps"] steps, or for `seconds`),
    keep the best in the training regime."""
    runs = len(models) * len(cfg["lrs"])
    results = {}
    with Progress(total=runs * cfg["steps"], unit="step", label="mqar") as bar:
        for mixer in models:
            best = None
            for lr in cfg["lrs"]:
                t0 = time.time()
                model, losses = train(mixer, lr, cfg, device, bar=bar, seconds=seconds)
                acc = evaluate(model, cfg, device)
                inside = [a for k, a in acc.items() if in_training_regime(k, cfg)]
                score = sum(inside) / max(len(inside), 1)
                run = dict(lr=lr, final_loss=sum(losses[-10:]) / len(losses[-10:]), accuracy=acc,
                           score_in_regime=score, seconds=time.time() - t0, steps=len(losses),
                           loss_curve=[sum(losses[i:i + 100]) / len(losses[i:i + 100])
                                       for i in range(0, len(losses), 100)])
                if best is None or score > best["score_in_regime"]:
                    best = run
            results[mixer] = best
    return results


def table(res: dict, cfg: dict) -> str:
    keys = [f"{T},{p}" for T in cfg["eval_T"] for p in cfg["eval_pairs"] if 3 * p <= T]
    timed = "minutes" not in cfg and any(r.get("minutes") for r in res["models"].values())
    head = "| model | lr | steps |" + (" minutes |" if timed else "") + " final loss | " + " | ".join(
        f"T={k.split(',')[0]}, {k.split(',')[1]} pairs{'' if in_training_regime(k, cfg) else ' *'}" for k in keys) + " |"
    lines = [f"MQAR accuracy at the query positions (best learning rate by accuracy inside the training "
             f"regime; * beyond it: more pairs or longer sequences than in training). Training: T in "
             f"{cfg['train_T']}, pairs in {cfg['train_pairs']}, "
             + (f"{cfg['minutes']:g} minutes per run" if cfg.get("minutes") else
                "each run for its minutes" if timed else f"{cfg['steps']} steps per run")
             + f", batches of {cfg['batch']}, "
             f"vocabulary {cfg['vocab']}, d_model {cfg['d_model']}, {cfg['heads']} heads of K = V = {cfg['head_dim']}.",
             "", head, "|" + "---|" * (4 + timed + len(keys))]
    for name, r in res["models"].items():
        lines.append(f"| {name} | {r['lr']:g} | {r.get('steps', cfg['steps'])} | "
                     + (f"{r['minutes']:g} | " if timed else "") + f"{r['final_loss']:.3f} | "
                     + " | ".join(f"{r['accuracy'].get(k, float('nan')):.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, cfg: dict, path: Path) -> str | None:
    """Accuracy against pairs, one panel per evaluation length; None, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not available ({exc})"
    fig, axes = plt.subplots(1, len(cfg["eval_T"]), figsize=(5 * len(cfg["eval_T"]), 4), squeeze=False)
    for ax, T in zip(axes[0], cfg["eval_T"]):
        for name, r in res["models"].items():
            ps = [p for p in cfg["eval_pairs"] if f"{T},{p}" in r["accuracy"]]
            ax.plot(ps, [r["accuracy"][f"{T},{p}"] for p in ps], marker="o", label=name)
        ax.axvline(max(cfg["train_pairs"]), color="gray", ls=":", lw=1)
        ax.set(title=f"T = {T}" + (" (longer than training)" if T > max(cfg["train_T"]) else ""),
               xlabel="pairs", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def merge(parts: list[dict]) -> dict:
    """One study from partial ones of the same configuration: per model, the best run by
    accuracy inside the training regime; the learning rates are the union of theirs."""
    def same(cfg):
        return {k: v for k, v in cfg.items() if k not in ("lrs", "minutes")}
    cfg = dict(parts[0]["config"])
    for p in parts[1:]:
        if same(p["config"]) != same(cfg):
            raise ValueError("merge: the partial studies were run with different configurations")
    cfg["lrs"] = sorted({lr for p in parts for lr in p["config"]["lrs"]})
    # timed parts may differ in their minutes: each run keeps its own (the table shows them)
    minutes = {p["config"].get("minutes") for p in parts}
    if len(minutes) > 1:
        cfg.pop("minutes", None)
    models = {}
    for p in parts:
        for name, r in p["models"].items():
            r = dict(r, minutes=r.get("minutes", p["config"].get("minutes")))
            if name not in models or r["score_in_regime"] > models[name]["score_in_regime"]:
                models[name] = r
    return dict(config=cfg, device=parts[0]["device"], models=models)


def write(res: dict, out: Path, stem: str) -> None:
    """The study's table, JSON and plot under out/."""
    from designmodel.atomic import write_text
    cfg = res["config"]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{stem}.json", json.dumps(res, indent=1))
    write_text(out / f"{stem}.md", table(res, cfg))
    why = plot(res, cfg, out / f"{stem}.png")
    print(table(res, cfg))
    if why:
        print(f"no plot: {why}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--models", default=",".join(MIXERS))
    ap.add_argument("--lrs", default=None, help="comma-separated learning rates")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None,
                    help="training sequences per step (default 256)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="train each (model, learning rate) for this long instead of a step count")
    ap.add_argument("--merge", default=None, help="comma-separated mqar.json files of partial studies")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",") if f]
        write(merge(parts), Path(args.out), "mqar")
        return 0
    cfg = config(args.smoke)
    if args.lrs:
        cfg["lrs"] = [float(x) for x in args.lrs.split(",")]
    if args.steps:
        cfg["steps"] = args.steps
    if args.batch:
        cfg["batch"] = args.batch
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MIXERS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MIXERS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds = None if args.minutes is None else 60 * args.minutes
    if seconds is not None:
        cfg["minutes"] = args.minutes
    res = dict(config=cfg, device=str(device), models=study(cfg, models, device, seconds))
    write(res, Path(args.out), "mqar_smoke" if args.smoke else "mqar")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
