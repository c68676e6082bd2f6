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


def test_readme_layer_example():
    """The layer example: prefill plus one decoded token equals one pass over the 21 tokens,
    and the backward reaches the layer's parameters."""
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[2]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    layer, x = ns["layer"], ns["x"]
    full = layer(x[:, :21])[0]
    torch.testing.assert_close(torch.cat([ns["o"], ns["o_next"]], 1), full, rtol=1e-4, atol=1e-5)
    assert layer.q_proj.weight.grad is not None and layer.q_proj.weight.grad.abs().sum() > 0
