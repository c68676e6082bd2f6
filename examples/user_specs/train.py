"""Train a small model with a user's spec as its sequence layer, on toy associative recall.

    python3 -m examples.user_specs.train SPEC [--smoke] [--steps N] [--batch B] [--seed S]

SPEC is anything designmodel.compile takes: a .py spec file defining `model`, a .toml spec
or a zoo name. The model is an embedding, one layer of the spec (designmodel.compile(SPEC)
.module(...): projections with a short convolution, the compiled op, output norm and gate)
with a residual connection, and a linear head.

The task: each sequence shows NP (key, value) token pairs, then one of the keys again; the
model must answer that key's value at the last position. Chance is log(VOCAB) in loss and
1/(VOCAB/2) in accuracy; a model that copies one of the NP values it saw at random reaches
log(NP) and 1/NP; below that it binds keys to values, which needs both the convolution (a
value's key is the token before it) and the layer's memory.

Runs on a GPU when there is one, else on the CPU with the kernels in Triton's interpreter
(slow: use --smoke, a few steps of a tiny batch). Prints the loss at the start and the end
and the recall accuracy on fresh sequences; a progress bar goes to stderr.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn

if not torch.cuda.is_available():
    # Triton must see this before it is first imported (the compiled kernels import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import designmodel  # noqa: E402
from examples.progress import Progress  # noqa: E402

VOCAB = 16          # keys are tokens 0..7, values 8..15
WIDTH, HEADS, HEAD_DIM = 32, 1, 16


def recall_batch(gen: torch.Generator, batch: int, pairs: int):
    """Token ids [batch, 2 pairs + 1] (k_1 v_1 ... k_NP v_NP, query key) and the answers [batch]."""
    keys = torch.stack([torch.randperm(VOCAB // 2, generator=gen)[:pairs] for _ in range(batch)])
    values = torch.randint(VOCAB // 2, VOCAB, (batch, pairs), generator=gen)
    which = torch.randint(0, pairs, (batch,), generator=gen)
    rows = torch.arange(batch)
    ids = torch.cat([torch.stack([keys, values], -1).reshape(batch, 2 * pairs), keys[rows, which, None]], 1)
    return ids, values[rows, which]


class RecallModel(nn.Module):
    """Embedding, one layer of the spec (residual), linear head read at the last position."""

    def __init__(self, spec, width: int = WIDTH, num_heads: int = HEADS, head_dim: int = HEAD_DIM):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.layer = designmodel.compile(spec).module(width, num_heads, head_dim, use_short_conv=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, VOCAB] of the answer, from token ids [B, T]."""
        x = self.embed(ids)
        y = self.layer(x)[0]
        return self.head(x + y)[:, -1]


def parse_args(argv=None):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", help="a .py spec file defining `model`, a .toml spec or a zoo name")
    p.add_argument("--smoke", action="store_true", help="a few steps at a tiny batch (CPU test)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 300, smoke 3)")
    p.add_argument("--batch", type=int, help="sequences per step (default 32, smoke 4)")
    p.add_argument("--pairs", type=int, default=2, help="key-value pairs per sequence (T = 2 pairs + 1)")
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.smoke else 300)
    args.batch = args.batch or (4 if args.smoke else 32)
    if args.pairs < 1 or 2 * args.pairs > VOCAB // 2 * 2 or args.pairs > VOCAB // 2:
        p.error(f"--pairs must be in 1..{VOCAB // 2}")
    return args


def accuracy(model: nn.Module, gen: torch.Generator, batch: int, pairs: int, device) -> float:
    """Fraction of fresh sequences whose answer is the argmax of the logits."""
    with torch.no_grad():
        ids, answer = recall_batch(gen, batch, pairs)
        return float((model(ids.to(device)).argmax(-1).cpu() == answer).float().mean())


def train(args) -> dict:
    """Train; returns the losses, the accuracy and the model (for tests)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = RecallModel(args.spec).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses, grads_ok = [], True
    start = time.perf_counter()
    with Progress(args.steps, unit="step", label="train") as bar:
        for _ in range(args.steps):
            ids, answer = recall_batch(gen, args.batch, args.pairs)
            loss = nn.functional.cross_entropy(model(ids.to(device)), answer.to(device))
            opt.zero_grad()
            loss.backward()
            grads_ok &= all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                            for p in model.parameters())
            opt.step()
            losses.append(loss.item())
            bar.update(1)
    acc = accuracy(model, gen, 4 * args.batch if args.smoke else 512, args.pairs, device)
    return dict(losses=losses, accuracy=acc, grads_ok=grads_ok, model=model, device=device,
                seconds=time.perf_counter() - start)


def main(argv=None) -> int:
    """Entry point: train and print the summary."""
    args = parse_args(argv)
    out = train(args)
    k = min(5, len(out["losses"]))
    first, last = sum(out["losses"][:k]) / k, sum(out["losses"][-k:]) / k
    layer = out["model"].layer
    print(f"spec {args.spec}: {layer.op.plan.family} family, {sum(p.numel() for p in out['model'].parameters())} "
          f"parameters, {args.steps} steps of {args.batch} on {out['device']} in {out['seconds']:.1f} s")
    print(f"loss: start {first:.3f} (chance log {VOCAB} = {math.log(VOCAB):.3f}), end {last:.3f} "
          f"(copying a random seen value: log {args.pairs} = {math.log(args.pairs):.3f})")
    print(f"recall accuracy: {out['accuracy']:.3f} (chance {2 / VOCAB:.3f}, random seen value {1 / args.pairs:.3f})")
    print(f"gradients finite and reaching every parameter: {'yes' if out['grads_ok'] else 'NO'}")
    return 0 if out["grads_ok"] and math.isfinite(last) else 1


if __name__ == "__main__":
    raise SystemExit(main())
