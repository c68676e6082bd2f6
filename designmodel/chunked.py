"""The kalman family's chunked filter in plain PyTorch (MATH.md 6.3): baseline and gradients.

    o, S, P, var = kalman_chunked(q, k, v, log_decay, noise, process_noise, prior, ...)

The same algorithm as the Triton kernels under templates/kalman (an LDL factorization of the
C x C innovation covariance per chunk, the Riccati recursion of P across chunks, the mean
passed like the reset family's), written with torch matrix operations so that torch autograd
differentiates it. It serves two purposes:

- the plain-PyTorch baseline that bench/bench_kalman.py times the kernels against (BENCH.md);
- the kalman family's backward for now: `kalman_backward` recomputes this filter from the
  inputs chunk by chunk under autograd and returns the gradients of the canonical per-token
  quantities (log-decay, observation noise r, process noise sigma, prior variance p0), which
  the generated `backward` chains back to the spec's inputs. It is exact but neither fast nor
  memory-lean (autograd keeps each chunk's intermediates); chunked Triton backward kernels
  for this family are still to come (bench/RESULTS.md).

Canonical quantities, the kernels' own: log_decay None (no decay), [B, T, H] or
[B, T, H, K] (natural log, <= 0); noise r [B, T, H] > 0; process_noise sigma None or
[B, T, H] >= 0 (sigma_t I added to the predicted covariance); prior p0 [H] > 0 (P_0 = p0 I
when no initial covariance is given), or the prior covariance itself [H, K, K] (a diagonal or
full prior; its gradient is then the matrix's, which the caller chains to the prior's inputs).
"""
from __future__ import annotations

import torch

__all__ = ["kalman_chunked", "kalman_backward"]


def _chunk_grams(gc, sc, C):
    """Decay ratios Gamma_tj = a_t / a_j (t >= j, else 0) and the process noise accumulated
    since the chunk start, e_t = sum_{j <= t} Gamma_tj^2 sigma_j.

    gc [B, H, C, 1|K] cumulative log-decay since the chunk start; sc [B, H, C] process noise.
    Returns Gam [B, H, C, C, 1|K] and e [B, H, C, 1|K].
    """
    low = torch.ones(C, C, dtype=torch.bool, device=gc.device).tril()
    diff = gc[:, :, :, None] - gc[:, :, None, :]
    # masked to -inf before exp: ratios above the diagonal would overflow, their gradient NaN
    Gam = diff.masked_fill(~low[..., None], float("-inf")).exp()
    e = ((Gam * Gam) * sc[:, :, None, :, None]).sum(3)
    return Gam, e


