"""The write family's backward against torch.autograd through the float64 step-by-step filter.

Each case draws q, k, v, the spec's inputs, an initial state and random gradients do (of the
readout) and dht (of the final state); `backward` of the generated module must give the
gradients that autograd gives for the loss <o, do> + <S_T, dht> computed by
designmodel.reference.recurrent in float64 on the same (rounded) values. Shapes: T not a
multiple of the chunk (64), K != V, with and without an initial state and dht, packed
sequences, float32 (rel. error <= 1e-4) and bfloat16 (<= 2e-2).
"""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings

import designmodel
from designmodel import ops, reference
from designmodel.codegen import emit, runtime
from designmodel.codegen.plan import plan as make_plan
from designmodel.derive import derive
from designmodel.spec import (Constant, DesignModel, Input, Readout, Regression, Transition, Write,
                              exp, reset, sigmoid, softplus)

from tests.strategies import specs

from .conftest import DEVICE, HAS_CUDA
from .helpers import make_inputs, overflowing_decays, relative_error

a = Input("a")
ak = Input("ak", per="key")
dt = Input("dt", domain="positive")
g = Input("g", domain="logdecay")
gamma = Constant("gamma", domain="unit")
lam = Constant("lam", per="key", domain="unit")

SPECS = {
    # log-decay logsigmoid(a), nonlinear in its input; prior readout
    "write_sigmoid_prior": DesignModel("write_sigmoid_prior", transition=Transition(decay=sigmoid(a)),
                                       observation=Write(), readout=Readout(timing="prior")),
    # per-key log-decay -softplus(ak) dt from a per-key and a per-head input; prior readout
    "write_softplus_per_key": DesignModel("write_softplus_per_key",
                                          transition=Transition(decay=exp(-softplus(ak) * dt)),
                                          observation=Write(), readout=Readout(timing="prior")),
    # a constant per-key decay [H, K]
    "write_constant_per_key": DesignModel("write_constant_per_key", transition=Transition(decay=lam),
                                          observation=Write()),
    # a per-token gate times a constant decay per head
    "write_gate_times_constant": DesignModel("write_gate_times_constant",
                                             transition=Transition(decay=exp(g) * gamma),
                                             observation=Write()),
}
ZOO = ["linear_attention", "retnet", "mamba2", "gla"]

