"""Exact filters and the covariance-reset reduction of a design model (MATH.md sections 2-3).

`derive(spec)` returns a `Derivation`: one token's update as an ordered list of named steps
(predict, gain, innovation, update, readout), each a sympy expression over the structured
matrices of `structure.py`; the closed form of the new mean (and covariance where the mean
depends on it); the per-token scalars the kernels need (log-decay, gain, noises), simplified;
the family and flags; the zoo model it equals; and the dataflow graph of its steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import networkx as nx
import sympy as sp

from designmodel import structure as st
from designmodel.family import Structure, classify
from designmodel.spec import DesignModel, as_filter, sigmoid


@dataclass(frozen=True)
class Step:
    """One named quantity of a token's update: `symbol = expr`."""

    symbol: sp.Basic
    expr: sp.Basic
    meaning: str

    @property
    def is_scalar(self) -> bool:
        return not isinstance(self.symbol, sp.MatrixExpr)


# Names of the derived quantities (the design-model vocabulary).
S_PRED = sp.MatrixSymbol(r"\bar{S}_t", st.K, st.V)      # predicted mean F_t S_{t-1}
P_PRED = sp.MatrixSymbol(r"\bar{P}_t", st.K, st.K)      # predicted covariance
GAIN_DIR = sp.MatrixSymbol("u_t", st.K, 1)              # P^- k_t, the gain's direction
INNOV_VAR = sp.Symbol("s_t", positive=True)             # innovation variance k^T P^- k + r
GAIN = sp.Symbol(r"\beta_t", positive=True)             # reset gain c / (c |k|^2 + r)
INNOV = sp.MatrixSymbol("e_t", st.V, 1)                 # innovation v_t - S^-^T k_t
S_NEW = sp.MatrixSymbol("S_t", st.K, st.V)
P_NEW = sp.MatrixSymbol("P_t", st.K, st.K)
Y = sp.MatrixSymbol("y_t", st.V, 1)
VAR = sp.Symbol(r"\sigma^{2}_t", nonnegative=True)


@dataclass
class Derivation:
    """The derived filter of one design model under one filter."""

    spec: DesignModel
    structure: Structure
    steps: list[Step]
    scalars: dict          # per-token scalars for the kernels: name -> simplified sympy expr
    mean: sp.Basic         # closed form of S_t over S_{t-1}, (P_{t-1}) and the inputs
    covariance: sp.Basic | None
    readout: sp.Basic
    variance: sp.Basic | None
    raw_mean: sp.Basic     # the update before simplification (Kalman form), kept for proofs
    zoo_name: str | None = None
    dataflow: nx.DiGraph = field(default_factory=nx.DiGraph)

    @property
    def family(self) -> str:
        return self.structure.family

    @property
    def filter(self):
        return self.spec.filter

    def expand(self, expr):
        """`expr` with every step symbol replaced by its definition."""
        for step in reversed(self.steps):
            expr = expr.xreplace({step.symbol: step.expr})
        return expr

    def covariance_free(self) -> bool:
        """True when the closed-form mean never involves the covariance P_{t-1}."""
        return st.P not in self.mean.free_symbols

    def one_line(self) -> str:
        """The mean update in one line of plain text (the Kalman family by its named steps)."""
        if self.family != "kalman":
            return f"S_t = {_plain(self.mean)}"
        defs = "; ".join(f"{_plain(s.symbol)} = {_plain(s.expr)}" for s in self.steps
                         if s.symbol not in (S_NEW, P_NEW, Y, VAR))
        new = next(s for s in self.steps if s.symbol == S_NEW)
        return f"S_t = {_plain(new.expr)}  [{defs}]"

    def to_markdown(self) -> str:
        """The derivation as Markdown with LaTeX."""
        from designmodel.printing import derivation_markdown
        return derivation_markdown(self)


def derive(spec, filter=None) -> Derivation:
    """Derive the per-token filter of `spec` (a DesignModel, a zoo name or a spec file).

    filter: "exact", reset(c), or None for the spec's own filter.
    """
    from designmodel.loading import load_spec
    spec = load_spec(spec)
    if filter is not None:
        f = as_filter(filter)
        if f != spec.filter:
            spec = replace(spec, filter=f)  # re-validates under the new filter
    structure = classify(spec)
    builder = {"write": _write_steps, "reset": _reset_steps, "kalman": _kalman_steps}[structure.family]
    steps, scalars = builder(spec)
    steps += _readout_steps(spec)
    d = Derivation(spec=spec, structure=structure, steps=steps, scalars=scalars, mean=None,
                   covariance=None, readout=None, variance=None, raw_mean=None)
    d.mean = d.expand(S_NEW)
    d.raw_mean = d.expand(_raw_mean(spec, structure))
    d.covariance = d.expand(P_NEW) if _has(steps, P_NEW) else None
    d.readout = d.expand(Y)
    d.variance = d.expand(VAR) if spec.readout.variance else None
    d.dataflow = dataflow(steps)
    from designmodel.zoo import identify
    d.zoo_name = identify(d)
    return d


# --- the three families ---------------------------------------------------------------

def _transition(spec):
    return st.per_key(spec.transition.decay)


def _process_noise(spec):
    q = spec.noise_expr()
    return sp.ZeroMatrix(st.K, st.K) if q == 0 else st.per_key(q)


def _decay_scalars(spec) -> dict:
    decay = spec.transition.decay
    return {"decay": decay, "log_decay": sp.expand_log(sp.log(decay), force=True)}


