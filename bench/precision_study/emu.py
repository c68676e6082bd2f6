"""Emulated tensor-core products and the Bayesian Layer's chunked filter (scalar decay), as the
Triton kernels compute it (templates/kalman/riccati.py.j2, gain.py.j2, mean.py.j2), with one dot
precision per group of products, and candidate reformulations of the covariance recursion.

Everything is float32 but the emulated products: operands rounded as the tensor core sees them,
their product taken in float64 and rounded once to float32 (accumulator included).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F32, F64 = torch.float32, torch.float64
C_BLK = 16        # the LDL's diagonal blocks


# --- rounding to tf32 -------------------------------------------------------------------------

def tf32_rna(x):
    """Round to nearest, ties away (cvt.rna.tf32.f32): what tf32x3's split uses for its big part."""
    b = x.contiguous().view(torch.int32)
    return ((b + 0x1000) & -8192).view(F32)


def tf32_rz(x):
    """Truncation: the tensor core reading a float32 register as tf32 (its low 13 bits ignored)."""
    return (x.contiguous().view(torch.int32) & -8192).view(F32)


def bf16(x):
    return x.to(torch.bfloat16).to(F32)


def bf16_pieces(x, n):
    """x = x1 + ... + xn (+ a remainder), each bf16 (round to nearest even)."""
    out = []
    for _ in range(n):
        out.append(bf16(x))
        x = x - out[-1]
    return out


class Emu:
    """dot(a, b, tag, acc): a @ b (+ acc) as tl.dot, with the input precision that `prec` gives
    for tag (the longest of tag, its dotted prefixes, "default").

    Precisions. "tf32": one pass, the MMA reading each float32 operand as tf32 by truncation
    (its low 13 bits ignored: what Triton's one-pass tf32 does; see REPORT.md); "tf32n": one
    pass with operands explicitly rounded to nearest first (cvt.rna, an elementwise op);
    "tf32x3": Triton's F32DotTC, big = rna(x), small = x - big (exact), aS bB + aB bS + aB bB,
    the small parts read by truncation; "x2a" / "x2b": split only a / only b, the other operand
    read once (truncated; "x2an" / "x2bn": rounded to nearest): 2 passes, equal to tf32x3 when
    that operand is exact in tf32; "ieee": float32 (here: exact product rounded once); "f64":
    no rounding (diagnosis). Every product is taken in float64 from the rounded operands and
    rounded once to float32. `tally` sums MACs x passes per tag (`frac` scales the MACs: the
    kernel computes 3 of the 4 quarters of a symmetric K x K update).
    """

    # tensor-core passes per precision (a bf16 pass is half a tf32 pass's time on an H100:
    # dense bf16 989 TFLOPS against tf32 495); "ieee" runs on the FMA units, not counted here
    PASSES = {"ieee": 1, "f64": 1, "tf32": 1, "tf32n": 1, "tf32x3": 3, "x2a": 2, "x2b": 2,
              "x2an": 2, "x2bn": 2, "b2a": 2, "b2b": 2, "b3a": 3, "b3b": 3, "b1": 1,
              "bfx3": 3, "bfx6": 6, "x3m": 2}
    BF16 = ("b2a", "b2b", "b3a", "b3b", "b1", "bfx3", "bfx6")

    def __init__(self, prec):
        self.prec = dict(prec)
        self.tally = {}
        self.counting = True

    def of(self, tag):
        t = tag
        while True:
            if t in self.prec:
                return self.prec[t]
            if "." not in t:
                return self.prec["default"]
            t = t.rsplit(".", 1)[0]

    def count(self, tag, macs, passes, prec="tf32"):
        """Tally MACs x passes in tf32-pass units (a bf16 pass counts one half)."""
        if self.counting:
            w = 0.5 if prec in self.BF16 else (0.75 if prec == "x3m" else 1.0)
            self.tally[tag] = self.tally.get(tag, 0) + macs * passes * w

    def dot(self, a, b, tag, acc=None, frac=1.0, prec=None):
        prec = prec or self.of(tag)
        self.count(tag, a.shape[-2] * a.shape[-1] * b.shape[-1] * frac, self.PASSES[prec], prec)
        if prec == "f64":
            p = a.double() @ b.double()
            return p + acc.double() if acc is not None else p
        rz = tf32_rz
        if prec == "ieee":
            p = a.double() @ b.double()
        elif prec == "tf32":
            p = rz(a).double() @ rz(b).double()
        elif prec == "tf32n":
            p = tf32_rna(a).double() @ tf32_rna(b).double()
        elif prec == "tf32x3":
            ab, bb = tf32_rna(a), tf32_rna(b)
            p = (rz(a - ab).double() @ bb.double() + ab.double() @ rz(b - bb).double()
                 + ab.double() @ bb.double())
        elif prec in ("x2a", "x2an"):
            ab = tf32_rna(a)
            bo = (tf32_rna(b) if prec.endswith("n") else rz(b)).double()
            p = rz(a - ab).double() @ bo + ab.double() @ bo
        elif prec in ("x2b", "x2bn"):
            bb = tf32_rna(b)
            ao = (tf32_rna(a) if prec.endswith("n") else rz(a)).double()
            p = ao @ rz(b - bb).double() + ao @ bb.double()
        elif prec == "x3m":
            # tf32x3 with the cross terms on bf16 MMAs: hi hi (tf32, exact) + bf16(hi) bf16(lo)
            # + bf16(lo) bf16(hi): one tf32 and two bf16 passes, about 2^-19 relative
            ab, bb = tf32_rna(a), tf32_rna(b)
            p = (ab.double() @ bb.double() + bf16(ab).double() @ bf16(b - bb).double()
                 + bf16(a - ab).double() @ bf16(bb).double())
        elif prec in self.BF16:
            # bf16 MMAs: operands converted to bf16 (round to nearest even), pieces of a split
            # x = x1 + x2 (+ x3) each bf16; exact products, float32 accumulation
            if prec == "b1":
                p = bf16(a).double() @ bf16(b).double()
            elif prec in ("b2a", "b3a"):
                p = sum(x.double() for x in bf16_pieces(a, int(prec[1]))) @ bf16(b).double()
            elif prec in ("b2b", "b3b"):
                p = bf16(a).double() @ sum(x.double() for x in bf16_pieces(b, int(prec[1])))
            else:
                n = 2 if prec == "bfx3" else 3
                pa, pb = bf16_pieces(a, n), bf16_pieces(b, n)
                p = sum(pa[i].double() @ pb[j].double() for i in range(n) for j in range(n) if i + j < n)
        else:
            raise ValueError(prec)
        if acc is not None:
            p = p + acc.double()
        return p.float()


