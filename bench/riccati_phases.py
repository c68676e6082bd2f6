"""Where the Riccati kernel's time goes, phase by phase, from the GPU's own clock.

    python3 bench/riccati_phases.py [--model bayesian_layer] [--shape 4,4096,16,128] [--dtype bf16] [--config JSON]

The Riccati kernel (templates/kalman/riccati.py.j2) runs one program per sequence and head,
chunk after chunk, so its time is the latency of one chunk's chain of dependent steps times
the number of chunks, and a profiler gives only the total. This script copies the generated
module's source, adds a stamp of the global nanosecond timer (PTX %globaltimer) at the
boundaries of the kernel's phases, as its own comments name them, runs the forward once to
compile and once to measure, and prints the mean time per chunk of each phase over every
program and every chunk but the first. The copy lives in a temporary folder; the generated
module is not touched. The stamps cost a store each and keep their place among the kernel's
other stores, but the compiler may move arithmetic across them: read the table as where the
chain spends its time, to a few percent. With TRITON_INTERPRET=1 (a dry run of the rewriting
on CPU) every stamp reads 0.
"""
from __future__ import annotations

import argparse
import json
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (name of the phase that ends at this stamp, a line of the kernel the stamp goes before)
STAMPS = [
    ("innovation dots (K^ P, U, S_in parts)", "        # every thread's scratch stores are done before any thread reads a block back"),
    ("S_in blocks back from scratch", "        # blocked LDL: factor the diagonal block, then the panel below it and its Schur update"),
    ("L, D stores of the last block", "        # U and the earlier blocks' Z are read back from memory (fewer live registers)"),
    ("Y = L^-1 U^ and Z by blocks", "        # the Riccati step by quarters: "),
]
# the stamps' clock, put into the copy before the stamped kernel
TIMER = '''@triton.jit
def _phase_clock():
    """The GPU's global timer in ns (0 in the interpreter)."""
    {body}
'''.format(body="return tl.program_id(0).to(tl.int64) * 0" if INTERPRET else
           'return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, '
           'is_pure=False, pack=1)')


def instrument(source: str, kernel: str = "chunk_riccati_kernel") -> tuple[str, list[str]]:
    """source with stamps in `kernel`: a first parameter _tm ([programs, chunks, stamps]
    int64), a stamp at the top of the chunk loop, one before each line of STAMPS, one before
    and after each diagonal block's ldl_block, and one at the end of the loop. Returns the new
    source and the names of the phases between consecutive stamps."""
    start = source.index(f"def {kernel}(")
    end = source.index("\n@triton.jit", start)
    body = source[start:end]
    body = body.replace(f"def {kernel}(\n", f"def {kernel}(\n    _tm,\n", 1)
    stamp = lambda indent: f"{indent}tl.store(_tm + (i_nh * tl.cdiv(T, BT) + i_t) * NSTAMP + {{}}, _phase_clock())\n"
    loop = "    for i_t in range(tl.cdiv(T, BT)):\n"
    assert body.count(loop) == 1, "the chunk loop moved: update riccati_phases.py"
    marks = [(body.index(loop) + len(loop), stamp("        "), "start")]
    for name, line in STAMPS:
        assert body.count(line) == 1, f"not found once in {kernel}: {line!r}"
        marks.append((body.index(line), stamp("        "), name))
    for m in re.finditer(r"        b_Li(\d+), b_D\d+ = ldl_block\([^\n]*\n", body):
        b = m.group(1)
        marks.append((m.start(), stamp("        "), f"panels and Schur updates before block {b}" if b != "0" else "(none)"))
        marks.append((m.end(), stamp("        "), f"ldl_block {b} (16 pivots, L^-1 by doubling)"))
    assert body.endswith("        tl.debug_barrier()\n\n"), "the loop's end moved: update riccati_phases.py"
    marks.append((len(body) - len("        tl.debug_barrier()\n\n"), stamp("        "), "Riccati update of P by quarters"))
    marks.sort(key=lambda m: m[0])
    names = [name for _, _, name in marks]
    for j, (at, text, _) in reversed(list(enumerate(marks))):
        body = body[:at] + text.format(j) + body[at:]
    out = source[:start] + body + source[end:]
    out = out.replace(f"@triton.jit(do_not_specialize=[\"T\"])\ndef {kernel}(",
                      TIMER + f"\n\n@triton.jit(do_not_specialize=[\"T\"])\ndef {kernel}(", 1)
    launch = f"    {kernel}[(N * H,)](\n        q,"
    assert out.count(launch) == 1, "the launch moved: update riccati_phases.py"
    out = out.replace(launch, f"    {kernel}[(N * H,)](\n        _TM, q,", 1)
    out = out.replace("        H=H, K=K, BT=BT, BK=BK, BC=16, HAS_INITIAL_COV",
                      "        NSTAMP=NSTAMP, H=H, K=K, BT=BT, BK=BK, BC=16, HAS_INITIAL_COV", 1)
    out = out.replace("    H: tl.constexpr,\n    K: tl.constexpr,\n    BT: tl.constexpr,",
                      "    NSTAMP: tl.constexpr,\n    H: tl.constexpr,\n    K: tl.constexpr,\n    BT: tl.constexpr,", 1)
    return out, names


