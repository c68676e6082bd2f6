"""Loading generated kernel modules.

A generated module (generated/<model>/kernels.py, or a cache entry for a spec outside the zoo)
is plain Python + Triton. Zoo modules are imported as `designmodel.generated.<model>.kernels`;
cache entries are loaded from their file under a name derived from their folder, once per
process. Triton reads a kernel's source from its file, so modules are always loaded from disk.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

_LOCK = threading.Lock()
_PATCHED = False


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def patch_interpreter_bf16_dot() -> None:
    """Work around Triton's interpreter multiplying bfloat16 dot operands as raw uint16.

    The interpreter stores bfloat16 as uint16 and its `tl.dot` passes them to numpy.matmul
    unconverted (checked with triton 3.9), so every bf16 matmul is garbage. Here the operands
    are widened to float32 first, which is what the GPU's bf16 MMA computes up to the
    accumulation order. Applied once, and only when interpreting.
    """
    global _PATCHED
    if _PATCHED or not interpreting():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _PATCHED = True


def load_zoo(model: str):
    """The committed kernels of a zoo model: designmodel.generated.<model>.kernels."""
    patch_interpreter_bf16_dot()
    return importlib.import_module(f"designmodel.generated.{model}.kernels")


def load_file(path) -> object:
    """The module in `path` (a generated kernels.py), loaded once per process."""
    patch_interpreter_bf16_dot()
    path = Path(path).resolve()
    name = "designmodel_kernels_" + "".join(ch if ch.isalnum() else "_" for ch in path.parent.name)
    with _LOCK:
        module = sys.modules.get(name)
        if module is not None and Path(module.__file__).resolve() == path:
            return module
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load generated kernels from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module


__all__ = ["load_zoo", "load_file", "interpreting", "patch_interpreter_bf16_dot"]