# --- inputs and the float64 reference ---------------------------------------------------------

def make_inputs(alpha, r, sigma, norm, T=512, H=2, K=128, seed=0, dtype="bf16"):
    """As bench/kalman_hard_cases.py inputs() (B = 1): q, k, v [H, T, K] float32 (rounded to
    bf16 when dtype is bf16), g, r, sigma [H, T]."""
    gen = torch.Generator().manual_seed(seed)
    q, v = torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, K, generator=gen)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1) * norm
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))
    if dtype == "bf16":
        q, k, v = bf16(q), bf16(k), bf16(v)
    elif dtype == "f16":
        q, k, v = (x.half().float() for x in (q, k, v))
    full = lambda x: torch.full((H, T), float(x))
    return dict(q=q, k=k, v=v, g=full(math.log(alpha)), r=full(r), sigma=full(sigma), dtype=dtype)


def reference(inp, P0=1.0):
    """The float64 step-by-step filter (MATH.md 2): o [H, T, V] (posterior readout, q scaled by
    K^-0.5), final S, P."""
    q, k, v = (inp[n].double() for n in "qkv")
    H, T, K = q.shape
    q = q * K ** -0.5
    a = inp["g"].double().exp()
    r, sg = inp["r"].double(), inp["sigma"].double()
    S = torch.zeros(H, K, v.shape[-1], dtype=F64)
    P = P0 * torch.eye(K, dtype=F64).expand(H, K, K).clone()
    eye = torch.eye(K, dtype=F64)
    o = torch.empty(H, T, v.shape[-1], dtype=F64)
    for t in range(T):
        at = a[:, t, None, None]
        P = at * at * P + sg[:, t, None, None] * eye
        S = at * S
        kt = k[:, t]
        u = (P @ kt[..., None])[..., 0]
        s = (u * kt).sum(-1) + r[:, t]
        inn = v[:, t] - (S * kt[..., None]).sum(-2)
        S = S + u[..., :, None] * inn[..., None, :] / s[:, None, None]
        P = P - u[..., :, None] * u[..., None, :] / s[:, None, None]
        P = 0.5 * (P + P.mT)
        o[:, t] = (S * q[:, t, :, None]).sum(-2)
    return o, S, P


