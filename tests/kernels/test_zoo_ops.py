"""Each zoo op of the write and reset families against the float64 step-by-step filter.

Shapes are small (the interpreter runs every program in numpy) but cover: T not a multiple of
the chunk (64), head dims 16, 32, 64 with K != V, with and without an initial state, packed
sequences (cu_seqlens), float32 and bfloat16 inputs.
"""
import pytest
import torch

from designmodel import ops
from designmodel.derive import derive

from .helpers import compare, overflowing_decays

WRITE = ["linear_attention", "retnet", "mamba2", "gla"]
RESET = ["deltanet", "gated_deltanet", "kda"]

# (B, T, H, K, V, initial_state, cu_seqlens, dtype)
CASES = {
    "fp32-T100-K32-V16-h0": (2, 100, 2, 32, 16, True, None, torch.float32),
    "fp32-T64-K16-V64": (1, 64, 2, 16, 64, False, None, torch.float32),
    "fp32-varlen-K64-V32-h0": (1, 150, 2, 64, 32, True, [0, 37, 101, 150], torch.float32),
    "bf16-T80-K64-V32-h0": (2, 80, 2, 64, 32, True, None, torch.bfloat16),
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def run_op(model, path):
    op = getattr(ops, model)

    def run(q, k, v, inputs, initial_state, cu_seqlens):
        inputs = {n: x for n, x in inputs.items() if n != "gamma"}  # retnet computes its gammas
        return op(q, k, v, **inputs, initial_state=initial_state, output_final_state=True,
                  cu_seqlens=cu_seqlens, config={"path": path})
    return run


# The fused path (state and readout in one pass) on the cases that differ most
PATHS = [(case, "two_pass") for case in CASES] + [
    ("fp32-T100-K32-V16-h0", "fused"), ("fp32-varlen-K64-V32-h0", "fused"), ("bf16-T80-K64-V32-h0", "fused")]


@pytest.mark.parametrize("case,path", PATHS)
@pytest.mark.parametrize("model", WRITE + RESET)
def test_zoo_op_matches_float64_filter(model, case, path):
    B, T, H, K, V, h0, cu, dtype = CASES[case]
    extra = {"gamma": ops.retnet_gamma(H)} if model == "retnet" else None
    err_o, err_s = compare(derive(model), run_op(model, path), B, T, H, K, V, dtype=dtype,
                           initial_state=h0, cu_seqlens=cu, extra_inputs=extra)
    tol = TOLERANCE[dtype]
    assert err_o <= tol, f"{model} {case}: output relative error {err_o:.2e} > {tol}"
    assert err_s <= tol, f"{model} {case}: final state relative error {err_s:.2e} > {tol}"


def test_no_final_state_unless_asked():
    q = torch.randn(1, 20, 1, 16)
    o, state = ops.linear_attention(q, q, q)
    assert state is None and o.shape == (1, 20, 1, 16)


def test_scale_defaults_to_inverse_sqrt_key_dim():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 30, 1, 16, generator=g) for _ in range(3))
    o1, _ = ops.linear_attention(q, k, v)
    o2, _ = ops.linear_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-6)


def run_op_config(model, config):
    op = getattr(ops, model)

    def run(q, k, v, inputs, initial_state, cu_seqlens):
        inputs = {n: x for n, x in inputs.items() if n != "gamma"}
        return op(q, k, v, **inputs, initial_state=initial_state, output_final_state=True,
                  cu_seqlens=cu_seqlens, config=config)
    return run


# Kernel variants beside the defaults, at the same tolerances
VARIANTS = [
    # the fused path (state and readout in one pass)
    ("gla", {"path": "fused", "attention": {"BK": 16}}),
    # the diagonal sub-chunk blocks in a grid of their own (the default), over several key blocks
    ("gla", {"path": "two_pass", "attention": {"diag": "grid", "BK": 16}}),
    # the diagonal sub-chunk blocks inside the key loop
    ("gla", {"path": "two_pass", "attention": {"diag": "blocks", "BK": 32}}),
]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model,config", VARIANTS)
def test_zoo_op_variant_matches_float64_filter(model, config, case):
    B, T, H, K, V, h0, cu, dtype = CASES[case]
    err_o, err_s = compare(derive(model), run_op_config(model, config), B, T, H, K, V, dtype=dtype,
                           initial_state=h0, cu_seqlens=cu)
    tol = TOLERANCE[dtype]
    assert err_o <= tol, f"{model} {config} {case}: output relative error {err_o:.2e} > {tol}"
    assert err_s <= tol, f"{model} {config} {case}: final state relative error {err_s:.2e} > {tol}"


# the interpreter's numpy reports the overflow the test is about
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("config", [{"attention": {"diag": "grid"}}, {"attention": {"diag": "blocks", "BK": 32}}])
def test_gla_with_decays_that_overflow_above_the_diagonal(config):
    """Half the keys forget within a token (log-decay -20 to -40), half barely (0 to -0.1): the
    diagonal blocks' ratios exp2(gc_t - gc_j) above the diagonal (t < j) overflow to inf there,
    and must be masked out, not summed into A or the state."""
    B, T, H, K, V = 1, 100, 2, 32, 16
    err_o, err_s = compare(derive("gla"), run_op_config("gla", config), B, T, H, K, V,
                           dtype=torch.float32, extra_inputs={"g": overflowing_decays(B, T, H, K)})
    assert err_o <= TOLERANCE[torch.float32], f"output relative error {err_o:.2e}"
    assert err_s <= TOLERANCE[torch.float32], f"final state relative error {err_s:.2e}"
