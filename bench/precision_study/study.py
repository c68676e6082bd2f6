"""Which covariance recursions of the Bayesian Layer tolerate one-pass tf32? (CPU emulation)

    python3 bench/precision_study/study.py [--only validate,condition,attribute,candidates,passes,long]

Emulates the kernels' float32 products (emu.py: tf32 one pass by truncation or by rounding,
tf32x3 as Triton's F32DotTC, 2-pass splits of one operand, bf16 splits) inside a copy of the
kernels' chunked filter (riccati / gain / mean / readout, scalar decay, P0 = I, S0 = 0) and
prints markdown tables: the emulator against the GPU figures, the problem's own conditioning,
which product needs which precision, the candidates on every case, their tensor-core passes
per chunk, and T = 2048. Errors: max |o - o_ref| / max |o_ref| (and of the final P) against
the float64 step-by-step filter on the same (rounded) inputs. About 3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from emu import (bf16, make_inputs, reference, rel, run_filter, tf32_rna, tf32_rz)  # noqa: E402

torch.set_num_threads(2)

# (alpha, r, sigma, |k|): bench/kalman_hard_cases.py's bayesian_layer rows
CASES = [(1, 1e-4, 0, 3), (1, 1e-3, 0, 3), (1, 1e-2, 0, 3), (1, 1e-4, 0, 1), (1, 1e-2, 0, 1),
         (0.9, 1e-4, 1, 3), (0.99, 1e-2, 1e-2, 1), (0.95, 1, 0.1, 1)]
X3 = "tf32x3"

# the GPU's figures (H100, bf16 inputs, bench/RESULTS.md session 12: calls 7, 8, 9)
GPU = {
    "FAST": [1.4e3, 4.9e2, 1.6e-1, 8.4e2, 2.0e-2, 4.4e-3, 4.8e-3, 5.4e-3],
    "FAST + innovation x3": [2.0e3, 2.1e2, 1.6e-1, 1.1e2, 2.3e-2, 4.4e-3, 4.9e-3, 5.4e-3],
    "covariance x3, gain/mean tf32": [2.1e-2, 2.0e-2, 1.3e-2, 2.4e-2, 4.9e-3, 4.4e-3, 4.8e-3, 5.1e-3],
    "default (x3 but readout)": [4.6e-3, 4.0e-3, 3.9e-3, 3.9e-3, 3.4e-3, 3.9e-3, 4.5e-3, 3.3e-3],
    "FAST + factor, solve x3": [2.6e3, 5.1e1, 2.4e-2],
    "FAST + innovation, solve x3": [1.9e3, 5.5e1, 1.2e-1],
}
T1 = dict(default="tf32", update=X3, readout="auto")
VALIDATE = {
    "FAST": T1,
    "FAST + innovation x3": {**T1, "innov": X3},
    "covariance x3, gain/mean tf32": {**T1, "innov": X3, "factor": X3, "solve": X3},
    "default (x3 but readout)": "default",
    "FAST + factor, solve x3": {**T1, "factor": X3, "solve": X3},
    "FAST + innovation, solve x3": {**T1, "innov": X3, "solve": X3},
}

# --- the candidates: (name, precisions, formulation) ----------------------------------------
# EXT (tf32 only): the keys and queries (bf16) are exact in tf32, so where one operand is an
# input only the other is split (2 passes: bit-for-bit tf32x3 when that operand is exact), the
# decay and scale applied as row scalings after the product; K K^T one pass; factor, solve and
# update stay tf32x3; in the gain kernel A = Q U^T 2-pass (U split), B tf32x3, W = L^-1 K^ 2-pass
# (W split, L read rounded to nearest), U_v = L^-1 V one pass; the mean kernel's W S and Z^T E
# 2-pass (W, Z split, S and E rounded to nearest: cvt.rna, an elementwise op); readout as now
EXT = {"default": X3, "innov.KP": "x2b", "innov.S": "x2a", "innov.KK": "tf32",
       "gain.A": "x2a", "gain.W": "x2bn", "gain.Uv": "tf32n", "mean": "x2an", "readout": "tf32"}
# EXB: EXT with bf16 MMAs (2x tf32's rate on an H100) wherever one operand is an exact bf16
# input: the other split in 3 bf16 pieces (as exact as float32); the update of P as
# Yt^T Yt, Yt = D^-1/2 Y in 3 bf16 pieces (y1y1 + y2y2 + (y1y2 + y1y3) + transpose); B in
# 3 bf16 passes (2 pieces each); the readout's Q S on one bf16 pass (S is stored in bf16)
EXB = {**EXT, "innov.KP": "b3b", "innov.S": "b3a", "innov.KK": "b1", "gain.A": "b2a",
       "gain.B": "bfx3", "readout.QS": "b1", "readout.BE": "tf32"}
# EXB-lean: EXB with W = L^-1 K^ and the mean kernel one pass (rounded to nearest)
EXBL = {**EXB, "gain.W": "tf32n", "mean": "tf32n"}
# rejected refinements: the update as a 2-pass symmetric tf32 split; the factor, solve and the
# update's cross terms on bf16 MMAs (tf32 hi x hi + bf16 hi x lo)
EXM = {**EXB, "factor": "x3m", "solve": "x3m"}
CANDIDATES = [
    ("default: all tf32x3 (readout tf32)", "default", {}),
    ("FAST: tf32, update tf32x3", "FAST", {}),
    ("FAST, one-pass operands rounded to nearest", dict(default="tf32n", update=X3, readout="auto"), {}),
    ("a. Joseph, all one-pass", dict(default="tf32"), dict(cov="joseph")),
    ("a. Joseph, its products x3, rest one-pass (rna)", dict(default="tf32n", jos=X3), dict(cov="joseph")),
    ("a. Joseph, all x3", dict(default=X3, readout="auto"), dict(cov="joseph")),
    ("b. exact keys in innovation only (KP, S 2-pass, KK 1)", {"default": X3, "innov.KP": "x2b", "innov.S": "x2a", "innov.KK": "tf32", "readout": "auto"}, dict(exact_innov=True)),
    ("c. Potter sqrt (sigma = 0), all one-pass", dict(default="tf32"), dict(cov="sqrt")),
    ("c. Potter sqrt (sigma = 0), F update one-pass, rest x3", dict(default=X3, sqrt="tf32n", readout="auto"), dict(cov="sqrt")),
    ("c. Potter sqrt (sigma = 0), all x3", dict(default=X3, readout="auto"), dict(cov="sqrt")),
    ("c. information form (no decay/noise; ideal inverse), rest one-pass", {"default": "tf32n", "info.update": "x2b", "readout": "auto"}, dict(cov="info", exact=True)),
    ("d. K (P - I) + K one-pass, rest default", {"default": X3, "innov.KP": "tf32n", "innov.S": "x2a", "readout": "auto"}, dict(delta=True)),
    ("d. EXT: exact operands, tf32 only", EXT, dict(exact=True)),
    ("d. EXT, one-pass products truncated (no cvt.rna)", {**EXT, "gain.W": "x2b", "gain.Uv": "tf32", "mean": "x2a"}, dict(exact=True)),
    ("d. EXT, update as 2-pass symmetric tf32 split", EXT, dict(exact=True, update="sym")),
    ("d. EXB: exact operands on bf16 MMAs, 3-piece bf16 update", EXB, dict(exact=True, update="symb")),
    ("d. EXB-lean: EXB, W and mean one-pass", EXBL, dict(exact=True, update="symb")),
    ("d. EXM: EXB, factor/solve/update cross terms on bf16", EXM, dict(exact=True, update="symm")),
]


def fmt(x):
    return "inf" if x == float("inf") else f"{x:.1e}"


def table(head, rows):
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |", flush=True)
    print()


def case_name(c):
    a, r, s, n = c
    return f"a={a:g} r={r:g} s={s:g} k={n:g}"


_refs = {}


def ref(c, dtype, T=512):
    key = (c, dtype, T)
    if key not in _refs:
        inp = make_inputs(*c, T=T, dtype=dtype)
        _refs[key] = (inp,) + reference(inp)
    return _refs[key]


def applicable(cand, c):
    if cand.get("cov") == "sqrt" and c[2] != 0:
        return False
    if cand.get("cov") == "info" and (c[0] != 1 or c[2] != 0):
        return False
    return True


def validate():
    print("## 1. The emulator against the GPU (bf16 inputs, o error; kernel storage: S, E, o in bf16)\n")
    rows = []
    for name, prec in VALIDATE.items():
        for i, c in enumerate(CASES):
            gpu = GPU[name][i] if i < len(GPU[name]) else None
            if gpu is None:
                continue
            inp, o_ref, _, _ = ref(c, "bf16")
            cells = [name, case_name(c), fmt(gpu)]
            for mode in ("rz", "rna"):
                p = dict(prec) if isinstance(prec, dict) else prec
                if mode == "rna":
                    # one-pass operands rounded to nearest instead of truncated
                    from emu import PRESETS
                    p = dict(PRESETS[p]) if isinstance(p, str) else p
                    p = {t: ("tf32n" if x == "tf32" else x) for t, x in p.items()}
                o, _ = run_filter(inp, p)
                cells.append(fmt(rel(o, o_ref)))
            rows.append(cells)
    table(["config", "case", "GPU", "emulated, one-pass truncating", "emulated, one-pass rounding"], rows)


def condition():
    print("## 2. The problem's own sensitivity (float64 filter, fp32 inputs): o error from rounding the inputs once\n")
    rows = []
    for c in CASES:
        inp, o_ref, _, P_ref = ref(c, "f32")
        cells = [case_name(c)]
        for f, names in ((tf32_rna, "k"), (tf32_rz, "k"), (bf16, "k"), (bf16, "qkv")):
            i2 = dict(inp)
            for n in names:
                i2[n] = f(inp[n])
            o, _, P = reference(i2)
            cells.append(f"{fmt(rel(o, o_ref))} / {fmt(rel(P, P_ref))}")
        rows.append(cells)
    table(["case", "k to tf32 (nearest)", "k to tf32 (truncated)", "k to bf16", "q, k, v to bf16"], rows)


def attribute():
    print("## 3. One product at a time from all-tf32x3 (bf16 inputs, float32 storage): o / P error\n")
    tags = ["innov.KP", "innov.S", "innov.KK", "factor.X", "factor.schur", "solve.off", "solve.diag",
            "update", "gain.A", "gain.B.off", "gain.B.diag", "gain.W", "gain.Uv", "mean.WS", "mean.S", "readout"]
    precs = ["tf32", "tf32n", "x2a", "x2b", "x3m"]
    cases = [CASES[0], CASES[2], CASES[4]]
    rows = []
    base = []
    for c in cases:
        inp, o_ref, _, P_ref = ref(c, "bf16")
        o, P = run_filter(inp, "all-x3", cand=dict(store32=True, exact=True))
        base.append(f"{fmt(rel(o, o_ref))}/{fmt(rel(P, P_ref))}")
    rows.append(["(all x3)", "-"] + base)
    for t in tags:
        for pr in precs:
            cells = [t, pr]
            for c in cases:
                inp, o_ref, _, P_ref = ref(c, "bf16")
                o, P = run_filter(inp, {"default": X3, t: pr}, cand=dict(store32=True, exact=True))
                cells.append(f"{fmt(rel(o, o_ref))}/{fmt(rel(P, P_ref))}")
            rows.append(cells)
    table(["product", "precision"] + [case_name(c) for c in cases], rows)


def ablate_long():
    print("## 3b. One change at a time from all-tf32x3 at T = 2048 (bf16 inputs, float32 storage, "
          "seed 0): global o error / worst o error of quarters 2-4 relative to their own max |o_ref| / P\n")
    D = {"default": X3}
    changes = [("(all x3)", D, {}),
               ("update: 2-pass symmetric tf32 split", D, dict(update="sym")),
               ("update: 3-piece bf16 symmetric (symb)", D, dict(update="symb")),
               ("update: tf32 hi hi + bf16 cross (symm)", D, dict(update="symm")),
               ("innov.KP b3b (P in 3 bf16 pieces)", {**D, "innov.KP": "b3b"}, dict(exact=True)),
               ("innov.KP b2b", {**D, "innov.KP": "b2b"}, dict(exact=True)),
               ("innov.S b3a", {**D, "innov.S": "b3a"}, dict(exact=True)),
               ("innov.KK b1", {**D, "innov.KK": "b1"}, dict(exact=True)),
               ("factor x3m", {**D, "factor": "x3m"}, {}),
               ("solve x3m", {**D, "solve": "x3m"}, {}),
               ("factor bfx3", {**D, "factor": "bfx3"}, {}),
               ("gain.A x2a", {**D, "gain.A": "x2a"}, dict(exact=True)),
               ("gain.A b2a", {**D, "gain.A": "b2a"}, dict(exact=True)),
               ("gain.B bfx3", {**D, "gain.B": "bfx3"}, {}),
               ("gain.B tf32n", {**D, "gain.B": "tf32n"}, {}),
               ("gain.W tf32n", {**D, "gain.W": "tf32n"}, {}),
               ("gain.W x2an (L split)", {**D, "gain.W": "x2an"}, {}),
               ("gain.W x2bn (W split)", {**D, "gain.W": "x2bn"}, {}),
               ("gain.Uv tf32n", {**D, "gain.Uv": "tf32n"}, {}),
               ("mean.WS tf32n", {**D, "mean.WS": "tf32n"}, {}),
               ("mean.WS x2an (W split)", {**D, "mean.WS": "x2an"}, {}),
               ("mean.WS x2bn (S split)", {**D, "mean.WS": "x2bn"}, {}),
               ("mean.S tf32n", {**D, "mean.S": "tf32n"}, {}),
               ("mean.S x2an (Z split)", {**D, "mean.S": "x2an"}, {}),
               ("mean.S x2bn (E split)", {**D, "mean.S": "x2bn"}, {}),
               ("readout tf32 (truncating)", {**D, "readout": "tf32"}, {})]
    rows = []
    cs = [(1, 1e-4, 0, 3), (1, 1e-2, 0, 3)]
    for name, prec, cand in changes:
        cells = [name]
        for c in cs:
            inp, o_ref, _, P_ref = ref(c, "bf16", T=2048)
            o, P = run_filter(inp, prec, cand=dict(cand, store32=True))
            late = max(rel(o[:, k * 512:(k + 1) * 512], o_ref[:, k * 512:(k + 1) * 512]) for k in (1, 2, 3))
            cells.append(f"{fmt(rel(o, o_ref))} / {fmt(late)} / {fmt(rel(P, P_ref))}")
        rows.append(cells)
    table(["change"] + [case_name(c) for c in cs], rows)


def candidates(which=None):
    print("## 4. Candidates on every case: o error, bf16 inputs with the kernels' bf16 storage "
          "[float32 storage] {final P}; fp16 inputs (fp16 storage; a few rows); fp32 inputs\n")
    rows = []
    for name, prec, cand in CANDIDATES:
        if which and not any(w in name for w in which):
            continue
        for dtype in ("bf16", "f16", "f32"):
            if dtype == "f16" and not any(name.startswith(n) for n in ("default:", "FAST:", "d. EXT:", "d. EXB:")):
                continue
            cells = [name, dtype]
            worst = 0.0
            for c in CASES:
                if not applicable(cand, c):
                    cells.append("-")
                    continue
                inp, o_ref, _, P_ref = ref(c, dtype)
                o, P = run_filter(inp, prec, cand=cand)
                e = rel(o, o_ref)
                worst = max(worst, e)
                if dtype == "bf16":
                    o32, _ = run_filter(inp, prec, cand=dict(cand, store32=True))
                    cells.append(f"{fmt(e)} [{fmt(rel(o32, o_ref))}] {{{fmt(rel(P, P_ref))}}}")
                else:
                    cells.append(f"{fmt(e)} {{{fmt(rel(P, P_ref))}}}")
            cells.append(("**pass**" if worst <= 5.05e-3 else "fail") + f" ({fmt(worst)})")
            rows.append(cells)
    table(["candidate", "inputs"] + [case_name(c) for c in CASES] + ["<= 5e-3 everywhere"], rows)


GROUPS = [("innovation", "innov"), ("factor", "factor"), ("solve", "solve"), ("update", "update"),
          ("gain", "gain"), ("mean", "mean"), ("readout", "readout")]


def passes():
    print("## 5. Tensor-core work per chunk and head (C = 64, K = V = 128): MACs x passes, in "
          "millions of tf32-pass equivalents (a bf16 pass = 1/2)\n")
    inp = make_inputs(1, 1e-2, 0, 3, T=64)
    rows = []
    base = {}
    for name, prec, cand in CANDIDATES:
        if not applicable(cand, (1, 1e-2, 0, 3)):
            continue
        _, _, tal = run_filter(inp, prec, cand=cand, tally=True)
        alias = {"jos": "update", "sqrt": "update", "info": "update"}
        g = {gn: sum(v for t, v in tal.items() if alias.get(t.split(".")[0], t.split(".")[0]) == pref)
             for gn, pref in GROUPS}
        ric = sum(g[x] for x in ("innovation", "factor", "solve", "update"))
        tot = sum(g.values())
        if not base:
            base = dict(ric=ric, tot=tot, g=g)
        if name.startswith("FAST:"):
            base["fast_ric"], base["fast_tot"] = ric, tot
        rows.append([name] + [f"{g[gn] / 1e6:.2f}" for gn, _ in GROUPS]
                    + [f"{ric / 1e6:.2f}", f"{tot / 1e6:.2f}", f"{ric / base['ric']:.2f}",
                       f"{tot / base['tot']:.2f}"])
    table(["candidate"] + [gn for gn, _ in GROUPS] + ["Riccati kernel", "all kernels", "Riccati / default", "all / default"], rows)
    print("(Joseph's, Potter's and the information form's own products are counted under update, "
          "which they replace; the information form's K x K inverse as K^3/2 MACs x 3 passes.)\n")


def long_runs(names=("default:", "FAST:", "d. EXT:", "d. EXB:", "d. EXB-lean", "d. EXM")):
    print("## 6. T = 2048 (bf16 inputs, seeds 0 and 1; kernel storage [float32 storage] {P})\n")
    rows = []
    for c, seed in [((1, 1e-2, 0, 3), 0), ((1, 1e-4, 0, 3), 0), ((1, 1e-2, 0, 3), 1), ((1, 1e-4, 0, 3), 1)]:
        key = (c, "bf16", 2048, seed)
        if key not in _refs:
            inp = make_inputs(*c, T=2048, dtype="bf16", seed=seed)
            _refs[key] = (inp,) + reference(inp)
        inp, o_ref, _, P_ref = _refs[key]
        for name, prec, cand in CANDIDATES:
            if not any(name.startswith(n) for n in names):
                continue
            o, P = run_filter(inp, prec, cand=cand)
            o32, _ = run_filter(inp, prec, cand=dict(cand, store32=True))
            # the error over each quarter of the sequence, to see it grow or not
            qs = []
            for k in range(4):
                sl = slice(k * 512, (k + 1) * 512)
                qs.append(fmt(rel(o[:, sl], o_ref[:, sl])))
            rows.append([case_name(c) + f" seed {seed}", name, f"{fmt(rel(o, o_ref))} [{fmt(rel(o32, o_ref))}] {{{fmt(rel(P, P_ref))}}}", " / ".join(qs)])
    table(["case", "candidate", "o [f32 storage] {P}", "o error by quarter of T (each relative to its own max |o_ref|)"], rows)


def bitwise():
    print("## 7. Exact keys: is the 2-pass innovation bit-for-bit the tf32x3 one?\n")
    rows = []
    for c in CASES:
        inp, o_ref, _, P_ref = ref(c, "bf16")
        o1, P1 = run_filter(inp, "default", cand=dict(store32=True))
        o2, P2 = run_filter(inp, {"default": X3, "innov.KP": "x2b", "innov.S": "x2a", "innov.KK": "tf32", "readout": "auto"},
                            cand=dict(exact_innov=True, store32=True))
        rows.append([case_name(c), str(bool(torch.equal(o1, o2) and torch.equal(P1, P2))),
                     fmt(float((o1 - o2).abs().max() / o_ref.abs().max())), fmt(rel(o1, o_ref)), fmt(rel(o2, o_ref))])
    table(["case", "o and P bitwise identical", "max |o1 - o2| / max |o_ref|", "default o err (f32 storage)", "exact-key o err"], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="validate,condition,attribute,ablate_long,candidates,passes,bitwise,long")
    args = ap.parse_args(argv)
    t0 = time.time()
    for part in args.only.split(","):
        globals()[{"long": "long_runs"}.get(part, part)]()
        print(f"({part}: {time.time() - t0:.0f} s so far)\n", flush=True)


if __name__ == "__main__":
    main()
