"""The explicit reverse sweep of the chunked Kalman filter (designmodel.chunked_adjoint) against
torch.autograd through the float64 step-by-step filter and against designmodel.chunked's
autograd backward: every input's gradient, with and without an initial state, with gradients
of the final state (dS, dP) and of the predictive variance."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import designmodel.chunked_adjoint as ca
from designmodel import zoo
from designmodel.chunked import kalman_backward
from designmodel.chunked_adjoint import (ADJOINT_PRECISION_STEPS, kalman_adjoint, kalman_adjoint_chunks,
                                         kalman_adjoint_two_sweeps, kalman_checkpoints)
from designmodel.derive import derive
from designmodel.reference import recurrent
from designmodel.spec import DesignModel, Prior, Readout, Regression, Transition, exp, isotropic
from tests.numeric.test_chunked import _canonical, _draw  # the chunked filter tests' inputs

_PRIOR = Prior(covariance=isotropic(zoo.p0))


def _spec(name, decay, noise, timing="posterior"):
    """A scalar-decay Kalman spec that reads out the predictive variance (so dvar is tested)."""
    return DesignModel(name, prior=_PRIOR, transition=Transition(decay=decay, noise=noise),
                       observation=Regression(noise=zoo.r), readout=Readout(timing, variance=True))


CASES = [
    "rls", "bayesian_layer",                                      # the zoo's, no variance readout
    _spec("rls_variance", 1, 0),                                  # no decay, no process noise
    _spec("decay_no_process_noise", exp(zoo.g), 0),
    _spec("bayesian_variance", exp(zoo.g), zoo.sigma),
    _spec("bayesian_prior_readout", exp(zoo.g), zoo.sigma, timing="prior"),
    _spec("per_key_variance", exp(zoo.g_key), zoo.sigma),           # a per-key decay
    _spec("per_key_prior_readout", exp(zoo.g_key), zoo.sigma, timing="prior"),
]
TOL = 1e-8


def _rel(got, want):
    """max |got - want| / max |want|."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _cotangents(spec, v, init, seed):
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    do = torch.randn(*v.shape, generator=gen, dtype=d)
    dS = torch.randn(*init[0].shape, generator=gen, dtype=d)
    dP = torch.randn(*init[1].shape, generator=gen, dtype=d)
    dvar = torch.randn(*v.shape[:3], generator=gen, dtype=d) if spec.readout.variance else None
    return do, dS, dP, dvar


def _sym(X):
    return 0.5 * (X + X.mT)


@pytest.mark.parametrize("sweep,chunk,T", [(kalman_adjoint, 16, 37), (kalman_adjoint, 32, 45),
                                           (kalman_adjoint_two_sweeps, 16, 37),
                                           (kalman_adjoint_chunks, 16, 37), (kalman_adjoint_chunks, 8, 40),
                                           (kalman_adjoint_chunks, 12, 40)],
                         ids=["one_sweep-16-37", "one_sweep-32-45", "two_sweeps-16-37", "chunks-16-37",
                              "chunks-8-40", "chunks-12-40"])   # per-key blocks of 8 (1 to 4) and of 4
