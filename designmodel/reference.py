"""Float64 references for any derivation: the step-by-step filter and implicit attention.

Two independent computations of the same layer, both in float64 torch:

- `recurrent` runs the filter token by token from its definition (MATH.md sections 2-3):
  write (S = F S + k v^T), Kalman (predict, gain, update) or covariance reset (P^- = c I).
- `implicit` builds the whole-sequence attention matrix Phi in closed form (MATH.md sections
  5 and 6.3 with one chunk) and reads out y = Phi V + Hs S0.

Neither reads the derived sympy update: only the spec's per-token scalars (decay, noises,
reset covariance) are evaluated from the spec, by `coefficients`. The derivation is thereby
checked against two implementations that share none of its algebra.

Layout as in flash-linear-attention: q, k [B, T, H, K], v [B, T, H, V], state [B, H, K, V],
readout y_t = S_t^T q_t (no scale factor), covariance [B, H, K, K], variance [B, T, H].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import sympy as sp
import torch
import torch.nn.functional as F
from torch import Tensor

from designmodel.family import Structure, classify
from designmodel.spec import DesignModel, Regression, Reset, inputs_of

__all__ = ["ReferenceOutput", "coefficients", "delta_gain_gradients", "prior_covariance", "input_shape", "recurrent",
           "implicit_attention", "implicit", "TORCH_FUNCTIONS", "UNIT_KEY_TOL"]

DTYPE = torch.float64
UNIT_KEY_TOL = 1e-6


def _on_tensors(fn):
    """fn applied to a float64 tensor; numeric subexpressions such as log(10) arrive as numbers."""
    return lambda x: fn(torch.as_tensor(x, dtype=DTYPE))


# How the spec's functions evaluate on tensors (sympy's own and those of designmodel.spec).
TORCH_FUNCTIONS = {
    **{name: _on_tensors(fn) for name, fn in (
        ("exp", torch.exp), ("log", torch.log), ("sqrt", torch.sqrt), ("sigmoid", torch.sigmoid),
        ("softplus", F.softplus), ("logsigmoid", F.logsigmoid))},
    "e": math.e, "pi": math.pi,
}


class ReferenceOutput(NamedTuple):
    """What a reference returns; fields a computation does not produce are None."""

    o: Tensor                   # [B, T, H, V] readout
    state: Tensor | None        # [B, H, K, V] final mean (N rows with cu_seqlens)
    covariance: Tensor | None   # [B, H, K, K] final key-side covariance (when tracked)
    variance: Tensor | None     # [B, T, H] predictive variance q^T P q (when declared)


# --- the spec's scalars ---------------------------------------------------------------------

def _spec_structure(derivation) -> tuple[DesignModel, Structure]:
    """The spec and structure of a Derivation (a bare DesignModel is accepted too)."""
    if isinstance(derivation, DesignModel):
        return derivation, classify(derivation)
    return derivation.spec, derivation.structure


def _is_per_key(expr) -> bool:
    return any(s.per == "key" for s in inputs_of(sp.sympify(expr)))


def _check_tensor(name: str, x, shape: tuple) -> None:
    """ValueError naming `name` unless x is a float64 tensor of `shape`."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {list(shape)}, got {type(x).__name__}")
    if x.dtype != DTYPE:
        raise ValueError(f"{name}: the float64 reference takes float64 tensors, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(x.shape)}")


def _check_domain(name: str, x: Tensor, domain: str) -> None:
    """ValueError naming the input when a value lies outside its declared domain."""
    ok = torch.isfinite(x)
    ok &= {"real": lambda: torch.ones_like(ok), "positive": lambda: x > 0,
           "nonnegative": lambda: x >= 0, "unit": lambda: (x > 0) & (x < 1),
           "logdecay": lambda: x <= 0}[domain]()
    if not bool(ok.all()):
        bad = x[~ok].flatten()[0].item()
        raise ValueError(f"{name}: value {bad} lies outside the input's domain {domain!r}")


