"""The kalman family with a diagonal or full prior covariance (not p0 I) against the float64
step-by-step filter (designmodel.reference.recurrent) and torch autograd through it.

Three priors: a per-key constant p (diagonal(p)), a diagonal written out as numbers, and a full
covariance named in the spec and given at run time ([H, K, K]); the generated launcher builds
the prior's [H, K, K] matrix and the kernels start from it. Tiny shapes (interpreter).
"""
import pytest
import torch
import torch.nn.functional as F

import designmodel
from designmodel.derive import derive
from designmodel.reference import recurrent
from designmodel.spec import (Constant, DesignModel, Input, Prior, Readout, Regression, Transition,
                              diagonal, exp, full, softplus)

from .conftest import DEVICE
from .helpers import relative_error

FORWARD_TOL = 1e-5    # fp32 inputs in the interpreter against float64, the forward
GRADIENT_TOL = 1e-4   # the gradients
K_LITERAL = 8
DIAGONAL = [0.5, 1.0, 2.0, 1.5, 0.8, 1.2, 3.0, 0.7]   # the literal prior's diagonal (K = 8)

gk = Input("gk", per="key", domain="logdecay")
g, r, sigma = Input("g", domain="logdecay"), Input("r", domain="positive"), Input("sigma", domain="nonnegative")
p = Constant("p", per="key", domain="positive")
c = Constant("c", domain="positive")   # per head


# a full prior written out as numbers (K = 8): tridiagonal, diagonally dominant
FULL = [[2.0 if i == j else (-0.5 if abs(i - j) == 1 else 0.0) for j in range(K_LITERAL)]
        for i in range(K_LITERAL)]


def _spec(name, covariance, process_noise=False, decay=g):
    transition = Transition(decay=exp(decay), noise=sigma) if process_noise else Transition(decay=exp(decay))
    return DesignModel(name, prior=Prior(covariance=covariance), transition=transition,
                       observation=Regression(noise=r), readout=Readout("posterior", variance=True))


SPECS = {
    "diagonal_constant": _spec("prior_diag_p", diagonal(p), process_noise=True),
    # an expression of a per-head and a per-key constant, printed as torch code in the launcher
    "diagonal_expression": _spec("prior_diag_expression", diagonal(c * softplus(p))),
    "diagonal_literal": _spec("prior_diag_numbers", diagonal(DIAGONAL)),
    "full_named": _spec("prior_full_named", full("Pprior")),
    "full_literal": _spec("prior_full_numbers", full(FULL)),
    # per-key decay: the one-kernel covariance path (chunk_covariance_kernel)
    "full_named_per_key_decay": _spec("prior_full_named_gk", full("Pprior"), decay=gk),
}
LITERAL = ("diagonal_literal", "full_literal")


def _draw(kind, B, T, H, K, V, seed=0, N=None):
    """float32 q, k, v and the op's inputs (the prior's included) for one of SPECS."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) * (0.5 + torch.rand(B, T, H, 1, generator=gen))
    v = torch.randn(B, T, H, V, generator=gen)
    ins = {"g": F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3.0),
           "r": 0.05 * 20 ** torch.rand(B, T, H, generator=gen)}
    if kind.endswith("per_key_decay"):
        ins["gk"] = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) + 3.0)
        del ins["g"]
    if kind == "diagonal_constant":
        ins["sigma"] = 0.3 * torch.rand(B, T, H, generator=gen)
    if kind.startswith("diagonal_constant") or kind == "diagonal_expression":
        ins["p"] = 0.3 + 2 * torch.rand(H, K, generator=gen)
    if kind == "diagonal_expression":
        ins["c"] = 0.5 + torch.rand(H, generator=gen)
    if kind.startswith("full_named"):
        a = torch.randn(H, K, K, generator=gen)
        m = a @ a.mT / K + 0.3 * torch.eye(K)
        ins["Pprior"] = 0.5 * (m + m.mT)
    return q, k, v, ins


def _reference(spec, q, k, v, ins, S0=None, P0=None, cu=None, scale=None):
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    return recurrent(derive(spec), q.double() * scale, k.double(), v.double(),
                     {n: x.double() for n, x in ins.items()},
                     initial_state=None if S0 is None else S0.double(),
                     initial_covariance=None if P0 is None else P0.double(),
                     cu_seqlens=None if cu is None else cu.long())


def _dev(x):
    return None if x is None else x.to(DEVICE)


def _check(what, pairs, tol):
    for name, x, y in pairs:
        err = relative_error(x, y)
        assert err <= tol, f"{what}: {name} relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("kind", list(SPECS))
def test_prior_forward_matches_float64_filter(kind):
    """No initial covariance: the kernels start from the spec's prior."""
    spec = SPECS[kind]
    K = K_LITERAL if kind in LITERAL else 16
    B, T, H, V = 2, 80, 2, 16
    q, k, v, ins = _draw(kind, B, T, H, K, V, seed=1)
    op = designmodel.compile(spec)
    o, (S, P), var = op(_dev(q), _dev(k), _dev(v), **{n: _dev(x) for n, x in ins.items()},
                        output_final_state=True, output_variance=True)
    ref = _reference(spec, q, k, v, ins)
    _check(kind, [("o", o, ref.o), ("S", S, ref.state), ("P", P, ref.covariance),
                  ("variance", var, ref.variance)], FORWARD_TOL)


