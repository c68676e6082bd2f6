"""One-pass copies between the arguments' layout [B, T, H, D] and the chunk layout of the kalman
backward's kernels [B, H, NC, C, D] (float32, the last chunk padded).

PyTorch does this with a strided copy per tensor (its generic elementwise kernel, which does
not vectorize a transposing copy with a dtype change), plus a pass for the query's scale and
one more for padding: about 1 ms of the Bayesian Layer's backward at (4, 4096, 16, 128) on an
H100 (bench/RESULTS.md, session 16). These kernels read rows of D contiguous numbers on both
sides, and fold the scale, the dtype change and the padding into the one copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# tokens per program ([_ROWS, D] tiles) and warps. Any of 16 to 64 rows at 2 to 8 warps copies
# a bf16 [4, 4096, 16, 128] in 0.073 ms on an H100 (about 2.7 TB/s; PyTorch's copy and scale:
# 0.317 ms, bench/RESULTS.md session 16)
_ROWS = 64
_WARPS = 4


@triton.jit
def chunk_layout_kernel(X, Y, T, TP, H, s_b, s_t, s_h, s_d, scale, fill,
                        D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    # X [B, T, H, D] (strides s_b, s_t, s_h, s_d) -> Y [B, H, TP, D], rows past T = fill
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)                                   # [BT]
    o_d = tl.arange(0, BD)                                              # [BD]
    m_d = o_d[None, :] < D
    m_x = (o_t[:, None] < T) & m_d                                      # [BT, BD]
    b_x = tl.load(X + i_b * s_b + i_h * s_h + o_t[:, None].to(tl.int64) * s_t + o_d[None, :] * s_d,
                  mask=m_x, other=0.0)
    b_y = tl.where(m_x, b_x.to(Y.dtype.element_ty) * scale, fill)
    tl.store(Y + (i_bh * TP + o_t[:, None]) * D + o_d[None, :], b_y, mask=(o_t[:, None] < TP) & m_d)


@triton.jit
def _to_bf16(x):
    """float32 -> bfloat16 rounded to nearest, ties to even, as PyTorch and the GPU's cast round
    (Triton's interpreter truncates): add half an ulp of the 16 bits kept, less one unless the
    last kept bit is odd; NaNs by the plain cast."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))


@triton.jit
def argument_layout_kernel(Y, X, T, H, s_b, s_h, s_t, s_d, scale,
                           D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    # Y [B, H, T', D] (strides s_b, s_h, s_t, s_d; T' >= T) -> X [B, T, H, D] contiguous
    # (float32 or bfloat16)
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)                                   # [BT]
    o_d = tl.arange(0, BD)                                              # [BD]
    m = (o_t[:, None] < T) & (o_d[None, :] < D)                         # [BT, BD]
    b_y = tl.load(Y + i_b * s_b + i_h * s_h + o_t[:, None].to(tl.int64) * s_t + o_d[None, :] * s_d,
                  mask=m, other=0.0)
    b_x = b_y.to(tl.float32) * scale
    if X.dtype.element_ty == tl.bfloat16:
        b_x = _to_bf16(b_x)
    tl.store(X + ((i_b * T + o_t[:, None]) * H + i_h) * D + o_d[None, :], b_x, mask=m)


def _check_rows(name, x):
    """ValueError unless x is a 4-D tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor, got {getattr(x, 'shape', type(x).__name__)}")


def to_chunk_layout(x, chunk, dtype=torch.float32, scale=1.0, fill=0.0):
    """x [B, T, H, D] -> [B, H, NC, chunk, D] in dtype, contiguous, times scale, NC = ceil(T /
    chunk); the rows of the last chunk past T are fill. x may have any strides (a slice of
    tokens, a transposed view)."""
    _check_rows("x", x)
    B, T, H, D = x.shape
    NC = -(-T // chunk)
    y = torch.empty(B, H, NC, chunk, D, dtype=dtype, device=x.device)
    if y.numel():
        grid = (triton.cdiv(NC * chunk, _ROWS), B * H)
        chunk_layout_kernel[grid](x, y, T, NC * chunk, H, *x.stride(), float(scale), float(fill),
                                  D=D, BT=_ROWS, BD=triton.next_power_of_2(D), num_warps=_WARPS)
    return y


def to_argument_layout(y, dtype, scale=1.0):
    """y [B, H, T, D], any strides (a view of the chunk layout is fine) -> [B, T, H, D] in
    dtype, contiguous, times scale: the inverse of `to_chunk_layout` after its padding is
    sliced off."""
    _check_rows("y", y)
    B, H, T, D = y.shape
    # the kernel writes float32 or bfloat16 (other dtypes: float32, then PyTorch's cast)
    out = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    x = torch.empty(B, T, H, D, dtype=out, device=y.device)
    if x.numel():
        grid = (triton.cdiv(T, _ROWS), B * H)
        argument_layout_kernel[grid](y, x, T, H, *y.stride(), float(scale),
                                     D=D, BT=_ROWS, BD=triton.next_power_of_2(D), num_warps=_WARPS)
    return x if out == dtype else x.to(dtype)