def import_copy(text: str, name: str):
    """A stamped copy of a generated module, imported from a temporary file (Triton reads a
    kernel's source from its file)."""
    path = Path(tempfile.mkdtemp(prefix="phases_")) / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(model: str):
    """The instrumented copy of a generated kalman module and its phases' names."""
    text, names = instrument((ROOT / "generated" / model / "kernels.py").read_text())
    return import_copy(text, f"{model}_phases"), names


def main(argv=None):
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bayesian_layer")
    ap.add_argument("--shape", default="4,4096,16,128")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--config", default=None, help='the op\'s config as JSON, e.g. \'{"covariance": {"update_rows": 16}}\'')
    args = ap.parse_args(argv)
    config = json.loads(args.config) if args.config else None
    B, T, H, K = (int(s) for s in args.shape.split(","))
    device = "cpu" if INTERPRET else "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    module, names = load(args.model)
    module.NSTAMP = len(names)
    NC = -(-T // module.CHUNK)
    module._TM = torch.zeros(B * H, NC, module.NSTAMP, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=gen)
    q, v = r(B, T, H, K).to(dtype), r(B, T, H, K).to(dtype)
    k = torch.nn.functional.normalize(r(B, T, H, K), dim=-1).to(dtype)
    g = -0.05 * torch.rand(B, T, H, device=device, generator=gen)
    noise = 0.5 + torch.rand(B, T, H, device=device, generator=gen)
    sigma = 0.01 * torch.rand(B, T, H, device=device, generator=gen)
    p0 = torch.ones(H, device=device)
    run = lambda: module.forward(q, k, v, g, p0, noise, sigma, check_domain=False, config=config)
    run()                                                               # compile
    module._TM.zero_()
    o = run()[0]
    import designmodel
    plain = designmodel.compile(args.model).kernels.forward(q, k, v, g, p0, noise, sigma, check_domain=False,
                                                            config=config)[0]
    print(f"stamped forward against the generated one: max |o - o'| = {(o.float() - plain.float()).abs().max().item():.2e}")
    if device == "cuda":
        torch.cuda.synchronize()
    tm = module._TM.double()
    steps = (tm[:, 1:, 1:] - tm[:, 1:, :-1]) / 1e3                     # us, chunks after the first
    whole = (tm[:, 1:, -1] - tm[:, 1:, 0]) / 1e3
    print(f"{args.model} {args.shape} {args.dtype} {args.config or ''}: Riccati chunk loop, us per chunk (mean over {B * H} programs x {NC - 1} chunks)")
    for name, col in zip(names[1:], steps.mean((0, 1)).tolist()):
        print(f"  {name:52s} {col:8.2f}")
    print(f"  {'one chunk, all phases':52s} {whole.mean().item():8.2f}")
    print(f"  {'the loop, first chunk start to last chunk end (ms)':52s} {(tm[:, -1, -1] - tm[:, 0, 0]).mean().item() / 1e6:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
