"""The recurrent (decoding) kernels of every family: `recurrent(...)` in each generated module.

(a) recurrent over a whole sequence against the float64 step-by-step filter (reference.recurrent);
(b) generating token by token (T = 1 calls, the final state carried as the next call's initial
    state) against one chunked forward pass over the sequence: outputs and final state;
(c) packed sequences (cu_seqlens).
For the 10 zoo models and one random spec per family (hypothesis, derandomized). Tiny shapes:
the interpreter runs every program in numpy.
"""
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings

import designmodel
from designmodel.codegen import runtime
from designmodel.derive import derive
from designmodel.reference import recurrent as reference
from designmodel.sampling import random_initial, random_inputs

from .conftest import DEVICE
from .helpers import relative_error
from tests.strategies import specs

ZOO = ["linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "kda",
       "rls", "bayesian_layer", "bayesian_layer_diag"]
KALMAN = {"rls", "bayesian_layer", "bayesian_layer_diag"}
# float32 in the interpreter against float64: the forward's bounds (kalman 1e-4)
TOL = {"write": 1e-5, "reset": 1e-5, "kalman": 1e-4}


def draw(d, B, T, H, K, V, N=None, seed=0):
    """float32 q, k, v, inputs, S0 (and P0 for kalman) from designmodel.sampling."""
    q, k, v, ins = random_inputs(d, B, T, H, K, V, seed=seed)
    S0, P0 = random_initial(N or B, H, K, V, seed=seed)
    return q.float(), k.float(), v.float(), {n: x.float() for n, x in ins.items()}, S0.float(), P0.float()


def with_variance(d):
    """The derivation with the predictive variance read out (for the reference)."""
    if d.structure.variance:
        return d
    return derive(replace(d.spec, readout=replace(d.spec.readout, variance=True)))


def ref_run(d, q, k, v, ins, S0, P0, cu=None, scale=1.0):
    kalman = d.structure.family == "kalman"
    return reference(with_variance(d) if kalman else d, q.double() * scale, k.double(), v.double(),
                     {n: x.double() for n, x in ins.items()}, initial_state=S0.double(),
                     initial_covariance=P0.double() if kalman else None,
                     cu_seqlens=None if cu is None else cu.long())


def call(module, fn, q, k, v, ins, S0, P0, cu=None, variance=False):
    """fn ("forward" or "recurrent") of a generated module with the state and the final state;
    returns (o, S, P or None, variance or None) on the CPU."""
    kalman = module.FAMILY == "kalman"
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    kwargs = dict(scale=1.0, initial_state=(dev(S0), dev(P0)) if kalman else dev(S0),
                  output_final_state=True, cu_seqlens=dev(cu))
    if kalman:
        kwargs["output_variance"] = variance
    out = getattr(module, fn)(dev(q), dev(k), dev(v), **{n: dev(ins[n]) for n in module.INPUTS}, **kwargs)
    o, final = out[0], out[1]
    S, P = final if kalman else (final, None)
    var = out[2] if kalman and variance else None
    return tuple(None if x is None else x.cpu() for x in (o, S, P, var))


def check_whole_sequence(module, d, B=2, T=37, H=2, K=16, V=32, seed=0):
    """(a): recurrent over the sequence against the float64 filter."""
    q, k, v, ins, S0, P0 = draw(d, B, T, H, K, V, seed=seed)
    kalman = module.FAMILY == "kalman"
    o, S, P, var = call(module, "recurrent", q, k, v, ins, S0, P0, variance=kalman)
    ref = ref_run(d, q, k, v, ins, S0, P0)
    tol = TOL[module.FAMILY]
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32 and S.dtype == torch.float32
    pairs = [("o", o, ref.o), ("S", S, ref.state)]
    if kalman:
        pairs += [("P", P, ref.covariance), ("variance", var, ref.variance)]
    for what, x, y in pairs:
        err = relative_error(x, y)
        assert err <= tol, f"{d.spec.name}: recurrent {what} relative error {err:.2e} > {tol}"


