"""Spec files (designmodel.specfile): round trips, hostile expressions, malformed files, saving.

The round trips compare with the Python-built DesignModel (dataclass equality) and with
hand-written TOML; the hostile tests run with eval, exec and sympy's text parsers barred, in
an empty folder, and check that each string is refused for its own reason.
"""
from __future__ import annotations

import builtins
import json
import os
import stat
import tomllib

import pytest
import sympy as sp
import sympy.parsing.sympy_parser as sympy_parser
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from designmodel import specfile, zoo
from designmodel.derive import derive
from designmodel.loading import load_spec
from designmodel.spec import (STATE, Constant, DesignModel, Input, Prior, Readout, Regression,
                              SpecError, Transition, Write, diagonal, exp, full, isotropic, log,
                              logsigmoid, reset, sigmoid, softplus, sqrt)
from designmodel.specfile import dumps, format_expression, load, loads, parse_expression, save

g = Input("g", domain="logdecay")
g_key = Input("g", per="key", domain="logdecay")
beta = Input("beta", domain="unit")
r = Input("r", domain="positive")
x = Input("x")
a = Input("a")
sigma_key = Input("sigma", per="key", domain="nonnegative")
d = Constant("d", per="key", domain="positive")
p0 = Constant("p0", domain="positive")

# Specs that use every part of the grammar, beyond the zoo.
OTHER_SPECS = {
    "per_key_given_diagonal": DesignModel(
        "per_key_given_diagonal", prior=Prior(diagonal(d), mean="given"),
        transition=Transition(decay=exp(g_key), noise=sigma_key),
        observation=Regression(noise=softplus(x) + r / 3 + sp.Float(0.1)),
        readout=Readout("prior", variance=True),
        description='quotes " and \\ backslash\nnew line, \t tab, unicode é ∑'),
    "diagonal_list": DesignModel(
        "diagonal_list", prior=Prior(diagonal([1, 2, sp.Rational(1, 2)])), key_dim=3, value_dim=5,
        transition=Transition(decay=sigmoid(a)), observation=Regression(noise=sqrt(r) + log(1 + r))),
    "full_matrix": DesignModel(
        "full_matrix", prior=Prior(full(sp.Matrix([[2, 1, 0], [1, 2, 0], [0, 0, sp.Float(0.5)]]))),
        key_dim=3, observation=Regression(noise=r)),
    "full_by_name": DesignModel("full_by_name", prior=Prior(full("P0")), observation=Regression(noise=r)),
    "stationary": DesignModel(
        "stationary", prior=Prior(isotropic(p0)), transition=Transition(decay=sigmoid(a), noise="stationary"),
        observation=Regression(noise=r), readout=Readout(variance=True)),
    "gain_above_one": DesignModel(
        "gain_above_one", transition=Transition(decay=exp(logsigmoid(x))),
        observation=Regression(noise=1 - 2 * beta, unit_keys=True),
        filter=reset(beta, allow_gain_above_one=True)),
    "map": DesignModel("map", transition=Transition(map=exp(g) * STATE), observation=Write(unit_keys=True)),
    "unicode_name": DesignModel(
        "unicode_name", observation=Write(),
        transition=Transition(decay=Input("β", domain="unit") ** 2 / 2 + sp.Rational(1, 3))),
    "reset_with_input_c": DesignModel(
        "reset_with_input_c", transition=Transition(decay=exp(g)), observation=Regression(noise=exp(-x)),
        filter=reset(2 * softplus(x))),
    "input_named_stationary": DesignModel(
        "input_named_stationary", observation=Regression(noise=r),
        transition=Transition(noise=Input("stationary", domain="nonnegative"))),
}


class _Forbidden(BaseException):
    """Raised by the barred functions; a BaseException, so no `except Exception` can hide it."""


