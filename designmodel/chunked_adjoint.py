"""The kalman family's backward as an explicit reverse sweep over chunks (docs/KALMAN_BACKWARD.md).

    grads = kalman_adjoint(q, k, v, log_decay, noise, process_noise, prior, do, dht, dvar, ...)

`designmodel.chunked.kalman_backward` differentiates the chunked filter (MATH.md 6.3) with
torch autograd, which keeps every chunk's intermediates. This module computes the same
gradients the way a chunked backward kernel would:

- forward (`kalman_checkpoints`): run the filter once and keep only the chunk-start mean
  S_c [K, V] and covariance P_c [K, K] of every chunk (O(T / C K^2) memory);
- backward: from the last chunk to the first, carry dS (the gradient w.r.t. the chunk-end
  mean) and dP (w.r.t. the chunk-end covariance, symmetric). Each chunk recomputes its
  quantities from (S_c, P_c) and its inputs (`_chunk_forward`) and applies the chunk's
  adjoint (`_chunk_adjoint`), written out with matrix products, triangular solves and the
  adjoint of the Cholesky factor of the innovation covariance. No autograd anywhere.

The filter is written with the Cholesky factor Lc of the innovation covariance (S_in =
Lc Lc^T; the kernels' LDL form has L = Lc diag(d)^-1, D = d^2, and gives the same numbers):
with the whitened innovations Et = Lc^-1 (V - K^ S) and gains Yt = Lc^-1 U^, the LDL form's
B E is W Et for W = mask(A Lc^-T), Z^T E is Yt^T Et and Y^T Z is Yt^T Yt.

`kalman_adjoint_chunks` is the schedule the generated modules' backward runs: every chunk at
once, from the checkpoints the forward kernels keep, with the two sequential sweeps as the
modules' Triton kernels (docs/KALMAN_BACKWARD.md, section 6); it also takes packed sequences.

Scope: a scalar decay (rls, bayesian_layer; log_decay [B, T, H] or None) or a per-key one
(bayesian_layer_diag; log_decay [B, T, H, K]: a and e carry the key dimension last, and the
products over Gamma run by blocks, designmodel.keywise),
process noise sigma_t I or none, prior a number, p0 [H] or the prior covariance [H, K, K].
Not done: per-key (diagonal) process noise. Packed sequences (cu_seqlens): only
kalman_adjoint_chunks.
"""
from __future__ import annotations

import os
import warnings

import torch

from designmodel import keywise

__all__ = ["kalman_checkpoints", "kalman_adjoint", "kalman_adjoint_two_sweeps", "kalman_adjoint_chunks"]


# --- small linear-algebra pieces ----------------------------------------------------------------