def rel(a, b):
    a = a.double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).abs().max() / b.abs().max())


# --- the kernels' pieces ----------------------------------------------------------------------

def ldl_block(A):
    """chunk_riccati_kernel's ldl_block: [.., 16, 16] float32 -> (L^-1, D), right-looking, L^-1
    by doubling with float32 ("ieee") products."""
    A = A.clone()
    n = A.shape[-1]
    o = torch.arange(n)
    N = torch.zeros_like(A)
    D = torch.zeros(A.shape[:-1], dtype=F32)
    for j in range(n):
        col = A[..., :, j]
        d = col[..., j]
        l = torch.where(o > j, col / d[..., None], torch.zeros_like(col))
        D[..., j] = d
        N[..., :, j] = l
        A = A - (d[..., None] * l)[..., :, None] * l[..., None, :]
    I = torch.eye(n, dtype=F32)
    mm = lambda x, y: (x.double() @ y.double()).float()
    N2 = mm(N, N)
    N4 = mm(N2, N2)
    N8 = mm(N4, N4)
    Li = mm(mm(mm(I - N, I + N2), I + N4), I + N8)
    return Li, D


def blocked_ldl(S_in, emu):
    """The Riccati kernel's blocked LDL of the lower blocks of S_in [H, C, C]: returns
    Li[b] (inverse of the diagonal block's unit L), D[b], X[i][b] = L_ib D_b, Lo[i][b] = L_ib."""
    C = S_in.shape[-1]
    nb = C // C_BLK
    blk = lambda i, j: S_in[..., i * C_BLK:(i + 1) * C_BLK, j * C_BLK:(j + 1) * C_BLK].clone()
    Sb = {(i, j): blk(i, j) for i in range(nb) for j in range(i + 1)}
    Li, D, X, Lo = {}, {}, {}, {}
    for b in range(nb):
        Li[b], D[b] = ldl_block(Sb[b, b])
        for i in range(b + 1, nb):
            X[i, b] = emu.dot(Sb[i, b], Li[b].mT, "factor.X")
            Lo[i, b] = X[i, b] / D[b][..., None, :]
        for i in range(b + 1, nb):
            for j in range(b + 1, i + 1):
                Sb[i, j] = Sb[i, j] - emu.dot(Lo[i, b], X[j, b].mT, "factor.schur")
    return Li, D, X, Lo


def chunk_decay(g, sg):
    """Per chunk [H, C] log-decay and process noise -> gc (cumulative), a, Gamma [H, C, C], e."""
    C = g.shape[-1]
    gc = g.cumsum(-1)
    low = torch.ones(C, C, dtype=torch.bool).tril()
    diff = torch.where(low, gc[..., :, None] - gc[..., None, :], torch.zeros(()))
    Gam = torch.where(low, diff.exp(), torch.zeros(()))
    e = (Gam * Gam * sg[..., None, :]).sum(-1)
    return gc, gc.exp(), Gam, e




# --- the chunked filter -----------------------------------------------------------------------

def blocks(x, b):
    """Rows b*16 .. b*16+15 of [.., C, *]."""
    return x[..., b * C_BLK:(b + 1) * C_BLK, :]


