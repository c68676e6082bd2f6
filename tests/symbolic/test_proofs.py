"""The statements of MATH.md sections 2-4, shown by sympy, and that the proofs can fail."""
import dataclasses

import pytest
import sympy as sp

from designmodel import proofs, zoo
from designmodel.derive import derive
from designmodel.spec import (DesignModel, Input, Regression, Transition, Write, exp, reset,
                              sigmoid)

WRITE = [n for n in zoo.NAMES if derive(n).family == "write"]
RESET = [n for n in zoo.NAMES if derive(n).family == "reset"]
KALMAN = [n for n in zoo.NAMES if derive(n).family == "kalman"]


def test_families_of_the_zoo():
    assert WRITE == ["linear_attention", "retnet", "mamba2", "gla"]
    assert RESET == ["deltanet", "gated_deltanet", "kda"]
    assert KALMAN == ["rls", "bayesian_layer", "bayesian_layer_diag"]


@pytest.mark.parametrize("name", WRITE)
def test_write_model_exact_filter_is_covariance_free(name):
    d = derive(name, filter="exact")
    assert proofs.covariance_free(d).holds


def test_write_model_with_process_noise_and_variance_is_covariance_free():
    g, s = Input("g", per="key", domain="logdecay"), Input("s", domain="positive")
    spec = DesignModel("w", transition=Transition(decay=exp(g), noise=s), observation=Write())
    d = derive(dataclasses.replace(spec, readout=dataclasses.replace(spec.readout, variance=True)))
    assert d.covariance is not None and proofs.covariance_free(d).holds


@pytest.mark.parametrize("name", KALMAN)
def test_kalman_mean_does_involve_the_covariance(name):
    assert not proofs.covariance_free(derive(name)).holds


@pytest.mark.parametrize("name", KALMAN)
def test_regression_exact_filter_is_the_bayesian_posterior(name):
    assert proofs.kalman_is_bayes(derive(name), key_dim=2, value_dim=2).holds


def test_regression_exact_filter_is_the_bayesian_posterior_at_k3():
    assert proofs.kalman_is_bayes(derive("bayesian_layer"), key_dim=3, value_dim=1).holds


@pytest.mark.parametrize("name", RESET)
def test_reset_update_is_kalman_with_reset_covariance(name):
    assert proofs.reset_matches_kalman(derive(name)).holds


def test_reset_of_the_bayesian_layer_is_gated_deltanet():
    d = derive("bayesian_layer", filter=reset(Input("c", domain="positive")))
    assert d.family == "reset" and d.structure.decay == "scalar"
    assert proofs.reset_matches_kalman(d, key_dim=2).holds


def test_reset_gain_with_unit_keys_is_sigmoid_of_log_snr():
    assert proofs.reset_gain_is_sigmoid().holds
    c, r = Input("c", domain="positive"), Input("r", domain="positive")
    spec = DesignModel("snr", observation=Regression(noise=r, unit_keys=True), filter=reset(c))
    d = derive(spec)
    assert sp.simplify(d.scalars["gain"] - c / (c + r)) == 0
    assert sp.simplify(d.scalars["gain_logit"] - (sp.log(c) - sp.log(r))) == 0
    assert proofs.reset_gain_is_sigmoid(spec).holds
    # recognized and printed as sigmoid(log c - log r)
    assert r"\sigma\left(" in d.to_markdown()


def test_log_snr_parameterization_gives_sigmoid_gain():
    x = Input("x")
    spec = DesignModel("logit", observation=Regression(noise=1, unit_keys=True), filter=reset(exp(x)))
    d = derive(spec)
    assert sp.simplify((d.scalars["gain"] - sigmoid(x)).rewrite(sp.exp)) == 0


def test_reset_gain_without_unit_keys_keeps_the_key_norm():
    c, r = Input("c", domain="positive"), Input("r", domain="positive")
    d = derive(DesignModel("n", observation=Regression(noise=r), filter=reset(c)))
    from designmodel.structure import KEY_NORM2
    assert sp.simplify(d.scalars["gain"] - c / (c * KEY_NORM2 + r)) == 0
    assert "gain_logit" not in d.scalars


@pytest.mark.parametrize("name", KALMAN)
def test_weak_evidence_limit_is_the_write_model(name):
    assert proofs.weak_evidence_limit(derive(name).spec, tokens=2, key_dim=2).holds


def test_weak_evidence_limit_three_tokens():
    assert proofs.weak_evidence_limit(derive("bayesian_layer").spec, tokens=3, key_dim=2).holds


# --- the proofs can fail -------------------------------------------------------------------

def _tampered(d, **changes):
    return dataclasses.replace(d, **changes)


def test_kalman_proof_fails_on_a_wrong_gain():
    d = derive("bayesian_layer")
    from designmodel.derive import INNOV_VAR, S_NEW
    assert d.steps[5].symbol == S_NEW
    wrong = d.expand(d.steps[5].expr.xreplace({INNOV_VAR: 2 * INNOV_VAR}))  # half the gain
    assert not proofs.kalman_is_bayes(_tampered(d, mean=wrong)).holds


def test_reset_proof_fails_on_a_wrong_update():
    d = derive("gated_deltanet")
    from designmodel import structure as st
    assert not proofs.reset_matches_kalman(_tampered(d, mean=d.mean + st.k * st.v.T)).holds


def test_limit_proof_fails_for_a_non_stationary_prior(monkeypatch):
    """Without the stationary process noise the scaled Kalman mean does not reach the write model."""
    spec = derive("bayesian_layer").spec
    real = proofs.stationary_version

    def no_noise(s):
        out = real(s)
        return dataclasses.replace(out, transition=Transition(decay=out.transition.decay))
    monkeypatch.setattr(proofs, "stationary_version", no_noise)
    assert not proofs.weak_evidence_limit(spec, tokens=2, key_dim=2).holds


def test_custom_function_derivatives_match_their_exp_forms():
    """The kernels' backward will print these derivatives; check them against sympy's own."""
    from designmodel.spec import logsigmoid, softplus
    x = sp.Symbol("x", real=True)
    for f in (sigmoid, softplus, logsigmoid):
        exact = sp.diff(f(x).rewrite(sp.exp), x)
        assert sp.simplify((sp.diff(f(x), x) - exact).rewrite(sp.exp)) == 0
