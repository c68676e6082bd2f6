"""Every zoo kernel compiles for an H100 (sm_90), checked on any machine.

The interpreter runs the kernels' Python, not Triton's compiler, so errors that only the
compiler sees pass the CPU suite and fail on the GPU (a name bound before a loop and rebound
with another shape inside it is one: it broke chunk_gain_kernel whenever V < 64).
`bench/compile_report.py --check` records the launches of a forward and backward in the
interpreter and compiles each for sm_90 with this machine's Triton, in a process of its own.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from designmodel import zoo

ROOT = Path(__file__).resolve().parents[2]

try:
    import triton.backends.nvidia.compiler  # noqa: F401
    HAS_NVIDIA_BACKEND = True
except ImportError:
    HAS_NVIDIA_BACKEND = False


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="this Triton has no NVIDIA backend to compile with")
@pytest.mark.parametrize("model", zoo.NAMES)
def test_zoo_kernels_compile_for_sm90(model):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), model,
                          "--shape", "1,80,2,64,32", "--backward", "--check"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    failures = [line for line in run.stdout.splitlines() if "failed:" in line]
    assert run.returncode == 0, "\n".join(failures) or run.stderr[-3000:]


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="this Triton has no NVIDIA backend to compile with")
def test_bayesian_layer_forward_settings_compile_for_sm90():
    """The Riccati kernel's other code path, off by default and timed by
    bench/bench_kalman.py --variants forward: the update by LDL blocks of 16 rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    config = '{"covariance": {"update_rows": 16}}'
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "bayesian_layer",
                          "--shape", "1,80,2,64,32", "--variance", "--check", "--config", config],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    failures = [line for line in run.stdout.splitlines() if "failed:" in line]
    assert run.returncode == 0, "\n".join(failures) or run.stderr[-3000:]