def input_shape(x, B: int, T: int, H: int, K: int) -> tuple:
    """The layout of an input: [B, T, H(, K)] per token, [H(, K)] for a constant."""
    lead = (B, T, H) if x.per_token else (H,)
    return lead + ((K,) if x.per == "key" else ())


def _input(x, inputs: dict, B, T, H, K) -> Tensor:
    """The checked tensor of input x."""
    if x.name not in inputs:
        kind = "per-token input" if x.per_token else "constant"
        raise ValueError(f"{x.name}: missing {kind} (per {x.per}, shape "
                         f"{list(input_shape(x, B, T, H, K))})")
    t = inputs[x.name]
    _check_tensor(x.name, t, input_shape(x, B, T, H, K))
    _check_domain(x.name, t, x.domain)
    return t


def _broadcastable(x, t: Tensor, per_key: bool) -> Tensor:
    """An input's tensor viewed so it broadcasts against [B, T, H(, K)]."""
    if not x.per_token:
        t = t[None, None]                          # [1, 1, H(, K)]
    if per_key and x.per == "head":
        t = t[..., None]                           # [.., H, 1]
    return t


def _evaluate(expr, inputs: dict, B, T, H, K) -> Tensor:
    """A scalar spec expression on tensors: [B, T, H, K] if it uses per-key inputs, else [B, T, H]."""
    expr = sp.sympify(expr)
    per_key = _is_per_key(expr)
    shape = (B, T, H, K) if per_key else (B, T, H)
    used = inputs_of(expr)
    args = [_broadcastable(x, _input(x, inputs, B, T, H, K), per_key) for x in used]
    fn = sp.lambdify(used, expr, modules=[TORCH_FUNCTIONS])
    value = torch.as_tensor(fn(*args), dtype=DTYPE)
    return value.expand(shape).clone()


def coefficients(derivation, inputs: dict, B: int, T: int, H: int, K: int) -> dict:
    """The spec's per-token scalars evaluated on the inputs.

    Returns decay (alpha), log_decay (log alpha, evaluated in log space), process_noise, and
    noise (r, regression only) and reset (c, reset filter only). Each is [B, T, H, K] when
    its expression uses per-key inputs, else [B, T, H]. Missing inputs, wrong shapes or
    dtypes and values outside an input's domain raise ValueError naming the input.
    """
    spec, _ = _spec_structure(derivation)
    decay = spec.transition.decay
    out = {
        "decay": _evaluate(decay, inputs, B, T, H, K),
        # log(exp(g)) = g exactly: a gate given as a log-decay never round-trips through exp.
        "log_decay": _evaluate(sp.expand_log(sp.log(decay), force=True), inputs, B, T, H, K),
        "process_noise": _evaluate(spec.noise_expr(), inputs, B, T, H, K),
    }
    if isinstance(spec.observation, Regression):
        out["noise"] = _evaluate(spec.observation.noise, inputs, B, T, H, K)
    if isinstance(spec.filter, Reset):
        out["reset"] = _evaluate(spec.filter.c, inputs, B, T, H, K)
    return out


def prior_covariance(derivation, inputs: dict, H: int, K: int) -> Tensor:
    """The prior's key-side covariance P0 per head, [H, K, K]."""
    spec, _ = _spec_structure(derivation)
    cov = spec.prior.covariance
    if cov.kind == "isotropic":
        p0 = _evaluate(cov.value, inputs, 1, 1, H, K)[0, 0]                 # [H]
        return p0[:, None, None] * torch.eye(K, dtype=DTYPE)
    if cov.kind == "diagonal":
        if isinstance(cov.value, tuple):
            if len(cov.value) != K:
                raise ValueError(f"prior: diagonal covariance has {len(cov.value)} entries, K is {K}")
            d = torch.tensor([float(x) for x in cov.value], dtype=DTYPE).expand(H, K)
        else:
            d = _evaluate(cov.value, inputs, 1, 1, H, K)[0, 0].expand(H, K)   # [H, K]
        return torch.diag_embed(d)
    if isinstance(cov.value, str):
        return _named_covariance(cov.value, inputs, H, K)
    if cov.value.shape != (K, K):
        raise ValueError(f"prior: full covariance is {cov.value.shape[0]}x{cov.value.shape[1]}, K is {K}")
    m = torch.tensor([[float(x) for x in row] for row in cov.value.tolist()], dtype=DTYPE)
    return m.expand(H, K, K).clone()


