"""`designmodel check SPEC`: derive, prove, and check the numbers, as a pass/fail table."""
from __future__ import annotations

import os

import torch

from designmodel import reference
from designmodel.derive import derive
from designmodel.proofs import applicable
from designmodel.sampling import random_initial, random_inputs

# Float64 references must agree to rounding; a kernel to the tolerance of its input dtype.
REFERENCE_TOL = 1e-10
# fp32 in the interpreter to 1e-4 (the kalman family's bound; write and reset meet 1e-5);
# bf16 inputs to 2e-2 (the kalman family's GPU bound).
KERNEL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def relative_error(x, ref) -> float:
    """max |x - ref| / max |ref|, in float64 on the CPU."""
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def reference_on_rounded(d, q, k, v, inputs, scale=1.0, initial_state=None, cu_seqlens=None):
    """The float64 filter on the values a kernel saw (q, k, v possibly rounded to bf16).

    Rounding moves a unit key off the sphere by up to 2^-9; for a spec that declares unit keys
    (and whose reference checks them) the key is renormalized.
    """
    k_ref = k.double()
    if d.structure.unit_keys:
        k_ref = k_ref / k_ref.norm(dim=-1, keepdim=True)
    return reference.recurrent(d, q.double() * scale, k_ref, v.double(),
                               {n: x.double() for n, x in inputs.items()},
                               initial_state=None if initial_state is None else initial_state.double(),
                               cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())


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
        err = relative_error(rec.o, imp.o)
        if d.structure.variance:
            err = max(err, relative_error(rec.variance, imp.variance))
        what = "reference: recurrent = implicit attention" + (" (initial state)" if initial else "")
        rows.append((what, err < REFERENCE_TOL, f"rel. error {err:.1e} (tol {REFERENCE_TOL:.0e})"))
    return rows


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _kernel_run(d, op, dtype, seed):
    """One run of the compiled op and of the float64 filter on the same (rounded) values."""
    B, T, H, K, V = 1, 100, 2, 32, 16  # T not a multiple of the chunk; K != V
    q, k, v, inputs = random_inputs(d, B, T, H, K, V, seed=seed)
    S0, _ = random_initial(B, H, K, V, seed=seed)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    gates = {n: x.float() for n, x in inputs.items()}  # gates stay float32, as fla takes them
    dev = _device()
    o, state = op(*(x.to(dev) for x in (q, k, v)), **{n: x.to(dev) for n, x in gates.items()},
                  scale=1.0, initial_state=S0.float().to(dev), output_final_state=True)[:2]
    state = state[0] if isinstance(state, tuple) else state  # the kalman family adds P
    ref = reference_on_rounded(d, q, k, v, gates, initial_state=S0.float())
    return relative_error(o, ref.o), relative_error(state, ref.state)


def _kernel_rows(d, seed):
    """The compiled kernels against the float64 reference, fp32 and bf16 inputs."""
    if not torch.cuda.is_available():  # before triton is first imported: run in its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from designmodel.codegen.compiler import compile as compile_op
    from designmodel.codegen.plan import PlanError
    try:
        op = compile_op(d.spec)
    except PlanError as err:
        return [("kernels", None, f"not compiled: {err}")]
    where = "GPU" if _device() == "cuda" else "Triton interpreter"
    rows = []
    for dtype, tol in KERNEL_TOL.items():
        err_o, err_s = _kernel_run(d, op, dtype, seed)
        name = str(dtype).replace("torch.", "")
        rows.append((f"kernels ({where}, {name}) = float64 filter", max(err_o, err_s) < tol,
                     f"rel. error o {err_o:.1e}, state {err_s:.1e} (tol {tol:.0e})"))
    return rows


def _gradient_error(d, op, seed):
    """The largest relative error, over q, k, v and the spec's inputs, of the compiled op's
    gradients (fp32 inputs) against autograd through the float64 filter, for a loss that reads
    the output and the final state (and, for the kalman family, the final covariance)."""
    B, T, H, K, V = 1, 70, 2, 16, 8   # T not a multiple of the chunk; K != V
    q, k, v, inputs = random_inputs(d, B, T, H, K, V, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    wo = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    ws = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    wp = torch.randn(B, H, K, K, generator=gen, dtype=torch.float64)
    dev = _device()
    ours = {n: x.float().to(dev).requires_grad_() for n, x in [("q", q), ("k", k), ("v", v), *inputs.items()]}
    o, state = op(ours["q"], ours["k"], ours["v"], **{n: ours[n] for n in inputs}, scale=1.0,
                  output_final_state=True)[:2]
    S, P = state if isinstance(state, tuple) else (state, None)
    loss = (o * wo.to(o)).sum() + (S * ws.to(S)).sum() + (0 if P is None else (P * wp.to(P)).sum())
    got = torch.autograd.grad(loss, list(ours.values()))
    leaves = {n: x.detach().double().cpu().requires_grad_() for n, x in ours.items()}
    ref = reference.recurrent(d, leaves["q"], leaves["k"], leaves["v"], {n: leaves[n] for n in inputs})
    rloss = (ref.o * wo).sum() + (ref.state * ws).sum()
    if P is not None:
        rloss = rloss + (ref.covariance * wp).sum()
    want = torch.autograd.grad(rloss, list(leaves.values()), allow_unused=True)
    unit = leaves["k"].detach()
    cov = d.spec.prior.covariance
    errors = []
    for name, g, w in zip(leaves, got, want):
        g = g.double().cpu()
        w = torch.zeros_like(g) if w is None else w
        if name == "k" and d.structure.unit_keys:
            # keys on the sphere: only the tangential part of a key's gradient is defined
            g, w = (x - (x * unit).sum(-1, keepdim=True) * unit for x in (g, w))
        if cov.kind == "full" and name == cov.value:
            g, w = (0.5 * (x + x.mT) for x in (g, w))   # a covariance: its symmetric part
        errors.append(relative_error(g, w))
    return max(errors)


def _gradient_rows(d, seed):
    """The compiled op's gradients against the float64 filter's, fp32 inputs."""
    from designmodel.codegen.compiler import compile as compile_op
    from designmodel.codegen.plan import PlanError
    try:
        op = compile_op(d.spec)
    except PlanError:
        return []   # _kernel_rows reports it
    where = "GPU" if _device() == "cuda" else "Triton interpreter"
    tol = KERNEL_TOL[torch.float32]
    err = _gradient_error(d, op, seed)
    return [(f"gradients ({where}, float32) = float64 filter", err < tol,
             f"rel. error {err:.1e} (tol {tol:.0e})")]


def check(spec, seed: int = 0) -> list[tuple[str, bool | None, str]]:
    """Rows (what, passed or None if skipped, detail) for a spec."""
    d = derive(spec)
    rows = [("derive", True, f"{d.structure.one_line()}; zoo model: {d.zoo_name or 'none'}")]
    rows += [(f"proof: {p.statement.split(': ', 1)[1]}", p.holds, "sympy") for p in applicable(d)]
    rows += _reference_rows(d, seed)
    rows += _kernel_rows(d, seed)
    rows += _gradient_rows(d, seed)
    return rows
