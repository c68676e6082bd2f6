"""Gradients of the kalman family (the Bayesian Layer, RLS, any spec of that family) against
torch autograd through the float64 step-by-step filter (designmodel.reference.recurrent).

The generated `backward` materializes the per-token quantities with a printed kernel, takes
their gradients from the chunked filter's explicit adjoint over every chunk at once, started
from the chunk-start states the forward kernels keep (designmodel.chunked_adjoint; per-key
decay: the chunked filter recomputed under autograd, designmodel.chunked), and chains them back
to the spec's inputs with sympy's derivatives, printed; the ops reach it through the custom ops'
autograd (designmodel.library), eager and under torch.compile.
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import designmodel
from designmodel import ops
from designmodel.derive import derive
from designmodel.reference import recurrent
from designmodel.spec import (Constant, DesignModel, Input, Prior, Readout, Regression, Transition,
                              exp, isotropic, logsigmoid, softplus)

from .conftest import DEVICE
from .helpers import relative_error

TOL = 1e-4   # fp32 inputs against float64

# a spec outside the zoo: every quantity a nonlinear function of an input, a prior readout
x, y, z = Input("x"), Input("y"), Input("z")
c0 = Constant("c0", domain="positive")
SOFT = DesignModel("soft_kalman", prior=Prior(covariance=isotropic(c0 * c0)),
                   transition=Transition(decay=exp(logsigmoid(x + 2)), noise=softplus(z) / 10),
                   observation=Regression(noise=softplus(y) + 0.1), readout=Readout("prior", variance=True))


def _inputs(spec, B, T, H, K, gen):
    out = {}
    for i in spec.inputs:
        shape = ((B, T, H) if i.per_token else (H,)) + ((K,) if i.per == "key" else ())
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        out[i.name] = {"logdecay": F.logsigmoid(t + 3), "positive": F.softplus(t) + 0.2,
                       "nonnegative": 0.1 * F.softplus(t), "real": t, "unit": torch.sigmoid(t)}[i.domain]
    return out


def _check(spec, B=1, T=70, H=2, K=16, V=8, initial=True, variance=True, cu=None, seed=0, config=None,
           bf16_values=False):
    """The op's gradients of a random linear loss against autograd through the float64 filter,
    on fp32 inputs (with bf16_values: q, k, v and the loss's weight on o rounded to bf16
    values, as exact in tf32 as 16-bit inputs and their dO are) under `config`."""
    d = derive(spec)
    op = designmodel.compile(spec)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    ins = _inputs(d.spec, B, T, H, K, gen)
    N = B if cu is None else len(cu) - 1
    S0 = 0.3 * torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)
    M = 0.3 * torch.randn(N, H, K, K, generator=gen, dtype=torch.float64)
    P0 = M @ M.mT + 0.5 * torch.eye(K, dtype=torch.float64)
    wo = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    ws = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)
    wp = torch.randn(N, H, K, K, generator=gen, dtype=torch.float64)
    wv = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    if bf16_values:
        q, k, v, wo = (t.to(torch.bfloat16).double() for t in (q, k, v, wo))
    cu_t = None if cu is None else torch.tensor(cu)
    leaves32 = {n: t.float().to(DEVICE).requires_grad_() for n, t in
                [("q", q), ("k", k), ("v", v), *ins.items()] + ([("S0", S0), ("P0", P0)] if initial else [])}
    out = op(leaves32["q"], leaves32["k"], leaves32["v"], **{n: leaves32[n] for n in ins}, scale=0.5,
             initial_state=(leaves32["S0"], leaves32["P0"]) if initial else None, output_final_state=True,
             output_variance=variance, cu_seqlens=None if cu_t is None else cu_t.to(DEVICE), config=config)
    o, (S, P) = out[0], out[1]
    loss = (o * wo.float().to(DEVICE)).sum() + (S * ws.float().to(DEVICE)).sum() + (P * wp.float().to(DEVICE)).sum()
    if variance:
        loss = loss + (out[2] * wv.float().to(DEVICE)).sum()
    loss.backward()
    # the float64 reference on the same fp32-rounded values
    leaves64 = {n: t.detach().cpu().double().requires_grad_() for n, t in leaves32.items()}
    # the same spec declaring its variance, so that the reference reads it out too
    d_var = derive(replace(d.spec, readout=Readout(d.spec.readout.timing, variance=True)))
    ref = recurrent(d_var, leaves64["q"] * 0.5, leaves64["k"], leaves64["v"], {n: leaves64[n] for n in ins},
                    initial_state=leaves64.get("S0"), initial_covariance=leaves64.get("P0"), cu_seqlens=cu_t)
    rloss = (ref.o * wo).sum() + (ref.state * ws).sum() + (ref.covariance * wp).sum()
    if variance:
        rloss = rloss + (ref.variance * wv).sum()
    rloss.backward()
    for n in leaves32:
        got, want = leaves32[n].grad.cpu().double(), leaves64[n].grad
        if want is None:   # p0 when an initial covariance is given: it does not enter the filter
            assert got.abs().max() == 0, n
            continue
        if n == "P0":   # only the symmetric part of a covariance's gradient is defined
            got, want = 0.5 * (got + got.mT), 0.5 * (want + want.mT)
        assert relative_error(got, want) <= TOL, f"d{n}: {relative_error(got, want):.2e}"


@pytest.mark.parametrize("model", ["bayesian_layer", "rls", "bayesian_layer_diag"])
def test_zoo_kalman_gradients_match_float64_filter(model):
    _check(model, variance=True, initial=True)


@pytest.mark.parametrize("model", ["bayesian_layer", "rls"])
def test_gradients_with_the_input_split_match_float64_filter(model):
    """The backward's "tf32x2" split (config adjoint precision_inputs; the default for 16-bit
    inputs under tf32x3): the dots with the keys or dO as loaded split only their other
    operand, the decays moved off the input. fp32 inputs with bf16 values make that exact on a
    GPU too; every step kernel runs it, and the gradients keep the fp32 bound."""
    _check(model, T=100, K=24, config={"adjoint": {"precision": "tf32x3", "precision_inputs": "tf32x2"}},
           bf16_values=True)


def test_gradients_without_initial_state_reach_the_prior_variance():
    _check("bayesian_layer", initial=False, variance=False, T=40)


def test_spec_with_nonlinear_quantities_and_prior_readout():
    _check(SOFT, initial=True, variance=True, T=50)


# the same with a per-key decay (bayesian_layer_diag's kind), through the same adjoint
xk = Input("x", per="key")
SOFT_DIAG = DesignModel("soft_kalman_diag", prior=Prior(covariance=isotropic(c0 * c0)),
                        transition=Transition(decay=exp(logsigmoid(xk + 2)), noise=softplus(z) / 10),
                        observation=Regression(noise=softplus(y) + 0.1), readout=Readout("prior", variance=True))


def test_spec_with_per_key_decay_nonlinear_quantities_and_prior_readout():
    _check(SOFT_DIAG, initial=True, variance=True, T=50)


@pytest.mark.parametrize("model", ["bayesian_layer", "bayesian_layer_diag"])
def test_varlen_gradients(model):
    _check(model, B=1, T=60, cu=[0, 13, 60], initial=True, variance=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_backward_matches_eager(backend):
    """torch.compile(fullgraph=True) through the op's saving forward and backward custom ops
    (the variance asked for, the final state not: an unused output before a used one)."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, K = 1, 30, 2, 16
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    k = F.normalize(k, dim=-1)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3)
    r = F.softplus(torch.randn(B, T, H, generator=gen)) + 0.1
    sigma = 0.05 * torch.rand(B, T, H, generator=gen)

    def loss(q, k, v, g, r, sigma):
        o, _, var = ops.bayesian_layer(q, k, v, g, r, sigma, output_variance=True)
        return (o * o).sum() + var.sum()

    grads = []
    torch._dynamo.reset()
    for fn in (loss, torch.compile(loss, fullgraph=True, backend=backend)):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (q, k, v, g, r, sigma)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert relative_error(a, b) <= 1e-6


