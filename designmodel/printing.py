"""A derivation as Markdown with LaTeX."""
from __future__ import annotations

import sympy as sp

from designmodel.spec import Regression, Reset


def _tex(expr) -> str:
    return sp.latex(expr)


def _spec_lines(spec) -> list[str]:
    cov = spec.prior.covariance
    if cov.kind == "isotropic":
        p = rf"{_tex(cov.value)}\,I"
    elif cov.kind == "diagonal":
        p = rf"\operatorname{{diag}}({_tex(cov.value) if not isinstance(cov.value, tuple) else ', '.join(map(_tex, cov.value))})"
    else:
        p = cov.value if isinstance(cov.value, str) else _tex(cov.value)
    mean = "0" if spec.prior.mean == "zero" else "S_0 (given)"
    obs = spec.observation
    if isinstance(obs, Regression):
        o = rf"regression: $v_t = S_t^T k_t + \varepsilon_t,\ \varepsilon_t \sim N(0, {_tex(obs.noise)})$"
    else:
        o = r"write: values are inputs, $S_t = F_t S_{t-1} + k_t v_t^T$"
    if obs.unit_keys:
        o += r", unit keys ($\|k_t\|^2 = 1$)"
    noise = spec.transition.noise
    q = r"p_0 (I - F_t F_t^T)\ \text{(stationary)}" if isinstance(noise, str) else _tex(noise)
    f = spec.filter
    filt = "exact" if not isinstance(f, Reset) else rf"covariance reset, $\bar P_t = {_tex(f.c)}\,I$"
    return [
        f"- prior: $S_0 = {mean}$, $P_0 = {p}$",
        rf"- transition: $F_t = {_tex(spec.transition.decay)}$ ({spec.transition.decay_kind}), $Q_t = {q}$",
        f"- observation: {o}",
        f"- readout: {spec.readout.timing} mean" + (", predictive variance" if spec.readout.variance else ""),
        f"- filter: {filt}",
    ]


def derivation_markdown(d) -> str:
    """Markdown for a Derivation: spec, steps, closed form, per-token scalars, family."""
    from designmodel.derive import recognize_sigmoid
    title = f"# {d.spec.name}: {d.structure.family} family"
    lines = [title, ""]
    if d.spec.description:
        lines += [d.spec.description, ""]
    lines += ["## Design model", ""] + _spec_lines(d.spec) + [""]
    lines += ["## One token's update", ""]
    for step in d.steps:
        lines.append(f"- {step.meaning}: $${_tex(step.symbol)} = {_tex(step.expr)}$$")
    lines += ["", "## Closed form", "", f"$$S_t = {_tex(d.mean)}$$", ""]
    if d.covariance is not None:
        lines += [f"$$P_t = {_tex(d.covariance)}$$", ""]
    lines.append("The mean " + ("never involves the covariance: the filter is covariance-free."
                                if d.covariance_free() else "depends on the covariance P."))
    lines += ["", "## Per-token scalars (what the kernels compute)", ""]
    for name, expr in d.scalars.items():
        line = f"- {name}: ${_tex(expr)}$"
        if name == "gain" and not expr.is_Symbol:
            shown = recognize_sigmoid(expr, d.scalars.get("gain_logit"))
            if shown != expr:
                line += f" $= {_tex(shown)}$"
        lines.append(line)
    lines += ["", "## Kernel family", "", f"- {d.structure.one_line()}"]
    lines.append(f"- zoo model: {d.zoo_name or 'none (a new layer)'}")
    return "\n".join(lines) + "\n"