def check_token_by_token(module, d, B=1, T=23, H=2, K=32, V=16, seed=1):
    """(b): T = 1 calls with the state carried equal one chunked pass over the sequence."""
    q, k, v, ins, S0, P0 = draw(d, B, T, H, K, V, seed=seed)
    kalman = module.FAMILY == "kalman"
    o_ref, S_ref, P_ref, _ = call(module, "forward", q, k, v, ins, S0, P0)
    S, P, outs = S0, P0, []
    for t in range(T):
        step = {n: (x[:, t:t + 1] if n in per_token(module) else x) for n, x in ins.items()}
        o_t, S, P, _ = call(module, "recurrent", q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], step, S, P)
        outs.append(o_t)
    o = torch.cat(outs, 1)
    tol = TOL[module.FAMILY]
    pairs = [("o", o, o_ref), ("S", S, S_ref)] + ([("P", P, P_ref)] if kalman else [])
    for what, x, y in pairs:
        err = relative_error(x, y)
        assert err <= tol, f"{d.spec.name}: token by token vs chunked {what}: {err:.2e} > {tol}"


def per_token(module):
    return {n for n, (shape, _) in module.INPUTS.items() if shape.startswith("[B, T")}


def check_varlen(module, d, cu=(0, 5, 6, 30), H=2, K=16, V=16, seed=2):
    """(c): packed sequences, each from its own initial state."""
    T, N = cu[-1], len(cu) - 1
    q, k, v, ins, S0, P0 = draw(d, 1, T, H, K, V, N=N, seed=seed)
    cu = torch.tensor(cu, dtype=torch.int32)
    o, S, P, _ = call(module, "recurrent", q, k, v, ins, S0, P0, cu=cu)
    ref = ref_run(d, q, k, v, ins, S0, P0, cu=cu)
    tol = TOL[module.FAMILY]
    pairs = [("o", o, ref.o), ("S", S, ref.state)]
    if module.FAMILY == "kalman":
        pairs.append(("P", P, ref.covariance))
    for what, x, y in pairs:
        err = relative_error(x, y)
        assert err <= tol, f"{d.spec.name}: varlen recurrent {what} relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("model", ZOO)
def test_zoo_recurrent_matches_float64_filter(model):
    check_whole_sequence(runtime.load_zoo(model), derive(model))


@pytest.mark.parametrize("model", ZOO)
def test_zoo_token_by_token_equals_chunked_forward(model):
    check_token_by_token(runtime.load_zoo(model), derive(model))


@pytest.mark.parametrize("model", ZOO)
def test_zoo_recurrent_packed_sequences(model):
    check_varlen(runtime.load_zoo(model), derive(model))


def test_decoding_step_without_cache_and_without_final_state():
    """T = 1 from no initial state; no final state unless asked (forward's convention)."""
    module = runtime.load_zoo("gated_deltanet")
    d = derive("gated_deltanet")
    q, k, v, ins, _, _ = draw(d, 2, 1, 2, 16, 16)
    o, state = module.recurrent(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), **{n: x.to(DEVICE) for n, x in ins.items()})
    assert state is None and o.shape == (2, 1, 2, 16)
    ref = reference(d, q.double() * 16 ** -0.5, k.double(), v.double(), {n: x.double() for n, x in ins.items()})
    assert relative_error(o, ref.o) <= 1e-5


@settings(max_examples=1, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=specs())
@pytest.mark.parametrize("family", ["write", "reset", "kalman"])
def test_random_spec_recurrent(family, spec, tmp_path_factory):
    d = derive(spec)
    assume(d.structure.family == family)
    assume(family == "kalman" or not d.structure.variance)
    assume(family != "kalman" or spec.prior.covariance.kind == "isotropic")
    op = designmodel.compile(spec, cache=tmp_path_factory.getbasetemp() / "recurrent-specs")
    K = spec.key_dim or 16
    check_whole_sequence(op.kernels, d, B=1, T=21, K=K, V=16)
    check_token_by_token(op.kernels, d, T=9, K=K)