def test_backward_reads_the_chunk_states_the_forward_kept(monkeypatch):
    """With a gradient to come, the op runs the forward kernels once, keeping the chunk-start
    means and covariances, and the backward starts from them instead of recomputing them."""
    module = designmodel.compile("bayesian_layer").kernels
    calls = []
    forward, backward = module.forward, module.backward

    def spy_forward(*args, **kw):
        calls.append(("forward", kw.get("save_for_backward", False)))
        return forward(*args, **kw)

    def spy_backward(*args, saved=None, **kw):
        calls.append(("backward", None if saved is None else [tuple(x.shape) for x in saved]))
        return backward(*args, saved=saved, **kw)
    monkeypatch.setattr(module, "forward", spy_forward)
    monkeypatch.setattr(module, "backward", spy_backward)
    _check("bayesian_layer", B=2, T=70, initial=True, variance=False)
    B, T, H, K, V = 2, 70, 2, 16, 8
    NS = B * 2   # two chunks of 64 per sequence
    assert calls == [("forward", True), ("backward", [(NS, H, K, V), (NS, H, K, K)])]


@pytest.mark.parametrize("variance", [False, True])
def test_backward_runs_the_parallel_steps_as_generated_kernels(monkeypatch, variance):
    """For a scalar decay and fp32 inputs the backward takes steps 2, 4 and 6 from the
    generated kernels (ADJOINT_STEPS), once each per backward, with the variance's gradient
    or without. The gradients _check compares are the step-by-step filter's."""
    module = designmodel.compile("bayesian_layer").kernels
    calls = []

    def spy(name):
        step = module.ADJOINT_STEPS[name]

        def run(*args, **kw):
            calls.append((name, tuple(args[0]["k"].shape)))
            return step(*args, **kw)
        return run
    for name in ("quantities", "mean", "covariance"):
        monkeypatch.setitem(module.ADJOINT_STEPS, name, spy(name))
    _check("bayesian_layer", B=2, T=70, initial=True, variance=variance)
    shape = (2, 2, 2, 64, 16)
    assert calls == [("quantities", shape), ("mean", shape), ("covariance", shape)]