def _named_covariance(name: str, inputs: dict, H: int, K: int) -> Tensor:
    """A full prior covariance supplied at run time under `name`, [H, K, K], checked SPD."""
    if name not in inputs:
        raise ValueError(f"{name}: missing full prior covariance (shape {[H, K, K]})")
    m = inputs[name]
    _check_tensor(name, m, (H, K, K))
    scale = float(m.abs().max()) if m.numel() else 0.0
    if not torch.allclose(m, m.mT, rtol=0, atol=1e-12 * max(scale, 1e-300)):
        raise ValueError(f"{name}: full prior covariance is not symmetric")
    if bool((torch.linalg.eigvalsh(m) < -1e-12 * scale).any()):
        raise ValueError(f"{name}: full prior covariance is not positive semidefinite")
    return m


# --- argument checks --------------------------------------------------------------------------

def _check_qkv(q, k, v=None) -> tuple:
    """(B, T, H, K, V) from q, k [B, T, H, K] and v [B, T, H, V] (V None without v)."""
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a tensor [B, T, H, K], got {getattr(q, 'shape', q)!r}")
    B, T, H, K = q.shape
    _check_tensor("q", q, (B, T, H, K))
    _check_tensor("k", k, (B, T, H, K))
    if v is None:
        return B, T, H, K, None
    if not isinstance(v, Tensor) or v.dim() != 4:
        raise ValueError(f"v: expected a tensor [B, T, H, V], got {getattr(v, 'shape', v)!r}")
    _check_tensor("v", v, (B, T, H, v.shape[-1]))
    return B, T, H, K, v.shape[-1]


def _check_unit_keys(spec, k: Tensor, tol: float) -> None:
    """Unit keys were declared: the derivation used |k|^2 = 1, so the keys must have it."""
    if not spec.observation.unit_keys:
        return
    err = (k.norm(dim=-1) - 1).abs()
    if err.numel() and float(err.max()) > tol:
        raise ValueError(f"k: the spec declares unit keys, but a key has norm off by {float(err.max()):.3g}")


def _uses_covariance(structure: Structure) -> bool:
    """The Kalman mean needs P; the other families track it only to read out the variance."""
    return structure.family == "kalman" or structure.variance


def _initial(derivation, inputs, initial_state, initial_covariance, N, H, K, V):
    """(S0 [N, H, K, V], P0 [N, H, K, K] or None) from the arguments or the prior."""
    _, structure = _spec_structure(derivation)
    if initial_state is None:
        S0 = torch.zeros(N, H, K, V, dtype=DTYPE)
    else:
        _check_tensor("initial_state", initial_state, (N, H, K, V))
        S0 = initial_state
    if not _uses_covariance(structure):
        return S0, None
    if initial_covariance is None:
        P0 = prior_covariance(derivation, inputs, H, K).expand(N, H, K, K)
    else:
        _check_tensor("initial_covariance", initial_covariance, (N, H, K, K))
        P0 = initial_covariance
    return S0, P0


# --- the step-by-step filter ----------------------------------------------------------------

def _decay_rows(X: Tensor, alpha: Tensor) -> Tensor:
    """F X for F = alpha I (alpha [B, H]) or diag(alpha) (alpha [B, H, K]); X [B, H, K, *]."""
    return X * (alpha[..., None, None] if alpha.dim() == 2 else alpha[..., :, None])