@pytest.mark.parametrize("kind", ["diagonal_constant", "full_named"])
def test_given_initial_covariance_overrides_the_prior(kind):
    spec = SPECS[kind]
    B, T, H, K, V = 1, 50, 2, 16, 8
    q, k, v, ins = _draw(kind, B, T, H, K, V, seed=2)
    gen = torch.Generator().manual_seed(3)
    S0 = torch.randn(B, H, K, V, generator=gen)
    a = torch.randn(B, H, K, K, generator=gen)
    P0 = a @ a.mT / K + 0.5 * torch.eye(K)
    op = designmodel.compile(spec)
    o, (S, P) = op(_dev(q), _dev(k), _dev(v), **{n: _dev(x) for n, x in ins.items()},
                   initial_state=(_dev(S0), _dev(P0)), output_final_state=True)
    ref = _reference(spec, q, k, v, ins, S0, P0)
    _check(kind, [("o", o, ref.o), ("S", S, ref.state), ("P", P, ref.covariance)], FORWARD_TOL)
    # and the prior really is not read: another prior gives the same result
    other = {n: (2 * x if n in ("p", "Pprior") else x) for n, x in ins.items()}
    o2, _ = op(_dev(q), _dev(k), _dev(v), **{n: _dev(x) for n, x in other.items()},
               initial_state=(_dev(S0), _dev(P0)))
    assert torch.equal(o, o2)


@pytest.mark.parametrize("kind", ["diagonal_constant", "full_named"])
def test_varlen_each_sequence_starts_from_the_prior(kind):
    spec = SPECS[kind]
    cu = torch.tensor([0, 29, 75], dtype=torch.int32)
    T, H, K, V = 75, 2, 16, 8
    q, k, v, ins = _draw(kind, 1, T, H, K, V, seed=4)
    op = designmodel.compile(spec)
    for form, run in (("chunked", op), ("recurrent", op.recurrent)):
        o, (S, P) = run(_dev(q), _dev(k), _dev(v), **{n: _dev(x) for n, x in ins.items()},
                                      output_final_state=True, cu_seqlens=_dev(cu))
        ref = _reference(spec, q, k, v, ins, cu=cu)
        assert S.shape == (2, H, K, V) and P.shape == (2, H, K, K)
        _check(f"{kind} {form}", [("o", o, ref.o), ("S", S, ref.state), ("P", P, ref.covariance)],
               FORWARD_TOL)


