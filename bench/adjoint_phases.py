"""Where the kalman backward's chunk adjoint kernel spends its time, phase by phase.

    python3 bench/adjoint_phases.py [--step mean|covariance] [--shape 4,4096,16,128]

chunk_adjoint_kernel (templates/kalman/chunk_adjoint.py.j2) runs steps 4 (mean) and 6
(covariance) of the backward, one program per chunk and head, in phases that its comments
name: (V), (S), (K), (B), (C), (D), (E). As bench/riccati_phases.py does for the Riccati
kernel, this script stamps the GPU's global timer at the start of each phase, in a copy of the
generated module, and runs the step on the inputs of bench/tune_kalman_steps.py. It prints the
mean time of each phase per program, the share of each, and the kernel's span from the first
stamp to the last. Programs share their SM with others, so a phase's time includes waiting
for them, and the shares are what to read. Steps 4 and 6 are checked against the generated
kernel (the copy must give the same gradients). With TRITON_INTERPRET=1 it is a dry run of
the rewriting on CPU, and every stamp reads 0.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from riccati_phases import INTERPRET, TIMER, import_copy  # noqa: E402

KERNEL = "chunk_adjoint_kernel"
# (phase that starts here, the line of the kernel the stamp goes before)
PHASES = [
    ("(V) by value blocks: dv, dLc, dW", "        # (V) by value blocks"),
    ("(S) the scores' adjoint", "        # (S) the scores"),
    ("(K) by key blocks: dYt, dU^, dU, dq", "    # (K) by key blocks"),
    ("(B) the Cholesky adjoint", "    # (B) the Cholesky adjoint"),
    ("(C) d(K^P)", "    # (C) d(K^P)"),
    ("(D) dK^, dk, Src", "    # (D) dK^"),
    ("(E) per token: decays and noises", "    # (E) per token"),
]


def instrument(source: str) -> tuple[str, list[str]]:
    """source with stamps in chunk_adjoint_kernel (a first parameter _tm, [programs, stamps]
    int64): after the program id, before each line of PHASES, and at the kernel's end.
    Returns the new source and the phase that starts at each stamp."""
    start = source.index(f"def {KERNEL}(")
    end = source.index("\n\n\n", start) + 1
    body = source[start:end]
    body = body.replace(f"def {KERNEL}(\n", f"def {KERNEL}(\n    _tm,\n", 1)
    stamp = "{indent}tl.store(_tm + n * NSTAMP + {j}, _phase_clock())\n"
    first = "    n = tl.program_id(0).to(tl.int64)\n"
    assert body.count(first) == 1, "the program id moved: update adjoint_phases.py"
    marks = [(body.index(first) + len(first), "    ", "prologue (scratch pointers, zeros)")]
    for name, line in PHASES:
        assert body.count(line) == 1, f"not found once in {KERNEL}: {line!r}"
        marks.append((body.index(line), line[:len(line) - len(line.lstrip())], name))
    marks.append((len(body), "    ", "end"))
    names = [name for _, _, name in marks]
    for j, (at, indent, _) in reversed(list(enumerate(marks))):
        body = body[:at] + stamp.format(indent=indent, j=j) + body[at:]
    out = source[:start] + body + source[end:]
    head = "@triton.jit\n" + f"def {KERNEL}("
    assert out.count(head) == 1, "the kernel's decorator moved: update adjoint_phases.py"
    out = out.replace(head, TIMER + "\n\n" + head, 1)
    at = out.index(head)                                                # NSTAMP before the first constexpr
    out = out[:at] + re.sub(r"(\n    [A-Z_]+: tl\.constexpr,)", r"\n    NSTAMP: tl.constexpr,\1", out[at:], count=1)
    launch = f"    {KERNEL}[(B * H * NC,)](\n        "
    assert out.count(launch) == 1, "the launch moved: update adjoint_phases.py"
    out = out.replace(launch, launch + "_TM, ", 1)
    out = out.replace("PRECISION=_sweep_precision(tf32), num_warps=warps, num_stages=1)",
                      "PRECISION=_sweep_precision(tf32), NSTAMP=NSTAMP, num_warps=warps, num_stages=1)", 1)
    return out, names


def load(model: str):
    """The stamped copy of a generated kalman module and its phases' names."""
    text, names = instrument((ROOT / "generated" / model / "kernels.py").read_text())
    return import_copy(text, f"{model}_adjoint_phases"), names


def main(argv=None):
    import torch
    import designmodel
    from tune_kalman_steps import _inputs
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--step", default="mean", choices=["mean", "covariance"])
    ap.add_argument("--shape", default="4,4096,16,128")
    args = ap.parse_args(argv)
    B, T, H, K = (int(s) for s in args.shape.split(","))
    module, names = load("bayesian_layer")
    plain = designmodel.compile("bayesian_layer").kernels
    x, c, S, P, cot = _inputs(B, T, H, K, K, module.CHUNK)
    NC = -(-T // module.CHUNK)
    module.NSTAMP = len(names)
    module._TM = torch.zeros(B * H * NC, len(names), dtype=torch.int64, device=x["q"].device)
    if args.step == "mean":
        run = lambda m: m.mean_chunk_adjoint(x, c, S, P, cot["dO"], cot["dS"], False, precision="tf32x3")
    else:
        run = lambda m: (m.covariance_chunk_adjoint(x, c, S, P, cot["dP"], False, precision="tf32x3"), None)
    run(module)                                                         # compile
    module._TM.zero_()
    got, want = run(module)[0], run(plain)[0]
    diff = max((got[m] - want[m]).abs().max().item() for m in want)
    print(f"stamped step against the generated one: max |grad - grad'| = {diff:.2e}")
    tm = module._TM.double().cpu()
    written = (tm != 0).all(0) if not INTERPRET else torch.ones(len(names), dtype=torch.bool)
    cols = [j for j in range(len(names)) if written[j]]
    print(f"chunk_adjoint_kernel, step {'4 (mean)' if args.step == 'mean' else '6 (covariance)'}, "
          f"{args.shape}: us per program (mean over {B * H * NC} programs), share")
    total = (tm[:, cols[-1]] - tm[:, cols[0]]).mean().item() / 1e3
    for a, b in zip(cols, cols[1:]):
        us = (tm[:, b] - tm[:, a]).mean().item() / 1e3
        print(f"  {names[a]:44s} {us:9.2f} {us / total if total else 0.:6.1%}")
    print(f"  {'one program, all phases':44s} {total:9.2f}")
    print(f"  {'the kernel: first stamp to last (ms)':44s} {(tm[:, cols[-1]].max() - tm[:, cols[0]].min()).item() / 1e6:9.3f}")


if __name__ == "__main__":
    sys.exit(main())
