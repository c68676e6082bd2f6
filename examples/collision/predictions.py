"""Closed-form retrieval errors (MATH.md section 7), independent of the measurement code.

Unit keys in R^K, n writes from S_0 = 0, values with per-coordinate variance s2, and the
retrieval error E = E||S^T k_j - v_j||^2 / V averaged over the stored items j <= n.

Everything here is MATH.md section 7 as written, except `reset_overlap_finite`, which is the
exact finite-n curve of the delta rule (beta = 1) on keys at overlap rho. MATH.md gives only
its plateau 2 rho s2 / (2 - rho); the finite-n form is derived below and its n -> infinity
limit is that plateau.

Derivation of `reset_overlap_finite`. Keys k_i = a u + b z_i (a^2 = rho, b^2 = 1 - rho,
z_i orthonormal and orthogonal to u), M_t = S_t^T, c = 1 - rho. With beta = 1,
M_t = M_{t-1} (I - k_t k_t^T) + v_t k_t^T. A vector orthogonal to k_1..k_t is not moved, so
M_{t-1} z_t = 0 and the prediction of the new key is M_{t-1} k_t = a w_{t-1}, w_t = M_t u,
which obeys w_t = c w_{t-1} + a v_t. For an older item j < t, k_t . k_j = rho gives
M_t k_j = M_{t-1} k_j + rho e_t with the innovation e_t = v_t - a w_{t-1}. Let
C_t = sum_{s <= t} c^{t-s} v_s (so a w_t = rho C_t and e_t = C_t - C_{t-1}); then, since
M_j k_j = v_j, the error of item j after n writes is rho (C_n - C_j), of expected squared norm
per value coordinate

    rho^2 s2 [ (1 - c^{2(n-j)}) + (1 - c^{n-j})^2 (1 - c^{2j}) ] / (1 - c^2),

and E(n) is its mean over j = 1..n. For n - j -> infinity and j -> infinity each item's error
tends to 2 rho^2 s2 / (1 - c^2) = 2 rho s2 / (2 - rho), MATH.md's plateau; the item average
approaches it only like 1 - 1/(rho n), because the most recent ~1/rho items are still
nearly exact.
"""
from __future__ import annotations

import numpy as np

__all__ = ["write_random", "write_overlap", "reset_random", "reset_overlap_plateau",
           "reset_overlap_finite", "rls_random", "rls_overlap", "predict"]


def write_random(n, K, s2=1.0):
    """Hebbian (linear attention), random unit keys: s2 (n - 1) / K (exact for any K)."""
    return s2 * (np.asarray(n, float) - 1) / K


def write_overlap(n, rho, s2=1.0):
    """Hebbian at overlap rho: s2 (n - 1) rho^2 (exact)."""
    return s2 * (np.asarray(n, float) - 1) * rho ** 2


def reset_random(n, K, s2=1.0):
    """Delta rule, beta = 1, random keys, large K: s2 (2 - e^-x)(1 - (1 - e^-x)/x), x = n/K."""
    x = np.asarray(n, float) / K
    return s2 * (2 - np.exp(-x)) * (1 - (-np.expm1(-x)) / x)


def reset_overlap_plateau(rho, s2=1.0):
    """Delta rule, beta = 1, overlap rho: the plateau 2 rho s2 / (2 - rho) (n -> infinity)."""
    return 2 * rho * s2 / (2 - rho)


def reset_overlap_finite(n, rho, s2=1.0):
    """Delta rule, beta = 1, overlap rho: the exact E(n) (module docstring); -> the plateau."""
    ns = np.atleast_1d(np.asarray(n, int))
    if rho == 0:
        return np.zeros(ns.shape) if np.ndim(n) else 0.0
    c = 1.0 - rho
    out = []
    for m in ns:
        j = np.arange(1, m + 1)
        per_item = ((1 - c ** (2 * (m - j))) + (1 - c ** (m - j)) ** 2 * (1 - c ** (2 * j))) / (1 - c * c)
        out.append(rho ** 2 * s2 * per_item.mean())
    out = np.array(out)
    return out if np.ndim(n) else float(out[0])


def _mp_g(lam, alpha):
    """The root g > 0 of lam g^2 + (lam + alpha - 1) g - 1 = 0, without cancellation."""
    b = lam + alpha - 1
    root = np.sqrt(b * b + 4 * lam)
    return np.where(b > 0, 2 / (b + root), (root - b) / (2 * lam))


def rls_random(n, K, lam, s2=1.0):
    """RLS / ridge with lambda = r / p0, random keys, large K (Marchenko-Pastur)."""
    alpha = np.asarray(n, float) / K
    g = _mp_g(lam, alpha)
    return s2 * (lam ** 2 * g * (1 + g) / (alpha * (2 * lam * g + lam + alpha - 1)) + 1 - 1 / alpha)


def rls_overlap(n, rho, lam, s2=1.0):
    """RLS at overlap rho (exact): s2 (lam^2/n) [(n-1)/(1-rho+lam)^2 + 1/(1-rho+n rho+lam)^2]."""
    n = np.asarray(n, float)
    return s2 * (lam ** 2 / n) * ((n - 1) / (1 - rho + lam) ** 2 + 1 / (1 - rho + n * rho + lam) ** 2)


def predict(family: str, n, K: int, rho=None, lam=None, s2=1.0):
    """The MATH.md 7 prediction for a model family ('write', 'reset', 'kalman') and key design
    (rho None: random keys). For reset at overlap this is the exact finite-n curve, whose
    limit is MATH.md's plateau (`reset_overlap_plateau`)."""
    if family == "write":
        return write_random(n, K, s2) if rho is None else write_overlap(n, rho, s2)
    if family == "reset":
        return reset_random(n, K, s2) if rho is None else reset_overlap_finite(n, rho, s2)
    if family == "kalman":
        return rls_random(n, K, lam, s2) if rho is None else rls_overlap(n, rho, lam, s2)
    raise ValueError(f"unknown family {family!r}")
