"""Implicit attention: the matrix Phi of every zoo model on one input, and the Bayesian Layer's
predictive variance along it (MATH.md section 5).

    python3 -m examples.implicit_attention.run [--smoke] [--out DIR]

Every zoo layer's readout is linear in the values, y = Phi V (zero initial state), with Phi a
T x T lower-triangular matrix that depends on the queries, keys and gates only. This example
builds Phi for all ten zoo models on the same input, draws them as heatmaps on one shared
diverging colour scale, and plots the predictive variance q_t^T P_t q_t of the Bayesian Layer
along the sequence (the compiled op, float32, against the float64 reference filter).

The input: a recall task. Six symbols A..F have unit keys in R^K (K = 16): A, B, C random unit
vectors in the first K/2 key dimensions, D, E, F in the last K/2, so symbols of the same half
overlap (|cos| up to ~0.6) and the halves are orthogonal. Token t writes symbol a_t (key
k_t = key(a_t), value v_t random) and queries symbol b_t (q_t = key(b_t)); b_t cycles
A, B, ..., F so every symbol is probed every six rows, and a_t repeats symbols unequally
(tokens 0-5 write A..F once; then A is written often, F never again), so a row shows where
its symbol was written, and how each model weighs an old write against a recent one
(recency), against repeated writes (averaging or overwriting), and against the other symbols
(crosstalk). Phi itself does not depend on the values.

Gates, chosen so each model's mechanism shows:
- scalar gate (mamba2, gated_deltanet, bayesian_layer): alpha_t = 0.98 per token, and a
  forget gate alpha = 0.02 at the boundary token t = T/2 (the context is cleared there);
- per-key gate (gla, kda, bayesian_layer_diag): alpha = 1 on the first K/2 key dimensions (A, B, C
  held indefinitely) and 0.85 on the last K/2 (D, E, F fade within ~10 tokens);
- retnet: its fixed decay for one head, gamma = 1 - 2^-5 (as fla's op and ours compute it);
- delta rule (deltanet, gated_deltanet, kda): beta = 0.9 (strong overwrite);
- Kalman family: prior p0 = 1, observation noise r = 0.1 (ridge lambda = r/p0 = 0.1); process
  noise sigma_t = p0 (1 - alpha_t^2) for the scalar gate, which keeps the prior stationary
  (MATH.md 4), so the forget gate resets the covariance to about p0 I; sigma = 0.02 for the
  per-key gate (its process noise is one number per head); RLS has neither.

Phi is computed in float64 by designmodel.reference.implicit_attention (the closed form). Checks
in the table: Phi V against the compiled op's output y (designmodel.ops, float32, scale 1, zero
initial state; on CPU in Triton's interpreter), and Phi against an independent construction,
the float64 step-by-step filter (reference.recurrent) run on one-hot values (column s of Phi is
the output for v = e_s). Outputs, beside this file: implicit_attention.png (the figure, skipped
with a message if matplotlib is missing), implicit_attention.md (the table) and
implicit_attention.json (inputs, gates, op outputs, variances, summaries and Phi to 7 digits).
--smoke: T = 32 (boundary at 16), same K, for the CPU test; writes implicit_attention_smoke.*.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton must see this before it is first imported (designmodel's kernels import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from examples.progress import Progress  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = ("linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "kda",
          "rls", "bayesian_layer", "bayesian_layer_diag")
SYMBOLS = "ABCDEF"
# The write sequence after tokens 0-5 (A..F once each): symbol frequencies, F never again.
WRITE_WEIGHTS = (0.4, 0.25, 0.1, 0.15, 0.1, 0.0)
ALPHA, FORGET = 0.98, 0.02            # scalar gate per token, and at the boundary token
ALPHA_FAST = 0.85                      # per-key gate on the last K/2 key dimensions
BETA = 0.9                             # delta-rule gain
P0, R, SIGMA_DIAG = 1.0, 0.1, 0.02     # Kalman prior, observation noise, per-key model's noise
DECAY_WORDS = {"none": "no decay", "constant": "constant decay", "scalar": "scalar gate",
               "per_key": "per-key gate"}
V_DIM = 16                             # value dimension of the op check
# fp32 kernels against float64, relative: in the interpreter 1e-5 for the write and reset
# forward, 1e-4 for the Kalman family (designmodel.check.KERNEL_TOL); on a GPU the write and
# reset kernels take TF32 dots, 5e-3 (tests/kernels/test_gpu.py), the Kalman ones tf32x3, 1e-4
OP_TOL = {"write": 1e-5, "reset": 1e-5, "kalman": 1e-4}
OP_TOL_GPU = {"write": 5e-3, "reset": 5e-3, "kalman": 1e-4}


# --- the input -------------------------------------------------------------------------------

def config(smoke: bool, T: int | None = None, K: int = 16, seed: int = 0) -> dict:
    """Sizes of the run: T tokens (boundary at T/2), key dim K, one head."""
    T = T or (32 if smoke else 64)
    if T < 12 or K < 4 or K % 2:
        raise ValueError(f"need T >= 12 and an even K >= 4, got T = {T}, K = {K}")
    return dict(T=T, K=K, V=V_DIM, boundary=T // 2, seed=seed, smoke=smoke)


def symbol_keys(K: int, gen: torch.Generator) -> torch.Tensor:
    """[6, K] unit keys: A, B, C in the first K/2 dimensions, D, E, F in the last K/2."""
    x = torch.randn(len(SYMBOLS), K // 2, generator=gen, dtype=torch.float64)
    keys = torch.zeros(len(SYMBOLS), K, dtype=torch.float64)
    keys[:3, :K // 2], keys[3:, K // 2:] = x[:3], x[3:]
    return keys / keys.norm(dim=-1, keepdim=True)


def sequence(cfg: dict) -> dict:
    """The shared input: written symbols a, probed symbols b, q, k, v (float32-exact float64)."""
    T, K = cfg["T"], cfg["K"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    keys = symbol_keys(K, gen).float().double()        # float32-exact: the op sees the same
    w = torch.tensor(WRITE_WEIGHTS, dtype=torch.float64)
    later = torch.multinomial(w, T - len(SYMBOLS), replacement=True, generator=gen)
    a = torch.cat([torch.arange(len(SYMBOLS)), later])                       # written symbol
    b = torch.arange(T) % len(SYMBOLS)                                       # probed symbol
    v = torch.randn(T, cfg["V"], generator=gen, dtype=torch.float64)
    v = v.float().double()
    return dict(a=a, b=b, q=keys[b][None, :, None], k=keys[a][None, :, None], v=v[None, :, None],
                keys=keys)                                              # q, k, v [1, T, 1, *]


def gates(cfg: dict) -> dict:
    """Per-token gates [1, T, 1(, K)] and constants [1] (float32-exact float64), by input name."""
    T, K, t0 = cfg["T"], cfg["K"], cfg["boundary"]
    alpha = torch.full((1, T, 1), ALPHA, dtype=torch.float64)
    alpha[:, t0] = FORGET
    alpha_key = torch.ones(1, T, 1, K, dtype=torch.float64)
    alpha_key[..., K // 2:] = ALPHA_FAST
    f32 = lambda x: x.float().double()                                    # noqa: E731
    full = lambda x: torch.full((1, T, 1), x, dtype=torch.float64)        # noqa: E731
    return dict(g=f32(alpha.log()), g_key=f32(alpha_key.log()), beta=f32(full(BETA)),
                r=f32(full(R)), sigma=f32(P0 * (1 - alpha ** 2)), sigma_diag=f32(full(SIGMA_DIAG)),
                p0=torch.full((1,), P0, dtype=torch.float64),
                gamma=_retnet_gamma())


def _retnet_gamma() -> torch.Tensor:
    """RetNet's decay for one head, as ops.retnet computes it: 1 - 2^-5, [1]."""
    return torch.tensor([1 - 2.0 ** -5], dtype=torch.float32).double()