def solve_blocks(Li, Lo, R, emu, tag, X=None, D=None):
    """L^-1 R by blocks, R [H, C, n]: Y_b = Li_b (R_b - sum_c L_bc Y_c) (tags tag.off, tag.diag).
    With X (the Riccati kernel's form) the off-diagonal products are X_bc Z_c, Z = D^-1 Y."""
    Y, Z = [], []
    for b in range(len(Li)):
        Rb = blocks(R, b)
        for c in range(b):
            if X is not None:
                Rb = Rb - emu.dot(X[b, c], Z[c], tag + ".off")
            else:
                Rb = Rb - emu.dot(Lo[b, c], Y[c], tag + ".off")
        Y.append(emu.dot(Li[b], Rb, tag + ".diag"))
        if X is not None:
            Z.append(Y[b] / D[b][..., :, None])
    return torch.cat(Y, -2)


def dense_Linv(Li, Lo):
    """The C x C inverse of the unit lower L from its blocks (float32; diagnosis only)."""
    nb = len(Li)
    H = Li[0].shape[0]
    C = nb * C_BLK
    L = torch.zeros(H, C, C, dtype=F32)
    for b in range(nb):
        Lbb = torch.linalg.inv(Li[b].double()).float()
        L[:, b * 16:(b + 1) * 16, b * 16:(b + 1) * 16] = Lbb
        for c in range(b):
            L[:, b * 16:(b + 1) * 16, c * 16:(c + 1) * 16] = Lo[b, c]
    return L


def symmetrize_quarters(Pn):
    """The Riccati kernel's store: diagonal quarters symmetrized, P_ba = P_ab^T."""
    K = Pn.shape[-1]
    h = K // 2
    Pq = Pn.clone()
    for sl in (slice(0, h), slice(h, K)):
        blk = Pn[..., sl, sl]
        Pq[..., sl, sl] = 0.5 * (blk + blk.mT)
    Pq[..., h:, :h] = Pn[..., :h, h:].mT
    return Pq


