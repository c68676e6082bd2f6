"""Each zoo model's derived update equals its published recurrence, proved by sympy.

The published recurrences are written here independently of the derivation, on explicit
symbolic matrices (every entry its own symbol): an equality proved for all values of them.
"""
import pytest
import sympy as sp

from designmodel import structure as st
from designmodel.derive import derive

KD, VD = 3, 2


def sym(name, r, c=1, **kw):
    return sp.Matrix(r, c, lambda i, j: sp.Symbol(f"{name}{i}{j}", **kw))


S = sym("S", KD, VD)
k, q, v = sym("k", KD), sym("q", KD), sym("v", VD)
P = sp.Matrix(KD, KD, lambda i, j: sp.Symbol(f"P{min(i, j)}{max(i, j)}"))  # generic symmetric
I = sp.eye(KD)
beta, gamma, r, sigma = sp.symbols("beta gamma r sigma", positive=True)
g = sp.Symbol("g", nonpositive=True)
gk = [sp.Symbol(f"g{m}", nonpositive=True) for m in range(KD)]


def derived(name, which="mean"):
    """The derived quantity at (KD, VD) with the zoo's inputs renamed to this file's symbols."""
    d = derive(name)
    values = {st.S: S, st.P: P, st.k: k, st.q: q, st.v: v}
    expr = {"mean": d.mean, "cov": d.covariance, "readout": d.readout}[which]
    out = st.explicit(expr, values, KD, VD)
    names = {"beta": beta, "gamma": gamma, "r": r, "sigma": sigma, "g": g, "p0": sp.Symbol("p0")}
    rename = {}
    for x in d.spec.inputs:
        if x.per == "key":
            rename.update({st.indexed(x, m): gk[m] for m in range(KD)})
        else:
            rename[x] = names[x.name]
    return out.xreplace(rename)


def assert_equal(a, b):
    a, b = sp.Matrix(a), sp.Matrix(b)
    assert a.shape == b.shape
    diff = (a - b).applyfunc(lambda e: sp.simplify(e))
    assert diff == sp.zeros(*a.shape), diff


def kalman_textbook(F, Q, noise):
    """Kalman filter in textbook form, column by column: H = k^T, K = P^- H^T (H P^- H^T + R)^-1,
    x = x^- + K (z - H x^-), P = (I - K H) P^-."""
    Pm = F * P * F.T + Q
    H = k.T
    gain = Pm * H.T / (H * Pm * H.T)[0, 0].__add__(noise)
    Sm = F * S
    mean = sp.Matrix.hstack(*[Sm[:, j] + gain * (v[j] - (H * Sm[:, j])[0, 0]) for j in range(VD)])
    cov = (I - gain * H) * Pm
    return mean, cov


PUBLISHED = {
    "linear_attention": lambda: S + k * v.T,
    "retnet": lambda: gamma * S + k * v.T,
    "mamba2": lambda: sp.exp(g) * S + k * v.T,
    "gla": lambda: sp.diag(*[sp.exp(x) for x in gk]) * S + k * v.T,
    # DeltaNet: S_t = S_{t-1} - beta k (k^T S_{t-1} - v^T)
    "deltanet": lambda: S - beta * k * (k.T * S - v.T),
    # Gated DeltaNet: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    "gated_deltanet": lambda: sp.exp(g) * (I - beta * k * k.T) * S + beta * k * v.T,
    # KDA: S_t = (I - beta_t k_t k_t^T) diag(alpha_t) S_{t-1} + beta_t k_t v_t^T
    "kda": lambda: (I - beta * k * k.T) * sp.diag(*[sp.exp(x) for x in gk]) * S + beta * k * v.T,
    # RLS in its classic form: P_t = P - P k k^T P / (r + k^T P k), S_t = S + P_t k (v^T - k^T S) / r
    "rls": lambda: S + (P - P * k * k.T * P / (r + (k.T * P * k)[0, 0])) * k * (v.T - k.T * S) / r,
    "bayesian_layer": lambda: kalman_textbook(sp.exp(g) * I, sigma * I, r)[0],
    "bayesian_layer_diag": lambda: kalman_textbook(sp.diag(*[sp.exp(x) for x in gk]), sigma * I, r)[0],
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_derived_mean_is_published_recurrence(name):
    assert_equal(derived(name), PUBLISHED[name]())


@pytest.mark.parametrize("name,F", [("rls", lambda: I), ("bayesian_layer", lambda: sp.exp(g) * I),
                                    ("bayesian_layer_diag", lambda: sp.diag(*[sp.exp(x) for x in gk]))])
def test_derived_covariance_is_textbook_kalman(name, F):
    Q = 0 * I if name == "rls" else sigma * I
    assert_equal(derived(name, "cov"), kalman_textbook(F(), Q, r)[1])


@pytest.mark.parametrize("name", ["mamba2", "gated_deltanet", "bayesian_layer"])
def test_posterior_readout_is_new_state_times_query(name):
    assert_equal(derived(name, "readout"), derived(name).T * q)


def test_a_wrong_recurrence_is_caught():
    """The check can fail: Gated DeltaNet with the decay after the erase is another layer."""
    wrong = (I - beta * k * k.T) * S * sp.exp(g) + beta * sp.exp(g) * k * v.T
    diff = (derived("gated_deltanet") - wrong).applyfunc(sp.simplify)
    assert diff != sp.zeros(KD, VD)
