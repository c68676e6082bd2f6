"""The collision study: retrieval error against the number of writes, measured and predicted.

    python3 -m examples.collision.run [--smoke] [--out DIR] [--path auto|ops|reference]

Writes n = 1..2K items (unit keys k_j, values v_j with per-coordinate variance s2 = 1) into
each memory from S_0 = 0, reads the final state S after n writes and measures the retrieval
error E = mean_j ||S^T k_j - v_j||^2 / V over the stored items j <= n, for

- linear attention (the write model: Hebbian),
- DeltaNet with beta = 1 - 1e-6 (the covariance reset with gain ~1; the zoo's beta lies in the
  open interval (0, 1), and the gap to beta = 1 changes E by O(1e-6), far below Monte Carlo
  error),
- the exact filter, RLS (online ridge regression, lambda = r / p0 with p0 = 1),

on keys at controlled overlap rho (k_i = sqrt(rho) u + sqrt(1 - rho) z_i, z_i orthonormal and
orthogonal to u: this needs n + 1 <= K, so these keys stop at n = K - 1) and on random keys on
the sphere (n = 1..2K), and overlays the closed forms of MATH.md section 7
(examples/collision/predictions.py).

Every n is a sequence of its own (the first n keys and values of a draw), packed along T with
cu_seqlens, so one call returns the final state of every n. The curves are computed with the
compiled ops (designmodel.ops, float32) where they exist and the device makes them practical
(CUDA; on CPU the Triton interpreter, which is fast enough only for --smoke), else with the
float64 reference filter (designmodel.reference.recurrent); the table says which computed each
curve. Outputs: collision.md (table), collision.png (plot, skipped if matplotlib is missing)
and collision.json (the aggregated results; --from-json redraws table and plot from it).
--smoke uses K = 16, a few n and one seed and writes collision_smoke.*.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    # Triton must see this before it is first imported (designmodel's kernels import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from examples.collision import predictions as pred  # noqa: E402
from examples.progress import Progress  # noqa: E402

HERE = Path(__file__).resolve().parent
BETA = 1.0 - 1e-6          # DeltaNet's gain: the zoo's beta is in the open interval (0, 1)
P0 = 1.0                   # RLS prior variance; r = lambda * p0
REL_FLOOR = 0.01           # relative gaps are taken where the prediction is >= REL_FLOOR * s2
NUM_FLOOR = 1e-5           # E below this (x s2) is the kernels' rounding floor: float32, and TF32
                           # dots on the GPU (readouts good to ~1e-3, E ~ 1e-6 on orthogonal keys)


# --- configuration ---------------------------------------------------------------------------

def config(args) -> dict:
    if args.smoke:
        K = args.K or 16
        cfg = dict(K=K, V=args.V or 64, seeds=args.seeds or 1,
                   ns_overlap=[2, 6, K - 1], ns_random=[4, K, 2 * K])
    else:
        K = args.K or 64
        cfg = dict(K=K, V=args.V or 64, seeds=args.seeds or 16,
                   ns_overlap=list(range(1, K)), ns_random=list(range(1, 2 * K + 1)))
    cfg.update(s2=1.0, rhos=[0.0, 0.3, 0.6, 0.9], lambdas=args.lambdas, beta=BETA, p0=P0,
               smoke=bool(args.smoke), seed0=args.seed0)
    return cfg


def models(cfg) -> list[dict]:
    out = [dict(key="linear_attention", label="linear attention (write)", family="write",
                zoo="linear_attention", lam=None),
           dict(key="deltanet", label="DeltaNet (reset, beta=1-1e-6)", family="reset",
                zoo="deltanet", lam=None)]
    for lam in cfg["lambdas"]:
        out.append(dict(key=f"rls_{lam:g}", label=f"RLS (exact filter, lambda={lam:g})",
                        family="kalman", zoo="rls", lam=lam))
    return out


# --- keys and values -------------------------------------------------------------------------

def overlap_keys(K: int, n: int, rhos, gen) -> torch.Tensor:
    """[len(rhos), n, K] unit keys with k_i . k_j = rho (i != j): sqrt(rho) u + sqrt(1-rho) z_i."""
    if n + 1 > K:
        raise ValueError(f"overlap keys need n + 1 <= K, got n = {n}, K = {K}")
    Q, _ = torch.linalg.qr(torch.randn(K, n + 1, generator=gen, dtype=torch.float64))
    u, Z = Q[:, 0], Q[:, 1:].T                                             # Z [n, K]
    return torch.stack([math.sqrt(r) * u + math.sqrt(1 - r) * Z for r in rhos])


def random_keys(K: int, n: int, gen) -> torch.Tensor:
    """[1, n, K] keys uniform on the unit sphere."""
    x = torch.randn(1, n, K, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


# --- the two ways of computing final states --------------------------------------------------

class Engine:
    """Final states of packed sequences, with the compiled ops or the float64 reference."""

    def __init__(self, path: str, smoke: bool):
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        want_ops = path == "ops" or (path == "auto" and (self.cuda or smoke))
        self.ops = None
        self.why = ""
        if want_ops:
            try:
                from designmodel import ops
                self.ops = ops
            except Exception as exc:  # noqa: BLE001  (report and fall back)
                self.why = f"designmodel.ops failed to import ({type(exc).__name__}: {exc})"
        elif path == "auto":
            self.why = "no CUDA: Triton's interpreter is too slow at full size"
        self._derived = {}

    def device_name(self) -> str:
        if self.cuda:
            return f"cuda ({torch.cuda.get_device_name(0)})"
        return "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"

    def route(self, m: dict) -> str:
        """How model m is computed: 'ops.<name>' or 'reference'."""
        if self.ops is None:
            return "reference"
        if m["family"] != "kalman":
            return f"ops.{m['zoo']}"
        if hasattr(self.ops, "rls"):
            return "ops.rls"
        if hasattr(self.ops, "bayesian_layer"):
            return "ops.bayesian_layer"
        return "reference"

    def describe(self, route: str) -> str:
        if route == "reference":
            why = f"; {self.why}" if self.why else ""
            return f"float64 reference (designmodel.reference.recurrent, cpu{why})"
        extra = " with g = 0, no process noise" if route == "ops.bayesian_layer" else ""
        return f"designmodel.{route}{extra} (float32, {self.device_name()})"

    def states(self, m: dict, route: str, keys: torch.Tensor, values: torch.Tensor, ns) -> torch.Tensor:
        """Final states [len(ns), H, K, V] (float64, cpu) after the first n writes, each n."""
        idx = torch.cat([torch.arange(n) for n in ns])
        k = keys[:, idx].transpose(0, 1)[None].contiguous()              # [1, T, H, K]
        v = values[:, idx].transpose(0, 1)[None].contiguous()            # [1, T, H, V]
        cu = torch.tensor([0] + list(np.cumsum(ns)), dtype=torch.long)
        T, H = k.shape[1], k.shape[2]
        if route == "reference":
            return self._reference(m, k, v, cu, T, H)
        dev, f32 = self.device, torch.float32
        k, v, cu = k.to(dev, f32), v.to(dev, f32), cu.to(dev)
        common = dict(scale=1.0, output_final_state=True, cu_seqlens=cu)
        if route == "ops.linear_attention":
            _, S = self.ops.linear_attention(k, k, v, **common)
        elif route == "ops.deltanet":
            beta = torch.full((1, T, H), BETA, dtype=f32, device=dev)
            _, S = self.ops.deltanet(k, k, v, beta, **common)
        elif route == "ops.rls":
            r = torch.full((1, T, H), m["lam"] * P0, dtype=f32, device=dev)
            _, (S, _) = self.ops.rls(k, k, v, r, p0=P0, **common)
        elif route == "ops.bayesian_layer":
            r = torch.full((1, T, H), m["lam"] * P0, dtype=f32, device=dev)
            g = torch.zeros((1, T, H), dtype=f32, device=dev)
            _, (S, _) = self.ops.bayesian_layer(k, k, v, g, r, p0=P0, **common)
        else:
            raise ValueError(route)
        return S.double().cpu()

    def _reference(self, m, k, v, cu, T, H) -> torch.Tensor:
        from designmodel.derive import derive
        from designmodel.reference import recurrent
        if m["zoo"] not in self._derived:
            self._derived[m["zoo"]] = derive(m["zoo"])
        inputs = {}
        if m["zoo"] == "deltanet":
            inputs["beta"] = torch.full((1, T, H), BETA, dtype=torch.float64)
        if m["zoo"] == "rls":
            inputs["r"] = torch.full((1, T, H), m["lam"] * P0, dtype=torch.float64)
            inputs["p0"] = torch.full((H,), P0, dtype=torch.float64)
        return recurrent(self._derived[m["zoo"]], k, k, v, inputs, cu_seqlens=cu).state


def retrieval_errors(S: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ns) -> np.ndarray:
    """Per value coordinate, mean_j (S_n^T k_j - v_j)^2 over j <= n: [H, len(ns), V]."""
    out = []
    for i, n in enumerate(ns):
        R = torch.einsum("hnk,hkv->hnv", keys[:, :n], S[i]) - values[:, :n]
        out.append((R ** 2).mean(1))                                         # [H, V]
    return torch.stack(out, 1).numpy()


# --- the study -------------------------------------------------------------------------------

def measure(cfg: dict, engine: Engine, crosscheck: int = 0) -> dict:
    """The study; crosscheck > 0 recomputes the first `crosscheck` seeds with the reference."""
    K, V, s2 = cfg["K"], cfg["V"], cfg["s2"]
    groups = {"overlap": cfg["ns_overlap"], "random": cfg["ns_random"]}
    ms = models(cfg)
    routes = {m["key"]: engine.route(m) for m in ms}
    for m in ms:
        print(f"  {m['label']:34s} <- {engine.describe(routes[m['key']])}")
    tokens = cfg["seeds"] * len(ms) * (len(cfg["rhos"]) * sum(groups["overlap"]) + sum(groups["random"]))
    samples = {(m["key"], g): [] for m in ms for g in groups}
    xdiff = {m["key"]: 0.0 for m in ms}
    t0 = time.perf_counter()
    with Progress(tokens, unit="tok", label="collision") as bar:
        for s in range(cfg["seeds"]):
            gen = torch.Generator().manual_seed(cfg["seed0"] + 7919 * s)
            data = {"overlap": overlap_keys(K, max(groups["overlap"]), cfg["rhos"], gen),
                    "random": random_keys(K, max(groups["random"]), gen)}
            vals = {g: math.sqrt(s2) * torch.randn(x.shape[0], x.shape[1], V, generator=gen,
                                                   dtype=torch.float64) for g, x in data.items()}
            for m in ms:
                for g, ns in groups.items():
                    S = engine.states(m, routes[m["key"]], data[g], vals[g], ns)
                    err = retrieval_errors(S, data[g], vals[g], ns)
                    samples[(m["key"], g)].append(err)
                    if s < crosscheck and routes[m["key"]] != "reference":
                        ref = engine.states(m, "reference", data[g], vals[g], ns)
                        e_ref = retrieval_errors(ref, data[g], vals[g], ns).mean(-1)
                        gap = np.abs(err.mean(-1) - e_ref) / np.maximum(e_ref, 1e-3 * s2)
                        xdiff[m["key"]] = max(xdiff[m["key"]], float(gap.max()))
                    bar.update(data[g].shape[0] * sum(ns))
    elapsed = time.perf_counter() - t0

    curves = []
    for m in ms:
        for g, ns in groups.items():
            arr = np.stack(samples[(m["key"], g)])                       # [seeds, H, len(ns), V]
            for h in range(arr.shape[1]):
                rho = cfg["rhos"][h] if g == "overlap" else None
                a = arr[:, h]                                             # [seeds, len(ns), V]
                mean = a.mean(axis=(0, 2))
                if g == "random" and a.shape[0] > 1:
                    # the keys are random too: the seeds' means are the independent samples
                    se = a.mean(2).std(0, ddof=1) / math.sqrt(a.shape[0])
                else:
                    # overlap keys have a fixed Gram matrix, so E depends on the values alone and
                    # the (seed, value coordinate) samples are i.i.d.
                    flat = a.transpose(1, 0, 2).reshape(len(ns), -1)
                    se = flat.std(1, ddof=1) / math.sqrt(flat.shape[1])
                curve = dict(model=m["key"], label=m["label"], family=m["family"], lam=m["lam"],
                             keys="random" if rho is None else f"rho={rho:g}", rho=rho,
                             ns=list(ns), mean=mean.tolist(), se=se.tolist(),
                             pred=np.asarray(pred.predict(m["family"], ns, K, rho, m["lam"], s2),
                                             float).tolist(),
                             computed_by=engine.describe(routes[m["key"]]))
                if m["family"] == "reset" and rho is not None:
                    curve["plateau"] = pred.reset_overlap_plateau(rho, s2)
                if crosscheck and routes[m["key"]] != "reference":
                    curve["ops_vs_reference"] = xdiff[m["key"]]
                curves.append(curve)
    used_ops = any(r != "reference" for r in routes.values())
    info = dict(cfg, elapsed_s=round(elapsed, 1),
                device=engine.device_name() if used_ops else "cpu (float64 reference)",
                torch=torch.__version__, python=platform.python_version(),
                crosscheck=int(min(crosscheck, cfg["seeds"])))
    return dict(config=info, curves=curves)


# --- comparison with the predictions ---------------------------------------------------------

def compare(curve: dict, K: int, s2: float, seeds: int = 2) -> dict:
    """Largest gaps between measured and predicted in the region where the prediction applies."""
    ns = np.array(curve["ns"])
    mean, se, p = (np.array(curve[x]) for x in ("mean", "se", "pred"))
    fam, rnd = curve["family"], curve["rho"] is None
    region = np.ones(len(ns), bool)
    if fam == "write":
        where = "exact, all n"
    elif fam == "reset" and rnd:
        region = ns >= K / 4
        where = "large-K formula; n >= K/4 (n < K/4 has a finite-n gap of about 1/n)"
    elif fam == "reset":
        where = "exact finite-n curve (our derivation; its limit is MATH's plateau), all n"
    elif rnd:
        where = "large-K (Marchenko-Pastur) formula, all n"
    else:
        where = "exact, all n"
    rel_ok = region & (p >= REL_FLOOR * s2)
    rel = np.abs(mean - p) / np.where(p > 0, p, 1)
    absgap = np.abs(mean - p)
    z = absgap / np.maximum(se, 1e-300)
    # a noiseless case (orthogonal keys: E = 0, SE = 0) is judged against the rounding floor
    within = (z <= 3) | (absgap <= NUM_FLOOR * s2)
    pool = region & (p > 0)
    pooled = float(mean[pool].sum() / p[pool].sum()) if pool.any() else None
    zmax = float(np.where(absgap <= NUM_FLOOR * s2, 0, z)[region].max()) if region.any() else None
    out = dict(where=where, pooled=pooled, zmax=zmax,
               max_rel=float(rel[rel_ok].max()) if rel_ok.any() else None,
               at_n=int(ns[rel_ok][rel[rel_ok].argmax()]) if rel_ok.any() else None,
               max_abs=float(absgap[region].max()) if region.any() else None,
               abs_at_n=int(ns[region][absgap[region].argmax()]) if region.any() else None,
               within3=f"{int(within[region].sum())}/{int(region.sum())}")
    if rnd and seeds < 2:
        out["within3"] = "n/a (1 seed)"
    outside = ~region & (p >= REL_FLOOR * s2)
    if outside.any():
        out["outside_max_rel"] = float(rel[outside].max())
        out["outside_at_n"] = int(ns[outside][rel[outside].argmax()])
    if "plateau" in curve:
        out["plateau"] = curve["plateau"]
        out["plateau_gap"] = float(abs(mean[-1] - curve["plateau"]) / curve["plateau"]) \
            if curve["plateau"] > 0 else float(abs(mean[-1]))
    return out


# --- outputs ---------------------------------------------------------------------------------

def _f(x: float) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e3:
        return f"{x:.2e}"
    return f"{x:.4f}" if abs(x) < 1 else f"{x:.3f}"


def table(res: dict) -> str:
    cfg, curves = res["config"], res["curves"]
    K, s2 = cfg["K"], cfg["s2"]
    cols = [2, 8, 16, 32, K - 1, K, 3 * K // 2, 2 * K] if not cfg["smoke"] else \
        sorted(set(cfg["ns_overlap"]) | set(cfg["ns_random"]))
    cols = [c for c in dict.fromkeys(cols) if c >= 1]
    by = {}
    for c in curves:
        by.setdefault(c["model"], []).append(c)
    lines = [f"# Collision study{' (smoke)' if cfg['smoke'] else ''}: retrieval error against n",
             "",
             f"K = {K}, V = {cfg['V']}, s2 = {s2:g}, {cfg['seeds']} seed(s); "
             f"E = mean over stored items j <= n of ||S^T k_j - v_j||^2 / V, "
             f"S the final state after n writes. DeltaNet: beta = {cfg['beta']!r}. "
             f"RLS: p0 = {cfg['p0']:g}, r = lambda p0. Overlap keys need n + 1 <= K, so they stop "
             f"at n = {K - 1}; beyond that only random keys apply (marked n/a). "
             f"Run time {cfg['elapsed_s']} s on {cfg['device']} (torch {cfg['torch']}).",
             "", "Computed by:", ""]
    for key, cs in by.items():
        lines.append(f"- {cs[0]['label']}: {cs[0]['computed_by']}")
    if cfg.get("crosscheck"):
        lines += ["", f"Cross-check: every curve computed by the ops was recomputed for the first "
                  f"{cfg['crosscheck']} seed(s), on the same keys and values, by the float64 "
                  "reference; largest relative difference of E over all n and key designs "
                  "(relative to max(E_ref, 1e-3 s2)):", ""]
        for key, cs in by.items():
            if "ops_vs_reference" in cs[0]:
                lines.append(f"- {cs[0]['label']}: {cs[0]['ops_vs_reference']:.2e}")
    lines += ["", "## Measured E (predicted) at selected n", "",
              "| model | keys | " + " | ".join(f"n={c}" for c in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for c in curves:
        idx = {n: i for i, n in enumerate(c["ns"])}
        cells = []
        for n in cols:
            if n in idx:
                i = idx[n]
                cells.append(f"{_f(c['mean'][i])} ({_f(c['pred'][i])})")
            else:
                cells.append("n/a" if c["rho"] is not None and n + 1 > K else "")
        lines.append(f"| {c['label']} | {c['keys']} | " + " | ".join(cells) + " |")
    lines += ["", "## Measured against predicted", "",
              f"Relative gaps |E - pred| / pred where pred >= {REL_FLOOR:g} s2 and the prediction "
              "applies; absolute gaps there too; 'within 3 SE' counts points whose gap is within "
              "three Monte Carlo standard errors (random keys: SE over seeds; overlap keys: the "
              "Gram matrix is fixed, SE over seeds x value coordinates; a gap below "
              f"{NUM_FLOOR:g} s2, the kernels' rounding floor, counts as within); 'sum E / sum pred' pools "
              "the points of the region (pred > 0), so Monte Carlo noise averages out and a systematic "
              "bias shows.", "",
              "| model | keys | largest rel. gap (at n) | largest abs. gap (at n) | within 3 SE | "
              "sum E / sum pred | prediction | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for c in curves:
        g = compare(c, K, s2, cfg["seeds"])
        rel = f"{g['max_rel'] * 100:.1f}% ({g['at_n']})" if g["max_rel"] is not None else "- (pred < floor)"
        ab = f"{_f(g['max_abs'])} ({g['abs_at_n']})" if g["max_abs"] is not None else "-"
        notes = []
        if "outside_max_rel" in g:
            notes.append(f"outside: {g['outside_max_rel'] * 100:.0f}% at n={g['outside_at_n']}")
        if "plateau" in g:
            notes.append(f"MATH plateau {_f(g['plateau'])}; E(n={c['ns'][-1]}) = {_f(c['mean'][-1])}"
                         + (f" ({g['plateau_gap'] * 100:.1f}% below)" if g["plateau"] > 0 else ""))
        pooled = f"{g['pooled']:.4f}" if g["pooled"] is not None else "-"
        lines.append(f"| {c['label']} | {c['keys']} | {rel} | {ab} | {g['within3']} | {pooled} | {g['where']} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> str | None:
    """Draw the figure; returns None, or why the plot was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not available ({exc})"
    cfg, curves = res["config"], res["curves"]
    K, s2 = cfg["K"], cfg["s2"]
    colors = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for c in curves:
        colors.setdefault(c["model"], palette[len(colors) % len(palette)])
    fig = plt.figure(figsize=(16, 9.5))
    gs = fig.add_gridspec(2, len(cfg["rhos"]), height_ratios=[1, 1.1], hspace=0.32, wspace=0.08)
    panels = {f"rho={r:g}": fig.add_subplot(gs[0, i]) for i, r in enumerate(cfg["rhos"])}
    half = len(cfg["rhos"]) // 2
    panels["random"] = fig.add_subplot(gs[1, :half])
    panels["random, linear"] = fig.add_subplot(gs[1, half:])
    lo, hi = 1e-8 * s2, 2e2 * s2
    for name, ax in panels.items():
        linear = name.endswith("linear")
        for c in (c for c in curves if c["keys"] == name.split(",")[0]):
            ns, mean, se = np.array(c["ns"]), np.array(c["mean"]), np.array(c["se"])
            col = colors[c["model"]]
            dense = np.arange(1, ns.max() + 1) if c["rho"] is None or c["family"] == "reset" else None
            if dense is not None:
                ax.plot(dense, np.clip(pred.predict(c["family"], dense, K, c["rho"], c["lam"], s2),
                                       0 if linear else lo, None), "-", color=col, lw=1.2, alpha=0.8)
            else:
                ax.plot(ns, np.clip(c["pred"], lo, None), "-", color=col, lw=1.2, alpha=0.8)
            if "plateau" in c and c["plateau"] > 0:
                ax.axhline(c["plateau"], color=col, ls=":", lw=1.2)
            ax.errorbar(ns, mean if linear else np.clip(mean, lo, None), yerr=se, fmt="o", ms=2.6, color=col,
                        elinewidth=0.8, label=c["label"])
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("n (writes)")
        if linear:
            ax.set_ylim(0, 2.2 * s2)
        else:
            ax.set_yscale("log")
            ax.set_ylim(lo, hi)
        if name.startswith("random"):
            ax.axvline(K, color="gray", lw=0.8, ls="--")
            ax.text(K, ax.get_ylim()[1] * (0.97 if linear else 1 / 3), " n = K", color="gray", va="top")
            ax.set_title(f"random unit keys, K = {K} (n = 1..{2 * K}), "
                         f"{'linear' if linear else 'log'} scale")
            ax.set_ylabel("retrieval error E / s2")
            if linear:
                ax.plot([], [], "-", color="gray", label="MATH.md 7 prediction")
                ax.plot([], [], ":", color="gray", label="DeltaNet plateau 2ρ/(2-ρ) (overlap)")
                ax.legend(loc="upper left", fontsize=9)
        else:
            ax.set_title(f"overlap {name.replace('rho', 'ρ')} (n + 1 ≤ K: n ≤ {K - 1})")
            if name != f"rho={cfg['rhos'][0]:g}":
                ax.tick_params(labelleft=False)
            else:
                ax.set_ylabel("retrieval error E / s2")
    fig.suptitle(f"Collision study: measured (dots, ±1 SE, {cfg['seeds']} seed(s), V = {cfg['V']}) "
                 f"against MATH.md 7 (lines; dotted: DeltaNet's plateau 2ρ/(2-ρ)); "
                 f"{cfg['device']}", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def write_outputs(res: dict, out: Path, smoke: bool, want_plot: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    stem = "collision_smoke" if smoke else "collision"
    files = {"json": out / f"{stem}.json", "table": out / f"{stem}.md", "plot": out / f"{stem}.png"}
    files["json"].write_text(json.dumps(res, indent=1) + "\n")
    text = table(res)
    files["table"].write_text(text)
    print(text)
    why = plot(res, files["plot"]) if want_plot else "--no-plot"
    if why:
        print(f"plot skipped: {why}")
        files.pop("plot")
    for kind, p in files.items():
        print(f"wrote {p}")
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m examples.collision.run", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (K = 16, a few n, one seed)")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default examples/collision)")
    ap.add_argument("--path", choices=["auto", "ops", "reference"], default="auto",
                    help="auto: the compiled ops on CUDA or with --smoke, else the float64 reference")
    ap.add_argument("--K", type=int, default=None)
    ap.add_argument("--V", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--lambdas", type=lambda s: [float(x) for x in s.split(",")], default=[1e-3, 0.1],
                    help="RLS lambda = r / p0 values, comma separated (default 1e-3,0.1)")
    ap.add_argument("--crosscheck", type=int, default=0, metavar="SEEDS",
                    help="recompute the ops curves of the first SEEDS seeds with the float64 "
                         "reference and report the largest difference")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="redraw table and plot from a collision.json (no computation)")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        write_outputs(res, args.out, res["config"]["smoke"], not args.no_plot)
        return 0
    cfg = config(args)
    print(f"collision study: K = {cfg['K']}, V = {cfg['V']}, seeds = {cfg['seeds']}, "
          f"n overlap = {cfg['ns_overlap'][0]}..{cfg['ns_overlap'][-1]}, "
          f"n random = {cfg['ns_random'][0]}..{cfg['ns_random'][-1]}")
    engine = Engine(args.path, cfg["smoke"])
    res = measure(cfg, engine, crosscheck=args.crosscheck)
    write_outputs(res, args.out, cfg["smoke"], not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