def _noise_matrix(sigma: Tensor, K: int) -> Tensor:
    """Q = sigma I (sigma [B, H]) or diag(sigma) (sigma [B, H, K]), [B, H, K, K]."""
    if sigma.dim() == 2:
        return sigma[..., None, None] * torch.eye(K, dtype=DTYPE)
    return torch.diag_embed(sigma)


def _step(family: str, co: dict, k: Tensor, v: Tensor, S: Tensor, P: Tensor | None):
    """One token: (predicted mean, predicted cov, posterior mean, posterior cov).

    co holds this token's coefficients ([B, H] or [B, H, K]); k [B, H, K], v [B, H, V].
    """
    K = k.shape[-1]
    S_pred = _decay_rows(S, co["decay"])                                      # [B, H, K, V]
    P_pred = None
    if P is not None:
        FPF = _decay_rows(_decay_rows(P, co["decay"]).mT, co["decay"])         # F P F^T
        P_pred = FPF + _noise_matrix(co["process_noise"], K)                  # [B, H, K, K]
    if family == "write":
        # Values are inputs, not evidence: the covariance only propagates.
        return S_pred, P_pred, S_pred + k[..., :, None] * v[..., None, :], P_pred
    if family == "reset":
        c = co["reset"]                                                       # [B, H]
        P_pred = None if P is None else c[..., None, None] * torch.eye(K, dtype=DTYPE)
        u = c[..., None] * k                                                  # gain direction c k
    else:
        u = (P_pred @ k[..., None])[..., 0]                                   # P^- k, [B, H, K]
    s = (k * u).sum(-1) + co["noise"]                                         # innovation variance [B, H]
    innov = v - (S_pred * k[..., :, None]).sum(-2)                            # v - S^-^T k, [B, H, V]
    S_new = S_pred + u[..., :, None] * innov[..., None, :] / s[..., None, None]
    P_new = None if P_pred is None else P_pred - u[..., :, None] * u[..., None, :] / s[..., None, None]
    return S_pred, P_pred, S_new, P_new


def _run(structure: Structure, co: dict, q, k, v, S, P):
    """The filter over the tokens of q, k, v [B, T, H, *] from (S, P); co sliced likewise.

    Returns (o [B, T, H, V], S_T, P_T, variance [B, T, H] or None).
    """
    posterior = structure.timing == "posterior"
    outs, variances = [], []
    for t in range(q.shape[1]):
        co_t = {name: c[:, t] for name, c in co.items()}
        S_pred, P_pred, S, P = _step(structure.family, co_t, k[:, t], v[:, t], S, P)
        mean, cov = (S, P) if posterior else (S_pred, P_pred)
        outs.append((mean * q[:, t, :, :, None]).sum(-2))                    # S^T q, [B, H, V]
        if structure.variance:
            qt = q[:, t]
            variances.append((qt[..., None, :] @ cov @ qt[..., :, None])[..., 0, 0])  # [B, H]
    B, T, H, _ = q.shape
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    var = None
    if structure.variance:
        var = torch.stack(variances, 1) if variances else q.new_zeros(B, 0, H)
    return o, S, P, var


def _check_cu_seqlens(cu_seqlens, B: int, T: int) -> list[int]:
    """The segment boundaries of a packed batch, as ints."""
    if B != 1:
        raise ValueError(f"cu_seqlens: a packed batch has B = 1, got B = {B}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int64, torch.int32) \
            or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a LongTensor [N + 1], got {cu_seqlens!r}")
    b = [int(x) for x in cu_seqlens]
    if b[0] != 0 or b[-1] != T or any(y < x for x, y in zip(b, b[1:])):
        raise ValueError(f"cu_seqlens: boundaries must rise from 0 to T = {T}, got {b}")
    return b


