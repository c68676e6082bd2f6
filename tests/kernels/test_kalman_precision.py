"""The covariance kernel's per-group dot precisions (config "covariance": precision_<group>).

Each group of the Riccati kernel's float32 dots (MATH.md 6.3) takes its own input precision:
innovation (K^ P, S_in, q^^T P q^), factor (the blocked LDL's panels and Schur complements;
not in the per-key kernel, whose LDL takes no dots), solve (the products with L^-1) and update
(P'). The interpreter computes every precision in float32, so here the tests check what it
can: every knob is accepted and reaches its own dots (the dots each launch asks for are
recorded: the groups split the kernel's dots between them, none empty), results still match
the float64 filter, and a bad value is one ValueError before any launch.
"""
from collections import Counter

import pytest
import torch

from designmodel import ops
from designmodel.codegen import runtime

from .conftest import DEVICE, HAS_CUDA
from .helpers import relative_error
from .test_kalman import TOLERANCE, draw, initial, reference, to_dev

# the groups each kernel has (bayesian_layer_diag's per-key kernel: no dots in its LDL)
GROUPS = {
    "rls": ("innovation", "factor", "solve", "update"),
    "bayesian_layer": ("innovation", "factor", "solve", "update"),
    "bayesian_layer_diag": ("innovation", "solve", "update"),
}


@pytest.fixture
def dots(monkeypatch):
    """The input precision of every dot the interpreter runs, in order."""
    from triton.runtime import interpreter
    seen = []
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.append(str(input_precision).rsplit(".", 1)[-1].lower())
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return seen


def run(model, data, config, dtype=torch.float32):
    """The op's (o, S, P, var) with `config`: q, k, v in dtype, an initial mean and covariance."""
    q, k, v, ins, p0, S0, P0 = data
    q, k, v = (x.to(dtype) for x in (q, k, v))
    o, (S, P), var = getattr(ops, model)(*to_dev(q, k, v), **{n: x.to(DEVICE) for n, x in ins.items()},
                                         p0=p0.to(DEVICE), initial_state=tuple(to_dev(S0, P0)),
                                         output_final_state=True, output_variance=True, config=config)
    return o, S, P, var


@pytest.mark.skipif(HAS_CUDA, reason="records the interpreter's dots")
@pytest.mark.parametrize("model", list(GROUPS))
def test_each_group_precision_reaches_its_own_dots_and_matches_float64(model, dots):
    """tf32 marks the dots a setting reaches (the gain, mean and readout kernels run tf32x3
    on fp32 inputs): each group's key alone marks some, the groups together mark exactly
    those of `precision` alone, the groups' own keys win over `precision`, and the default
    marks none for fp32 inputs and only the readout's for bf16 ones; FAST_CONFIG marks the
    covariance groups but the update, the gain's and the mean's on top. Every run agrees with
    the float64 filter to the kalman tests' tolerance (the interpreter computes every
    precision in float32: bench/kalman_hard_cases.py measures them on a GPU)."""
    q, k, v, ins, p0 = draw(model, 1, 100, 1, 32, 16, seed=11)
    S0, P0 = initial(1, 1, 32, 16, seed=11)
    data = (q, k, v, ins, p0, S0, P0)
    ref = reference(model, q, k, v, ins, p0, S0, P0)

    def marked(config, dtype=torch.float32):
        dots.clear()
        got = run(model, data, config, dtype)
        # the reference on the inputs as rounded to dtype
        want = ref if dtype == torch.float32 else reference(
            model, *(x.to(dtype).float() for x in (q, k, v)), ins, p0, S0, P0)
        for name, x, y in zip(("o", "S", "P", "var"), got, (want.o, want.state, want.covariance, want.variance)):
            err = relative_error(x, y)
            assert err <= TOLERANCE[dtype], f"{model} {config}: {name} relative error {err:.2e}"
        return Counter(dots)["tf32"]

    # `precision` reaches every group without a default of its own (the update has one)
    everything = marked({"covariance": {"precision": "tf32", "precision_update": "tf32"}})
    per_group = {g: marked({"covariance": {"precision": "tf32x3", f"precision_{g}": "tf32"}}) for g in GROUPS[model]}
    assert all(n > 0 for n in per_group.values()), per_group
    assert sum(per_group.values()) == everything, (per_group, everything)
    overridden = {f"precision_{g}": "tf32x3" for g in GROUPS[model]}
    assert marked({"covariance": {"precision": "tf32", **overridden}}) == 0
    # the default: tf32x3 for fp32 and bf16 inputs alike, but for the readout's dots, which run
    # tf32 for 16-bit inputs, and (scalar decay) the innovation's, tf32x2 for 16-bit inputs
    assert marked(None) == 0
    x3 = {} if model == "bayesian_layer_diag" else {"covariance": {"precision_innovation": "tf32x3"}}
    bf16 = marked(x3, torch.bfloat16)
    assert bf16 > 0
    assert marked({"readout": {"precision": "tf32x3"}, **x3}, torch.bfloat16) == 0
    if model != "bayesian_layer_diag":
        # tf32x2: two one-pass dots for each of the innovation's, but K K^T's (inputs both
        # sides: one), 2 chunks x 2 halves of the keys of them with process noise
        kkt = 4 if model == "bayesian_layer" else 0
        assert marked(None, torch.bfloat16) - bf16 == 2 * per_group["innovation"] - kkt
        # FAST_CONFIG: one-pass tf32 in every covariance group but the update, and in the gain
        # and mean kernels, on top of the readout's dots
        gain, mean = marked({"gain": {"precision": "tf32"}}), marked({"mean": {"precision": "tf32"}})
        assert gain > 0 and mean > 0
        fast = marked(runtime.load_zoo(model).FAST_CONFIG, torch.bfloat16)
        assert fast == bf16 + sum(n for g, n in per_group.items() if g != "update") + gain + mean


