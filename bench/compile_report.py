"""Compile time, registers and spills of a generated module's kernels for a GPU, on any machine.

    python bench/compile_report.py bayesian_layer --shape 4,4096,16,128 [--dtype bf16] [--arch 90]
        [--config '{"covariance": {"num_warps": 4}}'] [--variance] [--save] [--backward] [--check]

No GPU is needed: a child process runs the op's launcher in Triton's interpreter with its
kernels replaced by recorders (nothing is launched) and prints the launches; this process
compiles each for the target (sm_90 for the H100 by default) and assembles its PTX with
ptxas -v, whose report gives registers per thread and spill stores/loads. The Triton on this
machine may differ from the GPU machine's, so the figures are a guide (spills of a few hundred bytes or more are what to look for), not
the GPU's numbers. Device time is scarce; this is what to look at before spending it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDING = os.environ.get("TRITON_INTERPRET") == "1"   # the child: kernels recorded, never run
os.environ["TRITON_ALWAYS_COMPILE"] = "1"               # time the compile, not the cache
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
         torch.int32: "*i32", torch.int64: "*i64", torch.float64: "*fp64"}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kw)` records the launch."""

    def __init__(self, name, fn, launches):
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((self.name, self.fn, args, kw))


def signature(fn, args, kw):
    """(signature, constexprs, options) of one launch, as triton.compile takes them."""
    names = fn.arg_names
    values = dict(zip(names, args))
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    values.update(kw)
    sig, const = {}, {}
    for i, name in enumerate(names):
        x = values[name]
        if fn.params[i].is_constexpr or x is None:
            sig[name], const[name] = "constexpr", x
        elif isinstance(x, torch.Tensor):
            sig[name] = TYPES[x.dtype]
        elif isinstance(x, bool):
            sig[name] = "i1"
        elif isinstance(x, int):
            sig[name] = "i32" if -2 ** 31 <= x < 2 ** 31 else "i64"
        else:
            sig[name] = "fp32"
    return sig, const, options


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path     # the ptxas Triton itself chose for this target
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    text = out.stderr + out.stdout
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    if out.returncode:
        raise RuntimeError(f"ptxas failed: {text[-500:]}")
    return dict(regs=grab(r"Used (\d+) registers"), spill_st=grab(r"(\d+) bytes spill stores"),
                spill_ld=grab(r"(\d+) bytes spill loads"))


def record(model, shape, dtype, backward=False, backward_config=None, **kw):
    """The launches of one forward of a zoo op at shape (B, T, H, D) or (B, T, H, K, V), in the interpreter:
    a list of (kernel name, signature, constexprs, options), with the backward's after the
    forward's when asked."""
    from triton.runtime.interpreter import InterpretedFunction
    from designmodel.codegen import runtime
    module = runtime.load_zoo(model)
    launches = []
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, InterpretedFunction) and name.endswith("_kernel"):
            setattr(module, name, Recorder(name, JITFunction(obj.fn), launches))
    B, T, H, K, V = shape if len(shape) == 5 else (*shape, shape[-1])
    q, k = (torch.randn(B, T, H, K).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V).to(dtype)
    inputs = {}
    for name, (shp, domain) in module.INPUTS.items():
        dims = {"B": B, "T": T, "H": H, "K": K, "V": V}
        size = [dims[s.strip()] for s in shp.strip("[]").split(",")]
        inputs[name] = torch.full(size, 0.5 if domain in ("unit", "positive", "nonnegative") else -0.1)
    module.forward(q, k, v, **inputs, **kw)
    if backward and module.FAMILY == "kalman":
        _record_kalman_backward(module, B, T, H, K, V, "tf32x3" if dtype != torch.float32 else "ieee")
    elif backward:
        kw.pop("output_variance", None)
        kw.pop("save_for_backward", None)
        if backward_config is not None:
            kw["config"] = backward_config
        module.backward(q, k, v, **inputs, do=torch.randn_like(v), **kw)
    return [(name, *signature(fn, a, dict(k))) for name, fn, a, k in launches]


