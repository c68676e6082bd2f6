"""The MQAR example: its data against an independent reading of the sequences, its accuracy
measure against an oracle, and a smoke run of all four models through the compiled layers."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402

from examples.mqar import run  # noqa: E402
from examples.mqar.data import FILLER, IGNORE, mqar_batch  # noqa: E402


def test_queries_ask_for_the_value_bound_to_their_key():
    gen = torch.Generator().manual_seed(0)
    V, pairs = 100, 7
    tokens, targets = mqar_batch(gen, 16, 40, pairs, vocab=V)
    for seq, tgt in zip(tokens.tolist(), targets.tolist()):
        keys, values = seq[0:2 * pairs:2], seq[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(1 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in values)
        bound = dict(zip(keys, values))
        asked = [(t, y) for t, y in zip(seq[2 * pairs:], tgt[2 * pairs:]) if y != IGNORE]
        assert sorted(t for t, _ in asked) == sorted(keys)            # every key once
        assert all(bound[t] == y for t, y in asked)
        assert all(t == FILLER for t, y in zip(seq[2 * pairs:], tgt[2 * pairs:]) if y == IGNORE)
        assert all(y == IGNORE for y in tgt[:2 * pairs])


class Oracle(nn.Module):
    """Reads the pairs from the tokens and puts all its logit on the bound value."""

    def __init__(self, vocab, wrong=False):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong

    def forward(self, tokens, at=None):
        B, T = tokens.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            seq = tokens[b].tolist()
            bound = {}
            for t in range(0, T - 1, 2):
                if seq[t] == FILLER or seq[t] in bound or not seq[t + 1] >= self.vocab // 2:
                    break
                bound[seq[t]] = seq[t + 1]
            for t in range(2 * len(bound), T):
                if seq[t] in bound:
                    answer = bound[seq[t]]
                    logits[b, t, (answer + 1) % self.vocab if self.wrong else answer] = 1.0
        return logits if at is None else logits[at]


def test_evaluate_scores_an_oracle_one_and_a_wrong_oracle_zero():
    cfg = run.config(smoke=True)
    assert all(a == 1.0 for a in run.evaluate(Oracle(cfg["vocab"]), cfg, "cpu").values())
    assert all(a == 0.0 for a in run.evaluate(Oracle(cfg["vocab"], wrong=True), cfg, "cpu").values())


def test_smoke_run_trains_all_four_models_and_writes_its_outputs(tmp_path):
    assert run.main(["--smoke", "--batch", "3", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "mqar_smoke.json").read_text())
    assert res["config"]["batch"] == 3
    assert set(res["models"]) == set(run.MIXERS)
    for r in res["models"].values():
        assert torch.isfinite(torch.tensor(r["final_loss"]))
        assert set(r["accuracy"]) == {"18,2", "18,4", "30,2", "30,4", "30,8"}
    assert "beyond it" in (tmp_path / "mqar_smoke.md").read_text()


def test_merge_keeps_each_models_best_run_across_partial_studies(tmp_path):
    cfg = run.config(smoke=True)
    def part(lr, scores):
        runs = {m: dict(lr=lr, final_loss=1.0, accuracy={"18,2": s}, score_in_regime=s, seconds=0.)
                for m, s in scores.items()}
        return dict(config={**cfg, "lrs": [lr]}, device="cpu", models=runs)
    a = part(1e-3, {"mamba2": 0.2, "gated_deltanet": 0.9})
    b = part(3e-3, {"mamba2": 0.7, "gated_deltanet": 0.4})
    c = part(1e-2, {"linear_attention": 0.5})
    files = []
    for i, p in enumerate((a, b, c)):
        files.append(tmp_path / f"p{i}.json")
        files[-1].write_text(json.dumps(p))
    assert run.main(["--merge", ",".join(map(str, files)), "--out", str(tmp_path / "m")]) == 0
    res = json.loads((tmp_path / "m" / "mqar.json").read_text())
    assert {m: r["lr"] for m, r in res["models"].items()} == {
        "mamba2": 3e-3, "gated_deltanet": 1e-3, "linear_attention": 1e-2}
    assert res["config"]["lrs"] == [1e-3, 3e-3, 1e-2]
    bad = {**c, "config": {**c["config"], "steps": 99}}
    files[2].write_text(json.dumps(bad))
    try:
        run.merge([a, bad])
    except ValueError as e:
        assert "different configurations" in str(e)
    else:
        raise AssertionError("merge accepted partial studies of different configurations")


def test_accuracy_in_sub_batches_counts_every_query_once():
    """Rows alternately answered right and wrong (every row asks the same number of queries):
    accuracy exactly 1/2 for sub-batches of any even size: no query is lost or counted twice."""
    vocab = 64
    right, wrong = Oracle(vocab), Oracle(vocab, wrong=True)

    class Alternating(nn.Module):
        def forward(self, tokens, at):
            logits = torch.stack([(right if i % 2 == 0 else wrong)(t[None])[0] for i, t in enumerate(tokens)])
            return logits[at]

    tokens, targets = mqar_batch(torch.Generator().manual_seed(3), 6, 24, 4, vocab=vocab)
    for rows in (2, 4, 32):   # even sizes: every sub-batch starts on an even row, so the alternation holds
        assert run._accuracy(Alternating(), tokens, targets, rows=rows) == 0.5


def test_warmup_cosine_schedule_shape():
    """The factor rises linearly to 1 over the first tenth, then falls as a cosine to 0, and a
    total set late (a timed run) stretches it."""
    import math

    import pytest
    f = run.WarmupCosine(100)
    assert [f(s) for s in range(10)] == [pytest.approx((s + 1) / 10) for s in range(10)]
    assert f(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f(100) == pytest.approx(0.0) and f(99) > 0
    f.total = 1000
    assert f(99) == pytest.approx(1.0) and f(550) == pytest.approx(0.5)


def test_logits_at_the_queries_are_the_full_logits_there():
    """The model's `at` mask picks rows of the full logits: training and evaluation score the
    same numbers as the full [B, T, vocab] output would."""
    cfg = run.config(smoke=True)
    torch.manual_seed(0)
    model = run.Model("linear_attention", cfg)
    tokens, targets = mqar_batch(torch.Generator().manual_seed(5), 2, 18, 4, vocab=cfg["vocab"])
    at = targets != IGNORE
    with torch.no_grad():
        full, picked = model(tokens), model(tokens, at)
    torch.testing.assert_close(picked, full[at], rtol=1e-6, atol=1e-6)


def test_a_timed_run_fits_its_steps_to_the_time_left_and_stops_at_the_deadline():
    assert run._steps_in_time(35, 3000, rate=4.0, left=100.0) == 435
    assert run._steps_in_time(10, 3000, rate=0.0, left=100.0) == 3000      # no rate yet
    assert run._steps_in_time(500, 3000, rate=4.0, left=-1.0) == 500       # past the deadline
    assert run._steps_in_time(60, 3000, rate=1e-6, left=1.0) == 61         # at least one more


def test_a_timed_smoke_run_ends_near_its_deadline(tmp_path):
    """A run given a few seconds stops within a step or so of them, however its first steps'
    rate would have stretched the schedule (the timed runs of session 7's first study did not)."""
    import time
    cfg = dict(run.config(smoke=True), steps=10 ** 6)   # the time decides, not the step count
    t0 = time.perf_counter()
    _, losses = run.train("linear_attention", 3e-3, cfg, torch.device("cpu"), seconds=4.0)
    took = time.perf_counter() - t0
    assert len(losses) >= 10 and took < 4.0 + 10 * (took / len(losses)) + 2.0


def test_merge_of_timed_parts_keeps_each_runs_minutes(tmp_path):
    """Parts trained for different minutes merge, and the table says each run's minutes."""
    cfg = run.config(smoke=True)
    def part(minutes, name, score):
        r = dict(lr=1e-3, final_loss=1.0, accuracy={"18,2": score}, score_in_regime=score, seconds=0., steps=7)
        return dict(config={**cfg, "minutes": minutes}, device="cpu", models={name: r})
    res = run.merge([part(5.3, "mamba2", 0.1), part(3.6, "bayesian_layer", 0.9)])
    assert "minutes" not in res["config"]
    assert {m: r["minutes"] for m, r in res["models"].items()} == {"mamba2": 5.3, "bayesian_layer": 3.6}
    rows = run.table(res, res["config"]).splitlines()
    assert "| minutes |" in rows[2]
    assert any(r.startswith("| mamba2 | 0.001 | 7 | 5.3 | 1.000 |") for r in rows)
    same = run.merge([part(5.3, "mamba2", 0.1), part(5.3, "bayesian_layer", 0.9)])
    assert same["config"]["minutes"] == 5.3 and "| minutes |" not in run.table(same, same["config"])