def backward_dots(model, data, config, dtype, dots):
    """The precisions of the dots the backward alone runs (a forward first, then the gradients
    of sum(o w) w.r.t. q, k, v in dtype), counted."""
    q, k, v, ins, p0 = data
    leaves = [x.to(dtype).to(DEVICE).requires_grad_() for x in (q, k, v)]
    o, _ = getattr(ops, model)(*leaves, **{n: x.to(DEVICE) for n, x in ins.items()}, p0=p0.to(DEVICE), config=config)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dots.clear()
    torch.autograd.grad((o.float() * w).sum(), leaves)
    return Counter(dots)


@pytest.mark.skipif(HAS_CUDA, reason="records the interpreter's dots")
@pytest.mark.parametrize("model", ["rls", "bayesian_layer"])
def test_backward_precision_groups_and_the_split_of_16_bit_inputs_reach_their_dots(model, dots):
    """The backward's config "adjoint": float32 inputs run every dot ieee; 16-bit ones tf32x3,
    but for the dots with the keys or dO (or the 16-bit chunk-start means) as loaded, which
    split only their other operand (precision_inputs None: tf32x2 in the quantities and
    sweeps; "tf32x2" asks for it in the chunk adjoint too): each such tf32x3 dot becomes one
    or two one-pass dots, both kinds present. Each step group's key alone marks
    some dots tf32 and the groups together exactly those of `precision` (float32 inputs, where
    nothing is split), as many as the bf16 backward's tf32x3 dots unsplit (the gradients' values
    are checked in test_backward_kalman.py)."""
    data = draw(model, 1, 100, 1, 32, 16, seed=13)
    count = lambda cfg, dtype=torch.bfloat16: backward_dots(model, data, cfg, dtype, dots)
    fp32 = count(None, torch.float32)
    assert fp32["tf32"] == fp32["tf32x3"] == 0 and fp32["ieee"] > 0
    whole = count({"adjoint": {"precision_inputs": "tf32x3"}})
    assert whole["tf32"] == 0 and whole["tf32x3"] > 0
    # by default the quantities and sweeps split, and every dot of the chunk adjoint stays
    # tf32x3 (below: one-pass there, the default loses as many tf32x3 dots as it has)
    moved = {}
    for name, config in (("default", {}), ("asked", {"precision_inputs": "tf32x2"})):
        split = count({"adjoint": config})
        moved[name], added = whole["tf32x3"] - split["tf32x3"], split["tf32"]
        assert 0 < moved[name] < added < 2 * moved[name], (name, moved[name], added)
    assert moved["asked"] > moved["default"], moved
    # the groups, on float32 inputs (no split): each marks its own dots
    fp32 = lambda cfg: count({"adjoint": cfg}, torch.float32)
    per_group = {g: fp32({"precision": "tf32x3", f"precision_{g}": "tf32"})["tf32"]
                 for g in ("quantities", "sweeps", "chunk_adjoint")}
    assert all(n > 0 for n in per_group.values()), per_group
    assert sum(per_group.values()) == fp32({"precision": "tf32"})["tf32"] == whole["tf32x3"]
    one_pass = count({"adjoint": {"precision_chunk_adjoint": "tf32"}})
    assert count(None)["tf32x3"] - one_pass["tf32x3"] == per_group["chunk_adjoint"]


