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