def model_inputs(model: str, gt: dict) -> dict:
    """The reference inputs of a zoo model (float64), by the spec's input names."""
    return {"linear_attention": {}, "retnet": {"gamma": gt["gamma"]},
            "mamba2": {"g": gt["g"]}, "gla": {"g": gt["g_key"]},
            "deltanet": {"beta": gt["beta"]},
            "gated_deltanet": {"beta": gt["beta"], "g": gt["g"]},
            "kda": {"beta": gt["beta"], "g": gt["g_key"]},
            "rls": {"p0": gt["p0"], "r": gt["r"]},
            "bayesian_layer": {"g": gt["g"], "p0": gt["p0"], "r": gt["r"], "sigma": gt["sigma"]},
            "bayesian_layer_diag": {"g": gt["g_key"], "p0": gt["p0"], "r": gt["r"],
                                    "sigma": gt["sigma_diag"]}}[model]


def gate_text(model: str) -> str:
    """The gates of a model, in words (for the table)."""
    scalar = f"alpha = {ALPHA:g}, {FORGET:g} at t = T/2"
    per_key = f"alpha = 1 (dims < K/2), {ALPHA_FAST:g} (dims >= K/2)"
    kal = f"p0 = {P0:g}, r = {R:g}"
    return {"linear_attention": "none", "retnet": "gamma = 1 - 2^-5",
            "mamba2": scalar, "gla": per_key, "deltanet": f"beta = {BETA:g}",
            "gated_deltanet": f"beta = {BETA:g}; {scalar}", "kda": f"beta = {BETA:g}; {per_key}",
            "rls": kal, "bayesian_layer": f"{kal}; {scalar}; sigma = p0 (1 - alpha^2)",
            "bayesian_layer_diag": f"{kal}; {per_key}; sigma = {SIGMA_DIAG:g}"}[model]


