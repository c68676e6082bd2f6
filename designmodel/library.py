"""The generated kernels as torch.library custom ops, so that torch.compile traces through them.

Each generated module (a zoo model's or a compiled spec's) is registered once per process as
three ops in the "designmodel" namespace:

    designmodel::<name>            the chunked forward       (module.forward)
    designmodel::<name>_recurrent  the token-by-token form   (module.recurrent)
    designmodel::<name>_backward   the gradients             (module.backward, when emitted)

<name> is the zoo model's name, or for any other spec its name followed by a short hash of the
spec (`op_name`). Each op has a fake (meta) implementation giving its output shapes and dtypes,
so `torch.compile(model, fullgraph=True)` records it as one node without a graph break. Custom
ops cannot return None: an absent final state or variance is an empty tensor inside the op, and
the wrappers here map it back to None. The forward and recurrent ops share one autograd formula
(they compute the same function): it calls the backward op, so that the backward compiles too.
A module that names SAVED_FOR_BACKWARD (gla; deltanet and gated_deltanet) gets a third op,
`<name>_saving`, which the wrappers call when a gradient will be needed: it returns
(o, *kept, final state), what module.forward(..., save_for_backward=True) keeps for the
backward in between, and the backward op takes it as `Tensor[] saved` (module.backward(...,
saved=...)); an empty list means recompute, an empty tensor an absent entry. The name
"final_state" is the op's last output, not one more. The final state comes last because
inductor (torch 2.13) gives the outputs after an unused one the wrong layouts, and the final
state is unused whenever it is not asked for.

    from designmodel.library import register
    lop = register("gated_deltanet", module)      # idempotent: the same name returns the same ops
    o, final_state = lop.forward(q, k, v, g=g, beta=beta, output_final_state=True)
"""
from __future__ import annotations

import json
import re
import threading

import torch

__all__ = ["NAMESPACE", "LibraryOp", "register", "op_name", "registered"]

# the entry of SAVED_FOR_BACKWARD that is the forward's final state (the saving op's last output)
FINAL_STATE = "final_state"
NAMESPACE = "designmodel"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_OPS: dict[str, "LibraryOp"] = {}
_LOCK = threading.Lock()
_OPTIONS = ("scale", "initial_state", "output_final_state", "cu_seqlens", "check_domain", "config")


def op_name(spec, zoo: bool) -> str:
    """The op name of a spec: its name for a zoo model, else its name and a hash of the spec."""
    name = re.sub(r"\W", "_", spec.name)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = "m_" + name
    if zoo:
        return name
    from designmodel.codegen.emit import spec_hash
    return f"{name}_{spec_hash(spec)[:10]}"


def registered() -> dict:
    """The ops registered in this process: name -> LibraryOp."""
    return dict(_OPS)


def register(name: str, module) -> "LibraryOp":
    """The custom ops of a generated kernels module under `name`, registered on first use.

    Registering a name twice returns the first registration (the same spec compiles to the
    same kernels; the name of a spec outside the zoo carries its hash).
    """
    with _LOCK:
        op = _OPS.get(name)
        if op is None:
            op = _OPS[name] = LibraryOp(name, module)
        return op


# --- helpers -----------------------------------------------------------------------------------

def _empty(like: torch.Tensor) -> torch.Tensor:
    """The stand-in for None among an op's outputs."""
    return like.new_empty(0, dtype=torch.float32)