# (B, T, H, K, V, initial_state, dht, cu_seqlens, dtype)
CASES = {
    "fp32-T80-K16-V32-h0": (2, 80, 2, 16, 32, True, True, None, torch.float32),
    "fp32-T80-K32-V16-no-h0-no-dht": (1, 80, 2, 32, 16, False, False, None, torch.float32),
    "fp32-varlen-h0": (1, 100, 2, 16, 32, True, True, [0, 20, 70, 100], torch.float32),
    "bf16-T80-K32-V16-h0": (1, 80, 2, 32, 16, True, True, None, torch.bfloat16),
}
# float32 in the interpreter to 1e-4; on a GPU tl.dot rounds float32 operands to tf32 (10-bit
# mantissa), so float32 there has the bound of tests/kernels/test_gpu.py
TOLERANCE = {torch.float32: 5e-3 if HAS_CUDA else 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("backward-cache")


def module_of(name, cache):
    """The generated module: committed for the zoo, compiled into the cache otherwise."""
    if name in ZOO:
        return derive(name), runtime.load_zoo(name)
    op = designmodel.compile(SPECS[name], cache=cache)
    return op.derivation, op.kernels


def gradient_errors(d, module, B, T, H, K, V, h0, with_dht, cu, dtype, seed=0, config=None, saved=False,
                    extra_inputs=None):
    """Relative errors of backward's gradients against autograd through the float64 filter.
    saved: backward takes forward(..., save_for_backward=True)'s tensors (with the final state)
    instead of recomputing them; extra_inputs: inputs given instead of random ones."""
    p = make_plan(d)
    names = [i.name for i in p.inputs]
    q, k, v, ins = make_inputs(d.spec.inputs, B, T, H, K, V, seed=seed, unit_keys=d.structure.unit_keys)
    ins.update(extra_inputs or {})
    if "gamma" in ins and p.model == "retnet":
        ins["gamma"] = ops.retnet_gamma(H)  # RetNet's own decays, as in the forward tests
    N = B if cu is None else len(cu) - 1
    gen = torch.Generator().manual_seed(seed + 1)
    S0 = torch.randn(N, H, K, V, generator=gen) if h0 else None
    do = torch.randn(B, T, H, V, generator=gen).to(dtype)
    dht = torch.randn(N, H, K, V, generator=gen) if with_dht else None
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    scale = K ** -0.5
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    kw = {}
    if saved:
        _, _, kw["saved"] = module.forward(dev(q), dev(k), dev(v), *[dev(ins[n]) for n in names], scale=scale,
                                           initial_state=dev(S0), output_final_state=with_dht,
                                           cu_seqlens=dev(cu_t), save_for_backward=True)
    out = module.backward(dev(q), dev(k), dev(v), *[dev(ins[n]) for n in names], dev(do), dev(dht),
                          scale=scale, initial_state=dev(S0), cu_seqlens=dev(cu_t), config=config, **kw)
    assert len(out) == 4 + len(names)
    assert (out[-1] is None) == (S0 is None)

    # the float64 filter on the same values, differentiated by autograd
    leaves = [q.double(), k.double(), v.double()] + [ins[n].double() for n in names]
    leaves += [S0.double()] if h0 else []
    for x in leaves:
        x.requires_grad_(True)
    # inputs the kernels do not read (a process noise: the write mean does not see it) as given
    ref_inputs = {n: x.double() for n, x in ins.items()}
    ref_inputs.update(zip(names, leaves[3:3 + len(names)]))
    ref = reference.recurrent(d, leaves[0] * scale, leaves[1], leaves[2], ref_inputs,
                              initial_state=leaves[-1] if h0 else None,
                              cu_seqlens=None if cu_t is None else cu_t.long())
    loss = (ref.o * do.double()).sum()
    if with_dht:
        loss = loss + (ref.state * dht.double()).sum()
    expected = torch.autograd.grad(loss, leaves)
    got = list(out[:3 + len(names)]) + ([out[-1]] if h0 else [])
    labels = ["dq", "dk", "dv"] + [f"d{n}" for n in names] + (["dh0"] if h0 else [])
    errors = {}
    for label, x, ref_x, leaf in zip(labels, got, expected, [q, k, v] + [ins[n] for n in names] + [S0]):
        assert x.shape == ref_x.shape and x.dtype == leaf.dtype, (label, x.shape, x.dtype)
        errors[label] = relative_error(x, ref_x)
    return errors


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model", ZOO)
def test_zoo_backward_matches_autograd_of_float64_filter(model, case, cache):
    B, T, H, K, V, h0, with_dht, cu, dtype = CASES[case]
    d, module = module_of(model, cache)
    errors = gradient_errors(d, module, B, T, H, K, V, h0, with_dht, cu, dtype)
    bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
    assert not bad, f"{model} {case}: relative errors above {TOLERANCE[dtype]}: {bad}"


@pytest.mark.parametrize("case", ["fp32-T80-K16-V32-h0", "fp32-varlen-h0"])
@pytest.mark.parametrize("name", list(SPECS))
def test_spec_backward_matches_autograd_of_float64_filter(name, case, cache):
    B, T, H, K, V, h0, with_dht, cu, dtype = CASES[case]
    d, module = module_of(name, cache)
    errors = gradient_errors(d, module, B, T, H, K, V, h0, with_dht, cu, dtype, seed=2)
    bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
    assert not bad, f"{name} {case}: relative errors above {TOLERANCE[dtype]}: {bad}"


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=specs())
def test_random_write_specs_backward_matches_autograd(spec, tmp_path_factory):
    d = derive(spec)
    assume(d.structure.family == "write" and not d.structure.variance)
    module = designmodel.compile(spec, cache=tmp_path_factory.getbasetemp() / "random-specs").kernels
    K = spec.key_dim or 16
    errors = gradient_errors(d, module, 1, 70, 2, K, 16, True, True, None, torch.float32, seed=4)
    bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[torch.float32]}
    assert not bad, f"{d.one_line()}: relative errors above {TOLERANCE[torch.float32]}: {bad}"


class Refused:
    """Stands in for a kernel that must not be launched."""

    def __getitem__(self, grid):
        raise AssertionError("the backward recomputed what the forward saved")


