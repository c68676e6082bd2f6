"""The float64 references: step-by-step filter against closed-form implicit attention,
packed sequences, an outside Kalman filter (filterpy), and input validation."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from designmodel import structure as st_
from designmodel import zoo
from designmodel.derive import derive
from designmodel.reference import (coefficients, implicit, implicit_attention, prior_covariance,
                                   recurrent)
from designmodel.spec import (Constant, DesignModel, Input, Prior, Readout, Regression,
                              Transition, Write, diagonal, exp, full, isotropic)
from tests.strategies import FULL_NAME, random_initial, random_inputs, specs

TOL = 1e-10


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 for two empty or all-zero tensors)."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    return err / scale if scale > 0 else err


def with_readout(name: str, timing: str, variance: bool):
    """The zoo model `name` with the given readout, derived."""
    return derive(dataclasses.replace(zoo.spec(name), readout=Readout(timing, variance)))


def assert_agree(d, B=2, T=20, H=2, K=4, V=3, seed=0, initial=False):
    """recurrent and implicit agree on the outputs (and variance) of derivation d."""
    q, k, v, inputs = random_inputs(d, B, T, H, K, V, seed=seed)
    kw = {}
    if initial:
        S0, P0 = random_initial(B, H, K, V, seed=seed)
        kw = dict(initial_state=S0, initial_covariance=P0)
    rec = recurrent(d, q, k, v, inputs, **kw)
    imp = implicit(d, q, k, v, inputs, **kw)
    assert rec.o.shape == imp.o.shape == (B, T, H, V)
    assert rel_err(imp.o, rec.o) < TOL
    if d.spec.readout.variance:
        assert rec.variance.shape == imp.variance.shape == (B, T, H)
        assert rel_err(imp.variance, rec.variance) < TOL
    else:
        assert rec.variance is None and imp.variance is None
    return q, k, v, inputs, rec


# --- recurrent == implicit ---------------------------------------------------------------

@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("variance", [False, True], ids=["mean", "variance"])
@pytest.mark.parametrize("timing", ["posterior", "prior"])
@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_recurrent_matches_implicit(name, timing, variance, initial):
    d = with_readout(name, timing, variance)
    assert_agree(d, K=5, V=3, T=24, seed=zoo.NAMES.index(name), initial=initial)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), seed=st.integers(0, 2 ** 16), initial=st.booleans())
def test_random_specs_recurrent_matches_implicit(spec, seed, initial):
    d = derive(spec)
    assert_agree(d, K=spec.key_dim or 3, T=12, seed=seed, initial=initial)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_implicit_attention_is_lower_triangular(name):
    for timing in ("posterior", "prior"):
        d = with_readout(name, timing, False)
        q, k, v, inputs = random_inputs(d, 1, 10, 2, 4, 3, seed=3)
        phi = implicit_attention(d, q, k, inputs)                                 # [B, H, T, T]
        above = torch.ones(10, 10, dtype=torch.bool).triu(1 if timing == "posterior" else 0)
        assert phi.shape == (1, 2, 10, 10)
        assert float(phi[..., above].abs().max()) == 0.0
        # With a zero initial state the readout is Phi V.
        o = (phi @ v.transpose(1, 2)).transpose(1, 2)
        assert rel_err(o, recurrent(d, q, k, v, inputs).o) < TOL


def test_linear_attention_phi_is_masked_scores():
    d = derive("linear_attention")
    q, k, v, inputs = random_inputs(d, 1, 8, 1, 4, 2, seed=0)
    scores = q[0, :, 0] @ k[0, :, 0].T
    assert torch.allclose(implicit_attention(d, q, k, inputs)[0, 0], scores.tril(), rtol=0, atol=1e-14)


# --- the derived update against one step of the filter ------------------------------------

def _explicit_number(expr, values, K, V) -> torch.Tensor:
    """A derived expression at size (K, V) evaluated on `values`, as float64."""
    e = st_.explicit(expr, values, K, V)
    # The spec's own functions (sigmoid, softplus, ...) evaluate through their exp forms.
    e = e.applyfunc(lambda z: z.rewrite(sp.exp)) if hasattr(e, "applyfunc") else e.rewrite(sp.exp)
    return torch.tensor(sp.N(e).tolist() if hasattr(e, "tolist") else float(sp.N(e)), dtype=torch.float64)


def assert_derivation_is_one_step(spec, seed):
    """The derivation's closed-form mean, covariance, readout and variance equal one token of
    `recurrent` from a random state and covariance."""
    d = derive(spec)
    K, V = spec.key_dim or 2, 2
    q, k, v, inputs = random_inputs(d, 1, 1, 1, K, V, seed=seed)
    S0, P0 = random_initial(1, 1, K, V, seed=seed)
    ref = recurrent(d, q, k, v, inputs, initial_state=S0, initial_covariance=P0)
    m = lambda x: sp.Matrix(x.tolist())
    values = {st_.S: m(S0[0, 0]), st_.P: m(P0[0, 0]), st_.k: m(k[0, 0, 0]), st_.q: m(q[0, 0, 0]),
              st_.v: m(v[0, 0, 0]), st_.KEY_NORM2: float((k[0, 0, 0] ** 2).sum())}
    for x in spec.inputs:
        t = inputs[x.name][0, 0, 0] if x.per_token else inputs[x.name][0]
        if x.per == "key":
            values.update({st_.indexed(x, i): float(t[i]) for i in range(K)})
        else:
            values[x] = float(t)
    assert rel_err(_explicit_number(d.mean, values, K, V), ref.state[0, 0]) < TOL
    assert rel_err(_explicit_number(d.readout, values, K, V)[:, 0], ref.o[0, 0, 0]) < TOL
    if d.covariance is not None and ref.covariance is not None:
        assert rel_err(_explicit_number(d.covariance, values, K, V), ref.covariance[0, 0]) < TOL
    if d.variance is not None:
        assert rel_err(_explicit_number(d.variance, values, K, V), ref.variance[0, 0, 0]) < TOL


@pytest.mark.parametrize("timing", ["posterior", "prior"])
@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_derivation_is_one_filter_step(name, timing):
    assert_derivation_is_one_step(dataclasses.replace(zoo.spec(name), readout=Readout(timing, True)),
                                  seed=zoo.NAMES.index(name))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), seed=st.integers(0, 2 ** 16))
def test_random_derivations_are_one_filter_step(spec, seed):
    assert_derivation_is_one_step(spec, seed)


# --- packed sequences -------------------------------------------------------------------------

@pytest.mark.parametrize("name", zoo.NAMES)
def test_cu_seqlens_matches_separate_runs(name):
    d = with_readout(name, "posterior", True)
    bounds = [0, 5, 5, 17, 30]                                          # includes an empty segment
    q, k, v, inputs = random_inputs(d, 1, 30, 2, 4, 3, seed=5)
    N = len(bounds) - 1
    S0, P0 = random_initial(N, 2, 4, 3, seed=5)
    packed = recurrent(d, q, k, v, inputs, initial_state=S0, initial_covariance=P0,
                       cu_seqlens=torch.tensor(bounds))
    assert packed.state.shape == (N, 2, 4, 3)
    for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
        seg = {name_: (x[:, bos:eos] if x.dim() >= 3 else x) for name_, x in inputs.items()}
        one = recurrent(d, q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], seg,
                        initial_state=S0[n:n + 1], initial_covariance=P0[n:n + 1])
        assert torch.equal(packed.o[:, bos:eos], one.o)
        assert torch.equal(packed.variance[:, bos:eos], one.variance)
        assert torch.equal(packed.state[n:n + 1], one.state)
        if one.covariance is not None:
            assert torch.equal(packed.covariance[n:n + 1], one.covariance)


# --- an outside Kalman filter ---------------------------------------------------------------

@pytest.mark.parametrize("timing", ["posterior", "prior"])
@pytest.mark.parametrize("name", ["rls", "bayesian_layer", "bayesian_layer_diag"])
def test_exact_filter_matches_filterpy(name, timing):
    from filterpy.kalman import KalmanFilter

    d = with_readout(name, timing, True)
    B, T, H, K = 1, 16, 1, 4
    q, k, v, inputs = random_inputs(d, B, T, H, K, 1, seed=11)
    ours = recurrent(d, q, k, v, inputs)
    co = coefficients(d, inputs, B, T, H, K)
    P0 = prior_covariance(d, inputs, H, K)[0].numpy()
    kf = KalmanFilter(dim_x=K, dim_z=1)
    kf.x, kf.P = np.zeros((K, 1)), P0.copy()
    outs, variances = [], []
    for t in range(T):
        alpha, sigma = co["decay"][0, t, 0].numpy(), co["process_noise"][0, t, 0].numpy()
        kf.F = np.diag(np.broadcast_to(alpha, (K,)).astype(float))
        kf.Q = np.diag(np.broadcast_to(sigma, (K,)).astype(float))
        kf.predict()
        if timing == "prior":
            x, P = kf.x.copy(), kf.P.copy()
        kf.H = k[0, t, 0].numpy()[None, :]
        kf.R = np.array([[float(co["noise"][0, t, 0])]])
        kf.update(v[0, t, 0].numpy()[:, None])
        if timing == "posterior":
            x, P = kf.x, kf.P
        qt = q[0, t, 0].numpy()
        outs.append(float(qt @ x[:, 0]))
        variances.append(float(qt @ P @ qt))
    assert rel_err(ours.o[0, :, 0, 0], torch.tensor(outs, dtype=torch.float64)) < TOL
    assert rel_err(ours.variance[0, :, 0], torch.tensor(variances, dtype=torch.float64)) < TOL
    assert rel_err(ours.state[0, 0, :, 0], torch.from_numpy(kf.x[:, 0])) < TOL
    assert rel_err(ours.covariance[0, 0], torch.from_numpy(kf.P)) < TOL


# --- coefficients ---------------------------------------------------------------------------

def test_coefficient_shapes_and_values():
    d = derive("kda")
    B, T, H, K = 2, 3, 4, 5
    q, k, v, inputs = random_inputs(d, B, T, H, K, 2, seed=0)
    co = coefficients(d, inputs, B, T, H, K)
    assert co["decay"].shape == co["log_decay"].shape == (B, T, H, K)
    assert co["reset"].shape == co["noise"].shape == (B, T, H)
    assert co["process_noise"].shape == (B, T, H) and float(co["process_noise"].abs().max()) == 0
    assert torch.equal(co["decay"], inputs["g"].exp())
    assert torch.allclose(co["noise"], 1 - inputs["beta"], rtol=0, atol=0)


def test_coefficients_broadcast_constants_into_per_key():
    gamma = Constant("gamma", domain="unit")
    ak = Input("ak", per="key", domain="unit")
    spec = DesignModel("mix", transition=Transition(decay=gamma * ak), observation=Write())
    B, T, H, K = 1, 2, 3, 4
    inputs = {"gamma": torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64),
              "ak": torch.full((B, T, H, K), 0.9, dtype=torch.float64)}
    co = coefficients(derive(spec), inputs, B, T, H, K)
    assert co["decay"].shape == (B, T, H, K)
    assert torch.allclose(co["decay"][0, 1, :, 2], torch.tensor([0.45, 0.54, 0.63], dtype=torch.float64))


def test_log_decay_is_taken_in_log_space():
    d = derive("mamba2")
    g = torch.full((1, 2, 1), -800.0, dtype=torch.float64)    # exp(g) underflows to 0
    co = coefficients(d, {"g": g}, 1, 2, 1, 4)
    assert torch.equal(co["log_decay"], g)


def test_prior_covariances():
    H, K = 2, 3
    f64 = dict(dtype=torch.float64)
    p0 = torch.tensor([0.5, 2.0], **f64)
    assert torch.equal(prior_covariance(derive("rls"), {"p0": p0}, H, K), p0[:, None, None] * torch.eye(K, **f64))
    diag = DesignModel("d", prior=Prior(diagonal([1, 2, 3])), observation=Regression(), key_dim=3)
    assert torch.equal(prior_covariance(diag, {}, H, K)[1].diagonal(), torch.tensor([1.0, 2, 3], **f64))
    m = sp.Matrix([[2, 1, 0], [1, 2, 0], [0, 0, 1]])
    explicit = DesignModel("f", prior=Prior(full(m)), observation=Regression(), key_dim=3)
    assert torch.equal(prior_covariance(explicit, {}, H, K)[0], torch.tensor(m.tolist(), **f64))


# --- the weak-evidence limit (MATH.md section 4), as an outside check of both families -----

def test_weak_evidence_limit_of_the_kalman_filter_is_the_write_model():
    g = Input("g", domain="logdecay")
    rbig = Constant("rbig", domain="positive")
    kalman = DesignModel("k", prior=Prior(isotropic(1)),
                         transition=Transition(decay=exp(g), noise="stationary"),
                         observation=Regression(noise=rbig))
    write = DesignModel("w", transition=Transition(decay=exp(g)), observation=Write())
    q, k, v, inputs = random_inputs(write, 1, 16, 2, 4, 3, seed=2)
    r = 1e7
    inputs["rbig"] = torch.full((2,), r, dtype=torch.float64)
    scaled = recurrent(kalman, q, k, v, inputs).o * r
    assert rel_err(scaled, recurrent(write, q, k, v, inputs).o) < 1e-5


# --- bad inputs ---------------------------------------------------------------------------

def _gated_deltanet_inputs():
    d = derive("gated_deltanet")
    return (d,) + random_inputs(d, 1, 4, 2, 3, 2, seed=0)


@pytest.mark.parametrize("fn", ["recurrent", "implicit"])
@pytest.mark.parametrize("case, name", [
    ("missing", "beta"), ("shape", "g"), ("dtype", "g"), ("domain_logdecay", "g"),
    ("domain_unit", "beta"), ("nan", "beta"), ("q_dtype", "q"), ("v_shape", "v"),
    ("keys_not_unit", "k"), ("initial_state_shape", "initial_state"),
])
def test_bad_inputs_raise_naming_the_input(fn, case, name):
    d, q, k, v, inputs = _gated_deltanet_inputs()
    kw = {}
    if case == "missing":
        del inputs["beta"]
    elif case == "shape":
        inputs["g"] = inputs["g"][:, :, :1]
    elif case == "dtype":
        inputs["g"] = inputs["g"].float()
    elif case == "domain_logdecay":
        inputs["g"] = inputs["g"].clone().fill_(0.1)
    elif case == "domain_unit":
        inputs["beta"] = torch.ones_like(inputs["beta"])
    elif case == "nan":
        inputs["beta"] = inputs["beta"].clone().fill_(math.nan)
    elif case == "q_dtype":
        q = q.float()
    elif case == "v_shape":
        v = v[:, :, :1]
    elif case == "keys_not_unit":
        k = k * 1.01
    elif case == "initial_state_shape":
        kw["initial_state"] = torch.zeros(1, 2, 3, 5, dtype=torch.float64)
    run = recurrent if fn == "recurrent" else implicit
    with pytest.raises(ValueError, match=rf"^{name}:"):
        run(d, q, k, v, inputs, **kw)


def test_constant_and_covariance_inputs_are_checked():
    d = derive("rls")
    q, k, v, inputs = random_inputs(d, 1, 4, 2, 3, 2, seed=0)
    for bad in (torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64)):
        with pytest.raises(ValueError, match="^p0:"):
            recurrent(d, q, k, v, {**inputs, "p0": bad})
    with pytest.raises(ValueError, match="^initial_covariance:"):
        recurrent(d, q, k, v, inputs, initial_covariance=torch.eye(3, dtype=torch.float64))
    named = derive(DesignModel("n", prior=Prior(full(FULL_NAME)), observation=Regression()))
    q, k, v, inputs = random_inputs(named, 1, 4, 2, 3, 2, seed=0)
    with pytest.raises(ValueError, match=f"^{FULL_NAME}:"):
        recurrent(named, q, k, v, {})
    asym = inputs[FULL_NAME].clone()
    asym[:, 0, 1] += 1
    with pytest.raises(ValueError, match=f"^{FULL_NAME}:"):
        implicit(named, q, k, v, {FULL_NAME: asym})


def test_bad_cu_seqlens_raise():
    d, q, k, v, inputs = _gated_deltanet_inputs()
    for bad in (torch.tensor([0, 3]), torch.tensor([0, 3, 2, 4]), torch.tensor([0.0, 4.0])):
        with pytest.raises(ValueError, match="^cu_seqlens:"):
            recurrent(d, q, k, v, inputs, cu_seqlens=bad)
    q2, k2, v2 = (torch.cat([x, x]) for x in (q, k, v))
    inputs2 = {n: torch.cat([x, x]) for n, x in inputs.items()}
    with pytest.raises(ValueError, match="^cu_seqlens:"):
        recurrent(d, q2, k2, v2, inputs2, cu_seqlens=torch.tensor([0, 4]))


def test_unit_key_tolerance_can_be_loosened_for_rounded_keys():
    d, q, k, v, inputs = _gated_deltanet_inputs()
    k = k.to(torch.bfloat16).double()                          # normalized, then rounded
    with pytest.raises(ValueError, match="^k:"):
        recurrent(d, q, k, v, inputs)
    rec = recurrent(d, q, k, v, inputs, unit_key_tol=1e-2)
    assert rel_err(implicit(d, q, k, v, inputs, unit_key_tol=1e-2).o, rec.o) < TOL
