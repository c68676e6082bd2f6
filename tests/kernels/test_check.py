"""`designmodel check`: every row passes for a zoo model, and a broken kernel or gradient is caught."""
import torch

from designmodel import check as check_mod


def test_check_rows_pass_for_gated_deltanet():
    rows = check_mod.check("gated_deltanet")
    kinds = [what for what, _, _ in rows]
    assert any(w.startswith("kernels") and "float32" in w for w in kinds)
    assert any(w.startswith("kernels") and "bfloat16" in w for w in kinds)
    assert any(w.startswith("proof:") for w in kinds)
    assert any(w.startswith("gradients") for w in kinds)
    assert all(ok for _, ok, _ in rows), rows


def test_check_catches_a_wrong_kernel(monkeypatch):
    from designmodel.codegen import compiler
    real = compiler.compile

    def broken(spec, *a, **kw):
        op = real(spec, *a, **kw)

        def wrong(q, k, v, **kwargs):
            o, s = op(q, k, v, **kwargs)
            return o * 1.05, s  # 5%: above both tolerances
        return wrong
    monkeypatch.setattr(compiler, "compile", broken)
    rows = check_mod.check("mamba2")
    kernel_rows = [ok for what, ok, _ in rows if what.startswith("kernels")]
    assert kernel_rows == [False, False]


def test_cli_check_exit_status(capsys):
    from designmodel.cli import main
    assert main(["check", "linear_attention"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "kernels (" in out


def test_check_catches_a_wrong_gradient(monkeypatch):
    """Right outputs, gradients 5% off: the kernel rows pass, the gradient row fails."""
    from designmodel.codegen import compiler
    real = compiler.compile

    def broken(spec, *a, **kw):
        op = real(spec, *a, **kw)

        def wrong_backward(q, k, v, **kwargs):
            o, s = op(q, k, v, **kwargs)
            return o + 0.05 * (o - o.detach()), s   # the same values, gradients through o x 1.05
        return wrong_backward
    monkeypatch.setattr(compiler, "compile", broken)
    rows = check_mod.check("mamba2")
    assert [ok for what, ok, _ in rows if what.startswith("kernels")] == [True, True]
    assert [ok for what, ok, _ in rows if what.startswith("gradients")] == [False]
