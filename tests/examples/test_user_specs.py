"""The user specs of examples/user_specs end to end: they load, derive to the intended family,
pass `designmodel check`, compile to a folder, and train (smoke) with gradients reaching every
parameter of the model."""
import math
from pathlib import Path

import pytest
import sympy as sp
import torch

from designmodel.cli import main
from designmodel.derive import derive
from designmodel.loading import load_spec

ROOT = Path(__file__).resolve().parents[2] / "examples" / "user_specs"
SPECS = ["bayesian_prior_readout", "reset_learned_prior"]


def spec_path(name: str) -> str:
    return str(ROOT / f"{name}.py")


@pytest.fixture(autouse=True)
def _interpreter_on_cpu(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_prior_readout_spec_derives_a_kalman_filter_read_before_the_update():
    d = derive(spec_path("bayesian_prior_readout"))
    s = d.structure
    assert (s.family, s.decay, s.timing, s.variance) == ("kalman", "scalar", "prior", True)
    assert d.zoo_name is None                      # not in the zoo: the zoo reads the posterior
    g, p0 = (next(x for x in d.spec.inputs if x.name == n) for n in ("g", "p0"))
    assert sp.simplify(d.scalars["process_noise"] - p0 * (1 - sp.exp(2 * g))) == 0  # stationary


def test_reset_spec_derives_the_normalized_gain_with_a_learned_c():
    d = derive(spec_path("reset_learned_prior"))
    assert (d.family, d.structure.unit_keys, d.structure.decay) == ("reset", False, "scalar")
    c, r = (next(x for x in d.spec.inputs if x.name == n) for n in ("c", "r"))
    assert c.per_token and c.domain == "positive" and d.spec.filter.c == c
    knorm2 = next(x for x in d.scalars["gain"].free_symbols if x not in (c, r))
    assert sp.simplify(d.scalars["gain"] - c / (c * knorm2 + r)) == 0


def test_prior_readout_op_variance_matches_the_float64_filter():
    """The compiled op's readout before the update and its predictive variance q^T P^- q
    against the float64 step-by-step filter (`check` compares only readout and state)."""
    import designmodel
    from designmodel.reference import recurrent
    spec = spec_path("bayesian_prior_readout")
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 20, 2, 8, 8
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    inputs = dict(g=-0.5 * torch.rand(B, T, H, generator=gen), r=torch.rand(B, T, H, generator=gen) + 0.2,
                  p0=torch.rand(H, generator=gen) + 0.5)
    o, _, variance = designmodel.compile(spec)(q, k, v, **inputs, scale=1.0, output_variance=True)
    ref = recurrent(derive(spec), q.double(), k.double(), v.double(),
                    {n: x.double() for n, x in inputs.items()})
    for x, y in ((o, ref.o), (variance, ref.variance)):
        assert (x.double() - y).abs().max() / y.abs().max() < 1e-5


@pytest.mark.parametrize("name", SPECS)
def test_spec_file_defines_a_documented_model(name):
    model = load_spec(spec_path(name))
    assert model.name == name and model.description
    text = Path(spec_path(name)).read_text()
    assert text.startswith('"""') and "Why want it" in text


@pytest.mark.parametrize("name", SPECS)
def test_check_passes_every_row(name, capsys):
    assert main(["check", spec_path(name)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    verdicts = [line.split("  ")[-2].strip() for line in rows]
    assert len(rows) >= 7 and all(v == "pass" for v in verdicts), rows
    assert sum("kernels (" in line for line in rows) == 2    # fp32 and bf16 both ran


@pytest.mark.parametrize("name", SPECS)
def test_compile_writes_the_folder(name, tmp_path, capsys):
    from designmodel.specfile import load
    out = tmp_path / name
    assert main(["compile", spec_path(name), "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["__init__.py", "derivation.md", "kernels.py", "layer.py", "spec.toml"]
    assert load(out / "spec.toml") == load_spec(spec_path(name))
    assert (out / "derivation.md").read_text() == derive(spec_path(name)).to_markdown()


@pytest.mark.parametrize("name", SPECS)
def test_training_smoke_runs_with_gradients_on_every_parameter(name):
    from examples.user_specs import train
    args = train.parse_args([spec_path(name), "--smoke"])
    assert (args.steps, args.batch, 2 * args.pairs + 1) == (3, 4, 5)
    out = train.train(args)
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"])
    assert out["grads_ok"] and 0.0 <= out["accuracy"] <= 1.0
    # One more step, checked here: every parameter gets a finite gradient that is not all zero.
    model = out["model"]
    ids, answer = train.recall_batch(torch.Generator().manual_seed(1), 4, args.pairs)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(ids.to(out["device"])), answer.to(out["device"])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname
