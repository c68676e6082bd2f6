"""Training end to end: a one-layer model on a toy associative-recall task, its loss falls.

Each sequence writes NP (key, value) token pairs and then asks for the value of one of the
keys; the model predicts the answer at the query position. Gradients flow through the
compiled op's custom-op autograd into the generated backward kernels (Triton's interpreter on
CPU). A layer whose gradients were wrong or missing would not learn the task: the loss must
fall from chance level (log VOCAB) to below log NP, the loss of a model that only copies one
of the values in its context at random: it must bind keys to values, which needs both the
short convolution (the key is the token before its value) and the memory.

One write-family layer only: in Triton's interpreter a step costs about a second for it and
several for the reset and kalman families, whose gradients tests/kernels/test_backward_*.py
check directly.
"""
import math

import pytest
import torch
from torch import nn

from designmodel import layers

from .conftest import DEVICE

VOCAB, NP = 16, 2          # keys 0..7, values 8..15; two pairs, then one query
STEPS, BATCH = 60, 32


def recall_batch(gen, B):
    """Token ids [B, 2 NP + 1] and the answer [B]: pairs k_i v_i, then a query key."""
    keys = torch.stack([torch.randperm(VOCAB // 2, generator=gen)[:NP] for _ in range(B)])
    values = torch.randint(VOCAB // 2, VOCAB, (B, NP), generator=gen)
    which = torch.randint(0, NP, (B,), generator=gen)
    seq = torch.stack([keys, values], -1).reshape(B, 2 * NP)
    query = keys[torch.arange(B), which]
    return torch.cat([seq, query[:, None]], 1), values[torch.arange(B), which]


class Recall(nn.Module):
    def __init__(self, mixer: nn.Module, width: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.mixer = mixer
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        y = self.mixer(x)[0]
        return self.head(x + y)[:, -1]


@pytest.mark.parametrize("name", ["LinearAttention"])
def test_one_layer_model_learns_toy_recall(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    width = 32
    mixer = getattr(layers, name)(hidden_size=width, num_heads=1, head_dim=16, use_short_conv=True)
    model = Recall(mixer, width).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for step in range(STEPS):
        ids, answer = recall_batch(gen, BATCH)
        loss = nn.functional.cross_entropy(model(ids.to(DEVICE)), answer.to(DEVICE))
        opt.zero_grad()
        loss.backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert abs(start - math.log(VOCAB)) < 0.5          # chance level to begin with
    assert end < math.log(NP), (start, end)
