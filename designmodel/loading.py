"""Where a spec comes from: a DesignModel, a zoo name, a Python file or a TOML file."""
from __future__ import annotations

import runpy
from pathlib import Path

from designmodel.spec import DesignModel, SpecError


def load_spec(source) -> DesignModel:
    """A DesignModel from a DesignModel, a zoo name, a `.py` file defining `model`, or a `.toml` file."""
    if isinstance(source, DesignModel):
        return source
    from designmodel import zoo
    if isinstance(source, str) and source in zoo.SPECS:
        return zoo.SPECS[source]
    path = Path(source) if isinstance(source, (str, Path)) else None
    if path is None:
        raise SpecError("spec", f"expected a DesignModel, a zoo name or a spec file, got {source!r}")
    if not path.is_file():
        raise SpecError("spec", f"{source!s} is neither a zoo model ({', '.join(zoo.NAMES)}) nor a file")
    if path.suffix == ".toml":
        from designmodel.specfile import load
        return load(path)
    if path.suffix == ".py":
        namespace = runpy.run_path(str(path), run_name="designmodel_spec")
        model = namespace.get("model")
        if not isinstance(model, DesignModel):
            raise SpecError("spec", f"{path} must define `model = DesignModel(...)`")
        return model
    raise SpecError("spec", f"{path}: a spec file ends in .py or .toml")