def recurrent(derivation, q: Tensor, k: Tensor, v: Tensor, inputs: dict, initial_state=None,
              initial_covariance=None, cu_seqlens=None, *,
              unit_key_tol: float = UNIT_KEY_TOL) -> ReferenceOutput:
    """The step-by-step filter of a derivation (MATH.md sections 2-3), in float64.

    q, k [B, T, H, K], v [B, T, H, V]; inputs maps each input name of the spec to its tensor
    (see `coefficients`), and a full prior covariance given by name to [H, K, K].
    initial_state [B, H, K, V] (zero if None); initial_covariance [B, H, K, K] overrides
    the prior. With cu_seqlens (LongTensor [N + 1], B = 1), each of the N segments starts from
    its own row of initial_state / initial_covariance and N final states are returned.
    unit_key_tol: how far from 1 a key's norm may be when the spec declares unit keys (keys
    normalized in bf16 and then widened are off by about 1e-3). The filter always uses the
    keys as given, |k|^2 included.
    """
    spec, structure = _spec_structure(derivation)
    B, T, H, K, V = _check_qkv(q, k, v)
    _check_unit_keys(spec, k, unit_key_tol)
    co = coefficients(derivation, inputs, B, T, H, K)
    if cu_seqlens is None:
        S0, P0 = _initial(derivation, inputs, initial_state, initial_covariance, B, H, K, V)
        o, S, P, var = _run(structure, co, q, k, v, S0, P0)
        return ReferenceOutput(o, S, P if _uses_covariance(structure) else None, var)
    bounds = _check_cu_seqlens(cu_seqlens, B, T)
    S0, P0 = _initial(derivation, inputs, initial_state, initial_covariance, len(bounds) - 1, H, K, V)
    outs, states, covs, variances = [], [], [], []
    for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
        seg = slice(bos, eos)
        o, S, P, var = _run(structure, {name: c[:, seg] for name, c in co.items()},
                            q[:, seg], k[:, seg], v[:, seg], S0[n:n + 1],
                            None if P0 is None else P0[n:n + 1])
        outs.append(o), states.append(S), covs.append(P), variances.append(var)
    return ReferenceOutput(torch.cat(outs, 1), torch.cat(states, 0),
                           torch.cat(covs, 0) if P0 is not None else None,
                           torch.cat(variances, 1) if structure.variance else None)


