"""generated/ is what the compiler emits for the zoo, byte for byte."""
from pathlib import Path

import pytest

from designmodel.codegen import emit
from designmodel.derive import derive

GENERATED = Path(emit.GENERATED)
# the zoo models of the write and reset families (the Kalman family has its own tests)
MODELS = ["linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "kda"]


def test_zoo_models_include_the_write_and_reset_families():
    assert [m for m in emit.zoo_models() if m in MODELS] == MODELS


def test_regeneration_is_byte_identical(tmp_path):
    for model in MODELS:
        emit.write_model(model, tmp_path)
    for model in MODELS:
        for fname in ("kernels.py", "derivation.md", "__init__.py"):
            fresh = (tmp_path / model / fname).read_bytes()
            committed = (GENERATED / model / fname).read_bytes()
            assert fresh == committed, f"generated/{model}/{fname} is out of date: run python -m designmodel.codegen.emit"


@pytest.mark.parametrize("model", ["mamba2", "kda"])
def test_derivation_is_committed_beside_the_kernels(model):
    assert (GENERATED / model / "derivation.md").read_text() == derive(model).to_markdown()


@pytest.mark.parametrize("model", ["linear_attention", "gated_deltanet", "gla"])
def test_generated_code_is_self_contained_and_deterministic(model):
    text = (GENERATED / model / "kernels.py").read_text()
    assert "designmodel" not in "\n".join(l for l in text.splitlines() if l.startswith(("import", "from")))
    for stamp in ("2025", "2026", "datetime", "time.time"):
        assert stamp not in text
    assert "def forward(" in text and "@triton.jit" in text
    assert emit.render(derive(model))["kernels.py"] == text


def test_kernels_print_the_derivation_scalars():
    text = (GENERATED / "gated_deltanet" / "kernels.py").read_text()
    # the log-decay g and the gain beta are read from their inputs, per token
    assert "b_ld = tl.where(m_t, (b_g) * RCP_LN2, 0.)" in text
    assert "b_gain0 = tl.where(m_t0, b_beta, 0.)" in text