def _record_kalman_backward(module, B, T, H, K, V, precision):
    """The kalman backward's kernel launches: its chunk quantities, sweeps and chunk adjoints called directly on
    zeros of the shapes they get at (B, T, H, K, V) (the backward itself needs the forward's
    results, which a recorded forward does not make)."""
    C = module.CHUNK
    NC = -(-T // C)
    z = lambda *s: torch.zeros(B, H, NC, *s)
    c = {m: z(C, K) for m in ("Yt", "U", "KhP", "Kh")}
    c.update({m: z(C, C) for m in ("Li", "Lc", "R", "W", "Gam", "QU", "M", "Cs")},
             Et=z(C, V), a=z(C), e=z(C), gC=z(C), aC=z(), per_key=False)
    x = dict(q=z(C, K), k=z(C, K), sigma=z(C))
    states, covs = z(K, V), z(K, K)
    x.update(v=z(C, V), g=z(C), r=z(C) + 1)
    # 16-bit inputs: the chunk-start means stay 16-bit, and the dots with an exact operand split
    # ("tf32x2": by default in the quantities and sweeps, asked for in the chunk adjoint)
    split = "tf32x2" if precision == "tf32x3" else None
    if split:
        states = states.bfloat16()
    blocks = module.CHUNK_QUANTITIES_BLOCKS
    for factor_warps in (blocks[3], 0 if blocks[3] else 4):              # the default, then the other way
        module.CHUNK_QUANTITIES_BLOCKS = blocks[:3] + (factor_warps,)
        module.ADJOINT_STEPS["quantities"](x, states, covs, False, precision=precision, input_precision=split)
    module.CHUNK_QUANTITIES_BLOCKS = blocks
    mean_sweep, covariance_sweep = module.ADJOINT_SWEEPS
    mean_sweep(c["Yt"], c["Kh"], c["Kh"], c["W"], z(C, V), c["aC"], None, precision=precision, input_precision=split)
    covariance_sweep(c["Yt"], c["Kh"], covs, c["aC"], None, precision=precision)
    for inputs in dict.fromkeys((None, split)):
        module.ADJOINT_STEPS["mean"](x, c, states, covs, z(C, V), states, False, precision=precision,
                                     input_precision=inputs)
        module.ADJOINT_STEPS["mean"](x, c, states, covs, z(C, V), states, False, precision=precision, dvar=z(C),
                                     input_precision=inputs)
        module.ADJOINT_STEPS["covariance"](x, c, states, covs, covs, False, precision=precision,
                                           input_precision=inputs)
    # step 4 deferring its key gradient to step 6 (the backward's own path)
    _, _, carry = module.ADJOINT_STEPS["mean"](x, c, states, covs, z(C, V), states, False, precision=precision,
                                               input_precision=split, defer_keys=True)
    module.ADJOINT_STEPS["covariance"](x, c, states, covs, covs, False, precision=precision, carry=carry)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--shape", default="4,4096,16,128", help="B,T,H,D or B,T,H,K,V")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--variance", action="store_true")
    ap.add_argument("--save", action="store_true", help="forward(..., save_for_backward=True)")
    ap.add_argument("--backward", action="store_true", help="the backward's kernels too")
    ap.add_argument("--check", action="store_true",
                    help="only compile (no ptxas report); exit 1 if a kernel does not compile")
    ap.add_argument("--dump", default=None, help="write each kernel's TTGIR and PTX into this folder")
    ap.add_argument("--only", default=None, help="compile only the kernels whose names hold this text")
    ap.add_argument("--config", default=None, help='the op\'s config as JSON, e.g. \'{"covariance": {"num_warps": 4}}\'')
    ap.add_argument("--backward-config", default=None,
                    help='with --backward: the backward\'s config as JSON, e.g. \'{"dqk": {"diag": "grid"}}\'')
    args = ap.parse_args(argv)
    if RECORDING:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        kw = {"output_variance": True} if args.variance else {}
        if args.save:
            kw["save_for_backward"] = True
        if args.config:
            kw["config"] = json.loads(args.config)
        print(json.dumps(record(args.model, tuple(int(x) for x in args.shape.split(",")), dtype,
                                backward=args.backward, backward_config=json.loads(args.backward_config)
                                if args.backward_config else None, **kw)))
        return 0
    child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                           env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"recording the launches failed:\n{child.stderr[-2000:]}")
    launches = json.loads(child.stdout.strip().splitlines()[-1])
    from designmodel.codegen import runtime
    module = runtime.load_zoo(args.model)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.model} at {args.shape} {args.dtype}")
    print("| kernel | compile s | regs | spill st/ld B | smem B |")
    print("|---|---|---|---|---|")
    failed = 0
    for name, sig, const, options in launches:
        if args.only and args.only not in name:
            continue
        t0 = time.time()
        try:
            compiled = triton.compile(ASTSource(fn=getattr(module, name), signature=sig, constexprs=const),
                                      target=GPUTarget("cuda", args.arch, 32), options=options)
        except Exception as exc:      # report every kernel that fails, not only the first
            failed += 1
            print(f"| {name} | failed: {type(exc).__name__}: {' '.join(str(exc).split())[-600:]} |||", flush=True)
            continue
        secs = time.time() - t0
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                (Path(args.dump) / f"{name}.{ext}").write_text(compiled.asm[ext])
        rep = ptxas_report(compiled.asm["ptx"], args.arch) if not args.check else dict(regs="-", spill_st="-", spill_ld="-")
        print(f"| {name} | {secs:.1f} | {rep['regs']} | {rep['spill_st']}/{rep['spill_ld']} | "
              f"{compiled.metadata.shared} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