def test_backward_bad_gradient_shape_raises():
    m = designmodel.compile("rls").kernels
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="dvar"):
        m.backward(q, q, q, torch.ones(1), torch.ones(1, 8, 1), torch.randn(1, 8, 1, 16), dvar=torch.ones(3))


@pytest.mark.parametrize("r0,alpha,unit", [(1e-4, 1.0, True), (1e-2, 0.01, False), (1e2, 0.5, True),
                                           (1e-4, 0.99, False)], ids=["r1e-4", "alpha0.01", "r1e2", "r1e-4-raw"])
def test_kernel_steps_on_the_stress_grid(r0, alpha, unit):
    """The backward's per-chunk kernels (steps 2, 4 and 6, with the variance's gradient) at
    issue 4's extremes: tiny and large observation noise, fast decay, keys normalized and not.
    Every gradient in fp32 within 1e-4 of the float64 adjoint (kalman_adjoint_chunks in
    float64, itself checked against autograd through the step-by-step filter in
    tests/numeric/test_kalman_adjoint.py)."""
    from designmodel.chunked_adjoint import kalman_adjoint_chunks
    module = designmodel.compile("bayesian_layer").kernels
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 1, 200, 2, 16, 8
    rn = lambda *s: torch.randn(*s, generator=gen)
    q, k, v, do = rn(B, T, H, K), rn(B, T, H, K), rn(B, T, H, V), rn(B, T, H, V)
    k = F.normalize(k, dim=-1) if unit else k
    g = torch.full((B, T, H), math.log(alpha))
    r = torch.full((B, T, H), r0)
    sigma, dvar = 0.1 * torch.rand(B, T, H, generator=gen), rn(B, T, H)
    inputs = (q, k, v, g, r, sigma)
    got = kalman_adjoint_chunks(*inputs, 1.0, do, dvar=dvar, sweeps=module.ADJOINT_SWEEPS,
                                steps=module.ADJOINT_STEPS, compiled=False)
    want = kalman_adjoint_chunks(*(t.double() for t in inputs), 1.0, do.double(), dvar=dvar.double(),
                                 compiled=False)
    for name in ("q", "k", "v", "log_decay", "noise", "process_noise"):
        assert torch.isfinite(got[name]).all(), name
        assert relative_error(got[name].double(), want[name]) <= 1e-4, name
