"""Classify a derivation into a kernel family (write, reset, kalman) with structure flags."""
from __future__ import annotations

from dataclasses import dataclass, fields

from designmodel.spec import DesignModel, Regression, Reset


@dataclass(frozen=True)
class Structure:
    """What the kernel templates branch on.

    family:         write (model A exact), reset (model B, covariance reset), kalman (model B exact)
    decay:          none, constant, scalar or per_key
    process_noise:  none, isotropic or diagonal (only the kalman mean depends on it)
    timing:         posterior or prior readout
    variance:       whether the predictive variance is read out
    unit_keys:      keys declared unit-norm (the simplifier used |k|^2 = 1)
    prior:          isotropic, diagonal or full prior covariance (kalman and variance only)
    """

    family: str
    decay: str
    process_noise: str
    timing: str
    variance: bool
    unit_keys: bool
    prior: str

    def flags(self) -> dict:
        """The flags as a plain dict (the templates' context)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def one_line(self) -> str:
        """e.g. `reset, decay scalar, posterior readout, unit keys`."""
        parts = [self.family, f"decay {self.decay}"]
        if self.process_noise != "none":
            parts.append(f"process noise {self.process_noise}")
        parts.append(f"{self.timing} readout")
        if self.variance:
            parts.append("variance")
        if self.unit_keys:
            parts.append("unit keys")
        return ", ".join(parts)

    def mean_signature(self) -> tuple:
        """What decides the mean update's form; two models with equal signatures are the same
        layer up to the parameterization of their per-token scalars (reading out the variance
        as well does not change the layer)."""
        noise = self.process_noise if self.family == "kalman" else None
        return (self.family, self.decay, noise, self.timing)


def classify(spec: DesignModel) -> Structure:
    """The family and flags of a spec under its filter."""
    if isinstance(spec.observation, Regression):
        family = "reset" if isinstance(spec.filter, Reset) else "kalman"
    else:
        family = "write"
    noise = spec.noise_expr()
    if noise == 0:
        pnoise = "none"
    elif any(getattr(s, "per", "head") == "key" for s in noise.free_symbols):
        pnoise = "diagonal"
    else:
        pnoise = "isotropic"
    return Structure(
        family=family,
        decay=spec.transition.decay_kind,
        process_noise=pnoise,
        timing=spec.readout.timing,
        variance=spec.readout.variance,
        unit_keys=spec.observation.unit_keys,
        prior=spec.prior.covariance.kind,
    )
