"""`designmodel check SPEC`: derive, prove, and check the numbers, as a pass/fail table."""
from __future__ import annotations

import torch

from designmodel import reference
from designmodel.derive import derive
from designmodel.proofs import applicable
from designmodel.sampling import random_initial, random_inputs

# Float64 references must agree to rounding; a kernel to the tolerance of its input dtype.
REFERENCE_TOL = 1e-10
KERNEL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _reference_rows(d, seed):
    """Step-by-step filter against the implicit-attention form, zero and given initial state."""
    B, T, H, K, V = 2, 37, 2, 8, 6
    q, k, v, inputs = random_inputs(d, B, T, H, K, V, seed=seed)
    rows = []
    for initial in (False, True):
        S0, P0 = random_initial(B, H, K, V, seed=seed) if initial else (None, None)
        if d.family in ("write", "reset"):
            P0 = None if not d.structure.variance else P0
        rec = reference.recurrent(d, q, k, v, inputs, initial_state=S0, initial_covariance=P0)
        imp = reference.implicit(d, q, k, v, inputs, initial_state=S0, initial_covariance=P0)
        err = _rel(rec.o, imp.o)
        if d.structure.variance:
            err = max(err, _rel(rec.variance, imp.variance))
        what = "reference: recurrent = implicit attention" + (" (initial state)" if initial else "")
        rows.append((what, err < REFERENCE_TOL, f"rel. error {err:.1e} (tol {REFERENCE_TOL:.0e})"))
    return rows


def _kernel_rows(d, seed):
    """The compiled kernels against the float64 reference, where the family has kernels."""
    try:
        from designmodel.codegen.compiler import compile_spec, supports
    except ImportError:
        return [("kernels", None, "the kernel compiler is not installed")]
    if not supports(d):
        return [("kernels", None, f"no kernels for the {d.family} family yet")]
    from designmodel.codegen.check import kernel_rows
    return kernel_rows(d, seed=seed, tolerances=KERNEL_TOL)


def check(spec, seed: int = 0) -> list[tuple[str, bool | None, str]]:
    """Rows (what, passed or None if skipped, detail) for a spec."""
    d = derive(spec)
    rows = [("derive", True, f"{d.structure.one_line()}; zoo model: {d.zoo_name or 'none'}")]
    rows += [(f"proof: {p.statement.split(': ', 1)[1]}", p.holds, "sympy") for p in applicable(d)]
    rows += _reference_rows(d, seed)
    rows += _kernel_rows(d, seed)
    return rows
