"""The README's kernel example runs and its two ways of calling agree."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_kernel_example():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[1]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["o"].shape == (2, 256, 4, 64) and ns["state"].shape == (2, 4, 64, 64)
    torch.testing.assert_close(ns["o2"], ns["o"])
