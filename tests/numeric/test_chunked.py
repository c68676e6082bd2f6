"""The plain-PyTorch chunked Kalman filter (designmodel.chunked) against the float64
step-by-step filter: outputs, final state and covariance, variance, and gradients."""
import pytest
import torch
import torch.nn.functional as F

from designmodel import zoo
from designmodel.chunked import kalman_backward, kalman_chunked
from designmodel.derive import derive
from designmodel.reference import recurrent
from designmodel.spec import DesignModel, Prior, Readout, Regression, Transition, exp, isotropic

# the zoo's Bayesian Layer with a prior readout (before each token's update) and its variance
PRIOR_READOUT = DesignModel("bayesian_prior_readout", prior=Prior(covariance=isotropic(zoo.p0)),
                            transition=Transition(decay=exp(zoo.g), noise=zoo.sigma),
                            observation=Regression(noise=zoo.r), readout=Readout("prior", variance=True))
CASES = ["rls", "bayesian_layer", "bayesian_layer_diag", PRIOR_READOUT]


def _draw(spec, B, T, H, K, V, seed, N=None):
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    q = torch.randn(B, T, H, K, generator=gen, dtype=d)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=d), dim=-1) * 0.9
    v = torch.randn(B, T, H, V, generator=gen, dtype=d)
    names = {i.name: i for i in spec.inputs}
    x = {}
    if "g" in names:
        shape = (B, T, H, K) if names["g"].per == "key" else (B, T, H)
        x["g"] = F.logsigmoid(torch.randn(*shape, generator=gen, dtype=d) + 2)
    x["r"] = F.softplus(torch.randn(B, T, H, generator=gen, dtype=d)) + 0.05
    if "sigma" in names:
        x["sigma"] = 0.05 * torch.rand(B, T, H, generator=gen, dtype=d)
    x["p0"] = 0.5 + torch.rand(H, generator=gen, dtype=d)
    n = B if N is None else N
    S0 = torch.randn(n, H, K, V, generator=gen, dtype=d) * 0.3
    M = torch.randn(n, H, K, K, generator=gen, dtype=d) * 0.3
    P0 = M @ M.mT + 0.5 * torch.eye(K, dtype=d)
    return q, k, v, x, (S0, P0)


def _canonical(x):
    return dict(log_decay=x.get("g"), noise=x["r"], process_noise=x.get("sigma"), prior=x["p0"])


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c if isinstance(c, str) else c.name)
def test_chunked_filter_matches_step_by_step(case, initial):
    d = derive(case)
    spec = d.spec
    prior = spec.readout.timing == "prior"
    q, k, v, x, init = _draw(spec, 2, 37, 2, 8, 5, seed=1)
    scale = 8 ** -0.5
    ref = recurrent(d, q * scale, k, v, x, initial_state=init[0] if initial else None,
                    initial_covariance=init[1] if initial else None)
    o, S, P, var = kalman_chunked(q, k, v, **_canonical(x), scale=scale, chunk=16,
                                  initial_state=init if initial else None, prior_timing=prior,
                                  output_variance=ref.variance is not None)
    assert (o - ref.o).abs().max() < 1e-10 * ref.o.abs().max()
    assert (S - ref.state).abs().max() < 1e-10 * ref.state.abs().max()
    assert (P - ref.covariance).abs().max() < 1e-10 * ref.covariance.abs().max()
    if ref.variance is not None:
        assert (var - ref.variance).abs().max() < 1e-10 * ref.variance.abs().max()


def test_chunked_filter_varlen_matches_each_sequence():
    d = derive("bayesian_layer")
    q, k, v, x, init = _draw(d.spec, 1, 45, 2, 8, 4, seed=2, N=3)
    cu = torch.tensor([0, 7, 30, 45])
    ref = recurrent(d, q * 0.5, k, v, x, initial_state=init[0], initial_covariance=init[1], cu_seqlens=cu)
    o, S, P, _ = kalman_chunked(q, k, v, **_canonical(x), scale=0.5, chunk=16, initial_state=init,
                                cu_seqlens=cu)
    assert (o - ref.o).abs().max() < 1e-10 * ref.o.abs().max()
    assert (S - ref.state).abs().max() < 1e-10 * ref.state.abs().max()
    assert (P - ref.covariance).abs().max() < 1e-10 * ref.covariance.abs().max()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c if isinstance(c, str) else c.name)
def test_kalman_backward_matches_autograd_through_step_by_step(case):
    d = derive(case)
    spec = d.spec
    prior = spec.readout.timing == "prior"
    q, k, v, x, init = _draw(spec, 1, 21, 2, 6, 4, seed=3)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(*v.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(*init[0].shape, generator=gen, dtype=torch.float64)
    dP = torch.randn(*init[1].shape, generator=gen, dtype=torch.float64)
    dvar = torch.randn(*v.shape[:3], generator=gen, dtype=torch.float64) if spec.readout.variance else None
    got = kalman_backward(q, k, v, **_canonical(x), do=do, dht=(dS, dP), dvar=dvar, scale=0.7,
                          initial_state=init, prior_timing=prior)
    leaves = {n: t.clone().requires_grad_() for n, t in [("q", q), ("k", k), ("v", v), *x.items(),
                                                        ("S0", init[0]), ("P0", init[1])]}
    xin = {n: leaves[n] for n in x}
    ref = recurrent(d, leaves["q"] * 0.7, leaves["k"], leaves["v"], xin, initial_state=leaves["S0"],
                    initial_covariance=leaves["P0"])
    outs = [ref.o, ref.state, ref.covariance] + ([ref.variance] if dvar is not None else [])
    grads = [do, dS, dP] + ([dvar] if dvar is not None else [])
    names = list(leaves)
    want = dict(zip(names, torch.autograd.grad(outs, [leaves[n] for n in names], grads, allow_unused=True)))
    pairs = [("q", got["q"]), ("k", got["k"]), ("v", got["v"]), ("r", got["noise"]), ("p0", got["prior"]),
             ("S0", got["initial_state"][0]), ("P0", got["initial_state"][1])]
    if "g" in x:
        pairs.append(("g", got["log_decay"]))
    if "sigma" in x:
        pairs.append(("sigma", got["process_noise"]))
    for name, g_ in pairs:
        w = want[name]
        if name == "P0":
            # P0 is symmetric; only the symmetric part of its gradient is defined (the two
            # filters read P0 through P k and k^T P respectively, so their raw gradients differ
            # by a transpose-antisymmetric part that no symmetric perturbation sees)
            g_, w = 0.5 * (g_ + g_.mT), 0.5 * (w + w.mT)
        if name == "p0":
            # with an initial covariance given, p0 does not enter the filter
            assert w is None or w.abs().max() == 0
            assert g_.abs().max() == 0
            continue
        assert (g_ - w).abs().max() <= 1e-9 * w.abs().max(), name


def test_kalman_backward_prior_gradient_without_initial_covariance():
    d = derive("bayesian_layer")
    q, k, v, x, _ = _draw(d.spec, 1, 19, 2, 6, 4, seed=5)
    do = torch.randn(*v.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = kalman_backward(q, k, v, **_canonical(x), do=do, scale=1.0)
    p0 = x["p0"].clone().requires_grad_()
    ref = recurrent(d, q, k, v, {**x, "p0": p0})
    (want,) = torch.autograd.grad(ref.o, [p0], do)
    assert (got["prior"] - want).abs().max() <= 1e-9 * want.abs().max()