def covariance_step(st, kc, gc, a, Gam, e, rc, emu, cand):
    """One chunk of the covariance recursion (chunk_riccati_kernel for cov "kernel"). st: the
    carried covariance state. Returns (Li, D, X, Lo, U, Z, st')."""
    H, C, K = kc.shape
    gcar = gc[:, -1]
    eC, aC = e[:, -1], gcar.exp()
    form = cand.get("cov", "kernel")
    eye = torch.eye(K, dtype=F32)
    khc = kc * a[..., None]
    exact = cand.get("exact_innov", cand.get("exact", False))   # bf16 keys exact in tf32: decay as row scalings
    if form == "info":
        # information form (no decay, no process noise): Lambda = P^-1 carried, P = Lambda^-1
        # per chunk by an idealized inverse (float64, rounded to float32): a K x K Cholesky and
        # inverse per chunk in a kernel (128 sequential pivots), not emulated
        P = torch.linalg.inv(st["L"].double()).float()
        P = 0.5 * (P + P.mT)
        emu.count("info.inverse", K ** 3 / 2, 3)
        form = "kernel"
        info = True
    else:
        info = False
    if form in ("kernel", "joseph"):
        if not info:
            P = st["P"]
        if cand.get("delta"):
            # carry nothing new, but form K P as K (P - p0 I) + p0 K (the "P - diag" idea)
            KP = (emu.dot(kc, P - eye, "innov.KP") + kc) * a[..., None]
            S = emu.dot(KP, kc.mT, "innov.S") * a[..., None, :]
        elif exact:
            KP = emu.dot(kc, P, "innov.KP") * a[..., None]
            S = emu.dot(KP, kc.mT, "innov.S") * a[..., None, :]
        else:
            KP = emu.dot(khc, P, "innov.KP")
            S = emu.dot(KP, khc.mT, "innov.S")
    elif form == "sqrt":
        Fm = st["F"]                                            # P = F F^T
        Phi = emu.dot(kc, Fm, "innov.KF") * a[..., None]        # K^ F
        S = emu.dot(Phi, Phi.mT, "innov.S")
        KP = emu.dot(Phi, Fm.mT, "innov.KP")                     # K^ P = Phi F^T
    else:
        raise ValueError(form)
    KK = emu.dot(kc, kc.mT, "innov.KK")
    U = KP * a[..., None] + e[..., None] * kc                   # gain directions
    KC = KK * (Gam * e[..., None, :])
    KC = KC + KC.mT - torch.diag_embed(KC.diagonal(dim1=-2, dim2=-1))
    S_in = S + KC + torch.diag_embed(rc)
    Li, D, X, Lo = blocked_ldl(S_in, emu)
    Dc = torch.cat([D[b] for b in range(len(D))], -1)
    Uh = U * torch.exp(gcar[:, None] - gc)[..., None]           # U^ = U o (a_C / a)
    Y = solve_blocks(Li, Lo, Uh, emu, "solve", X=X, D=D)
    Z = Y / Dc[..., :, None]
    st2 = dict(st)
    upd = cand.get("update", "plain")
    if info:
        # Lambda' = Lambda + K^T R^-1 K: keys exact, 1/r applied to one operand (split)
        st2["L"] = emu.dot(kc.mT, kc / rc[..., None], "info.update", acc=st["L"])
    elif form == "kernel":
        Pn = P * (aC * aC)[:, None, None] + eC[:, None, None] * eye
        if upd == "plain":
            # P' = a_C^2 P + e_C I - (Z D)^T Z, one dot over the chunk, 3 quarters of 4
            Pn = emu.dot(-(Z * Dc[..., None]).mT, Z, "update", acc=Pn, frac=0.75)
        elif upd == "sym":
            # P' = ... - Yt^T Yt, Yt = D^-1/2 Y split once: hi^T hi + (hi^T lo + (hi^T lo)^T)
            Yt = Y / Dc.sqrt()[..., :, None]
            hi = tf32_rna(Yt)
            lo = Yt - hi
            Pn = emu.dot(-hi.mT, hi, "update.hh", acc=Pn, frac=0.75, prec="tf32")
            N = emu.dot(hi.mT, lo, "update.cross", prec=emu.of("update.cross") if "update.cross" in emu.prec else "tf32")
            Pn = Pn - (N + N.mT)
        elif upd in ("symm", "symb"):
            Yt = Y / Dc.sqrt()[..., :, None]
            if upd == "symm":
                # hi^T hi on tf32 (exact), the cross term hi^T lo on one bf16 pass
                hi = tf32_rna(Yt)
                lo = Yt - hi
                Pn = emu.dot(-hi.mT, hi, "update.hh", acc=Pn, frac=0.75, prec="tf32")
                N = emu.dot(hi.mT, lo, "update.cross", prec="b1")
                Pn = Pn - (N + N.mT)
            else:
                # three bf16 pieces: y1^T y1 + y2^T y2 (3 quarters each), (y1^T y2 + y1^T y3) + T
                y1, y2, y3 = bf16_pieces(Yt, 3)
                Pn = emu.dot(-y1.mT, y1, "update.11", acc=Pn, frac=0.75, prec="b1")
                Pn = emu.dot(-y2.mT, y2, "update.22", acc=Pn, frac=0.75, prec="b1")
                N = emu.dot(y1.mT, y2, "update.12", prec="b1") + emu.dot(y1.mT, y3, "update.13", prec="b1")
                Pn = Pn - (N + N.mT)
        else:
            raise ValueError(upd)
        st2["P"] = symmetrize_quarters(Pn)
    elif form == "joseph":
        st2["P"] = joseph(P, kc, a, gc, e, KC, rc, aC, eC, Li, Lo, D, Z, emu, cand)
    elif form == "sqrt":
        st2["F"] = sqrt_update(Fm, Phi, KP, rc, Li, Lo, D, aC, emu)
    return Li, D, X, Lo, U, Z, st2