def _segment(q, k, v, g, r, sigma, S, P, chunk, prior_timing, output_variance):
    """The filter over one run of tokens; q, k, v, g, r, sigma [B, H, T, *] (q scaled)."""
    B, H, T, K = q.shape
    per_key = g.dim() == 4
    outs, variances = [], []
    for s in range(0, T, chunk):
        e_ = slice(s, min(s + chunk, T))
        C = e_.stop - s
        Q, Kc, Vc, rc, sc = q[:, :, e_], k[:, :, e_], v[:, :, e_], r[:, :, e_], sigma[:, :, e_]
        gc = g[:, :, e_].cumsum(2)
        if not per_key:
            gc = gc[..., None]                                          # [B, H, C, 1]
        Gam, e = _chunk_grams(gc, sc, C)
        a = gc.exp()                                                    # decay since the chunk start
        Kh, Qh = Kc * a, Q * a
        # (K K^T) o C with C_tj = Gamma_tj e_j for t >= j: the process noise between tokens
        lowm = torch.einsum("bhtm,bhjm,bhtjm->bhtj", Kc, Kc * e, Gam)
        KC = lowm + lowm.mT - torch.diag_embed(lowm.diagonal(dim1=-2, dim2=-1))
        KhP = Kh @ P
        S_in = KhP @ Kh.mT + KC + torch.diag_embed(rc)                  # innovation covariance
        # cholesky_ex: no check of the result, hence no host sync per chunk (a failed factor
        # would show as NaN in the outputs)
        Lc = torch.linalg.cholesky_ex(S_in).L
        d = Lc.diagonal(dim1=-2, dim2=-1)
        L, D = Lc / d[..., None, :], d * d                              # S_in = L D L^T
        U = a * KhP + e * Kc                                            # gain directions [B, H, C, K]
        A = torch.einsum("bhtm,bhjm,bhtjm->bhtj", Q, U, Gam)
        AL = torch.linalg.solve_triangular(L, A.mT, upper=False, unitriangular=True).mT
        # a posterior readout sees its own token's innovation (tril), a prior one does not
        Bm = (AL.tril(-1) if prior_timing else AL.tril()) / D[..., None, :]
        E = torch.linalg.solve_triangular(L, Vc - Kh @ S, upper=False, unitriangular=True)
        outs.append(Qh @ S + Bm @ E)
        if output_variance:
            variances.append(((Qh @ P) * Qh).sum(-1) + (Q * Q * e).sum(-1)
                             - (Bm * Bm * D[..., None, :]).sum(-1))
        aC = a[:, :, -1]                                                # [B, H, 1|K]
        Uh = U * (gc[:, :, -1:] - gc).exp()
        Y = torch.linalg.solve_triangular(L, Uh, upper=False, unitriangular=True)
        Z = Y / D[..., None]
        S = aC[..., None] * S + Z.mT @ E
        P = aC[..., :, None] * P * aC[..., None, :] + torch.diag_embed(e[:, :, -1].expand(B, H, K)) - Y.mT @ Z
        P = 0.5 * (P + P.mT)
    o = torch.cat(outs, 2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    var = (torch.cat(variances, 2) if variances else q.new_zeros(B, H, 0)) if output_variance else None
    return o, S, P, var


def kalman_chunked(q, k, v, log_decay, noise, process_noise=None, prior=1.0, scale=None,
                   initial_state=None, cu_seqlens=None, chunk=64, prior_timing=False,
                   output_variance=False):
    """The chunked filter: (o [B, T, H, V], S [N, H, K, V], P [N, H, K, K], var [B, T, H] or None).

    q, k [B, T, H, K], v [B, T, H, V]; the canonical quantities as in the module docstring
    (prior a number, p0 [H], or the prior covariance [H, K, K]); scale default K ** -0.5; initial_state (S0 [N, H, K, V], P0
    [N, H, K, K] or None); cu_seqlens [N + 1] packs N sequences along T (B = 1). Computes in
    float64 for float64 inputs, else float32. prior_timing reads out before each token's
    update (o_t = S_pred^T q_t, variance of the predicted state).
    """
    B, T, H, K = q.shape
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    q, k, v = (x.to(f).transpose(1, 2) for x in (q, k, v))              # [B, H, T, D]
    q = q * scale
    g = (torch.zeros(B, T, H, device=q.device, dtype=f) if log_decay is None else log_decay.to(f))
    g = g.transpose(1, 2)
    r = noise.to(f).transpose(1, 2)
    sigma = torch.zeros_like(r) if process_noise is None else process_noise.to(f).transpose(1, 2)
    # (rows of the batch, span of tokens) filtered together: the whole batch, or each packed sequence
    if cu_seqlens is None:
        runs = [(slice(None), slice(0, T))]
    else:
        bounds = [int(x) for x in cu_seqlens]
        runs = [(slice(n, n + 1), slice(bounds[n], bounds[n + 1])) for n in range(len(bounds) - 1)]
    S0, P0 = initial_state if initial_state is not None else (None, None)
    p0 = prior.to(f) if isinstance(prior, torch.Tensor) else torch.as_tensor(prior, dtype=f, device=q.device)
    eye = torch.eye(K, dtype=f, device=q.device)
    # [H, K, K] the covariance every sequence starts from when no initial covariance is given
    prior_cov = p0 if p0.dim() == 3 else p0.reshape(-1).expand(H)[:, None, None] * eye
    outs, states, covs, variances = [], [], [], []
    for rows, seg in runs:
        b = B if cu_seqlens is None else 1
        S = (torch.zeros(b, H, K, v.shape[-1], device=q.device, dtype=f) if S0 is None
             else S0[rows].to(f))
        P = prior_cov.expand(b, H, K, K) if P0 is None else P0[rows].to(f)
        o, S, P, var = _segment(q[:, :, seg], k[:, :, seg], v[:, :, seg], g[:, :, seg], r[:, :, seg],
                                sigma[:, :, seg], S, P, chunk, prior_timing, output_variance)
        outs.append(o)
        states.append(S)
        covs.append(P)
        variances.append(var)
    o = torch.cat(outs, 2).transpose(1, 2)
    var = torch.cat(variances, 2).transpose(1, 2) if output_variance else None
    return o, torch.cat(states, 0), torch.cat(covs, 0), var


def kalman_backward(q, k, v, log_decay, noise, process_noise, prior, do, dht=None, dvar=None,
                    scale=None, initial_state=None, cu_seqlens=None, prior_timing=False):
    """Gradients of the chunked filter by recomputation under autograd.

    Arguments as `kalman_chunked`, plus the output gradients do [B, T, H, V], dht (dS [N, H, K,
    V], dP [N, H, K, K] or None) and dvar [B, T, H] (or None). Returns a dict with the gradient
    of every tensor argument that was given: q, k, v, log_decay, noise, process_noise, prior
    (when a tensor), initial_state (dS0, dP0 or None), each in its argument's shape and dtype.
    """
    def leaf(x):
        return None if x is None else x.detach().to(torch.float64 if x.dtype == torch.float64
                                                     else torch.float32).requires_grad_()
    tensors = dict(q=q, k=k, v=v, log_decay=log_decay, noise=noise, process_noise=process_noise,
                   prior=prior if isinstance(prior, torch.Tensor) else None)
    leaves = {n: leaf(x) for n, x in tensors.items()}
    S0, P0 = initial_state if initial_state is not None else (None, None)
    lS0, lP0 = leaf(S0), leaf(P0)
    with torch.enable_grad():
        o, S, P, var = kalman_chunked(
            leaves["q"], leaves["k"], leaves["v"], leaves["log_decay"], leaves["noise"],
            leaves["process_noise"], leaves["prior"] if leaves["prior"] is not None else prior,
            scale=scale, initial_state=None if initial_state is None else (lS0, lP0),
            cu_seqlens=cu_seqlens, prior_timing=prior_timing, output_variance=dvar is not None)
        outputs, grads = [o], [do.to(o.dtype)]
        if dht is not None:
            dS, dP = dht if isinstance(dht, (tuple, list)) else (dht, None)
            if dS is not None:
                outputs.append(S)
                grads.append(dS.to(S.dtype))
            if dP is not None:
                outputs.append(P)
                grads.append(dP.to(P.dtype))
        if dvar is not None:
            outputs.append(var)
            grads.append(dvar.to(var.dtype))
        wrt = [x for x in [*leaves.values(), lS0, lP0] if x is not None]
        got = torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
    got = iter(got)
    out = {}
    for name, x in tensors.items():
        if x is not None:
            gx = next(got)
            out[name] = torch.zeros_like(x) if gx is None else gx.to(x.dtype)
    if initial_state is not None:
        dS0 = next(got) if S0 is not None else None
        dP0 = next(got) if P0 is not None else None
        out["initial_state"] = (None if dS0 is None else dS0.to(S0.dtype),
                                None if dP0 is None else dP0.to(P0.dtype))
    return out