def _inverse_lower(L):
    """L^-1 for lower-triangular L [.., C, C] (lower-triangular too). The chunk's solves are
    products with it: one triangular solve per chunk, then matrix products, which batch far
    better on a GPU than a triangular solve per right-hand side (as the forward kernels do)."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def _sym(X):
    """The symmetric part (X + X^T) / 2: the gradient w.r.t. a symmetric matrix."""
    return 0.5 * (X + X.mT)


def _cholesky_adjoint(Lc, Li, dLc):
    """dS_in from dLc for S_in = Lc Lc^T (symmetric; Li = Lc^-1): sym(Lc^-T Phi(Lc^T dLc) Lc^-1),
    where Phi keeps the lower triangle and halves the diagonal (Murray 2016, "Differentiation
    of the Cholesky decomposition")."""
    Phi = (Lc.mT @ dLc).tril()
    Phi = Phi - 0.5 * torch.diag_embed(Phi.diagonal(dim1=-2, dim2=-1))
    return _sym(Li.mT @ Phi @ Li)


# --- one chunk ------------------------------------------------------------------------------------

def _chunk_forward(Q, Kc, Vc, g, r, sigma, S, P, strict):
    """One chunk of the filter from its start state (S [B, H, K, V], P [B, H, K, K]).

    Q (scaled), Kc [B, H, C, K], Vc [B, H, C, V], g [B, H, C] (or [B, H, C, K]: a per-key
    decay), r, sigma [B, H, C]; strict: prior readout (a token's readout does not see its own
    innovation). Any leading dimensions may stand for [B, H] (kalman_adjoint_chunks passes
    [B, H, NC], every chunk at once). Returns (o, var, S', P', cache) with cache the chunk's
    quantities the adjoint reads.
    """
    c = _chunk_quantities(Q, Kc, Vc, g, r, sigma, S, P, strict)
    o = c["Qh"] @ S + c["W"] @ c["Et"]
    var = (((c["Qh"] @ P) * c["Qh"]).sum(-1) + _fold(_scale(c["e"], Q * Q), Q[..., 0])
           - (c["W"] * c["W"]).sum(-1))
    Yt = c["Yt"]
    S_next = _scale_state(c["aC"], S) + Yt.mT @ c["Et"]
    P_next = _sym(_congruence(c["aC"], P) + _diagonal(c["eC"], P) - Yt.mT @ Yt)
    return o, var, S_next, P_next, c


# --- a scalar or a per-key decay -------------------------------------------------------------------
# With a scalar decay a_t, Gamma_tj and e_t are numbers per token ([.., C], [.., C, C]); with a
# per-key decay a and e carry the key dimension last ([.., C, K]; Gamma is not formed, see
# designmodel.keywise). These helpers apply either to the [.., C, K] and [.., K, *] matrices.

def _scale(x, X):
    """x o X for X [.., C, K]: a per-token x [.., C] scales X's rows, a per-key x is X's shape."""
    return x[..., None] * X if x.dim() == X.dim() - 1 else x * X


def _fold(X, like):
    """The adjoint of `_scale` w.r.t. x: X [.., C, K] summed over the keys when x (like) is per
    token, as it is when x is per key."""
    return X.sum(-1) if like.dim() == X.dim() - 1 else X


def _scale_state(aC, X):
    """diag(a_C) X for X [.., K, *]: a_C a number per chunk [..] or per key [.., K]."""
    return aC[..., None, None] * X if aC.dim() == X.dim() - 2 else aC[..., :, None] * X


def _congruence(aC, X):
    """diag(a_C) X diag(a_C) for X [.., K, K]: how P' and its adjoint take the decay."""
    return _scale_state(aC, _scale_state(aC, X).mT).mT


def _diagonal(eC, like):
    """diag(e_C) [.., K, K] from a number per chunk or per key."""
    K = like.shape[-1]
    if eC.dim() == like.dim() - 2:
        return eC[..., None, None] * torch.eye(K, dtype=like.dtype, device=like.device)
    return torch.diag_embed(eC)


def _decays(g, sigma, per_key):
    """a (decay since the chunk start) and its log b, Gamma_tj = a_t / a_j (t >= j, else 0)
    and e (process noise since the chunk start), per token or per token and key. With a
    per-key decay Gamma is None: the [C, C, K] ratios are never formed (designmodel.keywise
    works from b by blocks)."""
    C = g.shape[-2] if per_key else g.shape[-1]
    low = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    b = g.cumsum(-2 if per_key else -1)                                  # log decay since chunk start
    if per_key:
        return b.exp(), b, None, keywise.decayed_sums(2 * b, sigma[..., None].expand_as(b)), low
    # Gamma masked to -inf before exp (no overflow above the diagonal)
    Gam = (b[..., :, None] - b[..., None, :]).masked_fill(~low, float("-inf")).exp()
    e = (Gam * Gam * sigma[..., None, :]).sum(-1)                        # [.., C]
    return b.exp(), b, Gam, e, low


def _last(x, per_key):
    """The chunk's last token of a per-token [.., C] or per-key [.., C, K] quantity."""
    return x[..., -1, :] if per_key else x[..., -1]


def _noise_scores(Kc, Gam, b, e, per_key):
    """The process noise's share of the innovation covariance, sum_m k_tm k_jm Gamma_tj,m e_j,m
    for t >= j, made symmetric; and what its adjoint reads."""
    if per_key:
        Ml = keywise.decayed_scores(Kc, Kc * e, b)
        return Ml + Ml.mT - torch.diag_embed(Ml.diagonal(dim1=-2, dim2=-1)), {}
    M = Kc @ Kc.mT                                                       # [C, C]
    Cm = Gam * e[..., None, :]                                           # C_tj = Gamma_tj e_j, t >= j
    Cs = Cm + Cm.mT - torch.diag_embed(Cm.diagonal(dim1=-2, dim2=-1))    # symmetric
    return M * Cs, dict(M=M, Cs=Cs)


def _scores(Q, U, Gam, b, per_key):
    """A_tj = q_t^T diag(Gamma_tj) u_j (lower); and what its adjoint reads."""
    if per_key:
        return keywise.decayed_scores(Q, U, b), {}
    QU = Q @ U.mT
    return Gam * QU, dict(QU=QU)


def _chunk_quantities(Q, Kc, Vc, g, r, sigma, S, P, strict):
    """What `_chunk_forward` computes before its outputs and the adjoint reads (the cache)."""
    per_key = g.dim() == Q.dim()
    a, b, Gam, e, low = _decays(g, sigma, per_key)
    Kh, Qh = _scale(a, Kc), _scale(a, Q)
    noise, noise_cache = _noise_scores(Kc, Gam, b, e, per_key)
    KhP = Kh @ P                                                         # [C, K]
    S_in = KhP @ Kh.mT + noise + torch.diag_embed(r)                     # innovation covariance
    Lc = torch.linalg.cholesky_ex(S_in).L
    Li = _inverse_lower(Lc)
    U = _scale(a, KhP) + _scale(e, Kc)                                   # gain directions [C, K]
    A, score_cache = _scores(Q, U, Gam, b, per_key)                      # [C, C], lower
    R = A @ Li.mT                                                        # A Lc^-T
    W = R.tril(-1) if strict else R.tril()
    Et = Li @ (Vc - Kh @ S)                                              # whitened innovations [C, V]
    gC = (b[..., -1:, :] - b).exp() if per_key else Gam[..., -1, :]     # a_C / a_i
    Yt = Li @ _scale(gC, U)                                              # whitened gains [C, K]
    return dict(a=a, b=b, Gam=Gam, e=e, Kh=Kh, Qh=Qh, KhP=KhP, Lc=Lc, Li=Li, U=U, R=R, W=W, Et=Et,
                gC=gC, Yt=Yt, aC=_last(a, per_key), eC=_last(e, per_key), low=low,
                per_key=per_key, **noise_cache, **score_cache)


def _chunk_adjoint(Q, Kc, sigma, S, P, c, dO, dvar, dS1, dP1, strict, carry_mean=True,
                   carry_covariance=True):
    """The adjoint of `_chunk_forward`: from dO [C, V], dvar [C] and the gradients w.r.t. the
    chunk-end state (dS1 [K, V], dP1 [K, K] symmetric), the gradients w.r.t. the chunk's
    inputs (dQ, dK, dV, dg, dr, dsigma) and its start state (dS, dP symmetric).

    A cotangent given as None is zero, and the terms it feeds are skipped (the adjoint is linear
    in the cotangents: kalman_adjoint_chunks calls it at (dO, dvar, dS1) and at dP1 alone);
    dV and dS are then None when nothing reaches them. carry_mean, carry_covariance: False
    skips the start state's dS or dP (returned as None), when the sweeps give them. Steps in
    the reverse order of the forward; each line is the adjoint of one forward line.
    """
    pk = c["per_key"]
    a, Gam, e, Lc, Li, aC = c["a"], c["Gam"], c["e"], c["Lc"], c["Li"], c["aC"]
    Kh, Qh, KhP, U, W, Et, Yt = c["Kh"], c["Qh"], c["KhP"], c["U"], c["W"], c["Et"], c["Yt"]
    dQ, dQh, dW, dEt, de = 0, 0, None, None, torch.zeros_like(e)
    dS, dP, dYt, daC, deC = None, 0, 0, 0, 0
    # chunk-end state: S' = diag(a_C) S + Yt^T Et, P' = diag(a_C) P diag(a_C) + diag(e_C) - Yt^T Yt
    if dS1 is not None:
        dS = _scale_state(aC, dS1) if carry_mean else None
        dYt = Et @ dS1.mT
        dEt = Yt @ dS1
        daC = (dS1 * S).sum(-1) if pk else (dS1 * S).sum((-2, -1))
    if dP1 is not None:
        dP = _congruence(aC, dP1) if carry_covariance else 0
        dYt = dYt - 2 * Yt @ dP1
        dPP = dP1 * P
        daC = daC + (2 * (dPP * aC[..., None, :]).sum(-1) if pk else 2 * aC * dPP.sum((-2, -1)))
        deC = dP1.diagonal(dim1=-2, dim2=-1)
        deC = deC if pk else deC.sum(-1)
    # readout: O = Q^ S + W Et
    if dO is not None:
        dQh = dO @ S.mT
        dS = _add(dS, Qh.mT @ dO) if carry_mean else None
        dW = dO @ Et.mT
        dEt = _add(dEt, W.mT @ dO)
    if dvar is not None:
        # var = rowsum((Q^ P) o Q^) + sum_m e_m q_m^2 - rowsum(W o W)
        dQh = dQh + 2 * dvar[..., None] * (Qh @ P)
        dP = dP + Qh.mT @ (dvar[..., None] * Qh) if carry_covariance else 0
        de = de + _fold(dvar[..., None] * Q * Q, e)
        dQ = dQ + 2 * dvar[..., None] * _scale(e, Q)
        dW = _add(dW, -2 * dvar[..., None] * W)
    # whitened gains Yt = Lc^-1 (gC o U) and innovations Et = Lc^-1 (V - K^ S)
    if isinstance(dYt, torch.Tensor):
        dUh = Li.mT @ dYt
        dLc = -(dUh @ Yt.mT)
    else:                                                                # no state cotangent
        dUh, dLc = torch.zeros_like(U), torch.zeros_like(Lc)
    dV, dKh = None, 0
    if dEt is not None:
        dX = Li.mT @ dEt
        dLc = dLc - dX @ Et.mT
        dV = dX
        dKh = -(dX @ S.mT)
        dS = _add(dS, -(Kh.mT @ dX)) if carry_mean else None
    # scores R = A Lc^-T (R^T = Lc^-1 A^T), W = mask(R)
    dA = None
    if dW is not None:
        dR = dW.tril(-1) if strict else dW.tril()
        dAt = Li.mT @ dR.mT                                              # dA^T = Lc^-T dR^T
        dA = dAt.mT
        dLc = dLc - dAt @ c["R"]
    dLc = dLc.tril()
    # gC o U
    dU = _scale(c["gC"], dUh)
    dgC = _fold(dUh * U, c["gC"])
    # A_tj = q_t^T diag(Gamma_tj) u_j; with a per-key decay, what reaches Gamma goes straight
    # to the log decay b (db), as designmodel.keywise gives it
    dGam = None if pk else torch.zeros_like(Gam)
    db = torch.zeros_like(c["b"]) if pk else None
    if dA is not None:
        if pk:
            dQA, dUA, dbA = keywise.decayed_scores_adjoint(Q, U, c["b"], dA)
            dQ, dU, db = dQ + dQA, dU + dUA, db + dbA
        else:
            dQU = dA * Gam
            dGam = dA * c["QU"]
            dQ = dQ + dQU @ U
            dU = dU + dQU.mT @ Q
    # U = a o (K^ P) + e o K
    dKhP = _scale(a, dU)
    da = _fold(dU * KhP, a)
    de = de + _fold(dU * Kc, e)
    dK = _scale(e, dU)
    # innovation covariance S_in = K^ P K^^T + noise scores + diag(r), S_in = Lc Lc^T
    dSin = _cholesky_adjoint(Lc, Li, dLc)
    dr = dSin.diagonal(dim1=-2, dim2=-1)
    dKhP = dKhP + dSin @ Kh
    dKh = dKh + dSin @ KhP
    # the noise scores' lower part, each off-diagonal entry counted twice (symmetric)
    w = 2 * dSin.tril() - torch.diag_embed(dSin.diagonal(dim1=-2, dim2=-1))
    if pk:
        dKt, dKe, dbN = keywise.decayed_scores_adjoint(Kc, Kc * e, c["b"], w)
        dK = dK + dKt + e * dKe
        de = de + Kc * dKe
        db = db + dbN
    else:
        dK = dK + 2 * (dSin * c["Cs"]) @ Kc
        dCm = w * c["M"]
        dGam = dGam + dCm * e[..., None, :]
        de = de + (dCm * Gam).sum(-2)
    # K^ P
    dKh = dKh + dKhP @ P
    dP = _sym(dP + Kh.mT @ dKhP) if carry_covariance else None
    # decayed keys and queries K^ = a o K, Q^ = a o Q
    dK = dK + _scale(a, dKh)
    da = da + _fold(dKh * Kc, a)
    if dO is not None or dvar is not None:
        dQ = dQ + _scale(a, dQh)
        da = da + _fold(dQh * Q, a)
    # chunk-end decay a_C, noise e_C, and ratios gC = Gamma[C-1, :]
    if pk:
        da[..., -1, :] += daC
        de[..., -1, :] += deC
        # gC_i = exp(b_C - b_i)
        dG = dgC * c["gC"]
        db[..., -1, :] += dG.sum(-2)
        db = db - dG
        # e_t = sum_j Gamma_tj^2 sigma_j (per key): decayed sums of sigma over 2 b
        sig = sigma[..., None].expand_as(e)
        dsig, dbE = keywise.decayed_sums_adjoint(2 * c["b"], sig, e, de)
        dsigma = dsig.sum(-1)
        # a = exp(b), then back to g (b = cumsum g)
        db = db + 2 * dbE + da * a
        dg = db.flip(-2).cumsum(-2).flip(-2)
    else:
        da[..., -1] += daC
        de[..., -1] += deC
        dGam[..., -1, :] += dgC
        # e_t = sum_j Gamma_tj^2 sigma_j
        dGam = dGam + 2 * de[..., :, None] * Gam * sigma[..., None, :]
        dsigma = (de[..., :, None] * Gam * Gam).sum(-2)
        # a = exp(b), Gamma_tj = exp(b_t - b_j): back to b, then to g (b = cumsum g)
        dG = (dGam * Gam).tril()
        db = da * a + dG.sum(-1) - dG.sum(-2)
        dg = db.flip(-1).cumsum(-1).flip(-1)
    dQ = dQ if isinstance(dQ, torch.Tensor) else torch.zeros_like(Q)
    return dict(q=dQ, k=dK, v=dV, g=dg, r=dr, sigma=dsigma), dS, dP


def _add(x, y):
    """x + y where x may be None (zero)."""
    return y if x is None else x + y


# --- the sweep ------------------------------------------------------------------------------------

def _check_shape(name, x, shape):
    """ValueError naming x unless it is a tensor of the given shape."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape):
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be {list(shape)}, got {got}")


def _check(q, k, v, log_decay, noise, process_noise, initial_state, chunk, grads=None, N=None):
    """One ValueError naming the first argument of a wrong shape (domains are not checked);
    grads: the backward's (do, dvar, dht), or None for the forward; N the number of sequences
    (states are [N, H, *]; B when None)."""
    do, dvar, dht = grads if grads is not None else (None, None, None)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got {getattr(q, 'shape', type(q).__name__)}")
    B, T, H, K = q.shape
    _check_shape("k", k, (B, T, H, K))
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        raise ValueError(f"v must be [B, T, H, V], got {getattr(v, 'shape', type(v).__name__)}")
    V = v.shape[-1]
    _check_shape("v", v, (B, T, H, V))
    if isinstance(log_decay, torch.Tensor) and log_decay.dim() == 4:
        _check_shape("log_decay (per key)", log_decay, (B, T, H, K))
        log_decay = None
    for name, x in (("log_decay", log_decay), ("noise", noise), ("process_noise", process_noise),
                    ("dvar", dvar)):
        if x is not None or name == "noise":
            _check_shape(name, x, (B, T, H))
    if grads is not None:
        _check_shape("do", do, (B, T, H, V))
    for name, pair in (("initial_state", initial_state), ("dht", dht)):
        if pair is None:
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name} must be a pair (S [B, H, K, V], P [B, H, K, K]), either None")
        n = B if N is None else N
        for part, x, shape in (("S", pair[0], (n, H, K, V)), ("P", pair[1], (n, H, K, K))):
            if x is not None:
                _check_shape(f"{name} ({part})", x, shape)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")


def _contiguous(x, dtype):
    """x in dtype and contiguous, in one copy (`.to(dtype)` keeps a view's strides, and a
    `.contiguous()` after it would copy again)."""
    return x.to(dtype, memory_format=torch.contiguous_format)


def _scaled(x, s):
    """s x, a new tensor (x may be an argument itself), or x where s is 1."""
    return x if s == 1.0 else x * s


def _prepare(q, k, v, log_decay, noise, process_noise, prior, scale, initial_state, rows=None):
    """The inputs in the layout [B, H, T, *] in the compute dtype, and (S0, P0). rows: how q, k
    and v are copied, (x [B, T, H, D], scale) -> scale * x in the compute dtype (the chunked
    backward's chunk layout), or None for [B, H, T, D] like the others."""
    B, T, H, K = q.shape
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else float(scale)
    # one copy each into the chunk layout and the compute dtype (later steps read them whole)
    rows = rows or (lambda x, s: _scaled(_contiguous(x.transpose(1, 2), f), s))
    Q, Kc, Vc = rows(q, scale), rows(k, 1.0), rows(v, 1.0)
    z = torch.zeros(B, H, T, dtype=f, device=q.device)
    g, r, sigma = (z if x is None else _contiguous(x.transpose(1, 2), f)
                   for x in (log_decay, noise, process_noise))
    S0, P0 = initial_state if initial_state is not None else (None, None)
    p0 = prior.to(f) if isinstance(prior, torch.Tensor) else torch.as_tensor(prior, dtype=f, device=q.device)
    eye = torch.eye(K, dtype=f, device=q.device)
    prior_cov = p0 if p0.dim() == 3 else p0.reshape(-1).expand(H)[:, None, None] * eye
    S = torch.zeros(B, H, K, v.shape[-1], dtype=f, device=q.device) if S0 is None else S0.to(f)
    P = prior_cov.expand(B, H, K, K) if P0 is None else P0.to(f)
    return dict(q=Q, k=Kc, v=Vc, g=g, r=r, sigma=sigma), S, P, scale, p0


def _chunks(T, chunk):
    """The token slices of the chunks."""
    return [slice(s, min(s + chunk, T)) for s in range(0, T, chunk)]


def kalman_checkpoints(q, k, v, log_decay, noise, process_noise=None, prior=1.0, scale=None,
                       initial_state=None, chunk=64, prior_timing=False):
    """The forward pass of the sweep: (S_c [NC + 1, B, H, K, V], P_c [NC + 1, B, H, K, K]),
    the mean and covariance at every chunk start, the last entry the final state.

    Arguments as `kalman_adjoint`; NC = ceil(T / chunk). Only these states are kept.
    """
    _check(q, k, v, log_decay, noise, process_noise, initial_state, chunk)
    x, S, P, _, _ = _prepare(q, k, v, log_decay, noise, process_noise, prior, scale, initial_state)
    states, covs = [S], [P]
    for e_ in _chunks(q.shape[1], chunk):
        _, _, S, P, _ = _chunk_forward(*(x[n][:, :, e_] for n in "qkvg"), x["r"][:, :, e_],
                                       x["sigma"][:, :, e_], S, P, prior_timing)
        states.append(S)
        covs.append(P)
    return torch.stack(states), torch.stack(covs)


def _sweep_inputs(q, k, v, log_decay, noise, process_noise, prior, do, dht, dvar, scale,
                  initial_state, chunk, prior_timing):
    """What both sweeps start from, after one check of the arguments: (T, the compute dtype, the
    inputs in the chunk layout, scale, the prior, the chunk-start means and covariances, dO and
    dvar in the chunk layout, (dS, dP) at the end or Nones)."""
    _check(q, k, v, log_decay, noise, process_noise, initial_state, chunk, (do, dvar, dht))
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    x, _, _, scale, p0 = _prepare(q, k, v, log_decay, noise, process_noise, prior, scale, initial_state)
    states, covs = kalman_checkpoints(q, k, v, log_decay, noise, process_noise, prior, scale,
                                      initial_state, chunk, prior_timing)
    dO = do.to(f).transpose(1, 2)
    dV_ = None if dvar is None else dvar.to(f).transpose(1, 2)
    return (q.shape[1], f, x, scale, p0, states, covs, dO, dV_,
            dht if dht is not None else (None, None))


def kalman_adjoint(q, k, v, log_decay, noise, process_noise, prior, do, dht=None, dvar=None,
                   scale=None, initial_state=None, chunk=64, prior_timing=False):
    """Gradients of the chunked Kalman filter by an explicit reverse sweep over chunks.

    Arguments as `designmodel.chunked.kalman_backward` (no cu_seqlens): q, k [B, T, H, K],
    v [B, T, H, V], log_decay [B, T, H] or None, noise [B, T, H], process_noise [B, T, H] or
    None, prior (number, p0 [H] or covariance [H, K, K]), do [B, T, H, V], dht (dS [B, H, K,
    V], dP [B, H, K, K], either None) or None, dvar [B, T, H] or None, initial_state (S0, P0,
    either None) or None, chunk the chunk length, prior_timing True for a readout before each
    token's update (the prior readout). Computes in float64 for float64 q, else float32. Returns a dict like kalman_backward's: q, k,
    v, noise, and log_decay, process_noise, prior when tensors, initial_state (dS0, dP0) when
    given; dP0 is symmetric (the gradient w.r.t. a symmetric covariance).
    """
    T, f, x, scale, p0, states, covs, dO, dV_, (dS_end, dP_end) = _sweep_inputs(
        q, k, v, log_decay, noise, process_noise, prior, do, dht, dvar, scale, initial_state, chunk,
        prior_timing)
    # the carried adjoints: gradients w.r.t. the mean and covariance at the current chunk's end
    dS = torch.zeros_like(states[0]) if dS_end is None else dS_end.to(f).clone()
    dP = torch.zeros_like(covs[0]) if dP_end is None else _sym(dP_end.to(f))
    grads = {n: torch.zeros_like(x[n]) for n in ("q", "k", "v", "g", "r", "sigma")}
    chunks = _chunks(T, chunk)
    for i in reversed(range(len(chunks))):
        e_ = chunks[i]
        inp = {n: x[n][:, :, e_] for n in x}
        S, P = states[i], covs[i]
        *_, cache = _chunk_forward(inp["q"], inp["k"], inp["v"], inp["g"], inp["r"], inp["sigma"],
                                   S, P, prior_timing)
        local, dS, dP = _chunk_adjoint(inp["q"], inp["k"], inp["sigma"], S, P, cache, dO[:, :, e_],
                                       None if dV_ is None else dV_[:, :, e_], dS, dP, prior_timing)
        for n, gx in local.items():
            grads[n][:, :, e_] = gx
    return _collect(grads, dS, dP, q, k, v, log_decay, noise, process_noise, prior, p0,
                    initial_state, scale)


def _transition(c):
    """The chunk's mean transition F = diag(a_C) - Yt^T Wk [K, K] (Wk = Lc^-1 K^, whitened keys)
    and its readout map Q^ - W Wk [C, K]: S' = F S + Yt^T Lc^-1 V, O = (Q^ - W Wk) S + W Lc^-1 V."""
    Wk = c["Li"] @ c["Kh"]
    YW = c["Yt"].mT @ Wk
    return _diagonal(c["aC"], YW) - YW, c["Qh"] - c["W"] @ Wk


def kalman_adjoint_two_sweeps(q, k, v, log_decay, noise, process_noise, prior, do, dht=None,
                              dvar=None, scale=None, initial_state=None, chunk=64, prior_timing=False):
    """`kalman_adjoint` scheduled as a kernel split would run it (docs/KALMAN_BACKWARD.md, section 5).

    The chunk adjoint is linear in its cotangents, and the carries have closed forms:
    dS = F^T dS' + (Q^ - W Wk)^T dO, and dP = F^T dP' F + Src with Src the chunk adjoint's dP at
    dP' = 0. Hence: (1) checkpoints; (2) per chunk, in parallel, the value-independent matrices
    (F, the readout map); (3) the dS sweep, sequential, a linear recursion like the reset
    family's; (4) per chunk, in parallel, the adjoint at (dO, dvar, dS', dP' = 0): dq, dv and
    parts of the other gradients, and Src; (5) the dP sweep, sequential, dP = F^T dP' F + Src;
    (6) per chunk, in parallel, the adjoint at dP' alone (dk, dg, dr, dsigma parts). Same
    arguments and result as `kalman_adjoint`. Steps 4 and 6 call the chunk adjoint with the other
    cotangents None, so that it computes only the terms they reach.
    """
    T, f, x, scale, p0, states, covs, dO, dV_, (dS_end, dP_end) = _sweep_inputs(
        q, k, v, log_decay, noise, process_noise, prior, do, dht, dvar, scale, initial_state, chunk,
        prior_timing)
    chunks = _chunks(T, chunk)
    inputs = [{n: x[n][:, :, e_] for n in x} for e_ in chunks]
    # (2) parallel over chunks: the chunk's quantities from its checkpoint
    caches = [_chunk_forward(i["q"], i["k"], i["v"], i["g"], i["r"], i["sigma"], states[c], covs[c],
                             prior_timing)[-1] for c, i in enumerate(inputs)]
    maps = [_transition(c) for c in caches]
    # (3) sequential: dS at every chunk end (dS_ends[c] is w.r.t. the state after chunk c)
    dS_ends = [None] * len(chunks)
    dS = torch.zeros_like(states[0]) if dS_end is None else dS_end.to(f).clone()
    for c in reversed(range(len(chunks))):
        dS_ends[c] = dS
        Fc, Rc = maps[c]
        dS = Fc.mT @ dS + Rc.mT @ dO[:, :, chunks[c]]
    dS0 = dS
    # (4) parallel: the adjoint at dP' = 0
    grads = {n: torch.zeros_like(x[n]) for n in ("q", "k", "v", "g", "r", "sigma")}
    sources = []
    for c, i in enumerate(inputs):
        local, _, src = _chunk_adjoint(i["q"], i["k"], i["sigma"], states[c], covs[c], caches[c],
                                       dO[:, :, chunks[c]], None if dV_ is None else dV_[:, :, chunks[c]],
                                       dS_ends[c], None, prior_timing)
        sources.append(src)
        for n, gx in local.items():
            grads[n][:, :, chunks[c]] = gx
    # (5) sequential: dP at every chunk end
    dP_ends = [None] * len(chunks)
    dP = torch.zeros_like(covs[0]) if dP_end is None else _sym(dP_end.to(f))
    for c in reversed(range(len(chunks))):
        dP_ends[c] = dP
        Fc = maps[c][0]
        dP = Fc.mT @ dP @ Fc + sources[c]
    # (6) parallel: the adjoint at dP' alone
    for c, i in enumerate(inputs):
        local, _, _ = _chunk_adjoint(i["q"], i["k"], i["sigma"], states[c], covs[c], caches[c],
                                     None, None, None, dP_ends[c], prior_timing)
        for n in ("k", "g", "r", "sigma"):
            grads[n][:, :, chunks[c]] += local[n]
    return _collect(grads, dS0, dP, q, k, v, log_decay, noise, process_noise, prior, p0,
                    initial_state, scale)


# --- every chunk at once ---------------------------------------------------------------------------

# what a padding token holds: no key, value, query, decay or process noise, unit noise; it
# changes nothing (its innovation covariance row is r = 1 alone, its gain is zero)
_PAD = dict(q=0.0, k=0.0, v=0.0, g=0.0, r=1.0, sigma=0.0)


def _in_chunks(x, chunk, fill):
    """[B, H, T, *] (or [B, H, T]) -> [B, H, NC, chunk, *], the last chunk padded with fill."""
    tdim = 2
    T = x.shape[tdim]
    NC = -(-T // chunk)
    if NC * chunk != T:
        pad = x.new_full((*x.shape[:tdim], NC * chunk - T, *x.shape[tdim + 1:]), fill)
        x = torch.cat([x, pad], tdim)
    return x.reshape(*x.shape[:tdim], NC, chunk, *x.shape[tdim + 1:])


def _from_chunks(x, T):
    """The inverse of `_in_chunks`: [B, H, NC, chunk, *] -> [B, H, T, *]."""
    return x.flatten(2, 3)[:, :, :T]


def kalman_adjoint_chunks(q, k, v, log_decay, noise, process_noise, prior, do, dht=None, dvar=None,
                          scale=None, initial_state=None, chunk=64, prior_timing=False,
                          checkpoints=None, cu_seqlens=None, precision="ieee", sweeps=None, steps=None,
                          compiled=None):
    """`kalman_adjoint_two_sweeps` with every chunk at once: the backward a GPU runs.

    The parallel steps (2, 4, 6 of docs/KALMAN_BACKWARD.md section 5) take all chunks as one
    batch ([B, H, NC] leading dimensions, the last chunk padded with tokens that change
    nothing); only the two linear sweeps (dS = F^T dS' + (Q^ - W Wk)^T dO and dP = F^T dP' F +
    Src) loop over chunks. Arguments and result as `kalman_adjoint`, plus

    checkpoints: (S_c [NS, H, K, V], P_c [NS, H, K, K]), the mean and covariance at every chunk
        start (packed sequences: at least NS rows) as the generated forward keeps them (`forward(..., save_for_backward=True)`:
        chunk i of sequence n at n * NC + i, or at chunk_starts(cu_seqlens)[n] + i for packed
        sequences), or None to recompute them here (`kalman_checkpoints`);
    cu_seqlens: [N + 1] packed sequence boundaries (B = 1) or None; each sequence is swept
        on its own, from its own initial state and final-state gradients;
    precision: the input precision of the backward kernels' float32 dots: "ieee", "tf32x3"
        (three TF32 passes, near float32; the generated backward's choice for 16-bit inputs)
        or "tf32" (one pass, for well-conditioned filters only); PyTorch's own products always
        run in float32: one-pass TF32 made the gradients infinite for bf16 inputs with no decay
        and r = 1e-4 (bench/RESULTS.md, session 12). Or a dict: a precision per step in
        ADJOINT_PRECISION_STEPS ("quantities", "sweeps", "chunk_adjoint") and optionally
        "inputs", the precision of the dots with the keys or dO as loaded on one side (also
        the 16-bit chunk-start means) in every step: by default "tf32x2" (only the other
        operand split: tf32x3's products in two passes, see _step_precisions) in the
        quantities and the sweeps where k and do are 16-bit and the step runs "tf32x3", else
        the step's;
    sweeps: (mean sweep, covariance sweep), the two sequential steps as kernels (a generated
        module's ADJOINT_SWEEPS), or None to loop over the chunks in PyTorch;
    steps: parallel steps as kernels (a generated module's ADJOINT_STEPS: "quantities", step 2,
        "mean", step 4, and "covariance", step 6, with the signatures of its
        `chunk_quantities`, `mean_chunk_adjoint` and `covariance_chunk_adjoint`), used for a
        scalar decay in float32 (step 2 where steps 4 and 6 both run as kernels), or None
        for PyTorch;
    compiled: run the parallel steps through torch.compile (inductor fuses their elementwise
        passes: 33 -> 23 ms fwd+bwd at (4, 4096, 16, 128) on an H100, about 14 s to compile
        once per shape); None: when q is on a CUDA device, unless the environment sets
        DESIGNMODEL_COMPILE_ADJOINT=0. Where compiling fails, the steps run eagerly (one warning).
    """
    B, T, H, K = q.shape if isinstance(q, torch.Tensor) and q.dim() == 4 else (None,) * 4
    # one device-to-host copy of the boundaries (the sweep loops over the sequences)
    bounds = [0, T] if cu_seqlens is None else [int(b) for b in torch.as_tensor(cu_seqlens).tolist()]
    _check(q, k, v, log_decay, noise, process_noise, initial_state, chunk, (do, dvar, dht),
           None if cu_seqlens is None else len(bounds) - 1)
    precisions = _step_precisions(precision, k, do)
    V = v.shape[-1]
    if cu_seqlens is not None and (B != 1 or bounds[0] != 0 or bounds[-1] != T
                                   or any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:]))):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T} with B = 1, got {bounds} (B = {B})")
    N = len(bounds) - 1
    seqs = [(n, bounds[n], bounds[n + 1]) for n in range(N)] if cu_seqlens is not None else [(None, 0, T)]
    counts = [-(-(e - b) // chunk) for _, b, e in seqs]
    first = [sum(counts[:i]) for i in range(len(seqs))]
    if checkpoints is not None:
        # packed sequences: the forward allocates a bound on the number of chunks (no sync)
        NS = sum(counts) * (B if cu_seqlens is None else 1)
        for part, x, D in (("S_c", checkpoints[0], V), ("P_c", checkpoints[1], K)):
            rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 4 else NS
            _check_shape(f"checkpoints ({part})", x, (max(NS, rows) if cu_seqlens is not None else NS, H, K, D))
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    dS_end, dP_end = dht if dht is not None else (None, None)
    S0, P0 = initial_state if initial_state is not None else (None, None)
    # q, k, v and do into the chunk layout: for the generated backward (kernel steps, float32)
    # by one-pass copies (designmodel.layout), which also take the gradients back; else PyTorch's
    kernel_rows = bool(steps) and f == torch.float32
    if kernel_rows:
        from designmodel.layout import to_chunk_layout
        chunked = lambda x, s: to_chunk_layout(x, chunk, f, s)
    else:
        chunked = lambda x, s: _in_chunks(_scaled(_contiguous(x.transpose(1, 2), f), s), chunk, 0.0)
    parts = []
    for (n, b, e), NC, c0 in zip(seqs, counts, first):
        one = (lambda x: x) if n is None else (lambda x: None if x is None else x[n:n + 1])
        tok = (lambda x: x) if n is None else (lambda x: None if x is None else x[:, b:e])
        if checkpoints is None:
            states, covs = kalman_checkpoints(
                tok(q), tok(k), tok(v), tok(log_decay), tok(noise), tok(process_noise), prior, scale,
                None if initial_state is None else (one(S0), one(P0)), chunk, prior_timing)
            states, covs = states[:NC].movedim(0, 2), covs[:NC].movedim(0, 2)
        else:
            # [NS, H, K, *] -> [B, H, NC, K, *] (B = 1 for one packed sequence): a view, which
            # the per-chunk kernels read in place (_sweep_chunks copies it for PyTorch's steps)
            pick = slice(c0, c0 + NC) if n is not None else slice(None)
            states, covs = (x[pick].reshape(-1, NC, *x.shape[1:]).transpose(1, 2) for x in checkpoints)
        x, _, _, scale_, p0 = _prepare(tok(q), tok(k), tok(v), tok(log_decay), tok(noise),
                                       tok(process_noise), prior, scale, None, chunked)
        grads, dS0, dP0 = _sweep_chunks(
            {m: x[m] if m in ("q", "k", "v") else _in_chunks(x[m], chunk, _PAD[m]) for m in x}, states, covs,
            chunked(tok(do), 1.0),
            None if dvar is None else _in_chunks(_contiguous(tok(dvar).transpose(1, 2), f), chunk, 0.0),
            one(dS_end), one(dP_end), prior_timing, sweeps, precisions,
            _use_compiled(q) if compiled is None else compiled, steps)
        parts.append(({m: _from_chunks(g_, e - b) for m, g_ in grads.items()}, dS0, dP0))
    if len(parts) == 1:                                                  # no copy for one sequence
        grads, dS0, dP0 = parts[0]
    else:
        grads = {m: torch.cat([p[0][m] for p in parts], 2) for m in parts[0][0]}
        dS0, dP0 = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    return _collect(grads, dS0, dP0, q, k, v, log_decay, noise, process_noise, prior, p0,
                    initial_state, scale_, kernel_rows)


ADJOINT_PRECISION_STEPS = ("quantities", "sweeps", "chunk_adjoint")
_PRECISION_KEYS = ADJOINT_PRECISION_STEPS + ("inputs",)
# the steps whose input dots split by default. The chunk adjoint's do not: on an H100 (session
# 14, bench/kalman_hard_cases.py --grads, bf16, no decay, |k| = 3, r = 1e-4) its split put dk
# 1.2e-1 to 2.0e-1 off float64 over three seeds where tf32x3 gave 1.9e-2 to 4.2e-2, as far off
# as float32 ("ieee") dots there; the steps before it split with no change in any case
_SPLIT_BY_DEFAULT = ("quantities", "sweeps")


def _step_precisions(precision, k, do):
    """{step: (precision, input precision)} for each of ADJOINT_PRECISION_STEPS, from
    kalman_adjoint_chunks' `precision` (a string for every step, or a dict). bf16 and fp16
    values are exact in tf32, so where k and do are 16-bit a product with the keys or dO as
    loaded needs only its other operand split ("tf32x2"): the input precision of a "tf32x3"
    step in _SPLIT_BY_DEFAULT, unless the dict's "inputs" names one for every step."""
    given = precision if isinstance(precision, dict) else dict.fromkeys(ADJOINT_PRECISION_STEPS, precision)
    unknown = sorted(set(given) - set(_PRECISION_KEYS))
    missing = [n for n in ADJOINT_PRECISION_STEPS if given.get(n) is None]
    if unknown or missing:
        raise ValueError(f"precision: a string or a dict with {', '.join(ADJOINT_PRECISION_STEPS)} "
                         f"(and optionally 'inputs'); unknown {unknown}, missing {missing}")
    exact = all(x.dtype in (torch.bfloat16, torch.float16) for x in (k, do))
    split = lambda n, p: "tf32x2" if exact and p == "tf32x3" and n in _SPLIT_BY_DEFAULT else p
    return {n: (given[n], given.get("inputs") or split(n, given[n])) for n in ADJOINT_PRECISION_STEPS}


def _mean_sweep(Yt, Wk, Qh, W, dO, aC, dS_end, precision="ieee", input_precision=None):
    """Step 3 chunk by chunk: dS = F^T dS' + (Q^ - W Wk)^T dO with F = a_C I - Yt^T Wk, i.e.
    dS = a_C dS' + Q^^T dO - Wk^T (Yt dS' + W^T dO). Yt, Wk, Qh [B, H, NC, C, K], W [B, H, NC,
    C, C], dO [B, H, NC, C, V], aC [B, H, NC], dS_end [B, H, K, V] or None. Returns (dS at
    every chunk end [B, H, NC, K, V], dS at the start). (precision, input_precision: unused,
    in float32.)"""
    B, H, NC, C, K = Yt.shape
    dS = Yt.new_zeros(B, H, K, dO.shape[-1]) if dS_end is None else dS_end
    dS_ends = Yt.new_empty(B, H, NC, K, dO.shape[-1])
    for i in reversed(range(NC)):
        dS_ends[:, :, i] = dS
        X = Yt[:, :, i] @ dS + W[:, :, i].mT @ dO[:, :, i]
        dS = _scale_state(aC[:, :, i], dS) + Qh[:, :, i].mT @ dO[:, :, i] - Wk[:, :, i].mT @ X
    return dS_ends, dS


def _covariance_sweep(Yt, Wk, sources, aC, dP_end, precision="ieee", input_precision=None):
    """Step 5 chunk by chunk: dP = F^T dP' F + Src with F = a_C I - Yt^T Wk, i.e. (X = Yt dP')
    dP = a_C^2 dP' - a_C (X^T Wk + Wk^T X) + Wk^T (X Yt^T) Wk + Src. Yt, Wk [B, H, NC, C, K],
    sources [B, H, NC, K, K], aC [B, H, NC], dP_end [B, H, K, K] (symmetric) or None. Returns
    (dP at every chunk end [B, H, NC, K, K], dP at the start)."""
    B, H, NC, C, K = Yt.shape
    dP = Yt.new_zeros(B, H, K, K) if dP_end is None else dP_end
    dP_ends = Yt.new_empty(B, H, NC, K, K)
    for i in reversed(range(NC)):
        dP_ends[:, :, i] = dP
        a, Y, Wk_ = aC[:, :, i], Yt[:, :, i], Wk[:, :, i]
        X = Y @ dP
        aM = _scale_state(a, X.mT @ Wk_)                                 # diag(a_C) dP Yt^T Wk
        dP = _congruence(a, dP) - (aM + aM.mT) + Wk_.mT @ (X @ Y.mT) @ Wk_ + sources[:, :, i]
    return dP_ends, dP


_COMPILED = []
_COMPILE_FAILED = []


def _use_compiled(q):
    """The default of kalman_adjoint_chunks' `compiled`: on CUDA, unless switched off by the
    environment or after compiling failed once in this process."""
    return (q.is_cuda and os.environ.get("DESIGNMODEL_COMPILE_ADJOINT", "1") != "0"
            and not _COMPILE_FAILED)


def _compiled_steps():
    """(_chunk_quantities, _chunk_adjoint) through torch.compile, made once per process (each
    compiles on its first call per shape; dynamic shapes after a second one). A step whose
    compilation fails (no working inductor, say) warns once and runs eagerly from then on."""
    if not _COMPILED:
        _COMPILED.extend(_or_eager(torch.compile(fn), fn) for fn in (_chunk_quantities, _chunk_adjoint))
    return tuple(_COMPILED)


def _or_eager(compiled, eager):
    """compiled, falling back to eager (for good, with one warning) where it raises; an error
    of the inputs themselves is raised again by the eager call."""
    def run(*args, **kwargs):
        if not _COMPILE_FAILED:
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 (inductor's failures have no common type)
                _COMPILE_FAILED.append(err)
                warnings.warn(f"designmodel: the kalman backward's per-chunk steps run eagerly: "
                              f"torch.compile failed ({type(err).__name__}: {str(err)[:200]})")
        return eager(*args, **kwargs)
    return run


def _sweep_chunks(x, states, covs, dO, dvar, dS_end, dP_end, strict, sweeps=None, precision=None,
                  compiled=False, steps=None):
    """Steps 2 to 6 on every chunk at once: x the inputs [B, H, NC, C, *], states and covs the
    chunk-start means and covariances [B, H, NC, K, *], dO [B, H, NC, C, V], dvar [B, H, NC, C]
    or None, dS_end and dP_end the final state's gradients or None; sweeps: (mean sweep,
    covariance sweep) with the signatures of `_mean_sweep` and `_covariance_sweep` (the
    generated modules' Triton kernels), or None for those; compiled: the parallel steps through
    torch.compile; steps: parallel steps as kernels (see kalman_adjoint_chunks); precision:
    {step: (precision, input precision)} (_step_precisions), None for "ieee" throughout.
    Returns (the gradients [B, H, NC, C, *] of q (scaled), k, v, g, r, sigma; dS0; dP0)."""
    precision = precision or dict.fromkeys(ADJOINT_PRECISION_STEPS, ("ieee", "ieee"))
    at = lambda step: dict(zip(("precision", "input_precision"), precision[step]))
    quantities, adjoint = _compiled_steps() if compiled else (_chunk_quantities, _chunk_adjoint)
    per_key = x["g"].dim() == x["q"].dim()
    f = x["q"].dtype
    kernels = steps if steps and not per_key and f == torch.float32 else {}
    all_kernels = {"quantities", "mean", "covariance"} <= set(kernels)
    if not all_kernels:
        # some step runs in PyTorch: the chunk starts in its dtype, laid out by chunk
        states, covs = _contiguous(states, f), _contiguous(covs, f)
    # (2) the chunks' quantities: as a kernel where steps 4 and 6 are kernels too (the
    # PyTorch adjoint reads more of them)
    if all_kernels:
        c = kernels["quantities"](x, states, covs, strict, **at("quantities"))
    else:
        c = quantities(x["q"], x["k"], x["v"], x["g"], x["r"], x["sigma"], states, covs, strict)
    mean_sweep, covariance_sweep = sweeps or (_mean_sweep, _covariance_sweep)
    Wk = c["Wk"] if "Wk" in c else c["Li"] @ c["Kh"]                    # whitened keys [C, K]
    # (3) dS at every chunk end, sequential
    dS_ends, dS = mean_sweep(c["Yt"], Wk, c["Qh"], c["W"], dO, c["aC"],
                             None if dS_end is None else dS_end.to(f), **at("sweeps"))
    # (4) the adjoint at (dO, dvar, dS'): most gradients, and each chunk's dP source
    carry = None
    if "mean" in kernels and "covariance" in kernels:
        # step 6 finishes step 4's key gradient (linear in what step 4 carries over): one pass
        # of its last phase for both steps
        grads, sources, carry = kernels["mean"](x, c, states, covs, dO, dS_ends, strict, dvar=dvar,
                                                defer_keys=True, **at("chunk_adjoint"))
    elif "mean" in kernels:
        grads, sources = kernels["mean"](x, c, states, covs, dO, dS_ends, strict, dvar=dvar, **at("chunk_adjoint"))
    else:
        grads, _, sources = adjoint(x["q"], x["k"], x["sigma"], states, covs, c, dO, dvar,
                                    dS_ends, None, strict, carry_mean=False)
    # what steps 5 and 6 no longer read goes before they allocate theirs (at (4, 4096, 16, 128):
    # dS' 268 MB and dO 134 MB in float32, then the sources 268 MB)
    del dS_ends, dO
    # (5) dP at every chunk end, sequential
    dP_ends, dP = covariance_sweep(c["Yt"], Wk, sources, c["aC"],
                                   None if dP_end is None else _sym(dP_end.to(f)), **at("sweeps"))
    del sources
    # (6) the adjoint at dP' alone: the rest of the key, decay and noise gradients
    if "covariance" in kernels:
        more = kernels["covariance"](x, c, states, covs, dP_ends, strict, carry=carry, **at("chunk_adjoint"))
    else:
        more, _, _ = adjoint(x["q"], x["k"], x["sigma"], states, covs, c, None, None, None,
                             dP_ends, strict, carry_mean=False, carry_covariance=False)
    for m in ("k", "g", "r", "sigma"):
        grads[m] = grads[m] + more[m] if m in grads else more[m]
    return grads, dS, dP


def _collect(grads, dS0, dP0, q, k, v, log_decay, noise, process_noise, prior, p0, initial_state, scale,
             rows=False):
    """The gradients in the arguments' layouts and dtypes (the dict of kalman_backward); rows:
    those of q, k and v by designmodel.layout's one-pass copy."""
    def back(gx, like, s=1.0):
        if rows and gx.dim() == 4:
            from designmodel.layout import to_argument_layout
            return to_argument_layout(gx, like.dtype, s)
        return _contiguous(_scaled(gx, s).transpose(1, 2), like.dtype)
    out = dict(q=back(grads["q"], q, scale), k=back(grads["k"], k), v=back(grads["v"], v))
    if log_decay is not None:
        out["log_decay"] = back(grads["g"], log_decay)
    out["noise"] = back(grads["r"], noise)
    if process_noise is not None:
        out["process_noise"] = back(grads["sigma"], process_noise)
    S0, P0 = initial_state if initial_state is not None else (None, None)
    if isinstance(prior, torch.Tensor):
        if P0 is not None:
            out["prior"] = torch.zeros_like(prior)                      # the prior is not read
        elif p0.dim() == 3:
            out["prior"] = dP0.sum(0).to(prior.dtype)                   # [H, K, K], batch summed
        else:
            dp = dP0.diagonal(dim1=-2, dim2=-1).sum((0, -1))            # trace, [H]
            out["prior"] = (dp if prior.numel() > 1 else dp.sum()).reshape(prior.shape).to(prior.dtype)
    if initial_state is not None:
        out["initial_state"] = (None if S0 is None else dS0.to(S0.dtype),
                                None if P0 is None else dP0.to(P0.dtype))
    return out