def joseph(P, kc, a, gc, e, KC, rc, aC, eC, Li, Lo, D, Z, emu, cand):
    """P' = A P A^T + e_C I - G N - N^T G^T + G M G^T, A = a_C I - G K^, with the chunk's gain
    G = U^^T S_in^-1 (K x C), N = (a_C e / a) o K the process noise's cross covariance,
    M = (K K^T) o C + diag(r): exact for the optimal G, first-order insensitive to G's errors."""
    H, C, K = kc.shape
    nb = len(Li)
    # G^T = L^-T Z by blocks (backward substitution): Gt_b = Li_b^T (Z_b - sum_{c>b} L_cb^T Gt_c)
    Gt = [None] * nb
    for b in reversed(range(nb)):
        Rb = blocks(Z, b)
        for c in range(b + 1, nb):
            Rb = Rb - emu.dot(Lo[c, b].mT, Gt[c], "jos.G")
        Gt[b] = emu.dot(Li[b].mT, Rb, "jos.G")
    Gt = torch.cat(Gt, -2)                                   # [C, K]
    G = Gt.mT                                                 # [K, C]
    eye = torch.eye(K, dtype=F32)
    GK = emu.dot(G * a[..., None, :], kc, "jos.GK")          # G K^ = (G diag a) K
    A = aC[:, None, None] * eye - GK
    AP = emu.dot(A, P, "jos.AP")
    J = emu.dot(AP, A.mT, "jos.APA")
    M = KC + torch.diag_embed(rc)
    GM = emu.dot(G, M, "jos.GM")
    J = J + emu.dot(GM, Gt, "jos.GMG")
    N = kc * (aC[:, None] * e / a)[..., None]               # [C, K]
    GN = emu.dot(G, N, "jos.GN")
    J = J - GN - GN.mT + eC[:, None, None] * eye
    return 0.5 * (J + J.mT)


def sqrt_update(Fm, Phi, KP, rc, Li, Lo, D, aC, emu):
    """Potter-style square root for a chunk without process noise: P = F F^T,
    F' = a_C F (I - Phi^T W Phi), W = L^-T D^-1/2 (L D^1/2 + R^1/2)^-1 (Andrews), Phi = K^ F.
    The C x C work in float32."""
    L = dense_Linv(Li, Lo)                                    # unit lower L itself
    Dc = torch.cat([D[b] for b in range(len(D))], -1)
    Tm = L.double() * Dc.double().sqrt()[..., None, :] + torch.diag_embed(rc.double().sqrt())
    I = torch.eye(L.shape[-1], dtype=F64)
    Tinv = torch.linalg.solve_triangular(Tm, I.expand_as(Tm), upper=False)
    Linv = torch.linalg.solve_triangular(L.double(), I.expand_as(Tm), upper=False, unitriangular=True)
    W = (Linv.mT / Dc.double().sqrt()[..., None, :]) @ Tinv
    W = W.float()
    emu.count("sqrt.W", W.shape[-1] ** 3, 1)
    FPt = KP.mT                                               # F Phi^T = P K^^T
    V = emu.dot(FPt, W, "sqrt.FW")                            # [K, C]
    Fn = Fm - emu.dot(V, Phi, "sqrt.FT")
    return Fn * aC[:, None, None]


def output_step(Sm, qr, kc, vc, a, Gam, gcar, Li, D, Lo, U, Z, emu, io, cand):
    """chunk_gain_kernel, chunk_mean_kernel and chunk_readout_kernel for one chunk (qr: the
    queries unscaled): returns (o [H, C, V], S')."""
    H, C, K = qr.shape
    nb = len(Li)
    Dc = torch.cat([D[b] for b in range(nb)], -1)
    aC = gcar.exp()
    scale = K ** -0.5
    q = qr * scale
    exact = cand.get("exact_out", cand.get("exact", False))
    # B^T = L^-1 A^T by blocks, A^T_jt = Gamma_tj u_j^T q_t (t >= j); q carries the scale
    if exact:
        At = emu.dot(U, qr.mT, "gain.A") * (scale * Gam.mT)
    else:
        At = emu.dot(U, q.mT, "gain.A") * Gam.mT
    Mt = solve_blocks(Li, Lo, At, emu, "gain.B")
    Bm = (Mt / Dc[..., :, None]).mT.tril()                    # B_tj, t >= j
    h16 = io(Sm)
    form = cand.get("out", "kernel")
    if form == "kernel":
        W = solve_blocks(Li, Lo, kc * a[..., None], emu, "gain.W")
        Uv = solve_blocks(Li, Lo, vc, emu, "gain.Uv")
        E = Uv - emu.dot(W, Sm, "mean.WS")
    elif form == "innov":
        # E = L^-1 (V - K^ S): K exact (S split), the innovation solved by blocks
        R = vc - emu.dot(kc, Sm, "mean.KS") * a[..., None]
        E = solve_blocks(Li, Lo, R, emu, "mean.E")
    else:
        raise ValueError(form)
    e16 = io(E)
    Sn = emu.dot(Z.mT, E, "mean.S", acc=Sm * aC[:, None, None])
    if exact:
        QS = emu.dot(qr, h16, "readout.QS") * (a[..., None] * scale)
    else:
        QS = emu.dot(q * a[..., None], h16, "readout.QS")
    o = QS + emu.dot(Bm, e16, "readout.BE")
    return io(o), Sn