@pytest.mark.parametrize("initial", [False, True], ids=["prior", "initial_state"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c if isinstance(c, str) else c.name)
def test_adjoint_matches_autograd_through_step_by_step(case, initial, sweep, chunk, T):
    d = derive(case)
    spec = d.spec
    prior_timing = spec.readout.timing == "prior"
    q, k, v, x, init = _draw(spec, 2, T, 2, 6, 5, seed=11)
    do, dS, dP, dvar = _cotangents(spec, v, init, seed=12)
    scale = 0.7
    got = sweep(q, k, v, **_canonical(x), do=do, dht=(dS, dP), dvar=dvar, scale=scale,
                initial_state=init if initial else None, chunk=chunk, prior_timing=prior_timing)
    leaves = {n: t.clone().requires_grad_() for n, t in [("q", q), ("k", k), ("v", v), *x.items()]}
    if initial:
        leaves.update(S0=init[0].clone().requires_grad_(), P0=init[1].clone().requires_grad_())
    ref = recurrent(d, leaves["q"] * scale, leaves["k"], leaves["v"], {n: leaves[n] for n in x},
                    initial_state=leaves.get("S0"), initial_covariance=leaves.get("P0"))
    outs = [ref.o, ref.state, ref.covariance] + ([ref.variance] if dvar is not None else [])
    cots = [do, dS, dP] + ([dvar] if dvar is not None else [])
    names = list(leaves)
    want = dict(zip(names, torch.autograd.grad(outs, [leaves[n] for n in names], cots, allow_unused=True)))
    pairs = {"q": got["q"], "k": got["k"], "v": got["v"], "r": got["noise"]}
    if "g" in x:
        pairs["g"] = got["log_decay"]
    if "sigma" in x:
        pairs["sigma"] = got["process_noise"]
    if initial:
        pairs["S0"], pairs["P0"] = got["initial_state"]
        # with an initial covariance the prior is not read
        assert want["p0"] is None or want["p0"].abs().max() == 0
        assert got["prior"].abs().max() == 0
    else:
        pairs["p0"] = got["prior"]
    for name, g_ in pairs.items():
        w = want[name]
        if name == "P0":
            # only the symmetric part of a covariance's gradient is defined (the step-by-step
            # filter reads P0 through P k, whose raw gradient is not symmetric)
            w = _sym(w)
        assert _rel(g_, w) <= TOL, (name, _rel(g_, w))


@pytest.mark.parametrize("initial", [False, True], ids=["prior", "initial_state"])
@pytest.mark.parametrize("case", CASES[2:], ids=lambda c: c.name)
def test_adjoint_matches_chunked_autograd_backward(case, initial):
    spec = derive(case).spec
    prior_timing = spec.readout.timing == "prior"
    q, k, v, x, init = _draw(spec, 1, 50, 2, 8, 4, seed=21)
    do, dS, dP, dvar = _cotangents(spec, v, init, seed=22)
    kw = dict(do=do, dht=(dS, dP), dvar=dvar, scale=None, initial_state=init if initial else None,
              prior_timing=prior_timing)
    # kalman_backward runs one chunk of 64 here; the sweep runs four chunks of 16
    want = kalman_backward(q, k, v, **_canonical(x), **kw)
    got = kalman_adjoint(q, k, v, **_canonical(x), chunk=16, **kw)
    assert set(got) == set(want)
    for name in want:
        if name == "initial_state":
            assert _rel(got[name][0], want[name][0]) <= TOL
            assert _rel(got[name][1], _sym(want[name][1])) <= TOL
        elif name == "prior" and initial:
            assert got[name].abs().max() == 0 and want[name].abs().max() == 0
        else:
            assert _rel(got[name], want[name]) <= TOL, name


def test_adjoint_full_prior_covariance_and_partial_state_gradients():
    # a full prior covariance [H, K, K] (its gradient is the matrix's), only dP given, no dvar
    spec = derive("bayesian_layer").spec
    q, k, v, x, init = _draw(spec, 2, 29, 2, 5, 3, seed=31)
    do, _, dP, _ = _cotangents(spec, v, init, seed=32)
    M = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    prior = M @ M.mT + torch.eye(5, dtype=torch.float64)
    kw = dict(log_decay=x["g"], noise=x["r"], process_noise=x["sigma"], prior=prior, do=do,
              dht=(None, dP), scale=0.5, initial_state=(init[0], None))
    want = kalman_backward(q, k, v, **kw)
    got = kalman_adjoint(q, k, v, chunk=16, **kw)
    assert got["initial_state"][1] is None
    for name in ("q", "k", "v", "log_decay", "noise", "process_noise"):
        assert _rel(got[name], want[name]) <= TOL, name
    assert _rel(got["prior"], _sym(want["prior"])) <= TOL
    assert _rel(got["initial_state"][0], want["initial_state"][0]) <= TOL


@pytest.mark.parametrize("initial", [False, True], ids=["prior", "initial_state"])
def test_chunks_from_given_checkpoints_and_packed_sequences(initial):
    # the every-chunk-at-once sweep reading checkpoints in the generated forward's layout
    # ([NS, H, K, *], chunk i of sequence n at chunk_starts[n] + i), on packed sequences,
    # against the one-chunk-at-a-time sweep run on each sequence alone
    spec = _spec("bayesian_variance", exp(zoo.g), zoo.sigma)
    bounds, chunk = [0, 13, 40, 57], 8
    N = len(bounds) - 1
    q, k, v, x, init = _draw(spec, 1, bounds[-1], 2, 6, 5, seed=51, N=N)
    do, dS, dP, dvar = _cotangents(spec, v, init, seed=52)
    kw = dict(scale=0.6, chunk=chunk)
    per, states, covs = [], [], []
    for n in range(N):
        b, e = bounds[n], bounds[n + 1]
        cut = {m: (y[:, b:e] if y.dim() > 1 else y) for m, y in x.items()}
        h0 = (init[0][n:n + 1], init[1][n:n + 1]) if initial else None
        S_c, P_c = kalman_checkpoints(q[:, b:e], k[:, b:e], v[:, b:e], **_canonical(cut),
                                      initial_state=h0, **kw)
        states.append(S_c[:-1, 0])
        covs.append(P_c[:-1, 0])
        per.append(kalman_adjoint(q[:, b:e], k[:, b:e], v[:, b:e], **_canonical(cut), do=do[:, b:e],
                                  dht=(dS[n:n + 1], dP[n:n + 1]), dvar=dvar[:, b:e], initial_state=h0,
                                  **kw))
    got = kalman_adjoint_chunks(q, k, v, **_canonical(x), do=do, dht=(dS, dP), dvar=dvar,
                                initial_state=init if initial else None,
                                checkpoints=(torch.cat(states), torch.cat(covs)),
                                cu_seqlens=torch.tensor(bounds), **kw)
    for name in ("q", "k", "v", "log_decay", "noise", "process_noise"):
        want = torch.cat([p[name] for p in per], 1)
        assert _rel(got[name], want) <= TOL, name
    if initial:
        for j in (0, 1):
            want = torch.cat([p["initial_state"][j] for p in per])
            assert _rel(got["initial_state"][j], want) <= TOL
    else:
        assert _rel(got["prior"], sum(p["prior"] for p in per)) <= TOL
    with pytest.raises(ValueError, match="checkpoints"):
        kalman_adjoint_chunks(q, k, v, **_canonical(x), do=do, checkpoints=(states[0], covs[0]),
                              cu_seqlens=torch.tensor(bounds), **kw)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kalman_adjoint_chunks(q, k, v, **_canonical(x), do=do, cu_seqlens=torch.tensor([0, 30, 20, 57]),
                              **kw)


def test_forward_keeps_only_chunk_start_states(monkeypatch):
    # the checkpoints are the chunk-start states of the step-by-step filter, one per chunk
    d = derive("bayesian_layer")
    T, chunk = 45, 16
    q, k, v, x, init = _draw(d.spec, 1, T, 2, 6, 4, seed=41)
    states, covs = kalman_checkpoints(q, k, v, **_canonical(x), scale=0.5, initial_state=init, chunk=chunk)
    NC = math.ceil(T / chunk)
    assert states.shape == (NC + 1, 1, 2, 6, 4) and covs.shape == (NC + 1, 1, 2, 6, 6)
    for c, t in enumerate([0, 16, 32, 45]):
        ref = recurrent(d, q[:, :t] * 0.5, k[:, :t], v[:, :t], {n: y[:, :t] if y.dim() > 1 else y
                                                                 for n, y in x.items()},
                        initial_state=init[0], initial_covariance=init[1])
        assert _rel(states[c], ref.state) <= 1e-12
        assert _rel(covs[c], ref.covariance) <= 1e-12
    # the sweep: every chunk is run once forward and recomputed once backward, each time from
    # its checkpoint and its own C <= chunk tokens
    seen = []
    inner = ca._chunk_forward

    def spy(Q, Kc, Vc, g, r, sigma, S, P, strict):
        seen.append((Q.shape[2], tuple(S.shape), tuple(P.shape)))
        return inner(Q, Kc, Vc, g, r, sigma, S, P, strict)
    monkeypatch.setattr(ca, "_chunk_forward", spy)
    do = torch.randn(*v.shape, dtype=torch.float64)
    kalman_adjoint(q, k, v, **_canonical(x), do=do, scale=0.5, initial_state=init, chunk=chunk)
    assert [s[0] for s in seen] == [16, 16, 13, 13, 16, 16]
    assert all(s[1:] == ((1, 2, 6, 4), (1, 2, 6, 6)) for s in seen)


def test_bad_arguments_raise_one_value_error_naming_them():
    spec = derive("bayesian_layer").spec
    q, k, v, x, (S0, P0) = _draw(spec, 1, 8, 1, 4, 2, seed=51)
    do = torch.zeros_like(v)
    args = (q, k, v, x["g"], x["r"], x["sigma"], x["p0"])
    bad = [
        (r"log_decay \(per key\)", dict(log_decay=x["g"][..., None].expand(1, 8, 1, 3))),   # K = 4
        ("noise", dict(noise=x["r"][:, :7])),
        ("do", dict(do=do[..., :1])),
        ("do", dict(do=None)),
        ("dvar", dict(dvar=torch.zeros(1, 8, 2))),
        (r"dht \(P\)", dict(dht=(None, P0[..., :3]))),
        (r"initial_state \(S\)", dict(initial_state=(S0[..., :1], None))),
        ("chunk", dict(chunk=0)),
    ]
    names = ["q", "k", "v", "log_decay", "noise", "process_noise", "prior"]
    for match, change in bad:
        kw = dict(zip(names, args), do=do, chunk=4)
        kw.update(change)
        for sweep in (kalman_adjoint, kalman_adjoint_two_sweeps, kalman_adjoint_chunks):
            with pytest.raises(ValueError, match=match):
                sweep(**kw)
    # the chunked adjoint's dot precisions: a string, or one per step (and optionally "inputs")
    kw = dict(zip(names, args), do=do, chunk=4)
    for precision, match in (({"quantities": "ieee"}, r"missing \['sweeps', 'chunk_adjoint'\]"),
                             ({**dict.fromkeys(ADJOINT_PRECISION_STEPS, "ieee"), "input": "tf32x2"},
                              r"unknown \['input'\]")):
        with pytest.raises(ValueError, match=match):
            kalman_adjoint_chunks(**kw, precision=precision)


@pytest.mark.parametrize("strict", [False, True], ids=["posterior", "prior_readout"])
def test_chunk_adjoint_carries_through_the_chunk_transition(strict):
    # The carried adjoints obey the closed forms of docs/KALMAN_BACKWARD.md, with the chunk's
    # transition F = a_C I - Yt^T Wk (Wk = Lc^-1 K^), the mean's forward S' = F S + Yt^T Lc^-1 V:
    #   dS = F^T dS' + (Q^ - W Wk)^T dO        (all of dS)
    #   dP = F^T dP' F                          (the part from dP'; the gain is optimal)
    # and dP' reaches neither dq nor dv.
    gen = torch.Generator().manual_seed(61)
    d = torch.float64
    B, H, C, K, V = 1, 2, 16, 6, 5
    Q = torch.randn(B, H, C, K, generator=gen, dtype=d)
    Kc = F.normalize(torch.randn(B, H, C, K, generator=gen, dtype=d), dim=-1) * 0.9
    Vc = torch.randn(B, H, C, V, generator=gen, dtype=d)
    g = F.logsigmoid(torch.randn(B, H, C, generator=gen, dtype=d) + 2)
    r = F.softplus(torch.randn(B, H, C, generator=gen, dtype=d)) + 0.05
    sigma = 0.05 * torch.rand(B, H, C, generator=gen, dtype=d)
    S = torch.randn(B, H, K, V, generator=gen, dtype=d)
    M = torch.randn(B, H, K, K, generator=gen, dtype=d) * 0.3
    P = M @ M.mT + 0.5 * torch.eye(K, dtype=d)
    _, _, S1, _, c = ca._chunk_forward(Q, Kc, Vc, g, r, sigma, S, P, strict)
    Wk = torch.linalg.solve_triangular(c["Lc"], c["Kh"], upper=False)
    Fc = c["aC"][..., None, None] * torch.eye(K, dtype=d) - c["Yt"].mT @ Wk
    assert _rel(Fc @ S + c["Yt"].mT @ torch.linalg.solve_triangular(c["Lc"], Vc, upper=False), S1) <= 1e-12
    X = torch.randn(B, H, K, K, generator=gen, dtype=d)
    X = X + X.mT
    zO, zS = torch.zeros(B, H, C, V, dtype=d), torch.zeros(B, H, K, V, dtype=d)
    local, dS, dP = ca._chunk_adjoint(Q, Kc, sigma, S, P, c, zO, None, zS, X, strict)
    assert dS.abs().max() == 0
    assert _rel(dP, Fc.mT @ X @ Fc) <= 1e-12
    assert local["q"].abs().max() == 0 and local["v"].abs().max() == 0
    dO = torch.randn(B, H, C, V, generator=gen, dtype=d)
    dS1 = torch.randn(B, H, K, V, generator=gen, dtype=d)
    _, dS, _ = ca._chunk_adjoint(Q, Kc, sigma, S, P, c, dO, None, dS1, torch.zeros_like(X), strict)
    assert _rel(dS, Fc.mT @ dS1 + (c["Qh"] - c["W"] @ Wk).mT @ dO) <= 1e-12


def test_adjoint_in_float32_against_float64_step_by_step():
    # float32 inputs compute in float32; the bound is the preamble's 1e-4 for fp32 gradients
    d = derive(CASES[4])
    q, k, v, x, init = _draw(d.spec, 1, 45, 2, 16, 16, seed=71)
    do, dS, dP, dvar = _cotangents(d.spec, v, init, seed=72)
    f = [t.float() for t in (q, k, v, do, dvar)]
    xf = {n: t.float() for n, t in x.items()}
    got = kalman_adjoint(f[0], f[1], f[2], **_canonical(xf), do=f[3], dvar=f[4], scale=0.25, chunk=16)
    leaves = {n: t.clone().requires_grad_() for n, t in [("q", q), ("k", k), ("v", v), *x.items()]}
    ref = recurrent(d, leaves["q"] * 0.25, leaves["k"], leaves["v"], {n: leaves[n] for n in x})
    want = dict(zip(leaves, torch.autograd.grad([ref.o, ref.variance], list(leaves.values()), [do, dvar])))
    for name, key in (("q", "q"), ("k", "k"), ("v", "v"), ("g", "log_decay"), ("r", "noise"),
                      ("sigma", "process_noise"), ("p0", "prior")):
        assert got[key].dtype == torch.float32
        assert _rel(got[key].double(), want[name]) <= 1e-4, name


def test_chunks_compiled_steps_match_eager():
    # the parallel steps through torch.compile (what a CUDA backward runs) give the eager
    # steps' gradients, which the tests above check against autograd through the filter
    spec = _spec("bayesian_variance", exp(zoo.g), zoo.sigma)
    q, k, v, x, init = _draw(spec, 2, 37, 2, 6, 5, seed=61)
    do, dS, dP, dvar = _cotangents(spec, v, init, seed=62)
    kw = dict(do=do, dht=(dS, dP), dvar=dvar, scale=0.6, initial_state=init, chunk=16)
    want = kalman_adjoint_chunks(q, k, v, **_canonical(x), compiled=False, **kw)
    got = kalman_adjoint_chunks(q, k, v, **_canonical(x), compiled=True, **kw)
    for name in ("q", "k", "v", "log_decay", "noise", "process_noise"):
        assert _rel(got[name], want[name]) <= TOL, name
    for j in (0, 1):
        assert _rel(got["initial_state"][j], want["initial_state"][j]) <= TOL


def test_chunks_fall_back_to_eager_steps_where_compiling_fails(monkeypatch):
    # a torch.compile that cannot compile (no working inductor, say): one warning, the eager
    # steps' gradients, and eager steps from then on
    monkeypatch.setattr(ca, "_COMPILED", [])
    monkeypatch.setattr(ca, "_COMPILE_FAILED", [])

    def broken(fn):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    spec = _spec("bayesian_variance", exp(zoo.g), zoo.sigma)
    q, k, v, x, init = _draw(spec, 1, 20, 1, 4, 3, seed=71)
    do = torch.randn(*v.shape, dtype=torch.float64)
    want = kalman_adjoint_chunks(q, k, v, **_canonical(x), do=do, chunk=8, compiled=False)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        got = kalman_adjoint_chunks(q, k, v, **_canonical(x), do=do, chunk=8, compiled=True)
    assert all(_rel(got[n], want[n]) <= TOL for n in ("q", "k", "v", "log_decay", "noise"))
    assert len(ca._COMPILE_FAILED) == 1
    # from then on the eager steps, without another warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = kalman_adjoint_chunks(q, k, v, **_canonical(x), do=do, chunk=8, compiled=True)
    assert _rel(again["k"], want["k"]) <= TOL and len(ca._COMPILE_FAILED) == 1