def _write_steps(spec):
    F = _transition(spec)
    steps = [Step(S_PRED, F * st.S, "predicted mean (transition)"),
             Step(S_NEW, S_PRED + st.k * st.v.T, "write: the token adds k_t v_t^T")]
    if spec.readout.variance:
        steps += [Step(P_PRED, F * st.P * F.T + _process_noise(spec), "predicted covariance"),
                  Step(P_NEW, P_PRED, "covariance (values are not evidence)")]
    return steps, _decay_scalars(spec)


def _kalman_steps(spec):
    F, r = _transition(spec), spec.observation.noise
    steps = [
        Step(S_PRED, F * st.S, "predicted mean"),
        Step(P_PRED, F * st.P * F.T + _process_noise(spec), "predicted covariance"),
        Step(GAIN_DIR, P_PRED * st.k, "gain direction P^- k"),
        Step(INNOV_VAR, st.QuadraticForm(st.k, P_PRED, st.k) + r, "innovation variance"),
        Step(INNOV, st.v - S_PRED.T * st.k, "innovation"),
        Step(S_NEW, S_PRED + GAIN_DIR * INNOV.T / INNOV_VAR, "posterior mean"),
        Step(P_NEW, P_PRED - GAIN_DIR * GAIN_DIR.T / INNOV_VAR, "posterior covariance"),
    ]
    scalars = {**_decay_scalars(spec), "noise": r, "process_noise": sp.simplify(spec.noise_expr())}
    return steps, scalars


def _reset_innovation_variance(spec) -> sp.Expr:
    """s = c |k|^2 + r under the reset covariance c I (with |k|^2 = 1 for unit keys)."""
    knorm2 = 1 if spec.observation.unit_keys else st.KEY_NORM2
    return spec.filter.c * knorm2 + spec.observation.noise


def reset_gain(spec) -> sp.Expr:
    """The reset gain c / (c |k|^2 + r), simplified (with |k|^2 = 1 for unit keys)."""
    return sp.simplify(spec.filter.c / _reset_innovation_variance(spec))


def gain_logit(spec) -> sp.Expr | None:
    """log c - log r when the gain is sigmoid(log c - log r) (unit keys), else None."""
    if not spec.observation.unit_keys:
        return None
    c, r = spec.filter.c, spec.observation.noise
    logit = sp.expand_log(sp.log(c) - sp.log(r), force=True)
    return sp.simplify(logit)


def _reset_steps(spec):
    F, c = _transition(spec), spec.filter.c
    gain = reset_gain(spec)
    steps = [
        Step(S_PRED, F * st.S, "predicted mean"),
        Step(INNOV_VAR, _reset_innovation_variance(spec), "innovation variance under the reset c I"),
        Step(GAIN, gain, "reset gain c / s"),
        Step(S_NEW, (sp.Identity(st.K) - GAIN * st.k * st.k.T) * S_PRED + GAIN * st.k * st.v.T,
             "posterior mean (delta rule)"),
    ]
    if spec.readout.variance:
        steps += [Step(P_PRED, c * sp.Identity(st.K), "reset covariance"),
                  Step(P_NEW, P_PRED - c * GAIN * st.k * st.k.T, "posterior covariance")]
    scalars = {**_decay_scalars(spec), "reset": c, "noise": spec.observation.noise, "gain": gain}
    logit = gain_logit(spec)
    if logit is not None:
        scalars["gain_logit"] = logit
    return steps, scalars


def _raw_mean(spec, structure) -> sp.Basic:
    """The reset family's mean straight from the Kalman update with P^- = c I (for proofs)."""
    if structure.family != "reset":
        return S_NEW
    c = spec.filter.c
    knorm2 = st.QuadraticForm(st.k, sp.Identity(st.K), st.k)
    u = c * st.k
    s = c * knorm2 + spec.observation.noise
    return S_PRED + u * (st.v - S_PRED.T * st.k).T / s


def _readout_steps(spec):
    timing_post = spec.readout.timing == "posterior"
    mean = S_NEW if timing_post else S_PRED
    steps = [Step(Y, mean.T * st.q, f"readout ({spec.readout.timing} mean)")]
    if spec.readout.variance:
        cov = P_NEW if timing_post else P_PRED
        steps.append(Step(VAR, st.QuadraticForm(st.q, cov, st.q), "predictive variance (per value dim)"))
    return steps


def _has(steps, symbol) -> bool:
    return any(s.symbol == symbol for s in steps)


def dataflow(steps) -> nx.DiGraph:
    """The DAG of derived quantities: an edge a -> b when b's definition uses a."""
    g = nx.DiGraph()
    known = {s.symbol for s in steps}
    for s in steps:
        g.add_node(str(s.symbol), meaning=s.meaning, scalar=s.is_scalar)
        for dep in s.expr.free_symbols:
            if dep in known or dep in st.BASE:
                g.add_edge(str(dep), str(s.symbol))
            elif getattr(dep, "per_token", None) is not None:
                g.add_node(str(dep), meaning="input", scalar=True)
                g.add_edge(str(dep), str(s.symbol))
    return g


def recognize_sigmoid(gain, logit) -> sp.Expr:
    """The gain written as sigmoid(logit) when sympy proves they are equal, else the gain."""
    if logit is None:
        return gain
    if sp.simplify((sigmoid(logit) - gain).rewrite(sp.exp)) == 0:
        return sigmoid(logit)
    return gain


def _plain(expr) -> str:
    text = str(expr).replace("**", "^")
    for tex, plain in ((r"\bar{S}_t", "S^-_t"), (r"\bar{P}_t", "P^-_t"), (r"\beta_t", "beta_t")):
        text = text.replace(tex, plain)
    return text


__all__ = ["derive", "Derivation", "Step", "reset_gain", "gain_logit", "recognize_sigmoid",
           "dataflow"]