PRESETS = {
    # the kernels' configs: FAST_CONFIG and the default (tf32x3 but the readout, tf32 for bf16)
    "FAST": dict(default="tf32", update="tf32x3", readout="auto"),
    "default": dict(default="tf32x3", readout="auto"),
    "all-x3": dict(default="tf32x3"),
}


def run_filter(inp, prec="default", cand=None, chunk=64, P0=1.0, tally=False):
    """The chunked filter (MATH.md 6.3) as the kernels compute it, the products emulated with
    the precisions `prec` (a preset name or a dict {tag prefix: precision, "default": ...}).
    Returns (o [H, T, V], final P[, MACs x passes per tag in one chunk of one head])."""
    p = dict(PRESETS[prec]) if isinstance(prec, str) else dict(prec)
    for t, x in list(p.items()):
        if x == "auto":                  # the readout's default: tf32 for 16-bit inputs
            p[t] = "tf32" if inp["dtype"] in ("bf16", "f16") else "tf32x3"
    cand = cand or {}
    if cand.get("store32") and p.get("readout.QS") == "b1":
        # one bf16 pass is exact only on the bf16-stored S: with S kept in float32, 3 pieces
        p["readout.QS"] = "b3b"
    # the kernels store S at chunk starts, E and o in the input's dtype (store32: float32)
    io = {"bf16": bf16, "f16": lambda x: x.half().float()}.get(inp["dtype"], lambda x: x)
    if cand.get("store32"):
        io = lambda x: x
    emu = Emu(p)
    q = inp["q"]
    k, v, g, r, sg = inp["k"], inp["v"], inp["g"], inp["r"], inp["sigma"]
    H, T, K = q.shape
    eye = torch.eye(K, dtype=F32)
    st = {}
    if cand.get("cov", "kernel") == "sqrt":
        st["F"] = (P0 ** 0.5) * eye.expand(H, K, K).clone()
    elif cand.get("cov", "kernel") == "info":
        st["L"] = (1 / P0) * eye.expand(H, K, K).clone()
    else:
        st["P"] = P0 * eye.expand(H, K, K).clone()
    Sm = torch.zeros(H, K, v.shape[-1], dtype=F32)
    outs = []
    for s in range(0, T, chunk):
        sl = slice(s, s + chunk)
        gc, a, Gam, e = chunk_decay(g[:, sl], sg[:, sl])
        Li, D, X, Lo, U, Z, st = covariance_step(st, k[:, sl], gc, a, Gam, e, r[:, sl], emu, cand)
        o, Sm = output_step(Sm, q[:, sl], k[:, sl], v[:, sl], a, Gam, gc[:, -1], Li, D, Lo, U, Z, emu, io, cand)
        outs.append(o)
        emu.counting = False
    if "P" in st:
        P = st["P"]
    elif "F" in st:
        P = st["F"].double() @ st["F"].double().mT
    else:
        P = torch.linalg.inv(st["L"].double())
    res = (torch.cat(outs, 1), P)
    if tally:
        return res + (dict(emu.tally),)
    return res
