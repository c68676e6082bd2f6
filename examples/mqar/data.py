"""Multi-query associative recall (MQAR): key-value pairs, then queries of the keys.

A sequence of length T holds NP key-value pairs at its start, k_1 v_1 k_2 v_2 ... k_NP v_NP,
then the query region: every key once, in random order, at random positions, the other
positions a filler token. At a query position the target is the value bound to that key; every
other position has no target (-100, ignored by cross_entropy). Keys are drawn without
replacement from [1, vocab / 2), values with replacement from [vocab / 2, vocab); token 0 is
the filler. A model answers from the pairs it has seen, so a layer's memory decides how many
pairs it can hold and how long it can hold them.
"""
from __future__ import annotations

import torch

FILLER = 0
IGNORE = -100


def mqar_batch(gen: torch.Generator, B: int, T: int, pairs: int, vocab: int = 8192):
    """(tokens [B, T] int64, targets [B, T] int64 with IGNORE off the query positions).

    Needs 3 * pairs <= T (the pairs, then one query per key) and pairs < vocab / 2. The batch is
    drawn on gen's device (a CUDA generator keeps the data off the CPU during training).
    """
    half = vocab // 2
    if 3 * pairs > T:
        raise ValueError(f"mqar: {pairs} pairs need T >= {3 * pairs} (pairs, then a query per key), got T = {T}")
    if pairs >= half:
        raise ValueError(f"mqar: {pairs} pairs need more than {2 * pairs} tokens of vocabulary, got {vocab}")
    dev = gen.device
    keys = torch.argsort(torch.rand(B, half - 1, generator=gen, device=dev), dim=1)[:, :pairs] + 1   # distinct
    values = torch.randint(half, vocab, (B, pairs), generator=gen, device=dev)
    tokens = torch.full((B, T), FILLER, dtype=torch.long, device=dev)
    targets = torch.full((B, T), IGNORE, dtype=torch.long, device=dev)
    tokens[:, 0:2 * pairs:2] = keys
    tokens[:, 1:2 * pairs:2] = values
    # the queries: each key once, at distinct random positions after the pairs
    region = T - 2 * pairs
    slots = torch.argsort(torch.rand(B, region, generator=gen, device=dev), dim=1)[:, :pairs] + 2 * pairs
    order = torch.argsort(torch.rand(B, pairs, generator=gen, device=dev), dim=1)
    rows = torch.arange(B, device=dev)[:, None]
    tokens[rows, slots] = keys.gather(1, order)
    targets[rows, slots] = values.gather(1, order)
    return tokens, targets
