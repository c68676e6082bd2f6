"""The command line: derive, zoo (with its graph), check."""
import subprocess
import sys

from designmodel import zoo
from designmodel.cli import main
from designmodel.derive import derive


def test_derive_zoo_model_prints_markdown(capsys):
    assert main(["derive", "gated_deltanet", "--prove"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# gated_deltanet: reset family")
    assert "$$" in out and "zoo model: gated_deltanet" in out
    assert "[proved]" in out and "FAILED" not in out


def test_derive_python_spec_file(tmp_path, capsys):
    f = tmp_path / "my_layer.py"
    f.write_text("from designmodel.spec import *\n"
                 "g = Input('g', domain='logdecay')\nr = Input('r', domain='positive')\n"
                 "model = DesignModel('mine', transition=Transition(decay=exp(g), noise=0.1),\n"
                 "    observation=Regression(noise=r), readout=Readout('prior', variance=True))\n")
    assert main(["derive", str(f)]) == 0
    out = capsys.readouterr().out
    assert "# mine: kalman family" in out and "prior readout, variance" in out
    assert "zoo model: none" in out


def test_derive_with_reset_filter_names_gated_deltanet(capsys):
    assert main(["derive", "bayesian_layer", "--filter", "reset:0.5"]) == 0
    assert "zoo model: gated_deltanet" in capsys.readouterr().out


def test_zoo_lists_every_model_and_draws_graph(tmp_path, capsys):
    svg = tmp_path / "zoo.svg"
    assert main(["zoo", "--graph", str(svg)]) == 0
    out = capsys.readouterr().out
    for name in zoo.NAMES:
        assert f"\n{name} " in "\n" + out
        assert derive(name).one_line() in out
    assert "rls -> deltanet" in out and "bayesian_layer -> mamba2" in out
    text = svg.read_text()
    assert text.startswith("<svg") and all(n in text for n in zoo.NAMES)


def test_relations_graph_edges():
    g = zoo.relations()
    edges = {(a, b, k) for a, b, k in g.edges(data="relation")}
    assert ("bayesian_layer", "gated_deltanet", "reset") in edges
    assert ("bayesian_layer_diag", "kda", "reset") in edges
    assert ("rls", "linear_attention", "limit") in edges
    assert ("mamba2", "gla", "specialization") in edges
    assert len(edges) == 13


def test_module_entry_point_unknown_spec_exits_2():
    p = subprocess.run([sys.executable, "-m", "designmodel", "derive", "no_such_model"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: spec:")


def test_derive_toml_spec_like_a_python_spec(tmp_path, capsys):
    toml = tmp_path / "gdn.toml"
    assert main(["derive", "gated_deltanet", "--save", str(toml)]) == 0
    first = capsys.readouterr().out
    assert main(["derive", str(toml)]) == 0
    assert capsys.readouterr().out == first


def test_markdown_prints_powers_of_the_custom_functions():
    from designmodel.spec import DesignModel, Input, Readout, Regression, Transition, sigmoid
    x = Input("x")
    d = derive(DesignModel("sig", transition=Transition(decay=sigmoid(x), noise=0.1),
                           observation=Regression(noise=1), readout=Readout(variance=True)))
    assert r"\sigma\left(x\right)^{2}" in d.to_markdown()


def test_compile_writes_a_folder_whose_kernels_match_the_float64_filter(tmp_path, capsys, monkeypatch):
    """`designmodel compile SPEC -o DIR` on a spec outside the zoo: the written kernels run (in
    Triton's interpreter) and agree with the float64 reference; the written spec reloads to the
    same model."""
    import os

    import torch
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from designmodel.codegen import runtime
    from designmodel.reference import recurrent
    from designmodel.specfile import load
    f = tmp_path / "mine.py"
    f.write_text("from designmodel.spec import *\n"
                 "x = Input('x')\nb = Input('b', domain='unit')\n"
                 "model = DesignModel('soft_gated_delta', transition=Transition(decay=sigmoid(x + 2)),\n"
                 "    observation=Regression(noise=1), readout=Readout('posterior'), filter=reset(b / (1 - b)))\n")
    out = tmp_path / "built"
    assert main(["compile", str(f), "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["__init__.py", "derivation.md", "kernels.py", "layer.py",
                                   "spec.toml"]
    assert "wrote" in capsys.readouterr().out
    d = derive(str(f))
    assert load(out / "spec.toml") == d.spec
    kernels = runtime.load_file(out / "kernels.py")
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 20, 2, 16, 16
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    x = torch.randn(B, T, H, generator=gen)
    b = torch.rand(B, T, H, generator=gen) * 0.8 + 0.1
    o, _ = kernels.forward(q, k, v, b, x, scale=1.0)
    ref = recurrent(d, q.double(), k.double(), v.double(), {"x": x.double(), "b": b.double()})
    assert (o.double() - ref.o).abs().max() / ref.o.abs().max() < 1e-5


def test_compile_refuses_a_spec_without_kernels_in_one_line(tmp_path, capsys):
    assert main(["compile", "no_such_model", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: spec:") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_compiled_folder_layer_builds_the_specs_module(tmp_path, capsys, monkeypatch):
    """The written layer.py (and the package's `layer`) builds a DesignLayer of the written spec
    whose output equals a layer built directly from the spec with the same weights."""
    import importlib
    import sys

    import torch
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    import designmodel
    out = tmp_path / "gdn_built"
    assert main(["compile", "gated_deltanet", "-o", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.syspath_prepend(str(tmp_path))
    package = importlib.import_module("gdn_built")
    try:
        built = package.layer(hidden_size=32, num_heads=2, head_dim=8)
        assert package.forward is not None and built.op.plan.family == "reset"
        direct = designmodel.compile("gated_deltanet").module(32, 2, 8)
        direct.load_state_dict(built.state_dict())   # same parameter names and shapes
        x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(built(x)[0], direct(x)[0])
    finally:
        for name in [m for m in sys.modules if m == "gdn_built" or m.startswith("gdn_built.")]:
            del sys.modules[name]


def test_compile_writes_files_with_the_usual_permissions(tmp_path):
    """Atomic writes go through a 0600 temporary file; the result has 0666 less the umask."""
    import os
    import stat
    mask = os.umask(0o022)
    os.umask(mask)
    assert main(["compile", "deltanet", "-o", str(tmp_path / "out")]) == 0
    for f in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name
