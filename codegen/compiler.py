"""`designmodel.compile(spec)`: a design model to a forward op backed by generated kernels.

    op = designmodel.compile(spec)
    o, final_state = op(q, k, v, <inputs by name>, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None)
    o, cache = op.recurrent(q_t, k_t, v_t, <inputs of the token>, initial_state=cache,
                            output_final_state=True)          # one decoding step, T = 1

The spec's per-token inputs and constants are keyword arguments named after the spec's
inputs (`op.inputs` lists them with their shapes and domains). A zoo spec uses the committed
kernels under generated/; any other spec is compiled into the cache (codegen/emit.py).
"""
from __future__ import annotations

import inspect

from .plan import plan as make_plan


class CompiledOp:
    """A forward op for one design model: call it like the matching fla chunk op.

    `op(...)` runs the chunked forward, `op.recurrent(...)` the token-by-token form (decoding:
    T = 1 with the cache as initial_state), both through torch.library custom ops
    (designmodel.library: they compile with torch.compile(fullgraph=True) and carry autograd).
    `op.kernels` is the generated kernels module itself.
    """

    def __init__(self, derivation, module, source: str):
        from designmodel import library
        self.derivation = derivation
        self.plan = make_plan(derivation)
        self.kernels = module
        self.source = source          # "zoo" or the cache folder
        self.inputs = dict(module.INPUTS)
        self.__name__ = derivation.spec.name
        self.__doc__ = module.forward.__doc__
        self.__signature__ = inspect.signature(module.forward)
        self.library = library.register(library.op_name(derivation.spec, zoo=source == "zoo"), module)

    def _bind(self, args, kwargs) -> list:
        """The spec's inputs in order from positional and keyword arguments (ValueError naming
        what is missing, doubled or unknown); the inputs are popped from kwargs."""
        names = list(self.inputs)
        if len(args) > len(names):
            raise ValueError(f"{self.__name__} takes q, k, v and {len(names)} input(s) "
                             f"({', '.join(names) or 'none'}) by position, got {3 + len(args)} arguments")
        values = dict(zip(names, args))
        for name in names:
            if name in kwargs:
                if name in values:
                    raise ValueError(f"{self.__name__}: {name} given twice")
                values[name] = kwargs.pop(name)
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{self.__name__}: missing input(s) {', '.join(missing)} "
                             f"({', '.join(f'{n} {self.inputs[n][0]}' for n in missing)})")
        known = {"scale", "initial_state", "output_final_state", "cu_seqlens", "check_domain", "config"}
        if self.plan.family == "kalman":
            known.add("output_variance")
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"{self.__name__}: unknown argument(s) {', '.join(unknown)}; the inputs "
                             f"of this spec are {', '.join(names) or 'none'}")
        return [values[n] for n in names]

    def __call__(self, q, k, v, *args, **kwargs):
        """The chunked forward: (o, final_state) (kalman: final_state (S, P), and the variance
        when output_variance)."""
        kwargs = dict(kwargs)
        return self.library.forward(q, k, v, *self._bind(args, kwargs), **kwargs)

    def recurrent(self, q, k, v, *args, **kwargs):
        """The same layer token by token (the recurrent kernels), same arguments and results."""
        kwargs = dict(kwargs)
        return self.library.recurrent(q, k, v, *self._bind(args, kwargs), **kwargs)

    def module(self, hidden_size: int, num_heads: int, head_dim: int, **options):
        """A sequence layer (torch.nn.Module) around this op: projections, gates, norm and
        output gate in fla's conventions (designmodel.layers.DesignLayer; options as there)."""
        from designmodel.layers import DesignLayer
        return DesignLayer(self, hidden_size, num_heads, head_dim, **options)

    def __repr__(self):
        ins = ", ".join(f"{n} {s}" for n, (s, _) in self.inputs.items())
        return f"<compiled {self.plan.family} op {self.__name__}({', '.join(['q', 'k', 'v'] + ([ins] if ins else []))})>"


def compile(spec, filter=None, cache=None) -> CompiledOp:  # noqa: A001 (the public name)
    """The forward op of `spec` (a DesignModel, zoo name or spec file) under its filter.

    Raises PlanError (a ValueError) for a spec outside the write and reset families.
    """
    from designmodel.derive import derive
    from designmodel.zoo import SPECS

    from . import emit, runtime
    d = derive(spec, filter)
    make_plan(d)  # fails early, with the reason, for what these kernels cannot do
    name = d.spec.name
    if name in SPECS and SPECS[name] == d.spec and name in emit.zoo_models() and cache is None:
        return CompiledOp(d, runtime.load_zoo(name), "zoo")
    folder = emit.build(d, cache)
    return CompiledOp(d, runtime.load_file(folder / "kernels.py"), str(folder))


__all__ = ["compile", "CompiledOp"]
