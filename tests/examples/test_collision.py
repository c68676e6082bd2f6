"""The collision example's smoke run, checked against MATH.md section 7's closed forms.

The smoke run (K = 16, V = 64, one seed, n in {2, 6, 15} at overlap rho and {4, 16, 32} on
random keys) goes through the compiled ops (Triton's interpreter on CPU) in about 20 s.

Tolerances. On keys at overlap rho the Gram matrix k_i . k_j is fixed (1 on the diagonal, rho
off it), so the measured E depends on the random values alone and is the mean of V * seeds
i.i.d. per-value-coordinate samples; the run reports its standard error from those samples. A
measured point must lie within 4 standard errors of the closed form (under normality a false
alarm has probability ~6e-5 a point; the seed is fixed, so the test is deterministic) plus
1e-5 s2 for float32 rounding in the kernels (their readouts are good to ~1e-6 relative, a
squared error of ~1e-12, far below). The formulas are written out again here, from MATH.md,
rather than imported from the example, so the test does not share its algebra. Random keys
are not checked against the large-K formulas here: with K = 16 and one seed, key randomness
and finite-K corrections (see examples/README.md) dominate.
"""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from examples.collision import predictions  # noqa: E402
from examples.collision import run  # noqa: E402

S2 = 1.0
FP32_SLACK = 1e-5 * S2


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("collision")
    assert run.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads((out / "collision_smoke.json").read_text())
    curves = {(c["model"], c["keys"]): c for c in res["curves"]}
    return out, res, curves


def _points(c):
    return zip(c["ns"], c["mean"], c["se"])


def _close(measured, se, predicted):
    return abs(measured - predicted) <= 4 * se + FP32_SLACK


def test_files_written(smoke):
    out, res, _ = smoke
    table = (out / "collision_smoke.md").read_text()
    assert table.startswith("# Collision study (smoke)")
    assert "largest rel. gap" in table and "Computed by" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        png = out / "collision_smoke.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["config"]["K"] == 16 and res["config"]["smoke"]
    for c in res["curves"]:
        assert c["computed_by"].startswith(("designmodel.ops", "float64 reference"))


def test_hebbian_at_overlap_is_s2_n_minus_1_rho_squared(smoke):
    _, _, curves = smoke
    for rho in (0.0, 0.3, 0.6, 0.9):
        for n, m, se in _points(curves[("linear_attention", f"rho={rho:g}")]):
            assert _close(m, se, S2 * (n - 1) * rho ** 2), (rho, n, m, se)


def test_rls_tiny_lambda_recalls_everything_below_capacity(smoke):
    _, res, curves = smoke
    K = res["config"]["K"]
    lam = 1e-3
    for rho in (0.0, 0.3, 0.6, 0.9):
        for n, m, se in _points(curves[(f"rls_{lam:g}", f"rho={rho:g}")]):
            # MATH 7: s2 (lam^2/n) [(n-1)/(1-rho+lam)^2 + 1/(1-rho+n rho+lam)^2] -> 0 as lam -> 0
            exact = S2 * lam ** 2 / n * ((n - 1) / (1 - rho + lam) ** 2 + 1 / (1 - rho + n * rho + lam) ** 2)
            assert _close(m, se, exact), (rho, n, m, exact)
            assert m < 1e-3 * S2
    for n, m, _ in _points(curves[(f"rls_{lam:g}", "random")]):
        if n < K // 2:            # well below capacity: E ~ lam^2 (1/(1 - n/K))^2-ish, ~1e-6
            assert m < 1e-3 * S2, (n, m)


def test_rls_larger_lambda_at_overlap(smoke):
    _, _, curves = smoke
    lam = 0.1
    for rho in (0.0, 0.3, 0.6, 0.9):
        for n, m, se in _points(curves[(f"rls_{lam:g}", f"rho={rho:g}")]):
            exact = S2 * lam ** 2 / n * ((n - 1) / (1 - rho + lam) ** 2 + 1 / (1 - rho + n * rho + lam) ** 2)
            assert _close(m, se, exact), (rho, n, m, exact)


def test_delta_rule_at_overlap_approaches_its_plateau(smoke):
    _, _, curves = smoke
    for rho in (0.0, 0.3, 0.6, 0.9):
        plateau = 2 * rho * S2 / (2 - rho)            # MATH 7
        for n, m, se in _points(curves[("deltanet", f"rho={rho:g}")]):
            finite = predictions.reset_overlap_finite(n, rho, S2)
            assert finite <= plateau + 1e-12         # the item average stays below the plateau
            assert _close(m, se, finite), (rho, n, m, finite)
        # the finite-n curve's limit is MATH's plateau
        assert predictions.reset_overlap_finite(20000, rho, S2) == pytest.approx(plateau, rel=1e-3, abs=1e-12)