# --- Phi, the op, the variance ---------------------------------------------------------------

_DERIVED: dict = {}


def derivation(model: str, variance: bool = False):
    """The zoo derivation (with a variance readout when asked), cached."""
    key = (model, variance)
    if key not in _DERIVED:
        from designmodel.derive import derive
        d = derive(model)
        if variance:
            d = derive(replace(d.spec, readout=replace(d.spec.readout, variance=True)))
        _DERIVED[key] = d
    return _DERIVED[key]


def phi(model: str, seq: dict, gt: dict) -> torch.Tensor:
    """Phi [T, T] in float64, closed form (reference.implicit_attention)."""
    from designmodel.reference import implicit_attention
    return implicit_attention(derivation(model), seq["q"], seq["k"], model_inputs(model, gt))[0, 0]


def phi_by_columns(model: str, seq: dict, gt: dict) -> torch.Tensor:
    """Phi [T, T] from the step-by-step float64 filter on one-hot values: column s is y(v = e_s)."""
    from designmodel.reference import recurrent
    T = seq["q"].shape[1]
    onehot = torch.eye(T, dtype=torch.float64)[None, :, None]                # [1, T, 1, T]
    return recurrent(derivation(model), seq["q"], seq["k"], onehot, model_inputs(model, gt)).o[0, :, 0]


def run_op(model: str, seq: dict, gt: dict, device: str):
    """The compiled op in float32 (scale 1, zero initial state): (y [T, V], variance [T] or None)."""
    from designmodel import ops
    f = lambda x: x.to(device, torch.float32)                              # noqa: E731
    q, k, v = f(seq["q"]), f(seq["k"]), f(seq["v"])
    ins = {n: f(x) for n, x in model_inputs(model, gt).items() if n != "gamma"}  # retnet: its own
    out = getattr(ops, model)(q, k, v, **ins, scale=1.0,
                              **({"output_variance": True} if model in ("rls", "bayesian_layer",
                                                                       "bayesian_layer_diag") else {}))
    var = out[2][0, :, 0].double().cpu() if len(out) > 2 else None
    return out[0][0, :, 0].double().cpu(), var


def reference_variance(model: str, seq: dict, gt: dict) -> torch.Tensor:
    """q_t^T P_t q_t [T] from the float64 step-by-step filter (variance readout declared)."""
    from designmodel.reference import recurrent
    ref = recurrent(derivation(model, variance=True), seq["q"], seq["k"], seq["v"],
                    model_inputs(model, gt))
    return ref.variance[0, :, 0]


# --- summaries -------------------------------------------------------------------------------

