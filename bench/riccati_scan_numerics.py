"""Would the Bayesian Layer's covariance recursion survive being spread over chunks? (CPU)

    python3 bench/riccati_scan_numerics.py [--K 32] [--T 8192] [--group 8]

The forward's Riccati kernel walks the chunks one after another, one program per head: 64
programs on a GPU of 132 SMs, latency-bound (bench/RESULTS.md, sessions 9 to 11). Each chunk's
step is a map of the covariance at its start, P -> P', that conditions on the chunk's values
(MATH.md 6.3):

    P' = a_C^2 P + e_C I - (a_C K^ P + G)^T (K^ P K^^T + M)^-1 (a_C K^ P + G)

with M = (K K^T) o C + diag(r) and G_i = (a_C / a_i) e_i k_i, neither of which depends on P.
It is the covariance of x_end given y for y = K^ x + n, x_end = a_C x + w, Var n = M,
Var w = e_C I, Cov(w, n) = G^T. Such maps compose (the elements of the parallel Kalman filter
of Sarkka and Garcia-Fernandez, covariance part):

    A = a_C I - G^T M^-1 K^,   Cm = e_C I - G^T M^-1 G,   J = K^^T M^-1 K^
    (A, Cm, J)_i then j:  A_j W A_i,  A_j W Cm_i A_j^T + Cm_j,  A_i^T W^T J_j A_i + J_i,
    W = (I + Cm_i J_j)^-1

and applying an element to a covariance P gives A (I + P J)^-1 P A^T + Cm. Every chunk's
element needs only its own tokens (all chunks at once), and a two-level scan then takes
`group` dependent steps inside each group of chunks (all groups at once), NT / group across
the groups, and one step to apply each prefix to its group's starting covariance: 8 + 8 + 1
instead of 64 at (4, 4096, 16, 128).

This script measures, before any kernel is written, how far that scan's float32 covariances
at the chunk ends fall from the float64 sequential recursion, beside the float32 sequential
recursion's own error (the kernels' algorithm), on the corners of issue 4's stress grid:
alpha in {0.01, 0.5, 1}, r in {1e-4, 1, 1e2}, sigma in {0, 1e-2, 1}, unit keys and not.
It prints the worst relative error (Frobenius, over chunks and heads, where the float64
covariance is within float32's range) of each, inf for any non-finite value.
"""
from __future__ import annotations

import argparse
import itertools
import math

import torch

from designmodel.chunked import _chunk_grams


def chunk_terms(k, g, r, sigma, C):
    """Per chunk: K^ [.., C, K], M [.., C, C], G [.., C, K], a_C [..], e_C [..] (scalar decay).

    k [H, T, K]; g, r, sigma [H, T]; T a multiple of C. Leading dims of the results: [H, NT].
    """
    H, T, K = k.shape
    NT = T // C
    kc, gc = k.reshape(H, NT, C, K), g.reshape(H, NT, C).cumsum(-1)
    rc, sc = r.reshape(H, NT, C), sigma.reshape(H, NT, C)
    # the decay ratios and accumulated process noise of the PyTorch chunked filter, [H, NT, C, C] and [H, NT, C]
    Gam, e = (x[..., 0] for x in _chunk_grams(gc[..., None], sc, C))
    a = gc.exp()
    Kh = kc * a[..., None]
    low_m = (kc @ kc.mT) * Gam * e[..., None, :]                                         # t >= j: Gamma_tj e_j k_t.k_j
    M = low_m + low_m.mT - torch.diag_embed(low_m.diagonal(dim1=-2, dim2=-1)) + torch.diag_embed(rc)
    aC, eC = a[..., -1], e[..., -1]
    # a_C / a_i as one exp of a difference (each factor alone underflows at alpha = 0.01)
    G = kc * (e * (gc[..., -1:] - gc).exp())[..., None]
    return Kh, M, G, aC, eC