def _dense(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A contiguous empty tensor (the fake implementations' outputs)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _config_text(config) -> str | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict of per-kernel overrides, got {type(config).__name__}")
    return json.dumps(config, sort_keys=True)


def _given(kept):
    """The backward's saved tensors from the op's Tensor[] argument: an empty list, nothing was
    kept (the backward recomputes: None); an empty tensor, that entry is absent (None)."""
    return tuple(None if x.numel() == 0 else x for x in kept) if len(kept) else None


class LibraryOp:
    """The registered custom ops of one generated module, and Python wrappers that take the
    module's own arguments (inputs by position or by name) and return its results."""

    def __init__(self, name: str, module):
        self.name = name
        self.kernels = module
        self.family = module.FAMILY
        self.kalman = self.family == "kalman"
        self.inputs = list(module.INPUTS)
        # names of what module.forward(..., save_for_backward=True) keeps for module.backward
        # (none where the backward would not read them); the saving op returns all but the
        # final state, which is among its outputs anyway
        reads = getattr(module, "BACKWARD_READS_SAVED", True)
        self.saves = tuple(getattr(module, "SAVED_FOR_BACKWARD", ())) if reads else ()
        self.extra = self._kept(self.saves)
        self._define()

    def _kept(self, items):
        """The items (one per SAVED_FOR_BACKWARD name) that the saving op returns between o and
        the final state: all but the final state's."""
        return tuple(x for name, x in zip(self.saves, items) if name != FINAL_STATE)

    # --- schema and registration ----------------------------------------------------------
    def _schema(self, outputs: str) -> str:
        ins = "".join(f", Tensor {n}" for n in self.inputs)
        state = "Tensor? initial_state, Tensor? initial_covariance" if self.kalman else "Tensor? initial_state"
        flags = "bool output_final_state, bool output_variance" if self.kalman else "bool output_final_state"
        return (f"(Tensor q, Tensor k, Tensor v{ins}, float? scale, {state}, {flags}, "
                f"Tensor? cu_seqlens, bool check_domain, str? config) -> {outputs}")

    def _define(self) -> None:
        outputs = "(Tensor, Tensor, Tensor, Tensor)" if self.kalman else "(Tensor, Tensor)"
        # the saving op: o, the kept tensors, then the final state (and P, the variance)
        saving = "(" + ", ".join(["Tensor"] * ((4 if self.kalman else 2) + len(self.extra))) + ")"
        kinds = [("", "forward", outputs, self._fake), ("_recurrent", "recurrent", outputs, self._fake)]
        if self.saves:
            kinds.append(("_saving", "saving", saving, self._fake_saving))
        for suffix, fn, outs, fake in kinds:
            qualname = f"{NAMESPACE}::{self.name}{suffix}"
            torch.library.define(qualname, self._schema(outs), lib=_LIB)
            torch.library.impl(qualname, "default", lib=_LIB)(self._implementation(fn))
            torch.library.register_fake(qualname, fake, lib=_LIB)
            torch.library.register_autograd(qualname, self._backward, setup_context=self._setup_context,
                                            lib=_LIB)
        ins = "".join(f", Tensor {n}" for n in self.inputs)
        qualname = f"{NAMESPACE}::{self.name}_backward"
        if self.kalman:
            # the gradients of (o, S, P, variance) in; those of the inputs and (S0, P0) out
            grads = ", ".join(["Tensor"] * (3 + len(self.inputs) + 2))
            saved = ", Tensor[] saved" if self.saves else ""
            schema = (f"(Tensor q, Tensor k, Tensor v{ins}, Tensor do, Tensor? dS, Tensor? dP, Tensor? dvar, "
                      f"float? scale, Tensor? initial_state, Tensor? initial_covariance, Tensor? cu_seqlens, str? config{saved}) "
                      f"-> ({grads})")
        else:
            grads = ", ".join(["Tensor"] * (3 + len(self.inputs) + 1))
            saved = ", Tensor[] saved" if self.saves else ""
            schema = (f"(Tensor q, Tensor k, Tensor v{ins}, Tensor do, Tensor? dht, "
                      f"float? scale, Tensor? initial_state, Tensor? cu_seqlens{saved}) -> ({grads})")
        torch.library.define(qualname, schema, lib=_LIB)
        torch.library.impl(qualname, "default", lib=_LIB)(self._backward_implementation)
        torch.library.register_fake(qualname, self._backward_fake, lib=_LIB)
        ns = getattr(torch.ops, NAMESPACE)
        self._forward_op = getattr(ns, self.name).default
        self._recurrent_op = getattr(ns, f"{self.name}_recurrent").default
        self._saving_op = getattr(ns, f"{self.name}_saving").default if self.saves else None
        self._backward_op = getattr(ns, f"{self.name}_backward").default

    def _split(self, args):
        """(q, k, v, inputs, options dict) from the positional arguments of an op."""
        n = len(self.inputs)
        q, k, v, inputs, rest = args[0], args[1], args[2], list(args[3:3 + n]), list(args[3 + n:])
        if self.kalman:
            names = ("scale", "initial_state", "initial_covariance", "output_final_state",
                     "output_variance", "cu_seqlens", "check_domain", "config")
        else:
            names = ("scale", "initial_state", "output_final_state", "cu_seqlens", "check_domain", "config")
        return q, k, v, inputs, dict(zip(names, rest))

    # --- the real implementations ---------------------------------------------------------
    def _implementation(self, fn: str):
        def run(*args):
            q, k, v, inputs, opt = self._split(args)
            config = None if opt["config"] is None else json.loads(opt["config"])
            kwargs = dict(scale=opt["scale"], output_final_state=opt["output_final_state"],
                          cu_seqlens=opt["cu_seqlens"], check_domain=opt["check_domain"], config=config)
            if self.kalman:
                S0, P0 = opt["initial_state"], opt["initial_covariance"]
                kwargs["initial_state"] = None if S0 is None and P0 is None else (S0, P0)
                saving = fn == "saving"
                if saving:
                    kwargs["save_for_backward"] = True
                out = getattr(self.kernels, "forward" if saving else fn)(
                    q, k, v, *inputs, output_variance=opt["output_variance"], **kwargs)
                o, final = out[0], out[1]
                S, P = final if final is not None else (_empty(q), _empty(q))
                var = out[2] if opt["output_variance"] else _empty(q)
                return (o, *self._kept(out[-1]), S, P, var) if saving else (o, S, P, var)
            if fn != "saving":
                o, ht = getattr(self.kernels, fn)(q, k, v, *inputs, initial_state=opt["initial_state"], **kwargs)
                return o, (ht if ht is not None else _empty(q))
            o, ht, saved = self.kernels.forward(q, k, v, *inputs, initial_state=opt["initial_state"],
                                                save_for_backward=True, **kwargs)
            # an absent entry is an empty tensor; the final state is the last output
            kept = [_empty(q) if x is None else x for x in self._kept(saved)]
            return (o, *kept, ht if ht is not None else _empty(q))
        run.__name__ = f"{self.name}_{fn}"
        return run

    def _fake(self, *args):
        """Output shapes and dtypes. Lenient on bad input: the real implementation raises the
        op's ValueError when the compiled graph runs (an exception here would reach the caller
        wrapped in a torch._dynamo error instead)."""
        q, k, v, inputs, opt = self._split(args)
        o = _dense(v.shape, v)
        if q.dim() != 4 or v.dim() != 4:
            return (o, _empty(q), _empty(q), _empty(q)) if self.kalman else (o, _empty(q))
        B, T, H, K = q.shape
        V = v.shape[-1]
        cu = opt["cu_seqlens"]
        N = B if cu is None else cu.shape[0] - 1
        ht = _dense((N, H, K, V), q, torch.float32) if opt["output_final_state"] else _empty(q)
        if not self.kalman:
            return o, ht
        Pt = _dense((N, H, K, K), q, torch.float32) if opt["output_final_state"] else _empty(q)
        var = _dense((B, T, H), q, torch.float32) if opt["output_variance"] else _empty(q)
        return o, ht, Pt, var

    def _fake_saving(self, *args):
        """The saving op's outputs: (o, *kept, final state), module.saved_for_backward_shapes."""
        q, k, v, inputs, opt = self._split(args)
        o, *rest = self._fake(*args)   # rest: the final state (kalman: S, P, the variance)
        if q.dim() != 4 or v.dim() != 4:
            return (o, *[_empty(q) for _ in self.extra], *rest)
        cu = opt["cu_seqlens"]
        N = q.shape[0] if cu is None else cu.shape[0] - 1
        shapes = self.kernels.saved_for_backward_shapes(q, v, N, cu is not None)
        kept = [_dense(shape, q, dtype) for shape, dtype in self._kept(shapes)]
        return (o, *kept, *rest)

    # --- autograd --------------------------------------------------------------------------
    def _setup_context(self, ctx, inputs, output):
        q, k, v, ins, opt = self._split(inputs)
        if self.kalman:
            # the saving op's kept tensors sit between o and (S, P, the variance)
            kept = list(output[1:-3])
            if kept:
                ctx.mark_non_differentiable(*kept)
            ctx.save_for_backward(q, k, v, *ins, opt["initial_state"], opt["initial_covariance"],
                                  opt["cu_seqlens"], *kept)
            ctx.output_variance = opt["output_variance"]
            ctx.config = opt["config"]   # the kalman backward reads its own settings from it
        else:
            # the saving op's kept tensors (between o and the final state), in the order of
            # SAVED_FOR_BACKWARD, and the final state where it is named; none from the others
            saved = []
            if len(output) > 2:
                kept = iter(output[1:-1])
                saved = [output[-1] if name == FINAL_STATE else next(kept) for name in self.saves]
                ctx.mark_non_differentiable(*output[1:-1])
            ctx.save_for_backward(q, k, v, *ins, opt["initial_state"], opt["cu_seqlens"], *saved)
        ctx.scale = opt["scale"]
        ctx.output_final_state = opt["output_final_state"]
        ctx.n_args = len(inputs)

    def _backward_kalman(self, ctx, *grads):
        do, (dS, dP, dvar) = grads[0], grads[-3:]   # (o, S, P, var), or (o, *kept, S, P, var)
        saved = ctx.saved_tensors
        n = len(self.inputs)
        q, k, v, ins = saved[0], saved[1], saved[2], list(saved[3:3 + n])
        S0, P0, cu = saved[3 + n], saved[4 + n], saved[5 + n]
        kept = [list(saved[6 + n:])] if self.saves else []
        def given(x, asked):
            return x.contiguous() if asked and x is not None else None
        out = self._backward_op(q, k, v, *ins, do.contiguous(), given(dS, ctx.output_final_state),
                                given(dP, ctx.output_final_state), given(dvar, ctx.output_variance),
                                ctx.scale, S0, P0, cu, ctx.config, *kept)
        dq, dk, dv, dins = out[0], out[1], out[2], list(out[3:3 + n])
        dS0, dP0 = out[3 + n], out[4 + n]
        # one gradient per op argument: q, k, v, inputs, scale, initial_state,
        # initial_covariance, output_final_state, output_variance, cu_seqlens, check_domain, config
        return (dq, dk, dv, *dins, None, dS0 if S0 is not None else None,
                dP0 if P0 is not None else None, None, None, None, None, None)

    def _backward(self, ctx, *grads):
        if self.kalman:
            return self._backward_kalman(ctx, *grads)
        do, dht = grads[0], grads[-1]   # (o, final state), or (o, *kept, final state)
        saved = ctx.saved_tensors
        n = len(self.inputs)
        q, k, v, ins, h0, cu = saved[0], saved[1], saved[2], list(saved[3:3 + n]), saved[3 + n], saved[4 + n]
        dht = dht.contiguous() if ctx.output_final_state and dht is not None else None
        kept = ([list(saved[5 + n:])] if self.saves else [])
        out = self._backward_op(q, k, v, *ins, do.contiguous(), dht, ctx.scale, h0, cu, *kept)
        dq, dk, dv, dins, dh0 = out[0], out[1], out[2], list(out[3:3 + n]), out[3 + n]
        # one gradient per op argument: q, k, v, inputs, scale, initial_state, output_final_state,
        # cu_seqlens, check_domain, config
        return (dq, dk, dv, *dins, None, dh0 if h0 is not None else None, None, None, None, None)

    def _backward_implementation(self, q, k, v, *rest):
        n = len(self.inputs)
        ins = list(rest[:n])
        fn = getattr(self.kernels, "backward", None)
        if fn is None:
            raise NotImplementedError(f"{self.name}: the generated {self.family}-family kernels have no "
                                      "backward yet (module.backward is missing)")
        kw = {}
        if self.kalman:
            do, dS, dP, dvar, scale, S0, P0, cu, config = rest[n:n + 9]
            if self.saves:
                kw["saved"] = _given(rest[n + 9])
            kw["config"] = None if config is None else json.loads(config)
            state = None if S0 is None and P0 is None else (S0, P0)
            dht = None if dS is None and dP is None else (dS, dP)
            out = fn(q, k, v, *ins, do, dht=dht, dvar=dvar, scale=scale, initial_state=state, cu_seqlens=cu, **kw)
            grads = [g.to(x.dtype).contiguous() for g, x in zip(out[:3 + n], [q, k, v, *ins])]
            dS0, dP0 = out[3 + n] if out[3 + n] is not None else (None, None)
            grads.append(_empty(q) if dS0 is None else dS0.to(S0.dtype).contiguous())
            grads.append(_empty(q) if dP0 is None else dP0.to(P0.dtype).contiguous())
            return tuple(grads)
        do, dht, scale, h0, cu = rest[n:n + 5]
        if self.saves:
            kw["saved"] = _given(rest[n + 5])
        out = fn(q, k, v, *ins, do, dht=dht, scale=scale, initial_state=h0, cu_seqlens=cu, config=None, **kw)
        like = [q, k, v, *ins]
        grads = [g.to(x.dtype).contiguous() for g, x in zip(out[:3 + n], like)]
        dh0 = out[3 + n]
        grads.append(_empty(q) if dh0 is None else dh0.to(h0.dtype).contiguous())
        return tuple(grads)

    def _backward_fake(self, q, k, v, *rest):
        n = len(self.inputs)
        ins = list(rest[:n])
        grads = [_dense(x.shape, x) for x in (q, k, v, *ins)]
        if self.kalman:
            S0, P0 = rest[n + 5], rest[n + 6]
            grads += [_empty(q) if x is None else _dense(x.shape, x) for x in (S0, P0)]
            return tuple(grads)
        h0 = rest[n + 3]
        grads.append(_empty(q) if h0 is None else _dense(h0.shape, h0))
        return tuple(grads)

    # --- the Python wrappers ----------------------------------------------------------------
    def forward(self, q, k, v, *args, **kwargs):
        """module.forward through the custom op: the same arguments and results."""
        return self._call(self._forward_op, q, k, v, args, kwargs)

    def recurrent(self, q, k, v, *args, **kwargs):
        """module.recurrent through the custom op: the same arguments and results."""
        return self._call(self._recurrent_op, q, k, v, args, kwargs)

    __call__ = forward

    def _wants_saving(self, op, tensors) -> bool:
        """Whether to run the saving op instead of op: keep what the backward would recompute
        only when a gradient will be asked for."""
        return (op is self._forward_op and self._saving_op is not None and torch.is_grad_enabled()
                and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors))

    def _call(self, op, q, k, v, args, kwargs):
        if len(args) > len(self.inputs):
            raise ValueError(f"{self.name} takes q, k, v and {len(self.inputs)} input(s) by position, "
                             f"got {3 + len(args)} arguments")
        values = dict(zip(self.inputs, args))
        for name in self.inputs[len(args):]:
            if name not in kwargs:
                raise ValueError(f"{self.name}: missing input {name} {self.kernels.INPUTS[name][0]}")
            values[name] = kwargs.pop(name)
        known = set(_OPTIONS) | ({"output_variance"} if self.kalman else set())
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"{self.name}: unknown argument(s) {', '.join(unknown)}")
        for name, x in (("q", q), ("k", k), ("v", v), *values.items()):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        # one device: with a tensor on the meta device the dispatcher would run the fake
        # implementation alone, and the kernels' own check would never see the mix
        if k.device != q.device or v.device != q.device:
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        state = kwargs.get("initial_state")
        others = (*values.items(), ("cu_seqlens", kwargs.get("cu_seqlens")),
                  *(enumerate(state) if isinstance(state, (tuple, list)) else [("initial_state", state)]))
        for name, x in others:
            if isinstance(x, torch.Tensor) and x.device != q.device:
                raise ValueError(f"{name if isinstance(name, str) else f'initial_state[{name}]'} must be on "
                                 f"{q.device}, got {x.device}")
        scale = kwargs.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise ValueError(f"scale must be a number, got {type(scale).__name__}")
        scale = None if scale is None else float(scale)
        ofs = bool(kwargs.get("output_final_state", False))
        # the ops take every argument by position (their schema's order)
        cu, check, config = (kwargs.get("cu_seqlens"), bool(kwargs.get("check_domain", True)),
                             _config_text(kwargs.get("config")))
        ins = [values[n] for n in self.inputs]
        if not self.kalman:
            state = kwargs.get("initial_state")
            if state is not None and not isinstance(state, torch.Tensor):
                raise ValueError(f"initial_state must be a [N, H, K, V] tensor, got {type(state).__name__}")
            if self._wants_saving(op, (q, k, v, *ins, state)):
                op = self._saving_op
            out = op(q, k, v, *ins, scale, state, ofs, cu, check, config)
            return out[0], (out[-1] if ofs else None)
        S0, P0 = self.kernels._split_state(kwargs.get("initial_state"))
        for what, x in (("initial_state[0] (mean S)", S0), ("initial_state[1] (covariance P)", P0)):
            if x is not None and not isinstance(x, torch.Tensor):
                raise ValueError(f"{what} must be a tensor, got {type(x).__name__}")
        if self._wants_saving(op, (q, k, v, *ins, S0, P0)):
            op = self._saving_op
        ov = bool(kwargs.get("output_variance", False))
        out = op(q, k, v, *ins, scale, S0, P0, ofs, ov, cu, check, config)
        o, (S, P, var) = out[0], out[-3:]
        final = (S, P) if ofs else None
        return (o, final, var) if ov else (o, final)

    def __repr__(self):
        return f"<designmodel custom ops {NAMESPACE}::{self.name}[_recurrent, _backward] ({self.family})>"
