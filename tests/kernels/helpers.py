"""Inputs and the float64 comparison shared by the kernel tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from designmodel.check import reference_on_rounded, relative_error  # noqa: F401 (re-exported)

from .conftest import DEVICE


def input_value(i, B, T, H, K, gen) -> torch.Tensor:
    """A random value of input `i` (an InputPlan or spec Input) inside its domain, float32."""
    shape = {(True, "head"): (B, T, H), (True, "key"): (B, T, H, K),
             (False, "head"): (H,), (False, "key"): (H, K)}[(i.per_token, i.per)]
    x = torch.randn(*shape, generator=gen)
    return {"real": x, "positive": F.softplus(x) + 0.1, "nonnegative": F.softplus(x),
            "unit": torch.sigmoid(x + 1.0), "logdecay": F.logsigmoid(x + 3.0)}[i.domain]


def make_inputs(spec_inputs, B, T, H, K, V, seed=0, unit_keys=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(k, dim=-1) if unit_keys else 0.4 * k
    v = torch.randn(B, T, H, V, generator=gen)
    ins = {i.name: input_value(i, B, T, H, K, gen) for i in spec_inputs}
    return q, k, v, ins




def overflowing_decays(B, T, H, K, seed=5) -> torch.Tensor:
    """Per-key log-decays [B, T, H, K]: half the keys forget within a token (-20 to -40), half
    barely (0 to -0.1), so that a ratio exp2(gc_t - gc_j) taken the wrong way (t < j)
    overflows float32 within a sub-chunk."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([-(20 + 20 * torch.rand(B, T, H, K // 2, generator=gen)),
                      -0.1 * torch.rand(B, T, H, K - K // 2, generator=gen)], -1)


def compare(derivation, run, B, T, H, K, V, dtype=torch.float32, initial_state=True,
            cu_seqlens=None, seed=0, extra_inputs=None):
    """Run `run(q, k, v, inputs, initial_state, cu_seqlens)` on `dtype` inputs and the float64
    reference on the same (rounded) values; return (error of o, error of the final state)."""
    spec = derivation.spec
    q, k, v, ins = make_inputs(spec.inputs, B, T, H, K, V, seed=seed,
                               unit_keys=derivation.structure.unit_keys)
    ins.update(extra_inputs or {})
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    gen = torch.Generator().manual_seed(seed + 1)
    S0 = torch.randn(N, H, K, V, generator=gen) if initial_state else None
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    # per-token gates stay float32 (as fla's ops take them); q, k, v in the tested dtype
    o, state = run(*(x.to(DEVICE) for x in (q, k, v)),
                   {n: x.to(DEVICE) for n, x in ins.items()},
                   None if S0 is None else S0.to(DEVICE),
                   None if cu is None else cu.to(DEVICE))
    ref = reference_on_rounded(derivation, q, k, v, ins, scale=K ** -0.5, initial_state=S0,
                               cu_seqlens=cu)
    assert o.shape == (B, T, H, V) and o.dtype == dtype
    assert state.shape == (N, H, K, V) and state.dtype == torch.float32
    return relative_error(o, ref.o), relative_error(state, ref.state)