@pytest.mark.parametrize("model", ["mamba2", "gla"])
def test_autograd_through_the_op_uses_the_generated_backward(model, monkeypatch):
    """ops.<model> carries autograd (designmodel.library) into the module's backward (gla's
    with the forward op's saved states and attention: the recomputing kernels are refused)."""
    d = derive(model)
    module = runtime.load_zoo(model)
    for name in getattr(module, "SAVED", ()) and ("chunk_state_canonical_kernel", "chunk_attention_canonical_kernel"):
        monkeypatch.setattr(module, name, Refused())
    B, T, H, K, V = 1, 70, 2, 16, 32
    q, k, v, ins = make_inputs(d.spec.inputs, B, T, H, K, V, seed=8, unit_keys=False)
    gen = torch.Generator().manual_seed(9)
    h0, dht = torch.randn(B, H, K, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    do = torch.randn(B, T, H, V, generator=gen)
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, ins["g"], h0)]
    o, state = getattr(ops, model)(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True)
    ((o * do.to(DEVICE)).sum() + (state * dht.to(DEVICE)).sum()).backward()
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, ins["g"], h0)]
    ref = reference.recurrent(d, ref_leaves[0] * K ** -0.5, *ref_leaves[1:3], {"g": ref_leaves[3]},
                              initial_state=ref_leaves[4])
    expected = torch.autograd.grad((ref.o * do.double()).sum() + (ref.state * dht.double()).sum(), ref_leaves)
    for name, x, e in zip(["q", "k", "v", "g", "h0"], leaves, expected):
        tol = TOLERANCE[torch.float32]
        assert relative_error(x.grad, e) <= tol, f"{model} d{name}: {relative_error(x.grad, e):.2e}"


@pytest.mark.parametrize("case", ["fp32-T80-K16-V32-h0", "fp32-varlen-h0", "bf16-T80-K32-V16-h0"])
def test_backward_takes_the_forwards_saved_tensors(case, cache, monkeypatch):
    """gla's backward with the forward's saved states, attention and final state: the same
    gradients, and the recomputing kernels are not launched."""
    d, module = module_of("gla", cache)
    for name in ("chunk_state_canonical_kernel", "chunk_attention_canonical_kernel"):
        monkeypatch.setattr(module, name, Refused())
    B, T, H, K, V, h0, with_dht, cu, dtype = CASES[case]
    errors = gradient_errors(d, module, B, T, H, K, V, h0, with_dht, cu, dtype, saved=True)
    bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
    assert not bad, f"gla {case} with saved tensors: relative errors above {TOLERANCE[dtype]}: {bad}"


def test_backward_rejects_bad_saved_tensors():
    module = runtime.load_zoo("gla")
    B, T, H, K, V = 1, 20, 1, 16, 16
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE) for D in (K, K, V))
    g = -torch.rand(B, T, H, K, device=DEVICE)
    do = torch.randn(B, T, H, V, device=DEVICE)
    _, _, (h, A, qd, kd, gl, _) = module.forward(q, k, v, g, save_for_backward=True)
    with pytest.raises(ValueError, match="saved A"):
        module.backward(q, k, v, g, do, saved=(h, A[:, :10], qd, kd, gl, None))
    with pytest.raises(ValueError, match="saved must be"):
        module.backward(q, k, v, g, do, saved=(h, A, qd, kd, gl))


# several key and value blocks per program's loop, and several key blocks of programs
SMALL_BLOCKS = {"dh": dict(BK=16, BV=16), "dv": dict(BK=16, BV=16), "dqk": dict(BK=16, BV=16)}


@pytest.mark.parametrize("model,config", [
    ("mamba2", SMALL_BLOCKS),
    # the decay's scan in steps of 32 rows (several per sequence)
    ("gla", {**SMALL_BLOCKS, "attention": dict(BK=16, num_warps=4, num_stages=2),
             "decay": dict(BT=32, BK=16)}),
    # the sub-chunk blocks of dQ and dK inside the main kernel, over several key blocks
    ("gla", {**SMALL_BLOCKS, "dqk": dict(BK=16, BV=16, diag="loop")}),
    # the diagonal ones in a grid of their own (dK from sums across the columns' rows), the
    # others in the main kernel
    ("gla", {**SMALL_BLOCKS, "dqk": dict(BK=16, BV=16, diag="grid", diag_dk="columns", diag_bk=32)}),
    # all of them in the sub-chunk grid (the default), over several key blocks there too
    ("gla", {**SMALL_BLOCKS, "dqk": dict(BK=16, BV=16, diag_bk=16)}),
])
def test_backward_with_small_blocks(model, config, cache):
    B, T, H, K, V, h0, with_dht, cu, dtype = CASES["fp32-varlen-h0"]
    d, module = module_of(model, cache)
    errors = gradient_errors(d, module, B, T, H, 32, V, h0, with_dht, cu, dtype, config=config)
    bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
    assert not bad, f"{model} small blocks: relative errors above {TOLERANCE[dtype]}: {bad}"


# --- the per-token kernels: the quantities and the chain rule, printed from sympy ------------