@pytest.mark.skipif(HAS_CUDA, reason="records the interpreter's dots")
@pytest.mark.parametrize("model", ["rls", "bayesian_layer"])
def test_update_by_ldl_blocks_matches_float64(model, dots):
    """update_rows = 16: the update of P takes one dot per LDL block (4 at C = 64) per quarter
    of P, where by default (the chunk) it takes one per quarter over the whole chunk; both
    agree with the float64 filter (T not a multiple of the chunk, initial mean and covariance).
    The update's dots are told apart by marking them alone with tf32."""
    q, k, v, ins, p0 = draw(model, 1, 100, 1, 32, 16, seed=5)
    S0, P0 = initial(1, 1, 32, 16, seed=5)
    ref = reference(model, q, k, v, ins, p0, S0, P0)
    counts = {}
    for rows in (16, "default"):
        dots.clear()
        got = run(model, (q, k, v, ins, p0, S0, P0), {"covariance": {
            "precision": "tf32x3", "precision_update": "tf32", **({} if rows == "default" else {"update_rows": rows})}})
        for name, x, y in zip(("o", "S", "P", "var"), got, (ref.o, ref.state, ref.covariance, ref.variance)):
            err = relative_error(x, y)
            assert err <= TOLERANCE[torch.float32], f"{model} update_rows {rows}: {name} relative error {err:.2e}"
        counts[rows] = Counter(dots)["tf32"]
    # two chunks, K = 32 (quarters of 16 x 16: three per chunk)
    assert counts == {16: 2 * 3 * 4, "default": 2 * 3}, counts


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's float32 dots: a GPU's tf32 passes differ")
@pytest.mark.parametrize("model", ["rls", "bayesian_layer"])
def test_innovation_split_of_16_bit_inputs_matches_float64(model, dots):
    """bf16 inputs by default, and fp32 ones when asked, run the innovation as tf32x2: the
    keys and queries as loaded in the dots, the computed operand split into tf32 hi + lo, the
    decay and scale applied after; bf16 inputs also as bf16x3 (three bf16 pieces of it). The
    interpreter computes every dot in float32, so the pieces must add back to the whole: the
    float32 outputs (S, P, the variance) agree with the float64 filter on the rounded inputs
    to the fp32 bound (1e-4), where the bf16 bound is 2e-2; o is stored in bf16."""
    q, k, v, ins, p0 = draw(model, 1, 100, 1, 32, 16, seed=7)
    S0, P0 = initial(1, 1, 32, 16, seed=7)
    base = {}
    for dtype in (torch.bfloat16, torch.float32):
        dots.clear()
        run(model, (q, k, v, ins, p0, S0, P0), {"covariance": {"precision_innovation": "tf32x3"}}, dtype)
        base[dtype] = Counter(dots)
    kkt = 4 if model == "bayesian_layer" else 0   # K K^T's dots (inputs both sides): 2 chunks x 2 halves
    for dtype, config, passes in ((torch.bfloat16, None, 2),
                                  (torch.float32, {"covariance": {"precision_innovation": "tf32x2"}}, 2),
                                  (torch.bfloat16, {"covariance": {"precision_innovation": "bf16x3"}}, 3)):
        dots.clear()
        o, S, P, var = run(model, (q, k, v, ins, p0, S0, P0), config, dtype)
        want = reference(model, *(x.to(dtype).float() for x in (q, k, v)), ins, p0, S0, P0)
        for name, x, y in zip(("S", "P", "var"), (S, P, var), (want.state, want.covariance, want.variance)):
            err = relative_error(x, y)
            assert err <= TOLERANCE[torch.float32], f"{model} {dtype}: {name} relative error {err:.2e}"
        assert relative_error(o, want.o) <= TOLERANCE[torch.bfloat16 if dtype == torch.bfloat16 else torch.float32]
        # each of the innovation's tf32x3 dots became `passes` one-pass dots (K K^T's: one;
        # the interpreter records bf16 dots under the default input precision, tf32)
        moved = base[dtype]["tf32x3"] - Counter(dots)["tf32x3"]
        added = Counter(dots)["tf32"] - base[dtype]["tf32"]
        assert moved > kkt and added == passes * moved - (passes - 1) * kkt, (moved, added)