def delta_gain_gradients(dk: Tensor, dbeta: Tensor, k: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients through the delta rule's gain beta, from gradients through the spec's gain.

    The zoo's delta models (deltanet, gated_deltanet, kda) declare unit keys with c = beta,
    r = 1 - beta. This filter evaluates their gain as c / (c |k|^2 + r), which is beta on the
    sphere but depends on |k|^2, so autograd through it adds a radial term to dk that the
    derived gain beta (what fla and the kernels use) does not have. With
    s = beta |k|^2 + 1 - beta, d(gain)/d(beta) = 1 / s^2 and d(gain)/dk = -2 beta^2 k / s^2,
    so the gradients for the derived gain are dk + 2 beta^2 dbeta k and s^2 dbeta.
    k [..., K] and dk like it; beta and dbeta [...].
    """
    s = beta * (k * k).sum(-1) + 1 - beta
    return dk + 2 * (beta * beta * dbeta)[..., None] * k, dbeta * s * s


# --- implicit attention (closed form, one chunk) --------------------------------------------

def _heads_first(x: Tensor) -> Tensor:
    """[B, T, H, *] -> [B, H, T, *]."""
    return x.transpose(1, 2)


def _decay_ratios(G: Tensor, strict: bool) -> Tensor:
    """Gamma_ts = exp(G_t - G_s) for t >= s (t > s if strict), else 0.

    G [B, H, T] or [B, H, T, K] are cumulative log-decays; returns [B, H, T, T(, K)]. The
    masked entries are set to -inf before exp, so the ratio is never formed above the
    diagonal (where it would exceed 1 and could overflow).
    """
    T = G.shape[2]
    diff = G[:, :, :, None] - G[:, :, None, :]                                # [B, H, T, T(, K)]
    keep = torch.ones(T, T, dtype=torch.bool).tril(-1 if strict else 0)
    if G.dim() == 4:
        keep = keep[..., None]
    return diff.masked_fill(~keep, -math.inf).exp()


def _decayed_gram(x: Tensor, y: Tensor, G: Tensor, strict: bool) -> Tensor:
    """M_ts = sum_m x_tm y_sm Gamma_ts,m on the (strictly) lower triangle, [B, H, T, T].

    x, y [B, H, T, K]; G [B, H, T] (scalar decay) or [B, H, T, K] (per key).
    """
    gamma = _decay_ratios(G, strict)
    if G.dim() == 3:
        return (x @ y.mT) * gamma
    return torch.einsum("bhtm,bhsm,bhtsm->bhts", x, y, gamma)


def _implicit_parts(derivation, q, k, inputs, initial_covariance, unit_key_tol):
    """(Phi [B, H, T, T], Hs [B, H, T, K], variance [B, H, T] or None) in closed form.

    y = Phi V + Hs S0 with V, S0 in heads-first layout. q, k are [B, T, H, K].
    """
    spec, structure = _spec_structure(derivation)
    B, T, H, K, _ = _check_qkv(q, k)
    _check_unit_keys(spec, k, unit_key_tol)
    co = {name: _heads_first(c) for name, c in coefficients(derivation, inputs, B, T, H, K).items()}
    _, P0 = _initial(derivation, inputs, None, initial_covariance, B, H, K, 1)
    q, k = _heads_first(q), _heads_first(k)                                  # [B, H, T, K]
    strict = structure.timing == "prior"
    # Per-key whenever the decay or the process noise is: the diagonal entries then differ.
    per_key = co["log_decay"].dim() == 4 or co["process_noise"].dim() == 4
    G = co["log_decay"].cumsum(2)                                             # [B, H, T(, K)]
    sigma = co["process_noise"]
    if per_key:
        G = G[..., None].expand(B, H, T, K) if G.dim() == 3 else G
        sigma = sigma[..., None].expand(B, H, T, K) if sigma.dim() == 3 else sigma
    a = (G if G.dim() == 4 else G[..., None]).exp().expand(B, H, T, K)       # decay since start
    # Accumulated process noise e_t = sum_{j<=t} Gamma_tj^2 sigma_j (closed form of the scan).
    e = (_decay_ratios(2 * G, False) * (sigma[:, :, None] if per_key else sigma[:, :, None, :])).sum(3)
    e = e if per_key else e[..., None].expand(B, H, T, K)                    # [B, H, T, K]
    build = {"write": _write_parts, "reset": _reset_parts, "kalman": _kalman_parts}[structure.family]
    Phi, Hs, var = build(q=q, k=k, co=co, G=G, a=a, e=e, P0=P0, strict=strict)
    return Phi, Hs, var if structure.variance else None


def _quad(x: Tensor, P: Tensor) -> Tensor:
    """x_t^T P x_t per row: x [B, H, T, K], P [B, H, K, K] -> [B, H, T]."""
    return ((x @ P) * x).sum(-1)


def _write_parts(q, k, co, G, a, e, P0, strict):
    """Write family: Phi = mask(Q K^T o Gamma), Hs = Q o a; P_t = diag(a) P0 diag(a) + diag(e)."""
    Phi = _decayed_gram(q, k, G, strict)
    var = None if P0 is None else _quad(q * a, P0) + (q * q * e).sum(-1)
    return Phi, q * a, var


def _reset_parts(q, k, co, G, a, e, P0, strict):
    """Reset family: Phi = mask(Q K^T o Gamma) (I + stril(diag(beta)(K K^T o Gamma)))^{-1} diag(beta)."""
    c, r = co["reset"], co["noise"]                                           # [B, H, T]
    beta = c / (c * (k * k).sum(-1) + r)                                      # reset gain
    T = q.shape[2]
    system = torch.eye(T, dtype=DTYPE) + beta[..., :, None] * _decayed_gram(k, k, G, strict=True)
    T_ = torch.linalg.solve_triangular(system, torch.diag_embed(beta), upper=False, unitriangular=True)
    Phi = _decayed_gram(q, k, G, strict) @ T_                                 # [B, H, T, T]
    Hs = q * a - Phi @ (k * a)
    qq = (q * q).sum(-1)
    # The reset variance is local: the prior is c I at every token.
    var = c * qq if strict else c * (qq - beta * (k * q).sum(-1) ** 2)
    return Phi, Hs, var


def _kalman_parts(q, k, co, G, a, e, P0, strict):
    """Kalman family (MATH.md 6.3, one chunk): Phi = mask(A L^{-T}) D^{-1} L^{-1}."""
    r = co["noise"]                                                           # [B, H, T]
    kh, qh = k * a, q * a                                                     # decayed keys, queries
    # (K K^T) o C, C_tj = Gamma_tj e_j for t >= j, filled in symmetrically.
    low = _decayed_gram(k, k * e, G, strict=False)
    kc = low + low.mT - torch.diag_embed(low.diagonal(dim1=-2, dim2=-1))
    S_in = kh @ P0 @ kh.mT + kc + torch.diag_embed(r)                         # innovation covariance
    chol = torch.linalg.cholesky(S_in)
    d = chol.diagonal(dim1=-2, dim2=-1)                                       # [B, H, T]
    L, D = chol / d[..., None, :], d * d                                      # S_in = L D L^T
    U = a * (kh @ P0) + e * k                                                 # u_i = a_i P0 k^_i + e_i k_i
    A = _decayed_gram(q, U, G, strict=False)                                  # A_ti = Gamma_ti u_i^T q_t
    AL = torch.linalg.solve_triangular(L, A.mT, upper=False, unitriangular=True).mT   # A L^{-T}
    keep = torch.ones_like(AL, dtype=torch.bool).tril(-1 if strict else 0)
    Bm = AL * keep / D[..., None, :]                                          # mask(A L^{-T}) D^{-1}
    Phi = torch.linalg.solve_triangular(L, Bm, upper=False, left=False, unitriangular=True)
    Hs = qh - Phi @ kh
    var = _quad(qh, P0) + (q * q * e).sum(-1) - (Bm * Bm * D[..., None, :]).sum(-1)
    return Phi, Hs, var


def implicit_attention(derivation, q: Tensor, k: Tensor, inputs: dict, initial_covariance=None,
                       *, unit_key_tol: float = UNIT_KEY_TOL) -> Tensor:
    """The implicit attention matrix Phi [B, H, T, T] of MATH.md section 5.

    Lower triangular (strictly for a prior readout); y = Phi V when the initial state is zero.
    """
    return _implicit_parts(derivation, q, k, inputs, initial_covariance, unit_key_tol)[0]


def implicit(derivation, q: Tensor, k: Tensor, v: Tensor, inputs: dict, initial_state=None,
             initial_covariance=None, *, unit_key_tol: float = UNIT_KEY_TOL) -> ReferenceOutput:
    """The layer's readout in closed form, y = Phi V + Hs S0, and its variance (no state).

    Arguments as for `recurrent` (no cu_seqlens); o [B, T, H, V], variance [B, T, H].
    """
    B, T, H, K, V = _check_qkv(q, k, v)
    if initial_state is None:
        S0 = torch.zeros(B, H, K, V, dtype=DTYPE)
    else:
        _check_tensor("initial_state", initial_state, (B, H, K, V))
        S0 = initial_state                                                    # [B, H, K, V]
    Phi, Hs, var = _implicit_parts(derivation, q, k, inputs, initial_covariance, unit_key_tol)
    o = Phi @ _heads_first(v) + Hs @ S0                                       # [B, H, T, V]
    return ReferenceOutput(o.transpose(1, 2).contiguous(), None, None,
                           None if var is None else var.transpose(1, 2).contiguous())
