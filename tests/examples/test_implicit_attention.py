"""The implicit-attention example's smoke run, checked against independent references.

The smoke run (T = 32, K = 16, one head) writes Phi of the ten zoo models (closed form,
reference.implicit_attention, 7 digits), the compiled ops' outputs y on random values (float32,
Triton's interpreter on CPU) and the Kalman models' predictive variances. Here the inputs are
rebuilt from the run's JSON (keys, symbols, values) and the gates from the numbers the run
states, with this file's own code, and:

- Phi is compared with Phi built column by column by the float64 step-by-step filter
  (reference.recurrent) on one-hot values: column s of Phi is the output for v = e_s. The
  filter shares no algebra with the closed form. Tolerance: the stored 7 significant digits.
- Phi V (with that filter's Phi) is compared with the op's y: the op is the layer whose
  implicit attention Phi is. Tolerances as designmodel.check: 1e-5 relative for the write and
  reset forward, 1e-4 for the Kalman family (float32 against float64); on a GPU, whose write
  and reset kernels take TF32 dots, 5e-3 for those (as tests/kernels/test_gpu.py).
- Linear attention's and RetNet's Phi against their closed forms q_t . k_s and
  gamma^(t-s) q_t . k_s (s <= t), written out here.
- RLS's Phi gives every write of the same key the same weight (ridge regression: the weight
  of observation s is k_s^T (K^T K + lambda I)^-1 q_t, a function of k_s alone).
- The op's predictive variance against the float64 filter's q_t^T P_t q_t (1e-4 relative).
"""
import json
import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from designmodel.derive import derive  # noqa: E402
from designmodel.reference import recurrent  # noqa: E402
from examples.implicit_attention import run  # noqa: E402

SYMBOLS = "ABCDEF"
# float32 kernels against float64, relative: the interpreter's forward (designmodel.check);
# on a GPU the write and reset kernels take TF32 dots (5e-3, as tests/kernels/test_gpu.py)
OP_TOL = ({"write": 5e-3, "reset": 5e-3, "kalman": 1e-4} if torch.cuda.is_available()
          else {"write": 1e-5, "reset": 1e-5, "kalman": 1e-4})
DIGITS_TOL = 1e-6            # Phi is stored to 7 significant digits


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("implicit_attention")
    assert run.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads((out / "implicit_attention_smoke.json").read_text())
    return out, res, rebuild(res)