def test_bad_precision_settings_raise_one_value_error_before_any_launch(dots):
    """Unknown values, unknown or misspelt keys, a group the kernel lacks, None where a
    precision is needed: ValueError naming the setting, and no kernel has run."""
    q, k, v, ins, p0 = draw("bayesian_layer", 1, 20, 1, 16, 16)
    call = lambda model, cfg, **x: getattr(ops, model)(q, k, v, **x, config=cfg)
    bl = dict(g=ins["g"], r=ins["r"], sigma=ins["sigma"])
    cases = [
        ("bayesian_layer", {"covariance": {"precision_update": "tf32x4"}}, r"precision_update.*must be one of"),
        ("bayesian_layer", {"covariance": {"precision": "fp16"}}, r"'precision'.*must be one of"),
        ("bayesian_layer_diag", {"covariance": {"precision": None}}, r"'precision'.*must be one of"),
        ("bayesian_layer", {"covariance": {"precision_updat": "tf32"}}, r"unknown setting 'precision_updat'"),
        ("bayesian_layer_diag", {"covariance": {"precision_factor": "tf32"}}, r"unknown setting 'precision_factor'"),
        ("bayesian_layer", {"covariance": "tf32"}, r"config\['covariance'\] must be a dict"),
        ("bayesian_layer", {"gain": {"precision": "tf16"}}, r"'gain'.*must be one of"),
        ("rls", {"riccati": {}}, r"unknown kernel 'riccati'"),
        ("bayesian_layer", {"covariance": {"update_rows": 32}}, r"update_rows.*must be 16 or the chunk"),
        ("bayesian_layer", {"covariance": {"update_rows": 16, "num_warps": 8}}, r"update_rows 16 with 8 or more warps"),
        ("bayesian_layer_diag", {"covariance": {"update_rows": 64}}, r"unknown setting 'update_rows'"),
        ("bayesian_layer", {"covariance": {"precision_update": "tf32x2"}}, r"'precision_update'.*must be one of"),
        ("rls", {"covariance": {"precision_innovation": "bf16x3"}}, r"'bf16x3' needs bfloat16 q and k"),
        ("bayesian_layer_diag", {"covariance": {"precision_innovation": "tf32x2"}}, r"'precision_innovation'.*must be one of"),
        ("rls", {"mean": {"BV": 16, "num_warps": 8}}, r"config\['mean'\]: BV below 32 with 8 or more warps"),
        ("bayesian_layer_diag", {"mean": {"num_warps": 8, "precision": "tf32"}}, r"BV below 32 with 8 or more warps"),
        ("bayesian_layer", {"adjoint": {"precision_inputs": "bf16x3"}}, r"'precision_inputs'.*must be one of"),
        ("rls", {"adjoint": {"precision_sweeps": "tf32x2"}}, r"'precision_sweeps'.*must be one of"),
        ("bayesian_layer", {"adjoint": {"precision_sweep": "tf32"}}, r"unknown setting 'precision_sweep'"),
    ]
    for model, cfg, message in cases:
        x = {"r": ins["r"]} if model == "rls" else bl
        if model == "bayesian_layer_diag":
            x = {**bl, "g": ins["g"][..., None].expand(1, 20, 1, 16).contiguous()}
        with pytest.raises(ValueError, match=message):
            call(model, cfg, **x)
    assert dots == []


@pytest.mark.skipif(HAS_CUDA, reason="records the interpreter's dots")
@pytest.mark.parametrize("config", ["default", "unsplit", "adjoint", "fast"])
def test_backward_dots_follow_config_adjoint(config, dots):
    """Through the op's autograd the backward's kernels take config["adjoint"]: tf32x3 for
    bf16 inputs by default (no one-pass tf32 dot but the halves of the split of the dots with
    an exact input operand, counted in the test above; without that split none: one-pass tf32
    made gradients infinite without decay on a GPU), one-pass tf32 when it is named or with
    FAST_CONFIG. The gradients agree with autograd through the float64 filter on the rounded
    inputs every way."""
    cfg = {"default": None, "unsplit": {"adjoint": {"precision_inputs": "tf32x3"}},
           "adjoint": {"adjoint": {"precision": "tf32"}},
           "fast": runtime.load_zoo("bayesian_layer").FAST_CONFIG}[config]
    q, k, v, ins, p0 = draw("bayesian_layer", 1, 70, 1, 16, 16, seed=3)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    names = ("q", "k", "v", "g", "r", "sigma")
    mine = [x.to(DEVICE).requires_grad_() for x in (q, k, v, ins["g"], ins["r"], ins["sigma"])]
    o, _ = ops.bayesian_layer(*mine, p0=p0.to(DEVICE), config=cfg)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dots.clear()
    got = torch.autograd.grad((o.float() * w.float().to(DEVICE)).sum(), mine)
    seen = Counter(dots)
    if config == "default":
        assert seen["tf32"] > 0 and seen["tf32x3"] > 0, seen
    elif config == "unsplit":
        assert seen["tf32"] == 0 and seen["tf32x3"] > 0, seen
    else:
        assert seen["tf32x3"] == 0 and seen["tf32"] > 0, seen
    leaves = [x.detach().cpu().double().requires_grad_() for x in mine]
    ref = reference("bayesian_layer", *leaves[:3], dict(zip(names[3:], leaves[3:])), p0)
    want = torch.autograd.grad((ref.o * w).sum(), leaves)
    for n, x, y in zip(names, got, want):
        assert relative_error(x, y) <= TOLERANCE[torch.bfloat16], f"d{n}: {relative_error(x, y):.2e}"