def riccati_step(P, Kh, M, G, aC, eC):
    """The sequential recursion's chunk step (the kernels' algorithm, by a Cholesky solve)."""
    K = P.shape[-1]
    U = aC[..., None, None] * (Kh @ P) + G
    S_in = Kh @ P @ Kh.mT + M
    L = torch.linalg.cholesky(S_in)
    Y = torch.linalg.solve_triangular(L, U, upper=False)
    P = (aC ** 2)[..., None, None] * P + eC[..., None, None] * torch.eye(K, dtype=P.dtype) - Y.mT @ Y
    return 0.5 * (P + P.mT)


def elements(Kh, M, G, aC, eC):
    """Each chunk's (A, Cm, J), from its own tokens only."""
    K = Kh.shape[-1]
    I = torch.eye(K, dtype=Kh.dtype)
    L = torch.linalg.cholesky(M)
    Wk = torch.linalg.solve_triangular(L, Kh, upper=False)        # L^-1 K^
    Wg = torch.linalg.solve_triangular(L, G, upper=False)         # L^-1 G
    A = aC[..., None, None] * I - Wg.mT @ Wk
    Cm = eC[..., None, None] * I - Wg.mT @ Wg
    J = Wk.mT @ Wk
    return A, 0.5 * (Cm + Cm.mT), 0.5 * (J + J.mT)


def solve_no_pivoting(Amat, B):
    """A^-1 B by Gauss-Jordan elimination without row exchanges, the kind of solve a Triton
    program can run on registers. The matrices solved here, I + Cm J and I + P J with Cm, P, J
    symmetric positive semi-definite, have eigenvalues >= 1 (Cm J is similar to the
    semi-definite J^1/2 Cm J^1/2), so no pivot is zero; how much float32 loses without row
    exchanges is what --solve nopivot measures."""
    X = torch.cat([Amat, B], -1).clone()
    n = Amat.shape[-1]
    for i in range(n):
        row = X[..., i:i + 1, :] / X[..., i:i + 1, i:i + 1]
        X = X - X[..., :, i:i + 1] * row
        X[..., i:i + 1, :] = row
    return X[..., n:]


SOLVE = torch.linalg.solve


def combine(first, then):
    """The element of `first` followed by `then`."""
    Ai, Ci, Ji = first
    Aj, Cj, Jj = then
    I = torch.eye(Ai.shape[-1], dtype=Ai.dtype)
    W = SOLVE(I + Ci @ Jj, torch.cat([Ai, Ci @ Aj.mT], -1))   # (I + Ci Jj)^-1 [Ai, Ci Aj^T]
    K = Ai.shape[-1]
    A = Aj @ W[..., :K]
    C = Aj @ W[..., K:] + Cj
    V = SOLVE(I + Jj @ Ci, Jj @ Ai)                            # (I + Jj Ci)^-1 Jj Ai
    J = Ai.mT @ V + Ji
    return A, 0.5 * (C + C.mT), 0.5 * (J + J.mT)


def apply(element, P):
    """The covariance at an element's end from the covariance P at its start."""
    A, Cm, J = element
    I = torch.eye(P.shape[-1], dtype=P.dtype)
    C = A @ SOLVE(I + P @ J, P) @ A.mT + Cm
    return 0.5 * (C + C.mT)


def scan_covariances(P0, terms, group):
    """The covariances at every chunk end by the two-level scan: [H, NT, K, K]."""
    A, Cm, J = elements(*terms)
    H, NT, K, _ = A.shape
    ng = NT // group
    A, Cm, J = (x.reshape(H, ng, group, K, K) for x in (A, Cm, J))
    # inside each group, all groups at once: the prefixes by a left fold (group - 1 steps)
    pre = [(A[:, :, 0], Cm[:, :, 0], J[:, :, 0])]
    for c in range(1, group):
        pre.append(combine(pre[-1], (A[:, :, c], Cm[:, :, c], J[:, :, c])))
    # across the groups: each group's start from the previous group's whole prefix (ng steps)
    starts, P = [], P0
    for n in range(ng):
        starts.append(P)
        P = apply(tuple(x[:, n] for x in pre[-1]), P)
    start = torch.stack(starts, 1)                                           # [H, ng, K, K]
    # every prefix applied to its group's start, all at once (one step)
    out = torch.stack([apply(p, start) for p in pre], 2)                    # [H, ng, group, K, K]
    return out.reshape(H, NT, K, K)