def summary(Phi: torch.Tensor, seq: dict, t0: int) -> dict:
    """What a row of Phi puts where, averaged over the rows whose probed symbol was written:
    on that symbol's latest write, on its earlier writes (split by the key half of the symbol:
    A-C or D-F), on the other symbols' tokens (crosstalk, |Phi|), and across the boundary t0."""
    a, b = seq["a"].tolist(), seq["b"].tolist()
    T, half = len(a), len(SYMBOLS) // 2
    latest, older, cross, rows = [], {0: [], 1: []}, [], 0
    for t in range(T):
        same = [s for s in range(t + 1) if a[s] == b[t]]
        if not same:
            continue
        rows += 1
        latest.append(float(Phi[t, same[-1]]))
        older[b[t] // half].append(float(Phi[t, same[:-1]].sum()) if len(same) > 1 else 0.0)
        other = [s for s in range(t + 1) if a[s] != b[t]]
        cross.append(float(Phi[t, other].abs().sum()))
    rowsum = Phi.sum(1)
    mean = lambda x: sum(x) / len(x)                                           # noqa: E731
    return dict(lower_triangular=bool((Phi.triu(1) == 0).all()),
                rows=rows, latest=mean(latest), older=mean(older[0] + older[1]),
                older_ac=mean(older[0]), older_df=mean(older[1]), crosstalk=mean(cross),
                across_boundary=float(Phi[t0 + 1:, :t0].abs().sum(1).mean()),
                rowsum_mean=float(rowsum.mean()), rowsum_min=float(rowsum.min()),
                rowsum_max=float(rowsum.max()), max_abs=float(Phi.abs().max()))


# --- the study -------------------------------------------------------------------------------

def device_name() -> str:
    """Where the compiled ops run, in words."""
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"


def study(cfg: dict) -> dict:
    """Phi of every zoo model, the op checks and the Bayesian Layer's variance."""
    from designmodel.zoo import spec
    from designmodel.family import classify
    seq, gt = sequence(cfg), gates(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = dict(models={}, variance={})
    t_start = time.perf_counter()
    # work units: one op run and two references per model, counted in tokens
    with Progress(len(MODELS) * cfg["T"], unit="tok", label="implicit attention") as bar:
        for model in MODELS:
            st = classify(spec(model))
            P = phi(model, seq, gt)
            P_cols = phi_by_columns(model, seq, gt)
            t0 = time.perf_counter()
            y, var = run_op(model, seq, gt, device)
            op_s = time.perf_counter() - t0
            y_phi = P @ seq["v"][0, :, 0]
            err = float((y_phi - y).abs().max())
            rel = err / float(y_phi.abs().max())
            info = dict(family=st.family, decay=st.decay, gates=gate_text(model),
                        phi_vs_op_abs=err, phi_vs_op_rel=rel,
                        op_tol=(OP_TOL_GPU if device == "cuda" else OP_TOL)[st.family],
                        phi_vs_columns=float((P - P_cols).abs().max() / P.abs().max()),
                        op_seconds=round(op_s, 2), y_op=_f32_list(y),
                        phi=[[float(f"{x:.7g}") for x in row[:i + 1]] for i, row in enumerate(P.tolist())],
                        **summary(P, seq, cfg["boundary"]))
            if var is not None:
                ref_var = reference_variance(model, seq, gt)
                out["variance"][model] = dict(
                    op=_f32_list(var), reference=ref_var.tolist(),
                    rel_error=float((var - ref_var).abs().max() / ref_var.abs().max()))
            out["models"][model] = info
            bar.update(cfg["T"])
    out["config"] = dict(cfg, elapsed_s=round(time.perf_counter() - t_start, 1),
                         device=device_name(), torch=torch.__version__,
                         python=platform.python_version(),
                         gates=dict(alpha=ALPHA, forget=FORGET, alpha_fast=ALPHA_FAST, beta=BETA,
                                    p0=P0, r=R, sigma_diag=SIGMA_DIAG,
                                    retnet_gamma=float(gt["gamma"][0])))
    out["input"] = dict(a=[SYMBOLS[i] for i in seq["a"].tolist()],
                        b=[SYMBOLS[i] for i in seq["b"].tolist()],
                        keys=_f32_list(seq["keys"]), v=_f32_list(seq["v"][0, :, 0]))
    return out


def _f32_list(x: torch.Tensor) -> list:
    """A float32-exact tensor as nested lists of 9-digit numbers (they round-trip float32)."""
    if x.dim() == 0:
        return float(f"{float(x):.9g}")
    return [_f32_list(r) for r in x]


def phi_from_json(m: dict) -> torch.Tensor:
    """A model's Phi [T, T] (float64, 7 digits) from its result entry (the lower triangle is stored)."""
    T = len(m["phi"])
    P = torch.zeros(T, T, dtype=torch.float64)
    for t, row in enumerate(m["phi"]):
        P[t, :t + 1] = torch.tensor(row, dtype=torch.float64)
    return P


def input_from_json(res: dict) -> tuple[dict, dict]:
    """(seq, gates) rebuilt from a result's config and input (float64, as the run used them)."""
    cfg = res["config"]
    # 9 digits round-trip float32: back to float32, the values the run used
    keys = torch.tensor(res["input"]["keys"], dtype=torch.float32).double()
    a = torch.tensor([SYMBOLS.index(c) for c in res["input"]["a"]])
    b = torch.tensor([SYMBOLS.index(c) for c in res["input"]["b"]])
    v = torch.tensor(res["input"]["v"], dtype=torch.float32).double()
    seq = dict(a=a, b=b, q=keys[b][None, :, None], k=keys[a][None, :, None], v=v[None, :, None],
               keys=keys)
    return seq, gates(cfg)


# --- outputs ---------------------------------------------------------------------------------

def _f(x: float) -> str:
    """A number for the table: 3 decimals, or 3 significant digits when tiny or huge."""
    if x == 0:
        return "0"
    return f"{x:.2e}" if abs(x) < 1e-3 or abs(x) >= 1e3 else f"{x:.3f}"


def table(res: dict) -> str:
    """The Markdown table of a result: per model, what Phi looks like and the op check."""
    cfg = res["config"]
    T, t0 = cfg["T"], cfg["boundary"]
    lines = [f"# Implicit attention{' (smoke)' if cfg['smoke'] else ''}: Phi of the zoo on one input",
             "",
             f"T = {T}, K = {cfg['K']}, one head, boundary (forget gate of the scalar-gated "
             f"models) at t = {t0}. Written symbols a_t: {''.join(res['input']['a'])}; probed "
             f"symbols b_t cycle {SYMBOLS}. Phi in float64 (reference.implicit_attention); "
             f"the op in float32 on {cfg['device']} (torch {cfg['torch']}), scale 1, zero initial "
             f"state, V = {cfg['V']} random values; run time {cfg['elapsed_s']} s.",
             "",
             "Per row t (rows whose probed symbol was written at some s <= t), averaged over rows: "
             "*latest* = Phi on the probed symbol's latest write; *older* = sum of Phi over its "
             "earlier writes (all probes; probes of A-C; probes of D-F, the key half that the "
             "per-key gate decays); *crosstalk* = sum of |Phi| over the other symbols' tokens. "
             f"*across* = mean over rows t > {t0} of sum_(s < {t0}) |Phi_ts|. *lower tri.*: every "
             "entry above the diagonal is exactly 0. *Phi V vs op*: max |Phi V - y| / max |Phi V| "
             "with y the compiled op's output (tolerance: 1e-5 write/reset, 1e-4 Kalman; on a GPU, "
             "where the write and reset kernels take TF32 dots, 5e-3 write/reset). "
             "*Phi vs filter*: max |Phi - Phi_rec| / max |Phi|, Phi_rec built column by column by "
             "the float64 step-by-step filter on one-hot values.",
             "",
             "| model | family | decay | gates | lower tri. | latest | older (all; A-C; D-F) | crosstalk | across | "
             "row sum (mean, min, max) | max abs(Phi) | Phi V vs op | Phi vs filter |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        rs = f"{_f(m['rowsum_mean'])}, {_f(m['rowsum_min'])}, {_f(m['rowsum_max'])}"
        ok = "" if m["phi_vs_op_rel"] <= m["op_tol"] else " (ABOVE TOL)"
        lines.append(f"| {name} | {m['family']} | {m['decay']} | {m['gates']} | "
                     f"{'yes' if m['lower_triangular'] else 'no'} | {_f(m['latest'])} | "
                     f"{_f(m['older'])}; {_f(m['older_ac'])}; {_f(m['older_df'])} | "
                     f"{_f(m['crosstalk'])} | {_f(m['across_boundary'])} | {rs} | "
                     f"{_f(m['max_abs'])} | {m['phi_vs_op_rel']:.1e}{ok} | {m['phi_vs_columns']:.1e} |")
    lines += ["", "## Predictive variance q_t^T P_t q_t", "",
              "The compiled op (float32, output_variance=True) against the float64 step-by-step "
              "filter with a variance readout.", "",
              "| model | max rel. error | var at t = 0 | min var before t0 | var at t0 | var at T-1 |",
              "|---|---|---|---|---|---|"]
    for name, v in res["variance"].items():
        ref = v["reference"]
        lines.append(f"| {name} | {v['rel_error']:.1e} | {_f(ref[0])} | {_f(min(ref[:t0]))} | "
                     f"{_f(ref[t0])} | {_f(ref[-1])} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> str | None:
    """Draw the figure; returns None, or why the plot was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not available ({exc})"
    cfg, models = res["config"], res["models"]
    T, t0 = cfg["T"], cfg["boundary"]
    vmax = max(m["max_abs"] for m in models.values())
    fig = plt.figure(figsize=(19, 12.5))
    gs = fig.add_gridspec(3, 5, height_ratios=[1, 1, 0.8], hspace=0.38, wspace=0.12)
    a, b = res["input"]["a"], res["input"]["b"]
    im = None
    for i, (name, m) in enumerate(models.items()):
        ax = fig.add_subplot(gs[i // 5, i % 5])
        im = ax.imshow(phi_from_json(m).numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(f"{name}\n({m['family']} family, {DECAY_WORDS[m['decay']]})", fontsize=10)
        if m["decay"] == "scalar":
            ax.axvline(t0 - 0.5, color="gray", lw=0.6, ls="--")
            ax.axhline(t0 - 0.5, color="gray", lw=0.6, ls="--")
        step = 8 if T > 32 else 4
        ax.set_xticks(range(0, T, step))
        ax.set_yticks(range(0, T, step))
        ax.tick_params(labelsize=7)
        if i % 5 == 0:
            ax.set_ylabel("query token t")
        if i // 5 == 1:
            ax.set_xlabel("key token s")
    cax = fig.add_axes([0.915, 0.42, 0.008, 0.42])
    fig.colorbar(im, cax=cax, label="Phi_ts")
    ax = fig.add_subplot(gs[2, :])
    styles = {"bayesian_layer": ("tab:blue", "Bayesian Layer (scalar gate)"),
              "bayesian_layer_diag": ("tab:orange", "Bayesian Layer (per-key gate)"),
              "rls": ("tab:green", "RLS")}
    t = list(range(T))
    for name, v in res["variance"].items():
        col, label = styles.get(name, ("gray", name))
        ax.plot(t, v["reference"], "-", color=col, lw=1.4, label=f"{label}: float64 filter")
        ax.plot(t, v["op"], "o", color=col, ms=3, label=f"{label}: op, float32 "
                f"(max rel. err. {v['rel_error']:.0e})")
    ax.set_xticks(t)
    ax.set_xticklabels([f"{x}\n{b[x]}" for x in t], fontsize=6)
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_xlabel("token t (probed symbol b_t below)")
    ax.set_ylabel("predictive variance q_t^T P_t q_t")
    ax.set_yscale("log")
    lo = min(min(v["reference"]) for v in res["variance"].values())
    ax.set_ylim(lo / 2, 30)                    # room for the legend above the curves
    ax.axvline(t0, color="gray", lw=0.8, ls="--")
    ax.text(t0, lo / 1.8, f" t = {t0}: forget gate (scalar gate)", color="gray", va="bottom", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.suptitle(f"Implicit attention Phi (y = Phi V) of the zoo on one recall sequence "
                 f"(T = {T}, K = {cfg['K']}; written a_t = {''.join(a)}; probed b_t cycle "
                 f"{SYMBOLS}); shared colour scale +-{vmax:.2f}", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return None


def write_outputs(res: dict, out: Path, want_plot: bool = True) -> dict:
    """Write the JSON, the table and the figure into out; returns {kind: path}."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "implicit_attention_smoke" if res["config"]["smoke"] else "implicit_attention"
    files = {"json": out / f"{stem}.json", "table": out / f"{stem}.md", "plot": out / f"{stem}.png"}
    files["json"].write_text(json.dumps(res, separators=(",", ":")) + "\n")
    text = table(res)
    files["table"].write_text(text)
    print(text)
    why = plot(res, files["plot"]) if want_plot else "--no-plot"
    if why:
        print(f"plot skipped: {why}")
        files.pop("plot")
    for p in files.values():
        print(f"wrote {p}")
    return files


def main(argv=None) -> int:
    """The command line; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python3 -m examples.implicit_attention.run",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="T = 32 (for the CPU test)")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: beside this file)")
    ap.add_argument("--T", type=int, default=None)
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="redraw table and figure from an implicit_attention.json (no computation)")
    args = ap.parse_args(argv)
    if args.from_json:
        write_outputs(json.loads(args.from_json.read_text()), args.out, not args.no_plot)
        return 0
    cfg = config(args.smoke, args.T, args.K, args.seed)
    print(f"implicit attention: T = {cfg['T']}, K = {cfg['K']}, boundary t = {cfg['boundary']}, "
          f"{len(MODELS)} zoo models, op on {device_name()}")
    write_outputs(study(cfg), args.out, not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