def rebuild(res):
    """q, k, v [1, T, 1, *] and each model's inputs, from the JSON and the stated gates."""
    cfg, gs, inp = res["config"], res["config"]["gates"], res["input"]
    T, K, t0 = cfg["T"], cfg["K"], cfg["boundary"]
    # stored to 9 digits, which round-trip float32: back to float32, the values the run used
    keys = torch.tensor(inp["keys"], dtype=torch.float32).double()
    a = [SYMBOLS.index(c) for c in inp["a"]]
    b = [SYMBOLS.index(c) for c in inp["b"]]
    q, k = keys[b][None, :, None], keys[a][None, :, None]
    v = torch.tensor(inp["v"], dtype=torch.float32).double()[None, :, None]
    f32 = lambda x: x.float().double()                                      # noqa: E731
    alpha = torch.full((1, T, 1), gs["alpha"], dtype=torch.float64)
    alpha[:, t0] = gs["forget"]
    alpha_key = torch.ones(1, T, 1, K, dtype=torch.float64)
    alpha_key[..., K // 2:] = gs["alpha_fast"]
    g, g_key = f32(alpha.log()), f32(alpha_key.log())
    const = lambda x: f32(torch.full((1, T, 1), x, dtype=torch.float64))   # noqa: E731
    beta, r = const(gs["beta"]), const(gs["r"])
    p0 = torch.full((1,), gs["p0"], dtype=torch.float64)
    gamma = torch.tensor([gs["retnet_gamma"]], dtype=torch.float64)
    inputs = {"linear_attention": {}, "retnet": {"gamma": gamma},
              "mamba2": {"g": g}, "gla": {"g": g_key}, "deltanet": {"beta": beta},
              "gated_deltanet": {"beta": beta, "g": g}, "kda": {"beta": beta, "g": g_key},
              "rls": {"p0": p0, "r": r},
              "bayesian_layer": {"g": g, "p0": p0, "r": r, "sigma": f32(gs["p0"] * (1 - alpha ** 2))},
              "bayesian_layer_diag": {"g": g_key, "p0": p0, "r": r, "sigma": const(gs["sigma_diag"])}}
    return dict(q=q, k=k, v=v, a=a, b=b, inputs=inputs, T=T)


def stored_phi(m):
    """The run's Phi [T, T] from its lower-triangle rows."""
    T = len(m["phi"])
    P = torch.zeros(T, T, dtype=torch.float64)
    for t, row in enumerate(m["phi"]):
        assert len(row) == t + 1
        P[t, :t + 1] = torch.tensor(row, dtype=torch.float64)
    return P


def phi_by_filter(model, data):
    """Phi from the float64 step-by-step filter on one-hot values, column by column."""
    onehot = torch.eye(data["T"], dtype=torch.float64)[None, :, None]          # [1, T, 1, T]
    return recurrent(derive(model), data["q"], data["k"], onehot, data["inputs"][model]).o[0, :, 0]


def rel(x, ref):
    return float((x - ref).abs().max() / ref.abs().max())


def test_files_written(smoke):
    out, res, _ = smoke
    table = (out / "implicit_attention_smoke.md").read_text()
    assert table.startswith("# Implicit attention (smoke)")
    assert "Phi V vs op" in table and "ABOVE TOL" not in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "implicit_attention_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["models"]) == set(run.MODELS) and len(run.MODELS) == 10
    assert res["config"]["smoke"] and res["config"]["T"] == 32


@pytest.mark.parametrize("model", run.MODELS)
def test_phi_is_the_filter_on_one_hot_values(smoke, model):
    _, res, data = smoke
    P_filter = phi_by_filter(model, data)
    assert bool((P_filter.triu(1) == 0).all())                     # causal: y_t ignores v_s, s > t
    err = rel(stored_phi(res["models"][model]), P_filter)
    assert err <= DIGITS_TOL, f"{model}: Phi differs from the filter's by {err:.1e}"


@pytest.mark.parametrize("model", run.MODELS)
def test_phi_v_is_the_compiled_op(smoke, model):
    _, res, data = smoke
    m = res["models"][model]
    y_op = torch.tensor(m["y_op"], dtype=torch.float64)
    y_phi = phi_by_filter(model, data) @ data["v"][0, :, 0]
    err = rel(y_op, y_phi)
    tol = OP_TOL[m["family"]]
    assert err <= tol, f"{model}: op output vs Phi V relative error {err:.1e} > {tol}"
    assert m["phi_vs_op_rel"] <= tol


def test_write_models_closed_forms(smoke):
    _, res, data = smoke
    q, k = data["q"][0, :, 0], data["k"][0, :, 0]
    T = data["T"]
    dots = torch.tril(q @ k.T)                                      # q_t . k_s for s <= t
    assert rel(stored_phi(res["models"]["linear_attention"]), dots) <= DIGITS_TOL
    gamma = res["config"]["gates"]["retnet_gamma"]
    assert gamma == pytest.approx(1 - 2 ** -5)
    ages = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp_min(0).double()
    assert rel(stored_phi(res["models"]["retnet"]), dots * gamma ** ages) <= DIGITS_TOL


def test_rls_weighs_every_write_of_a_key_equally(smoke):
    _, res, data = smoke
    P = stored_phi(res["models"]["rls"])
    a = data["a"]
    for t in range(data["T"]):
        for sym in set(a[:t + 1]):
            w = P[t, [s for s in range(t + 1) if a[s] == sym]]
            assert float(w.max() - w.min()) <= DIGITS_TOL * float(P.abs().max()), (t, sym)


@pytest.mark.parametrize("model", ["rls", "bayesian_layer", "bayesian_layer_diag"])
def test_variance_is_the_filters(smoke, model):
    _, res, data = smoke
    d = derive(model)
    d = derive(replace(d.spec, readout=replace(d.spec.readout, variance=True)))
    ref = recurrent(d, data["q"], data["k"], data["v"], data["inputs"][model]).variance[0, :, 0]
    got = res["variance"][model]
    assert rel(torch.tensor(got["op"], dtype=torch.float64), ref) <= 1e-4
    assert rel(torch.tensor(got["reference"], dtype=torch.float64), ref) <= 1e-12
    # the first token: one observation of the probed unit key (q_0 = k_0 = A, in the first key
    # half), from the predicted variance c = q^T P^- q: posterior c - c^2 / (c + r) (MATH.md 2).
    # RLS: c = p0; scalar gate with stationary noise: alpha^2 p0 + p0 (1 - alpha^2) = p0;
    # per-key gate (alpha = 1 on the first half) with noise sigma: p0 + sigma.
    gs = res["config"]["gates"]
    c = {"rls": gs["p0"], "bayesian_layer": gs["p0"],
         "bayesian_layer_diag": gs["p0"] + gs["sigma_diag"]}[model]
    assert data["a"][0] == data["b"][0] == 0
    assert float(ref[0]) == pytest.approx(c - c ** 2 / (c + gs["r"]), rel=1e-6)