@pytest.fixture
def guard(monkeypatch, tmp_path):
    """An empty working folder, with eval, exec and sympy's text parsers barred and recorded."""
    monkeypatch.chdir(tmp_path)
    loads(dumps(zoo.SPECS["kda"]))  # let lazy imports happen before exec is barred
    calls = []

    def barred(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise _Forbidden(name)
        return f

    real_sympify = sp.sympify

    def sympify(value, *args, **kwargs):
        # spec.py sympifies sympy objects (harmless); text is what sympify would eval.
        if isinstance(value, (str, bytes)):
            calls.append("sympify")
            raise _Forbidden("sympify")
        return real_sympify(value, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", barred("eval"))
    monkeypatch.setattr(builtins, "exec", barred("exec"))
    monkeypatch.setattr(sp, "sympify", sympify)
    monkeypatch.setattr(sp, "parse_expr", barred("parse_expr"))
    monkeypatch.setattr(sympy_parser, "parse_expr", barred("parse_expr"))
    monkeypatch.setattr(sympy_parser, "eval_expr", barred("eval_expr"))
    yield calls
    assert calls == []
    assert not (tmp_path / "PWNED").exists()


# --- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_round_trip_is_equal(name, guard):
    spec = zoo.SPECS[name]
    assert loads(dumps(spec)) == spec


@pytest.mark.parametrize("name", sorted(OTHER_SPECS))
def test_other_specs_round_trip_is_equal(name, guard):
    spec = OTHER_SPECS[name]
    text = dumps(spec)
    back = loads(text)
    assert back == spec
    assert dumps(back) == text  # the text is stable


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_file_loads_and_derives_like_the_python_spec(name, tmp_path):
    spec = zoo.SPECS[name]
    path = save(spec, tmp_path / f"{name}.toml")
    assert load_spec(path) == spec
    assert load_spec(str(path)) == spec
    assert derive(path).one_line() == derive(spec).one_line()


@pytest.mark.parametrize("name", ["stationary", "gain_above_one", "per_key_given_diagonal", "map"])
def test_other_file_derives_like_the_python_spec(name, tmp_path):
    spec = OTHER_SPECS[name]
    path = save(spec, tmp_path / "spec.toml")
    assert derive(str(path)).one_line() == derive(spec).one_line()


def test_dumps_writes_the_documented_schema():
    data = tomllib.loads(dumps(zoo.SPECS["kda"]))
    assert data["name"] == "kda" and data["format"] == 1
    assert data["inputs"] == {"beta": {"per": "head", "domain": "unit", "per_token": True},
                              "g": {"per": "key", "domain": "logdecay", "per_token": True}}
    assert data["prior"] == {"mean": "zero", "covariance": "isotropic", "value": "1"}
    assert data["transition"] == {"decay": "exp(g)", "noise": "0"}
    assert data["observation"] == {"kind": "regression", "noise": "1 - beta", "unit_keys": True}
    assert data["readout"] == {"timing": "posterior", "variance": False}
    assert data["filter"] == {"kind": "reset", "c": "beta", "allow_gain_above_one": False}
    full_data = tomllib.loads(dumps(OTHER_SPECS["full_matrix"]))
    assert full_data["prior"]["value"] == [["2", "1", "0"], ["1", "2", "0"], ["0", "0", "0.5"]]
    assert tomllib.loads(dumps(OTHER_SPECS["stationary"]))["transition"]["noise"] == "stationary"
    named = tomllib.loads(dumps(OTHER_SPECS["input_named_stationary"]))["transition"]["noise"]
    assert named == "(stationary)"  # an input called "stationary", not the stationary noise


HAND_WRITTEN = {
    # Minimal files: optional keys left out, plain TOML numbers where an expression goes.
    "gated_deltanet": '''
        name = "gated_deltanet"
        description = "reset of the regression model, scalar gate"
        [inputs]
        g = { domain = "logdecay" }
        beta = { domain = "unit" }
        [prior]
        mean = "zero"
        covariance = "isotropic"
        value = 1
        [transition]
        decay = "exp(g)"
        noise = 0
        [observation]
        kind = "regression"
        noise = "1-beta"
        unit_keys = true
        [readout]
        timing = "posterior"
        [filter]
        kind = "reset"
        c = "beta"
    ''',
    "bayesian_layer": '''
        name = "bayesian_layer"
        description = "exact filter, scalar gate, isotropic process noise"
        [inputs]
        g = { per = "head", domain = "logdecay", per_token = true }
        r = { domain = "positive" }
        sigma = { domain = "nonnegative" }
        p0 = { domain = "positive", per_token = false }
        [prior]
        mean = "zero"
        covariance = "isotropic"
        value = "p0"
        [transition]
        decay = "exp( g )"
        noise = "sigma"
        [observation]
        kind = "regression"
        noise = "r"
        [readout]
        timing = "posterior"
        [filter]
        kind = "exact"
    ''',
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_file_equals_the_zoo_spec(name, guard):
    assert loads(HAND_WRITTEN[name]) == zoo.SPECS[name]


def test_hand_written_full_matrix_with_numbers():
    text = HAND_WRITTEN["bayesian_layer"].replace(
        'covariance = "isotropic"\n        value = "p0"',
        'covariance = "full"\n        value = [[2, "1/2"], ["1/2", 1.5]]')
    text = text.replace('p0 = { domain = "positive", per_token = false }', "")
    spec = loads(text)
    expected = sp.ImmutableMatrix([[2, sp.Rational(1, 2)], [sp.Rational(1, 2), sp.Float(1.5)]])
    assert spec.prior.covariance.kind == "full"
    assert spec.prior.covariance.value == expected


# --- the expression parser ------------------------------------------------------------------

SYMBOLS = {"g": g, "beta": beta, "r": r, "x": x}


@pytest.mark.parametrize("text, expected", [
    ("1 - beta", 1 - beta),
    ("exp(g)", sp.exp(g)),
    ("-g**2", -(g ** 2)),                      # ** binds tighter than unary minus
    ("2**3**2", sp.Integer(512)),              # ** is right-associative
    ("1/2", sp.Rational(1, 2)),
    ("x/3*2", sp.Rational(2, 3) * x),
    ("0.1*r", sp.Float(0.1) * r),
    ("r**-2", 1 / r ** 2),
    ("sqrt(r)", sp.Pow(r, sp.Rational(1, 2))),
    ("sqrt(2)*2**(1/3)", sp.Pow(2, sp.Rational(1, 2)) * sp.Pow(2, sp.Rational(1, 3))),
    ("log(1 + r)", sp.log(1 + r)),
    ("sigmoid(x) + softplus(x) - logsigmoid(x)", sigmoid(x) + softplus(x) - logsigmoid(x)),
    ("+beta", beta),
    ("  exp(g)\n", sp.exp(g)),
    ("2**64", sp.Integer(2) ** 64),
    ("exp(-exp(700*beta))", sp.exp(-sp.exp(700 * beta))),
    (" + ".join(f"{i}*beta" for i in range(1, 101)), 5050 * beta),   # a long sum is not deep
    ("*".join(["sigmoid(x)"] * 60), sigmoid(x) ** 60),
])
def test_parse_expression_builds_the_expected_sympy(text, expected, guard):
    assert parse_expression(text, SYMBOLS) == expected


@pytest.mark.parametrize("expr, text", [
    (1 - beta, "1 - beta"),
    (sp.exp(g), "exp(g)"),
    (-(g ** 2), "-g**2"),
    (sp.Rational(1, 3), "1/3"),
    (sp.Float(0.1) * r, "0.1*r"),
    (1 / r ** 2, "1/r**2"),
    (sp.sqrt(r) / 2, "sqrt(r)/2"),
    (sp.E * r, "exp(1)*r"),
    # Canonical forms that sympy's str() prints so that they read back as another tree:
    (sp.Mul(sp.Rational(1, 2), 1 / (beta + g)), "1/2/(beta + g)"),
    (sp.Mul(4, r + sp.Rational(5, 9), 1 / beta), "4*(r + 5/9)/beta"),
    (sp.Mul(-1, r + 1, 1 / beta), "-(r + 1)/beta"),
    (exp(g) * STATE, "state*exp(g)"),
])
def test_format_expression_writes_readable_text_that_reads_back_equal(expr, text):
    assert format_expression(expr) == text
    symbols = {**SYMBOLS, "state": STATE}
    assert parse_expression(text, symbols) == expr


@st.composite
def expressions(draw, depth=3):
    """Random admitted expressions, built with sympy as a spec author would."""
    leaves = [g, beta, r, x, sp.Integer(draw(st.integers(-5, 5))),
              sp.Rational(draw(st.integers(-9, 9)), draw(st.integers(1, 9))),
              sp.Float(draw(st.floats(-50, 50, allow_nan=False).filter(lambda v: v != 0)))]
    if depth == 0:
        return draw(st.sampled_from(leaves))
    op = draw(st.sampled_from(["leaf", "+", "-", "*", "/", "**", "f", "pos"]))
    if op == "leaf":
        return draw(st.sampled_from(leaves))
    u = draw(expressions(depth - 1))
    if not u.free_symbols and op in ("f", "pos"):
        u = u * x  # sympy evaluates functions of floats at once; keep the arguments symbolic
    if op in "+-*/":
        v = draw(expressions(depth - 1))
        assume(op != "/" or v != 0)
        return {"+": u + v, "-": u - v, "*": u * v, "/": u / v if v != 0 else u}[op]
    if op == "**":
        e = draw(st.sampled_from([-2, -1, 2, 3, sp.Rational(1, 2)]))
        assume(u != 0)
        return (1 + sigmoid(u)) ** e if e == sp.Rational(1, 2) else u ** e
    if op == "f":
        return draw(st.sampled_from([exp, sigmoid, softplus, logsigmoid]))(u)
    return draw(st.sampled_from([sqrt, log]))(1 + exp(u))  # arguments that are > 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions())
def test_format_then_parse_gives_the_same_expression(expr):
    assume(not expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo, sp.I))
    try:
        text = format_expression(expr)
    except SpecError as err:
        # Only these refusals are expected: the documented limits (values past the magnitude
        # guard, exponents above 64, huge rationals), floats that are not doubles, and symbolic
        # exponents (sympy turns exp(x*log(2)) into 2**x), which bounds.py refuses too.
        expected = ("too large", "too close", "larger than 64", "bits", "not a double",
                    "is not a number")
        assume(not any(reason in str(err) for reason in expected))
        raise
    assert parse_expression(text, SYMBOLS) == expr


# --- hostile expressions ---------------------------------------------------------------------

TEMPLATE = {
    "name": "gated_deltanet",
    "description": "reset of the regression model, scalar gate",
    "inputs": {"beta": {"domain": "unit"}, "g": {"domain": "logdecay"}},
    "prior": {"mean": "zero", "covariance": "isotropic", "value": "1"},
    "transition": {"decay": "exp(g)", "noise": "0"},
    "observation": {"kind": "regression", "noise": "1 - beta", "unit_keys": True},
    "readout": {"timing": "posterior", "variance": False},
    "filter": {"kind": "reset", "c": "beta"},
}


def to_toml(data: dict) -> str:
    """TOML for a nested dict of strings, numbers, booleans and lists (JSON strings are TOML strings)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(w)}" for k, w in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(w) for w in v) + "]"
        if isinstance(v, float):
            return repr(v)  # TOML spells nan and inf in lower case, JSON does not
        return json.dumps(v)
    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{json.dumps(n)} = {value(w)}" for n, w in v.items()]
    return "\n".join(lines) + "\n"


def with_value(section: str, key: str, text) -> str:
    data = json.loads(json.dumps(TEMPLATE))
    data[section][key] = text
    toml = to_toml(data)
    assert tomllib.loads(toml)[section][key] == text  # the string reaches the parser intact
    return toml


def test_template_is_the_zoo_spec():
    assert loads(to_toml(TEMPLATE)) == zoo.SPECS["gated_deltanet"]


HOSTILE = {
    "__import__('os').system('touch PWNED')": "attribute access",
    "__import__('os')": "calling __import__ is not allowed",
    "().__class__.__bases__[0].__subclasses__()": "attribute access",
    "exp.__globals__": "attribute access",
    "(lambda: 1)()": "lambda",
    "[x for x in ()]": "comprehensions",
    "2**2**2**100": "exponent 100 is larger than 64",
    "10**10**10": "exponent 10000000000 is larger than 64",
    "9**999999": "exponent 999999 is larger than 64",
    "g" * 100_000: "100000 characters long",
    "(" * 500 + "g" + ")" * 500: "not a valid expression",
    "exp(" * 100 + "g" + ")" * 100: "nested more than",
    "-" * 1000 + "g": "nested more than",
    "open('x')": "calling open is not allowed",
    "open('PWNED', 'w').write('x')": "attribute access",
    "eval('1')": "calling eval is not allowed",
    "g if g else g": "conditional expressions",
    '"abc"': "strings are not allowed",
    "1j": "complex numbers",
    "exp(x=1)": "keyword arguments",
    "exp(g, g)": "exactly one argument",
    "f'{g}'": "f-strings",
    "(y := 1)": "assignment expressions",
    "g < 1": "comparisons",
    "g and beta": "'and' / 'or'",
    "g @ g": "operator '@'",
    "__builtins__": "name __builtins__ is not allowed",
    "gamma": "unknown name 'gamma'",
    "exp": "must be called with one argument",
    "exp(g)**g": "exponent g is not a number",
    "exp(-exp(exp(exp(64))))": "too large to check",
    "exp(-exp(exp(64*beta)))": "too large to check",
    "(2**64)**64": "more than 4096 bits",
    "123456789" * 20: "more than 128 bits",
    "1e400": "not a finite number",
    "1/0": "division by zero",
    "": "not a valid expression",
}
POSITIONS = [("transition", "decay"), ("transition", "noise"), ("observation", "noise"),
             ("filter", "c"), ("prior", "value")]


@pytest.mark.parametrize("section, key", POSITIONS)
@pytest.mark.parametrize("text", list(HOSTILE), ids=lambda t: repr(t[:30]))
def test_hostile_expression_is_refused_and_nothing_runs(text, section, key, guard, tmp_path):
    with pytest.raises(SpecError) as info:
        loads(with_value(section, key, text))
    assert info.value.part == section
    assert str(info.value).startswith(f"{section}: {key}: ")
    assert HOSTILE[text] in str(info.value)
    assert not (tmp_path / "PWNED").exists()
    assert guard == []


@pytest.mark.parametrize("text", ["__import__('os').system('touch PWNED')", "2**2**2**100"])
def test_hostile_file_is_refused_through_load_spec_and_derive(text, guard, tmp_path):
    path = tmp_path / "hostile.toml"
    path.write_text(with_value("transition", "decay", text))
    for read in (load, load_spec, derive):
        with pytest.raises(SpecError, match="transition: decay: "):
            read(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("matrix", [[["__import__('os')", "0"], ["0", "1"]],
                                    [["1", "0"], ["0", "9**999999"]]])
def test_hostile_matrix_entry_is_refused(matrix, guard):
    data = json.loads(json.dumps(TEMPLATE))
    data["prior"] = {"mean": "zero", "covariance": "full", "value": matrix}
    with pytest.raises(SpecError, match=r"prior: value\[\d\]\[\d\]: "):
        loads(to_toml(data))


@pytest.mark.parametrize("name, reason", [("__class__", "cannot name an input"),
                                          ("lambda", "cannot name an input"),
                                          ("exp", "cannot name an input"),
                                          ("state", "cannot name an input"),
                                          ("os.system", "not an identifier"),
                                          ("ℌ", "NFKC")])
def test_hostile_input_name_is_refused(name, reason, guard):
    data = json.loads(json.dumps(TEMPLATE))
    data["inputs"][name] = {"domain": "real"}
    with pytest.raises(SpecError, match=reason) as info:
        loads(to_toml(data))
    assert info.value.part == "inputs"


# --- validation and malformed files -------------------------------------------------------

@pytest.mark.parametrize("section, key, text, part, message", [
    ("transition", "decay", "exp(g) + 1", "transition", "in (0, 1]"),
    ("transition", "decay", "beta - 1/2", "transition", "in (0, 1]"),
    ("observation", "noise", "beta - 1", "observation", "must be > 0"),
    ("filter", "c", "g", "filter", "> 0"),
    ("prior", "value", "g", "prior", "per-token input"),
    ("transition", "noise", "g", "transition", ">= 0"),
])
def test_loaded_spec_is_validated_like_a_python_spec(section, key, text, part, message):
    with pytest.raises(SpecError) as info:
        loads(with_value(section, key, text))
    assert info.value.part == part
    assert message in str(info.value)


def _edit(**changes) -> str:
    data = json.loads(json.dumps(TEMPLATE))
    for path, value in changes.items():
        *parents, last = path.split("__")
        table = data
        for p in parents:
            table = table[p]
        if value is _DROP:
            del table[last]
        else:
            table[last] = value
    return to_toml(data)


_DROP = object()


@pytest.mark.parametrize("text, part, message", [
    ("name = \n", "toml", "not valid TOML"),
    ('name = "x"\n[inputs\n', "toml", "not valid TOML"),
    ('name = "x"\nname = "y"\n', "toml", "not valid TOML"),
    (_edit(transition=_DROP), "transition", "missing table [transition]"),
    (_edit(filter=_DROP), "filter", "missing table [filter]"),
    (_edit(name=_DROP), "spec", "missing key 'name'"),
    (_edit(transition__noise=_DROP), "transition", "missing key 'noise'"),
    (_edit(prior__covariance=_DROP), "prior", "missing key 'covariance'"),
    (_edit(transition__gain=1), "transition", "unknown key 'gain'"),
    (_edit(extra={"a": 1}), "spec", "unknown key 'extra'"),
    (_edit(inputs__g={"domain": "negative"}), "inputs", "g: domain must be one of"),
    (_edit(inputs__g={"domain": "logdecay", "per": "token"}), "inputs", "g: per must be one of"),
    (_edit(inputs__g={"domain": "logdecay", "size": 3}), "inputs", "g: unknown key 'size'"),
    (_edit(inputs__g=3), "inputs", "g: expected a table, got an integer"),
    (_edit(inputs__g={"domain": "logdecay", "per_token": 1}), "inputs", "per_token: expected true or false"),
    (_edit(inputs=[1]), "inputs", "expected a table"),
    (_edit(transition__decay=True), "transition", "decay: expected an expression"),
    (_edit(transition__decay=["exp(g)"]), "transition", "decay: expected an expression"),
    (_edit(transition__decay=float("nan")), "transition", "not a finite number"),
    (_edit(transition__map="exp(g)*state"), "transition", "exactly one of 'decay' and 'map'"),
    (_edit(key_dim="64"), "spec", "key_dim: expected an integer"),
    (_edit(key_dim=True), "spec", "key_dim: expected an integer"),
    (_edit(key_dim=0), "spec", "key_dim: expected a positive dimension"),
    (_edit(name=3), "spec", "name: expected text"),
    (_edit(format=2), "spec", "format"),
    (_edit(observation__unit_keys="yes"), "observation", "unit_keys: expected true or false"),
    (_edit(observation__kind="gaussian"), "observation", "kind: expected one of"),
    (_edit(observation={"kind": "write", "noise": "1"}), "observation", "unknown key 'noise'"),
    (_edit(filter={"kind": "exact", "c": "beta"}), "filter", "unknown key 'c'"),
    (_edit(filter={"kind": "reset"}), "filter", "missing key 'c'"),
    (_edit(readout__timing="later"), "readout", "timing: expected one of"),
    (_edit(prior__covariance="banded"), "prior", "covariance: expected one of"),
    (_edit(prior__value=["1", "2"]), "prior", "value: expected an expression"),
    (_edit(prior__covariance="full", prior__value=[["1", "0"], ["0"]]), "prior", "square matrix"),
    (_edit(prior__covariance="full", prior__value=[]), "prior", "square matrix"),
    (_edit(prior__covariance="full", prior__value=[["1", "2"], ["2", "1"]]), "prior",
     "not positive semidefinite"),
    (_edit(prior__covariance="full", prior__value="not a name"), "prior", "not an identifier"),
    (_edit(prior__covariance="diagonal", prior__value=[]), "prior", "1 to 64 entries"),
    (_edit(transition__decay="exp(h)"), "transition", "unknown name 'h'"),
    (_edit(observation={"kind": "write"}), "filter", "covariance reset applies to the regression"),
    (_edit(transition__noise="stationary", prior__covariance="diagonal"), "transition",
     "stationary noise p0 (I - F F^T) needs an isotropic prior"),
    ("x" * (specfile.MAX_FILE + 1), "toml", "more than"),
])
def test_malformed_file_gives_one_clear_spec_error(text, part, message, guard):
    with pytest.raises(SpecError) as info:
        loads(text)
    assert info.value.part == part
    assert message in str(info.value)


def test_unreadable_files_give_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"'.encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        load(bad)
    with pytest.raises(SpecError, match="expected TOML text"):
        loads(b'name = "x"')


def test_specs_that_cannot_be_written_are_refused():
    with pytest.raises(SpecError, match="transition: decay: pi\\*exp\\(g\\)/4 cannot be written") as info:
        dumps(DesignModel("with_pi", transition=Transition(decay=exp(g) * sp.pi / 4)))
    assert "pi is not a number, an input or one of the functions" in str(info.value)
    with pytest.raises(SpecError, match="two different inputs are named g"):  # refused already
        DesignModel("clash", transition=Transition(decay=exp(g)),
                    observation=Regression(noise=Input("g", domain="positive")))
    with pytest.raises(SpecError, match="transition: decay: .*exponent 100"):
        dumps(DesignModel("big_power", transition=Transition(decay=beta ** 100), observation=Write()))
    with pytest.raises(SpecError, match="key_dim must be a positive integer"):  # refused already
        DesignModel("bad_dim", key_dim="64")


# --- saving ----------------------------------------------------------------------------------

def test_save_leaves_only_the_file(tmp_path):
    path = save(zoo.SPECS["kda"], tmp_path / "kda.toml")
    assert os.listdir(tmp_path) == ["kda.toml"]
    assert load(path) == zoo.SPECS["kda"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # shareable, not mkstemp's 0600


def test_save_over_an_existing_file_replaces_it(tmp_path):
    path = tmp_path / "spec.toml"
    save(zoo.SPECS["mamba2"], path)
    path.chmod(0o600)
    save(zoo.SPECS["rls"], path)
    assert load(path) == zoo.SPECS["rls"]
    assert os.listdir(tmp_path) == ["spec.toml"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the old file's mode is kept


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "spec.toml"
    save(zoo.SPECS["mamba2"], path)
    before = path.read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save(zoo.SPECS["rls"], path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["spec.toml"]


def test_unwritable_spec_creates_no_file(tmp_path):
    with pytest.raises(SpecError):
        save(DesignModel("with_pi", transition=Transition(decay=exp(g) * sp.pi / 4)), tmp_path / "x.toml")
    assert os.listdir(tmp_path) == []