@pytest.mark.parametrize("kind", ["diagonal_constant", "full_named"])
def test_prior_gradients_match_float64_autograd(kind):
    """dq, dk, dv, the gates' and the prior's inputs' gradients (dp by autograd through
    diag_embed, dPprior the matrix's) against torch.autograd through the float64 filter."""
    spec = SPECS[kind]
    B, T, H, K, V = 1, 70, 2, 16, 8
    q, k, v, ins = _draw(kind, B, T, H, K, V, seed=5)
    gen = torch.Generator().manual_seed(6)
    wo, ws = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    wp, wv = torch.randn(B, H, K, K, generator=gen), torch.randn(B, T, H, generator=gen)
    leaves = {n: x.to(DEVICE).requires_grad_() for n, x in [("q", q), ("k", k), ("v", v), *ins.items()]}
    op = designmodel.compile(spec)
    o, (S, P), var = op(leaves["q"], leaves["k"], leaves["v"], **{n: leaves[n] for n in ins},
                        output_final_state=True, output_variance=True)
    loss = sum((x * w.to(DEVICE)).sum() for x, w in ((o, wo), (S, ws), (P, wp), (var, wv)))
    loss.backward()
    leaves64 = {n: x.detach().cpu().double().requires_grad_() for n, x in leaves.items()}
    ref = _reference(spec, leaves64["q"], leaves64["k"], leaves64["v"], {n: leaves64[n] for n in ins})
    rloss = sum((x * w.double()).sum() for x, w in
                ((ref.o, wo), (ref.state, ws), (ref.covariance, wp), (ref.variance, wv)))
    rloss.backward()
    for n in leaves:
        got, want = leaves[n].grad.cpu().double(), leaves64[n].grad
        assert want is not None and want.abs().max() > 0, n
        if n == "Pprior":   # only the symmetric part of a covariance's gradient is defined
            got, want = 0.5 * (got + got.mT), 0.5 * (want + want.mT)
        assert relative_error(got, want) <= GRADIENT_TOL, f"{kind} d{n}: {relative_error(got, want):.2e}"


def test_token_by_token_equals_one_chunked_pass():
    """Decoding: the first step starts from the prior (no state given), the next ones from
    the carried (S, P); together they equal one chunked pass."""
    kind = "diagonal_constant"
    spec = SPECS[kind]
    B, T, H, K, V = 1, 20, 2, 16, 8
    q, k, v, ins = _draw(kind, B, T, H, K, V, seed=7)
    op = designmodel.compile(spec)
    dev = {n: _dev(x) for n, x in ins.items()}
    o_ref, (S_ref, P_ref) = op(_dev(q), _dev(k), _dev(v), **dev, output_final_state=True)
    state, outs = None, []
    for t in range(T):
        step = {n: (x[:, t:t + 1] if x.dim() == 3 and n != "p" else x) for n, x in dev.items()}
        o_t, state = op.recurrent(_dev(q[:, t:t + 1]), _dev(k[:, t:t + 1]), _dev(v[:, t:t + 1]), **step,
                                  initial_state=state, output_final_state=True)
        outs.append(o_t)
    _check("token by token vs chunked", [("o", torch.cat(outs, 1), o_ref), ("S", state[0], S_ref),
                                         ("P", state[1], P_ref)], FORWARD_TOL)


def test_bad_prior_inputs_raise_before_any_launch():
    B, T, H, K, V = 1, 8, 2, 16, 8
    q, k, v, ins = _draw("full_named", B, T, H, K, V)
    op = designmodel.compile(SPECS["full_named"])
    with pytest.raises(ValueError, match=r"Pprior must be \[H, K, K\]"):
        op(_dev(q), _dev(k), _dev(v), **{n: _dev(x) for n, x in ins.items() if n != "Pprior"},
           Pprior=_dev(ins["Pprior"][:, :8, :8]))
    q, k, v, ins = _draw("diagonal_constant", B, T, H, K, V)
    ins["p"][1, 3] = 0.0
    with pytest.raises(ValueError, match=r"p must be > 0"):
        designmodel.compile(SPECS["diagonal_constant"])(
            _dev(q), _dev(k), _dev(v), **{n: _dev(x) for n, x in ins.items()})
    q, k, v, ins = _draw("diagonal_literal", B, T, H, K, V)   # K = 16, the prior is for 8
    with pytest.raises(ValueError, match=r"written for K = 8"):
        designmodel.compile(SPECS["diagonal_literal"])(
            _dev(q), _dev(k), _dev(v), **{n: _dev(x) for n, x in ins.items()})
