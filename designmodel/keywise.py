"""Per-key decayed products inside a chunk, without the [C, C, K] decay tensor.

With a per-key decay (bayesian_layer_diag), the chunk's scores and process-noise terms weigh
each key m by the ratio Gamma_tj,m = a_tm / a_jm = exp(b_tm - b_jm) (b the log decay since the
chunk start, t >= j). Formed whole, Gamma is [.., C, C, K]: at (4, 4096, 16, 128) with C = 64
that is 2.1 G numbers per tensor, and the einsums over it run as matrix-vector products. Here
the chunk is cut into blocks of s rows. Between blocks the ratio factors through the first
row rho of the later block, exp(b_t - b_rho) exp(b_rho - b_j) with j < rho <= t, both factors
at most 1 (no overflow, whatever the decay); only the s x s diagonal blocks form the ratio
itself. Each function has its adjoint beside it (the gradients w.r.t. every argument, b
included), written out rather than left to autograd, for the kalman adjoint
(designmodel.chunked_adjoint).

    decayed_scores(X, Y, b)  A_tj = sum_m X_tm Y_jm Gamma_tj,m   (t >= j, else 0)   [.., C, C]
    decayed_sums(b, Y)       Z_tm = sum_{j <= t} Gamma_tj,m Y_jm                    [.., C, K]
"""
from __future__ import annotations

import torch


def block_rows(C: int) -> int:
    """The rows per block: 8 where it divides the chunk (C = 64 gives 8 blocks of 8: about
    sqrt(C), which balances the diagonal blocks' [C, s, K] against the factors' [C / s, C, K]),
    else the largest of 4, 2, 1 that does."""
    return next(s for s in (8, 4, 2, 1) if C % s == 0)


def _factors(b):
    """The blocks' factors: L [.., C, K] = exp(b_t - b_rho(t)) (rho(t) the first row of t's
    block), R [.., NB, C, K] = exp(b_rho_I - b_j) for j < rho_I (else 0), and the diagonal
    blocks' ratios G [.., NB, s, s, K] = exp(b_t - b_j) for t >= j within a block (else 0)."""
    C, K = b.shape[-2:]
    s = block_rows(C)
    nb = C // s
    bb = b.unflatten(-2, (nb, s))                                        # [.., NB, s, K]
    ref = bb[..., :, :1, :]                                              # [.., NB, 1, K] b_rho
    L = (bb - ref).exp().flatten(-3, -2)                                 # [.., C, K]
    j = torch.arange(C, device=b.device)
    before = j[None, :] < (torch.arange(nb, device=b.device) * s)[:, None]   # [NB, C] j < rho_I
    R = (ref - b[..., None, :, :]).masked_fill(~before[..., None], float("-inf")).exp()
    low = torch.ones(s, s, dtype=torch.bool, device=b.device).tril()
    G = (bb[..., :, None, :] - bb[..., None, :, :]).masked_fill(~low[..., None], float("-inf")).exp()
    return L, R, G, nb, s


def _diagonal_blocks(A, nb, s):
    """[.., NB, s, s]: the s x s diagonal blocks of A [.., C, C]."""
    return A.unflatten(-1, (nb, s)).unflatten(-3, (nb, s)).diagonal(dim1=-4, dim2=-2).permute(
        *range(A.dim() - 2), -1, -3, -2)


def _place_diagonal(D, nb, s):
    """[.., C, C] with the blocks D [.., NB, s, s] on its diagonal, zero elsewhere."""
    eye = torch.eye(nb, dtype=D.dtype, device=D.device)
    return (D[..., :, :, None, :] * eye[:, None, :, None]).flatten(-4, -3).flatten(-2, -1)


def decayed_scores(X, Y, b):
    """A [.., C, C] with A_tj = sum_m X_tm Y_jm exp(b_tm - b_jm) for t >= j, else 0.

    X, Y, b [.., C, K]; b non-increasing along the chunk (a log decay since its start)."""
    L, R, G, nb, s = _factors(b)
    Xl = (X * L).unflatten(-2, (nb, s))                                  # [.., NB, s, K]
    A = (Xl @ (Y[..., None, :, :] * R).mT).flatten(-3, -2)               # between blocks
    Xb, Yb = X.unflatten(-2, (nb, s)), Y.unflatten(-2, (nb, s))
    D = ((Xb[..., :, None, :] * G) * Yb[..., None, :, :]).sum(-1)        # [.., NB, s, s]
    return A + _place_diagonal(D, nb, s)


def decayed_scores_adjoint(X, Y, b, dA):
    """(dX, dY, db) of decayed_scores from dA [.., C, C] (its upper triangle is ignored).

    dX_t = sum_j dA_tj Gamma_tj o Y_j, dY_j = sum_t dA_tj Gamma_tj o X_t, and since every term
    carries exp(b_t - b_j), db = X o dX - Y o dY."""
    L, R, G, nb, s = _factors(b)
    Xl = (X * L).unflatten(-2, (nb, s))
    Yr = Y[..., None, :, :] * R                                          # [.., NB, C, K]
    dA_rows = dA.unflatten(-2, (nb, s))                                  # [.., NB, s, C]
    dX = (dA_rows @ Yr).flatten(-3, -2) * L
    dY = ((dA_rows.mT @ Xl) * R).sum(-3)
    dD = _diagonal_blocks(dA, nb, s)[..., None] * G                      # [.., NB, s, s, K]
    Xb, Yb = X.unflatten(-2, (nb, s)), Y.unflatten(-2, (nb, s))
    dX = dX + (dD * Yb[..., None, :, :]).sum(-2).flatten(-3, -2)
    dY = dY + (dD * Xb[..., :, None, :]).sum(-3).flatten(-3, -2)
    return dX, dY, X * dX - Y * dY


def decayed_sums(b, Y):
    """Z [.., C, K] with Z_tm = sum_{j <= t} exp(b_tm - b_jm) Y_jm (b, Y [.., C, K])."""
    L, R, G, nb, s = _factors(b)
    carried = (R * Y[..., None, :, :]).sum(-2)                           # [.., NB, K] at each rho
    Yb = Y.unflatten(-2, (nb, s))
    within = (G * Yb[..., None, :, :]).sum(-2)                           # [.., NB, s, K]
    return (L.unflatten(-2, (nb, s)) * carried[..., None, :] + within).flatten(-3, -2)


def decayed_sums_adjoint(b, Y, Z, dZ):
    """(dY, db) of Z = decayed_sums(b, Y) from dZ: dY_j = sum_{t >= j} exp(b_t - b_j) dZ_t, the
    same sum run backwards along the chunk (with -b reversed, again non-increasing), and
    db = dZ o Z - Y o dY."""
    dY = decayed_sums(-b.flip(-2), dZ.flip(-2)).flip(-2)
    return dY, dZ * Z - Y * dY