def chain_errors(d, module, B=2, T=70, H=2, K=16, seed=3):
    """(error of the materialized log-decay, errors of the chain rule per input) against the
    float64 spec scalars and autograd."""
    p = make_plan(d)
    _, k, _, ins = make_inputs(d.spec.inputs, B, T, H, K, 16, seed=seed, unit_keys=False)
    NR, BT = B * T, module.TOKEN_ROWS
    shape = (B, T, H, K) if p.log_decay.per_key else (B, T, H)
    log_decay = torch.empty(shape, device=DEVICE)
    grid = ((NR + BT - 1) // BT, H)
    args = [k.to(DEVICE)] + [ins[i.name].to(DEVICE) for i in p.inputs]
    module.token_quantities_kernel[grid](*args, log_decay, NR, H=H, K=K, BT=BT, BK=max(16, K))
    leaves = {i.name: ins[i.name].double().requires_grad_(True) for i in p.inputs}
    ref = reference.coefficients(d, leaves, B, T, H, K)["log_decay"]
    dld = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    expected = torch.autograd.grad((ref * dld.double()).sum(), list(leaves.values()))
    grads = {i.name: torch.empty((NR,) + tuple(ins[i.name].shape) if not i.per_token else ins[i.name].shape,
                                 device=DEVICE) for i in p.inputs}
    module.token_chain_kernel[grid](*args, dld.to(DEVICE), *grads.values(), NR, H=H, K=K, BT=BT,
                                    BK=max(16, K))
    grads = {i.name: grads[i.name] if i.per_token else grads[i.name].sum(0) for i in p.inputs}
    return (relative_error(log_decay, ref.detach()),
            {n: relative_error(grads[n], e) for n, e in zip(leaves, expected)})


@pytest.mark.parametrize("name", ["write_sigmoid_prior", "write_softplus_per_key",
                                  "write_constant_per_key", "write_gate_times_constant"])
def test_chain_rule_kernel_matches_autograd(name, cache):
    d, module = module_of(name, cache)
    err_q, errors = chain_errors(d, module)
    assert err_q <= 1e-6, f"{name}: log-decay relative error {err_q:.2e}"
    bad = {n: e for n, e in errors.items() if not e <= 1e-5}
    assert not bad, f"{name}: chain-rule relative errors {bad}"


def test_chain_rule_is_printed_from_sympy(cache):
    _, module = module_of("write_sigmoid_prior", cache)
    text = open(module.__file__).read()
    # log-decay log(sigmoid(a)), printed stably, and its derivative 1 - sigmoid(a)
    assert "logsigmoid(b_a)" in text
    assert "b_d_a += b_dlog_decay * (1.0 - tl.sigmoid(b_a))" in text


def test_backward_rejects_bad_gradients():
    module = runtime.load_zoo("mamba2")
    q = torch.randn(1, 20, 1, 16)
    gate = -torch.rand(1, 20, 1)
    with pytest.raises(ValueError, match="do must have the shape of v"):
        module.backward(q, q, q, gate, torch.zeros(1, 20, 1, 8))
    with pytest.raises(ValueError, match="dht must be"):
        module.backward(q, q, q, gate, torch.zeros_like(q), torch.zeros(1, 1, 16, 8))
    with pytest.raises(ValueError, match="g must be"):
        module.backward(q, q, q, gate[:, :10], torch.zeros_like(q))


@pytest.mark.parametrize("model,config,match", [
    ("gla", {"dqk": {"diag": "columns"}}, "dqk diag must be 'loop', 'grid' or 'intra'"),
    ("gla", {"dqk": {"diag_dk": "both"}}, "dqk diag_dk must be 'columns' or 'rows'"),
    # the recomputation of A reads the forward's attention settings
    ("gla", {"attention": {"diag": "loop"}}, "attention diag must be 'blocks' or 'grid'"),
    ("gla", "fast", "config must be a dict of per-kernel overrides, got str"),
    ("gla", {"dqk": {"diag_BK": 32}}, "unknown setting 'diag_BK' of backward kernel 'dqk'"),
    ("gla", {"dqk": 32}, r"config\['dqk'\] must be a dict"),
    ("gla", {"dgk": {}}, "unknown backward kernel 'dgk'"),
    # the diagonal's settings belong to the per-key decay's kernels only
    ("mamba2", {"dqk": {"diag": "grid"}}, "unknown setting 'diag' of backward kernel 'dqk'"),
])
def test_backward_rejects_a_bad_config_before_any_launch(model, config, match, monkeypatch):
    """A kernel or a setting the defaults lack (a typo), or a value outside a setting's
    choices: one ValueError naming it, and no kernel has run."""
    module = runtime.load_zoo(model)
    launched = []
    for name in [n for n in dir(module) if n.endswith("_kernel")]:
        monkeypatch.setattr(module, name, _Launches(name, launched))
    q = torch.randn(1, 20, 1, 16)
    g = -torch.rand_like(q) if model == "gla" else -torch.rand(1, 20, 1)
    with pytest.raises(ValueError, match=match):
        module.backward(q, q, q, g, torch.zeros_like(q), config=config)
    assert launched == []


class _Launches:
    """A kernel's stand-in that records each launch by name."""

    def __init__(self, name, launched):
        self.name, self.launched = name, launched

    def __getitem__(self, grid):
        return lambda *a, **k: self.launched.append(self.name)


# The reset family's gain reads |k|^2: its chain rule adds 2 k dQ dQ/d|k|^2 to dk. The reset
# modules get `backward` with their family's core; the per-token kernels are common, so they
# are rendered here for a reset spec beside its forward module and checked on their own.
RESET_FULL_GAIN = DesignModel("reset_full_gain", transition=Transition(decay=sigmoid(a)),
                              observation=Regression(noise=Input("r", domain="positive")),
                              filter=reset(Input("c", domain="positive")))


def test_chain_rule_through_the_key_norm_matches_autograd(tmp_path):
    d = derive(RESET_FULL_GAIN)
    p = make_plan(d)
    assert p.gain.uses_key_norm and [i.name for i in p.inputs] == ["a", "c", "r"]
    text = emit.render(d)["kernels.py"] + "\n\n" + emit.environment().get_template(
        "common/backward.py.j2").render(plan=p)
    (tmp_path / "kernels.py").write_text(text)
    module = runtime.load_file(tmp_path / "kernels.py")
    B, T, H, K = 1, 70, 2, 16
    _, k, _, ins = make_inputs(d.spec.inputs, B, T, H, K, 16, seed=5, unit_keys=False)
    NR, BT = B * T, module.TOKEN_ROWS
    grid = ((NR + BT - 1) // BT, H)
    args = [k.to(DEVICE)] + [ins[n].to(DEVICE) for n in ("a", "c", "r")]
    log_decay, gain = (torch.empty(B, T, H, device=DEVICE) for _ in range(2))
    module.token_quantities_kernel[grid](*args, log_decay, gain, NR, H=H, K=K, BT=BT, BK=K)

    # the reference gain c / (c |k|^2 + r) from the spec's scalars (reference.coefficients)
    leaves = {n: ins[n].double().requires_grad_(True) for n in ("a", "c", "r")}
    k64 = k.double().requires_grad_(True)
    co = reference.coefficients(d, leaves, B, T, H, K)
    gain_ref = co["reset"] / (co["reset"] * (k64 * k64).sum(-1) + co["noise"])
    assert relative_error(gain, gain_ref.detach()) <= 1e-6
    assert relative_error(log_decay, co["log_decay"].detach()) <= 1e-6

    gen = torch.Generator().manual_seed(6)
    dgain, dld = torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen)
    loss = (gain_ref * dgain.double()).sum() + (co["log_decay"] * dld.double()).sum()
    expected = torch.autograd.grad(loss, [*leaves.values(), k64])
    dk = torch.zeros(B, T, H, K, device=DEVICE)
    grads = [torch.empty(B, T, H, device=DEVICE) for _ in range(3)]
    module.token_chain_kernel[grid](*args, dld.to(DEVICE), dgain.to(DEVICE), dk, *grads, NR,
                                    H=H, K=K, BT=BT, BK=K)
    for name, x, e in zip(["da", "dc", "dr", "dk"], [*grads, dk], expected):
        assert relative_error(x, e) <= 1e-5, f"{name}: relative error {relative_error(x, e):.2e}"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("diag", ["intra", "grid", "loop"])
def test_gla_backward_with_decays_that_overflow_above_the_diagonal(diag, cache):
    """Half the keys forget within a token (log-decay -20 to -40), half barely: every ratio the
    backward forms must stay <= 1 or be masked, so that no inf or NaN reaches the gradients."""
    B, T, H, K, V = 1, 100, 2, 32, 16
    d, module = module_of("gla", cache)
    errors = gradient_errors(d, module, B, T, H, K, V, True, True, None, torch.float32,
                             config={"dqk": {"diag": diag}}, extra_inputs={"g": overflowing_decays(B, T, H, K)})
    bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[torch.float32]}
    assert not bad, f"gla strong decays, dqk diag {diag}: relative errors above {TOLERANCE[torch.float32]}: {bad}"
