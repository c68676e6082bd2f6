"""The README's example runs and says what it claims."""
import re
from pathlib import Path

import sympy as sp

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    d = ns["d"]
    assert d.zoo_name == "gated_deltanet"
    c, r = (next(x for x in d.spec.inputs if x.name == n) for n in "cr")
    assert sp.simplify(d.scalars["gain"] - c / (c + r)) == 0
    out = capsys.readouterr().out
    assert d.one_line() in out and "FAILED" not in out


def test_readme_opens_with_the_two_commands_ci_runs():
    lines = [l.strip() for l in README.read_text().splitlines() if l.strip()]
    assert lines[1:3] == ["bash setup.sh && python3 -m designmodel check bayesian_layer",
                          "bash setup.sh && python3 -m pytest -q"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash setup.sh && python3 -m pytest -q" in ci
