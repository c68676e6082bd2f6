"""A bad spec gets one clear SpecError naming the offending part, never a sympy traceback."""
import pytest
import sympy as sp

from designmodel.derive import derive
from designmodel.spec import (STATE, Constant, DesignModel, Input, Prior, Readout, Regression,
                              SpecError, Transition, Write, diagonal, exp, full, isotropic, log,
                              reset)

g = Input("g", domain="logdecay")
x = Input("x")                       # real
beta = Input("beta", domain="unit")
r = Input("r", domain="positive")


def raises(part, *words):
    """Context: a SpecError for `part` whose message contains every word."""
    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(SpecError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.ctx.__exit__(*exc)
            err = self.info.value
            assert err.part == part, str(err)
            assert str(err).startswith(f"{part}: ")
            for w in words:
                assert w in str(err), str(err)
            return out
    return _Ctx()


def test_nonlinear_transition():
    with raises("transition", "not linear"):
        Transition(map=exp(g) * STATE ** 2)


def test_affine_transition_is_not_a_linear_map():
    with raises("transition", "free of the state"):
        Transition(map=exp(g) * STATE + 1)


def test_state_dependent_decay():
    with raises("transition", "depends on the state"):
        DesignModel(transition=Transition(decay=exp(g) * STATE))


def test_state_dependent_noise():
    with raises("observation", "depends on the state"):
        DesignModel(observation=Regression(noise=1 + STATE ** 2))


def test_unsupported_covariance_structure():
    from designmodel.spec import Covariance
    with raises("prior", "unsupported covariance structure"):
        Covariance("banded", 1)
    with raises("prior", "unsupported covariance"):
        Prior(covariance="toeplitz")


def test_per_token_prior_covariance():
    with raises("prior", "per-token"):
        DesignModel(prior=Prior(covariance=isotropic(r)), observation=Regression(noise=r))


def test_covariance_not_positive_semidefinite():
    with raises("prior", "not positive semidefinite"):
        DesignModel(prior=Prior(covariance=full(sp.Matrix([[1, 2], [2, 1]]))), key_dim=2,
                    observation=Regression(noise=1))
    with raises("prior", "positive semidefinite"):
        DesignModel(prior=Prior(covariance=isotropic(-1)), observation=Regression(noise=1))
    with raises("prior", "positive semidefinite"):
        DesignModel(prior=Prior(covariance=diagonal([1, -2, 1])), observation=Regression(noise=1))


def test_covariance_not_symmetric():
    with raises("prior", "not symmetric"):
        DesignModel(prior=Prior(covariance=full(sp.Matrix([[1, 0], [0.5, 1]]))),
                    observation=Regression(noise=1))


def test_mismatched_dimensions():
    with raises("prior", "dimension 3", "key_dim is 4"):
        DesignModel(prior=Prior(covariance=diagonal([1, 1, 1])), key_dim=4,
                    observation=Regression(noise=1))
    with raises("prior", "square"):
        DesignModel(prior=Prior(covariance=full(sp.Matrix([[1, 0, 0], [0, 1, 0]]))),
                    observation=Regression(noise=1))
    with raises("prior", "dimension 2", "key_dim is 3"):
        DesignModel(prior=Prior(covariance=full(sp.eye(2))), key_dim=3, observation=Regression(noise=1))


def test_per_key_observation_noise_is_a_dimension_mismatch():
    gk = Input("gk", per="key", domain="positive")
    with raises("observation", "per-key"):
        DesignModel(observation=Regression(noise=gk))


def test_input_outside_its_domain():
    with raises("transition", "(0, 1]", "x in (-oo, oo)"):
        DesignModel(transition=Transition(decay=exp(x)))       # exp of a real input can exceed 1
    with raises("transition", "(0, 1]"):
        DesignModel(transition=Transition(decay=g))            # a log-decay used as the decay
    with raises("observation", "> 0"):
        DesignModel(observation=Regression(noise=g))           # noise from a log-decay (<= 0)
    with raises("observation", "log of a quantity that can be <= 0"):
        DesignModel(observation=Regression(noise=log(x)))
    with raises("transition", ">= 0"):
        DesignModel(transition=Transition(noise=x))            # process noise from a real input


def test_undeclared_symbol():
    with raises("transition", "not a declared Input"):
        DesignModel(transition=Transition(decay=exp(-sp.Symbol("y") ** 2)))


def test_reset_gain_above_one_needs_explicit_permission():
    b = Input("b", domain="unit")  # c = 2b, r = 1 - 2b: gain 2b in (0, 2)
    spec = dict(observation=Regression(noise=1 - 2 * b, unit_keys=True))
    with raises("observation", "no Bayesian reading", "allow_gain_above_one=True"):
        DesignModel(**spec, filter=reset(2 * b))
    d = derive(DesignModel(**spec, filter=reset(2 * b, allow_gain_above_one=True)))
    assert sp.simplify(d.scalars["gain"] - 2 * b) == 0


def test_reset_of_the_write_model():
    with raises("filter", "write model"):
        DesignModel(observation=Write(), filter=reset(1))


def test_reset_covariance_must_be_positive():
    with raises("filter", "> 0"):
        DesignModel(observation=Regression(noise=1), filter=reset(x))


def test_noise_must_be_positive():
    with raises("observation", "> 0"):
        DesignModel(observation=Regression(noise=0))


def test_bad_readout_and_filter():
    with raises("readout", "timing"):
        Readout(timing="later")
    with raises("filter", "exact"):
        DesignModel(filter="kalman")


def test_bad_input_declaration():
    with raises("inputs", "domain"):
        Input("z", domain="complex")
    with raises("inputs", "per"):
        Input("z", per="value")


def test_retnet_style_constant_is_classified_constant():
    gamma = Constant("gamma", domain="unit")
    d = derive(DesignModel(transition=Transition(decay=gamma)))
    assert d.structure.decay == "constant" and d.zoo_name == "retnet"


def test_cli_prints_one_line_error_without_traceback(tmp_path, capsys):
    from designmodel.cli import main
    bad = tmp_path / "bad.py"
    bad.write_text("from designmodel.spec import *\nx = Input('x')\n"
                   "model = DesignModel(transition=Transition(decay=exp(x)))\n")
    assert main(["derive", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: transition:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_two_inputs_with_one_name():
    with raises("inputs", "two different inputs are named g"):
        DesignModel(transition=Transition(decay=exp(g)),
                    observation=Regression(noise=Input("g", domain="positive")))


def test_reserved_and_invalid_input_names():
    for name in ("exp", "sigmoid", "__class__", "state"):
        with raises("inputs", "reserved"):
            Input(name)
    with raises("inputs", "not an identifier"):
        Input("lambda")


def test_top_level_fields_are_checked():
    with raises("spec", "key_dim must be a positive integer"):
        DesignModel(key_dim="64")
    with raises("spec", "value_dim must be a positive integer"):
        DesignModel(value_dim=-3)
    with raises("spec", "name"):
        DesignModel(name=3)


def test_numbers_too_extreme_to_order_are_refused_not_crashed():
    with raises("transition", "cannot be decided"):
        DesignModel(transition=Transition(decay=exp(sp.Integer(2) ** -4000)))


def test_full_covariance_check_is_fast_at_real_key_sizes():
    import time
    a = sp.randMatrix(128, 128, min=-3, max=3, seed=1)
    spd = a * a.T + sp.eye(128)
    t = time.perf_counter()
    DesignModel(prior=Prior(covariance=full(spd)), key_dim=128, observation=Regression(noise=1))
    assert time.perf_counter() - t < 20
    with raises("prior", "not positive semidefinite"):
        DesignModel(prior=Prior(covariance=full(spd - 1000 * sp.eye(128))), observation=Regression(noise=1))


def test_float_and_rational_entries_are_symmetric():
    m = sp.Matrix([[2, sp.Rational(1, 2)], [0.5, 1]])
    DesignModel(prior=Prior(covariance=full(m)), observation=Regression(noise=1))
