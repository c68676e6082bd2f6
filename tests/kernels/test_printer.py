"""The sympy -> Triton printer."""
import pytest
import sympy as sp

from designmodel import structure as st
from designmodel.codegen.printer import triton_code
from designmodel.spec import Constant, Input, logsigmoid, sigmoid, softplus

a = Input("a")
c = Input("c", domain="positive")
r = Input("r", domain="positive")
gk = Input("gk", per="key", domain="logdecay")
gamma = Constant("gamma", domain="unit")
NAMES = {a: "b_a", c: "b_c", r: "b_r", gk: "b_gk", gamma: "b_gamma", st.KEY_NORM2: "b_knorm2"}


@pytest.mark.parametrize("expr,code", [
    (a, "b_a"),
    (sp.log(sigmoid(a)), "logsigmoid(b_a)"),
    (-softplus(a), "-softplus(b_a)"),
    (logsigmoid(a), "logsigmoid(b_a)"),
    (sp.log(gamma), "tl.log(b_gamma)"),
    (sp.log(sp.exp(a)), "b_a"),
    (c / (c * st.KEY_NORM2 + r), "b_c/(b_c*b_knorm2 + b_r)"),
    (1 - c, "1.0 - b_c"),
    (sp.sqrt(c), "tl.sqrt(b_c)"),
    (c ** 2, "b_c * b_c"),
    # a power in a denominator stays one operand (not a / c * c)
    (a / c ** 2, "b_a/(b_c * b_c)"),
    (-c / (c * st.KEY_NORM2 + r) ** 2, "-b_c/((b_c*b_knorm2 + b_r) * (b_c*b_knorm2 + b_r))"),
    (sp.log(2) * a, "0.6931471805599453*b_a"),
    (sp.exp(gk), "tl.exp(b_gk)"),
])
def test_prints_spec_functions_as_triton(expr, code):
    assert triton_code(expr, NAMES) == code


def test_a_symbol_without_a_register_is_an_error():
    with pytest.raises(ValueError, match="no register block"):
        triton_code(a + Input("zz"), NAMES)


def test_printed_code_evaluates_like_sympy():
    import math
    expr = sp.log(sigmoid(a)) * c + softplus(a) / (1 + r ** 2) - sp.sqrt(c)
    code = triton_code(expr, {a: "x", c: "y", r: "z"})
    env = dict(x=0.3, y=1.7, z=0.4,
               tl=type("tl", (), {"exp": math.exp, "log": math.log, "sqrt": math.sqrt}),
               softplus=lambda t: math.log1p(math.exp(t)),
               logsigmoid=lambda t: -math.log1p(math.exp(-t)))
    want = float(expr.rewrite(sp.exp).subs({a: 0.3, c: 1.7, r: 0.4}))
    assert abs(eval(code, env) - want) < 1e-12