def sequential_covariances(P0, terms):
    """The covariances at every chunk end by the chunk-after-chunk recursion: [H, NT, K, K]."""
    Kh = terms[0]
    outs, P = [], P0
    for c in range(Kh.shape[1]):
        P = riccati_step(P, *(x[:, c] for x in terms))
        outs.append(P)
    return torch.stack(outs, 1)


def relative_error(X, ref):
    """Worst Frobenius relative error over heads and chunks (inf where X is not finite), over
    the chunk ends whose covariance is within float32's range (with no process noise and a
    decay < 1, P shrinks as alpha^2t and leaves it: both float32 methods then hold zeros)."""
    if not torch.isfinite(X).all():
        return math.inf
    den = ref.flatten(-2).norm(dim=-1)
    keep = den > torch.finfo(torch.float32).tiny * ref.shape[-1]
    if not keep.any():
        return 0.0
    num = (X.double() - ref).flatten(-2).norm(dim=-1)
    return float((num[keep] / den[keep]).max())


def case(H, T, K, C, alpha, r, sigma, unit, group, seed=0):
    """(sequential float32 error, scan float32 error, scan float64 error) for one grid point."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(H, T, K, generator=gen, dtype=torch.float64)
    k = k / k.norm(dim=-1, keepdim=True) if unit else k * K ** -0.5 * (0.5 + torch.rand(H, T, 1, generator=gen, dtype=torch.float64))
    g = torch.full((H, T), math.log(alpha), dtype=torch.float64)
    rr = torch.full((H, T), r, dtype=torch.float64)
    ss = torch.full((H, T), sigma, dtype=torch.float64)
    P0 = torch.eye(K, dtype=torch.float64).expand(H, K, K)
    t64 = chunk_terms(k, g, rr, ss, C)
    ref = sequential_covariances(P0, t64)
    t32 = chunk_terms(k.float(), g.float(), rr.float(), ss.float(), C)
    seq32 = sequential_covariances(P0.float(), t32)
    errs = [relative_error(seq32, ref)]
    for terms, P in ((t32, P0.float()), (t64, P0)):
        try:
            errs.append(relative_error(scan_covariances(P, terms, group), ref))
        except torch.linalg.LinAlgError:
            errs.append(math.inf)
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--solve", choices=("lu", "nopivot"), default="lu",
                    help="the scan's K x K solves: LAPACK's pivoted LU, or Gauss-Jordan without row exchanges")
    args = ap.parse_args(argv)
    global SOLVE
    SOLVE = solve_no_pivoting if args.solve == "nopivot" else torch.linalg.solve
    assert args.T % (args.chunk * args.group) == 0, "T must be a multiple of chunk * group"
    print(f"H {args.H}, T {args.T}, K {args.K}, chunk {args.chunk}, group {args.group}, solve {args.solve}: worst relative error of P at the chunk ends vs float64 sequential")
    print("| alpha | r | sigma | unit keys | sequential fp32 | scan fp32 | scan fp64 |")
    print("|---|---|---|---|---|---|---|")
    worst = [0.0, 0.0, 0.0]
    for alpha, r, sigma, unit in itertools.product((0.01, 0.5, 1.0), (1e-4, 1.0, 1e2), (0.0, 1e-2, 1.0), (True, False)):
        errs = case(args.H, args.T, args.K, args.chunk, alpha, r, sigma, unit, args.group)
        worst = [max(w, e) for w, e in zip(worst, errs)]
        print(f"| {alpha} | {r:g} | {sigma:g} | {unit} | " + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)
    print(f"| worst | | | | " + " | ".join(f"{e:.1e}" for e in worst) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
