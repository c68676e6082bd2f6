"""From a derivation to kernel stages: what is computed per token, per chunk and per state.

The planner reads the derivation's dataflow graph (`Derivation.dataflow`, networkx): a
quantity that no path from the memory S_{t-1} reaches depends on the token alone and is
computed *per token*, inline, by every kernel that needs it (the log-decay, the reset gain:
a few flops from the inputs, cheaper to recompute than to store). Quantities that couple the
tokens of one chunk but not the state are computed *per chunk* and stored (the reset
family's W and U, the per-key intra-chunk attention A); the memory itself is carried *per
state* by a sequential pass over chunks (MATH.md sections 6.1 and 6.2).

The plan is plain data: the templates under templates/ branch on it, and it holds the
per-token expressions already printed as Triton for each broadcasting context.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import networkx as nx
import sympy as sp

from designmodel import structure as st
from designmodel.spec import Input, inputs_of

from .printer import torch_code, triton_code

CHUNK = 64        # tokens per chunk (BT)
SUB_CHUNK = 16    # tokens per sub-chunk (BC): blocks of the triangular solve, per-key decay ratios

# Names the kernels and launchers use themselves; a spec input may not take them. An input
# is a kernel argument of its own name and a register block b_<name>, so names of kernel
# locals (bos, boc), register stems (b_gc, b_k0, ...) and the prefixes of indices (i_),
# offsets (o_), masks (m_), pointers (p_) and blocks (b_) are reserved too.
RESERVED = frozenset({
    "q", "k", "v", "o", "h", "w", "u", "A", "v_new", "h0", "ht", "T", "H", "K", "V", "N",
    "B", "BT", "BC", "BK", "BV", "NT", "NS", "scale", "initial_state", "output_final_state",
    "cu_seqlens", "chunk_indices", "chunk_offsets", "config", "check_domain", "tl", "triton",
    "torch", "math", "os", "softplus", "logsigmoid", "bos", "boc", "vn", "ld", "glast", "kr",
    "ks", "gs", "row", "col", "knorm2", "RCP_LN2", "CHUNK", "SUB_CHUNK", "FAMILY", "INPUTS",
    "DOMAIN_TEXT", "forward", "check_inputs", "default_config", "prepare_chunks",
    "HAS_INITIAL_STATE", "STORE_FINAL_STATE", "IS_VARLEN", "DOT_PRECISION", "INNOVATION_PRECISION",
    "FACTOR_PRECISION", "SOLVE_PRECISION", "UPDATE_PRECISION",
})
_RESERVED_PATTERN = re.compile(r"^(_.*|[iomp]_.*|b_.*|(q|k|v|gc|gn|gain|kn|A|Aq|Ai|T)\d*)$")


def reserved(name: str) -> bool:
    """True when an input may not be called `name` (the kernels use it)."""
    return name in RESERVED or bool(_RESERVED_PATTERN.match(name))

FAMILIES = ("write", "reset", "kalman")


class PlanError(ValueError):
    """A derivation these kernels cannot implement."""


@dataclass(frozen=True)
class InputPlan:
    """One input of the layer as the kernels read it."""

    name: str
    per: str          # "head" or "key"
    per_token: bool
    domain: str

    @property
    def shape(self) -> str:
        """The tensor shape the op expects, in words ("matrix": a named full prior covariance)."""
        return {(True, "head"): "[B, T, H]", (True, "key"): "[B, T, H, K]",
                (False, "head"): "[H]", (False, "key"): "[H, K]",
                (False, "matrix"): "[H, K, K]"}[(self.per_token, self.per)]

    @property
    def ndim(self) -> int:
        return {(True, "head"): 3, (True, "key"): 4, (False, "head"): 1, (False, "key"): 2,
                (False, "matrix"): 3}[(self.per_token, self.per)]

    @property
    def domain_check(self) -> str | None:
        """A torch expression over `x` that is True where the input lies outside its domain."""
        return {
            "real": None,
            "positive": "~(x > 0)",
            "nonnegative": "~(x >= 0)",
            "unit": "~((x > 0) & (x < 1))",
            "logdecay": "~(x <= 0)",
        }[self.domain]

    @property
    def pad_value(self) -> str:
        """What a masked load reads past the end of a sequence: a point inside the domain, so
        that the printed expressions stay finite on padding rows (they are masked anyway)."""
        return {"real": "0.", "positive": "1.", "nonnegative": "1.", "unit": "0.5",
                "logdecay": "-1."}[self.domain]

    @property
    def domain_text(self) -> str:
        return {"real": "finite", "positive": "> 0", "nonnegative": ">= 0",
                "unit": "in (0, 1)", "logdecay": "<= 0 (a log-decay)"}[self.domain]


@dataclass(frozen=True)
class Quantity:
    """A per-token scalar of the derivation, printed for each broadcasting context."""

    name: str                 # "log_decay" or "gain"
    expr: sp.Expr
    inputs: tuple[str, ...]   # names of the inputs it reads
    per_key: bool             # varies along the key dimension
    uses_key_norm: bool       # reads |k_t|^2
    code: dict                # context -> Triton code ("rows": [BT]; "rows_keys": [BT, BK];
                              # "token": one token, scalar or [BK])
    # d expr / d x for each input name x it reads (and KNORM2 for |k_t|^2 when it reads it):
    # name -> context -> Triton code, printed from sympy's derivative (the backward's chain rule)
    derivatives: dict = field(default_factory=dict)

    def derivative(self, wrt: str, context: str) -> str:
        """The Triton code of d expr / d wrt in a broadcasting context."""
        return self.derivatives[wrt][context]


@dataclass(frozen=True)
class KernelPlan:
    """One kernel of the forward pass."""

    name: str
    grid: str
    stage: str        # "per chunk" or "per state"
    computes: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Everything the templates need to know about one design model."""

    model: str
    family: str                     # write or reset
    decay: str                      # none, constant, scalar, per_key
    timing: str                     # posterior (inclusive tril) or prior (strict)
    unit_keys: bool
    inputs: tuple[InputPlan, ...]   # every input the kernels read, sorted by name
    log_decay: Quantity | None
    gain: Quantity | None
    per_token: tuple[str, ...]      # quantities computed inline, per token
    per_chunk: tuple[str, ...]      # quantities stored once per chunk
    per_state: tuple[str, ...]      # quantities carried across chunks
    kernels: tuple[KernelPlan, ...]
    chunk: int = CHUNK
    sub_chunk: int = SUB_CHUNK
    notes: tuple[str, ...] = field(default_factory=tuple)
    # kalman family only: observation noise r, process noise sigma, prior variance p0
    noise: Quantity | None = None
    process_noise: Quantity | None = None
    prior: Quantity | None = None
    # kalman family with a diagonal or full prior: the launcher builds the prior covariance
    # [H, K, K] from the spec and passes it to the kernels as their initial covariance
    prior_kind: str = "isotropic"
    prior_inputs: tuple[InputPlan, ...] = ()   # inputs only the prior reads (not kernel arguments)
    prior_reads: tuple[str, ...] = ()          # names of every input the prior reads, sorted
    prior_matrix: str | None = None            # torch code of the prior covariance [H, K, K]
    prior_size: int | None = None              # K of a prior written out as numbers

    @property
    def arguments(self) -> tuple[InputPlan, ...]:
        """Every input the op takes, sorted by name: the kernels' and the prior's."""
        return tuple(sorted(self.inputs + self.prior_inputs, key=lambda i: i.name))

    @property
    def has_decay(self) -> bool:
        return self.decay != "none"

    @property
    def per_key_decay(self) -> bool:
        return self.decay == "per_key"

    @property
    def inclusive(self) -> bool:
        """Posterior readout: token t's own write is read (tril); prior: it is not (stril)."""
        return self.timing == "posterior"

    @property
    def stores_attention(self) -> bool:
        """The intra-chunk attention A is stored per chunk (per-key decay) rather than
        recomputed by the output kernel from Q K^T."""
        return self.per_key_decay

    @property
    def nsub(self) -> int:
        return self.chunk // self.sub_chunk

    def canonical(self) -> "Plan":
        """This plan with each per-token quantity read from a tensor of its own instead of
        computed from the spec's inputs: the log-decay from `g` (natural log, [B, T, H] or
        [B, T, H, K], a constant decay expanded over the tokens) and the gain from `beta`
        ([B, T, H]). The backward kernels are rendered from it: they take the materialized
        quantities, and the chain rule maps their gradients back to the inputs."""
        log_decay = gain = None
        inputs = []
        if self.log_decay is not None:
            g = Input("g", per="key" if self.log_decay.per_key else "head", domain="logdecay")
            log_decay = _quantity("log_decay", g)
            inputs.append(InputPlan("g", g.per, True, "logdecay"))
        if self.gain is not None:
            beta = Input("beta", domain="real")
            gain = _quantity("gain", beta)
            inputs.append(InputPlan("beta", "head", True, "real"))
        return replace(self, inputs=tuple(sorted(inputs, key=lambda i: i.name)),
                       log_decay=log_decay, gain=gain)

    def passthrough(self) -> tuple[str, ...]:
        """The per-token quantities that are one per-token input as it is (mamba2's g, the delta
        rule's beta) and that no other quantity reads: the backward takes the input as the
        quantity and the quantity's gradient as the input's, without a per-token kernel."""
        qs = [q for q in (self.log_decay, self.gain) if q is not None]
        return tuple(q.name for q in qs
                     if isinstance(q.expr, Input) and q.expr.per_token
                     and not any(q.expr.name in o.inputs for o in qs if o is not q))

    def inputs_of(self, *quantities: str) -> tuple[InputPlan, ...]:
        """The inputs read by the named per-token quantities, sorted by name."""
        names = set()
        for qname in quantities:
            qty = getattr(self, qname)
            if qty is not None:
                names.update(qty.inputs)
        return tuple(i for i in self.inputs if i.name in names)


# --- building a plan ------------------------------------------------------------------------

def _names(inputs, context: str, key_norm: str = "b_knorm2") -> dict:
    """How each input symbol is read in a context: "rows" ([BT] blocks) or "rows_keys"
    ([BT, BK] blocks, per-head inputs broadcast along the keys)."""
    out = {st.KEY_NORM2: key_norm if context == "rows" else f"{key_norm}[:, None]"}
    for s in inputs:
        reg = f"b_{s.name}"
        if context == "rows":
            out[s] = reg
        elif s.per == "key":
            out[s] = reg if s.per_token else f"{reg}[None, :]"
        else:
            out[s] = f"{reg}[:, None]" if s.per_token else reg
    return out


# The name under which a Quantity's derivative by |k_t|^2 is kept (not an input name: reserved).
KNORM2 = "knorm2"


def _printed(expr, used, per_key: bool) -> dict:
    """expr printed for each context it can be read in."""
    code = {"rows_keys": triton_code(expr, _names(used, "rows_keys"))}
    if not per_key:
        code["rows"] = triton_code(expr, _names(used, "rows"))
    # one token (the recurrent kernels): per-head inputs are scalars, per-key inputs [BK]
    # vectors, so the plain register names broadcast by themselves
    code["token"] = triton_code(expr, _names(used, "rows"))
    return code


def _quantity(name: str, expr) -> Quantity | None:
    expr = sp.sympify(expr)
    if name == "log_decay" and expr == 0:
        return None
    used = inputs_of(expr)
    per_key = any(s.per == "key" for s in used)
    uses_key_norm = st.KEY_NORM2 in expr.free_symbols
    # the chain rule of the backward: sympy's derivative by each input (and by |k|^2)
    wrt = [(s.name, s) for s in used] + ([(KNORM2, st.KEY_NORM2)] if uses_key_norm else [])
    derivatives = {n: _printed(sp.diff(expr, s), used, per_key) for n, s in wrt}
    return Quantity(name=name, expr=expr, inputs=tuple(s.name for s in used), per_key=per_key,
                    uses_key_norm=uses_key_norm, code=_printed(expr, used, per_key),
                    derivatives=derivatives)


def token_quantities(derivation) -> list[str]:
    """Dataflow nodes that depend on the token alone: no path from the memory reaches them."""
    g = derivation.dataflow
    state = str(st.S)
    from_state = nx.descendants(g, state) | {state} if state in g else set()
    return sorted(n for n, data in g.nodes(data=True)
                  if data.get("scalar") and data.get("meaning") != "input" and n not in from_state)


def plan(derivation) -> Plan:
    """The kernel plan of a write- or reset-family derivation."""
    s = derivation.structure
    name = derivation.spec.name
    if s.family == "kalman":
        return plan_kalman(derivation)
    if s.family not in FAMILIES:
        raise PlanError(f"{name}: the {s.family} family has no chunked kernels here "
                        f"(write and reset only)")
    if s.variance:
        raise PlanError(f"{name}: the predictive variance is not read out by the write/reset "
                        "kernels; drop Readout(variance=True)")
    used = inputs_of(derivation.scalars["log_decay"])
    if s.family == "reset":
        used += inputs_of(derivation.scalars["gain"])
    inputs = sorted({i for i in used}, key=lambda i: i.name)
    for i in inputs:
        if reserved(i.name):
            raise PlanError(f"{name}: input name {i.name!r} is reserved by the kernels; rename it")
    log_decay = _quantity("log_decay", derivation.scalars["log_decay"])
    gain = _quantity("gain", derivation.scalars["gain"]) if s.family == "reset" else None
    if gain is not None and gain.per_key:
        raise PlanError(f"{name}: the reset gain must be one number per head and token")

    # What the dataflow says is per token; the template-level names of those quantities.
    token_nodes = token_quantities(derivation)
    per_token = ["log_decay"] if log_decay is not None else []
    if gain is not None:
        per_token.append("gain")
    per_chunk, kernels = [], []
    bh = "B * H"
    if s.family == "reset":
        per_chunk += ["W = T_ (K o a)", "U = T_ V"]
        if s.decay == "per_key":
            per_chunk.append("A = tril(Q K^T o Gamma)")
        kernels.append(KernelPlan(
            "chunk_reset_kernel", f"(NT, {bh})", "per chunk",
            "T_ = (I + stril(diag(beta) (K K^T o Gamma)))^-1 diag(beta), W = T_ (K o a), U = T_ V"
            + ("; A = tril(Q K^T o Gamma)" if s.decay == "per_key" else ""),
            ("q", "k", "v", *[i.name for i in inputs]) if s.decay == "per_key" else ("k", "v", *[i.name for i in inputs]),
            ("w", "u", "A") if s.decay == "per_key" else ("w", "u")))
        kernels.append(KernelPlan(
            "chunk_state_kernel", f"(NV, {bh})", "per state",
            "V_n = U - W S; S' = a_C S + (K o (a_C / a))^T V_n",
            ("k", "w", "u", *(log_decay.inputs if log_decay else ()), "h0"), ("h", "v_new", "ht")))
    else:
        if s.decay == "per_key":
            per_chunk.append("A = tril(Q K^T o Gamma)")
            kernels.append(KernelPlan(
                "chunk_attention_kernel", f"(NT, {bh})", "per chunk",
                "A = tril(Q K^T o Gamma), per-key decay ratios over sub-chunks",
                ("q", "k", *log_decay.inputs), ("A",)))
        kernels.append(KernelPlan(
            "chunk_state_kernel", f"(NK * NV, {bh})", "per state",
            "S' = a_C S + (K o (a_C / a))^T V",
            ("k", "v", *(log_decay.inputs if log_decay else ()), "h0"), ("h", "ht")))
    values = "v_new" if s.family == "reset" else "v"
    kernels.append(KernelPlan(
        "chunk_output_kernel", f"(NV, NT, {bh})", "per chunk",
        f"O = (Q o a) S + tril(Q K^T o Gamma) {values}",
        ("q", "k", values, "h", *(["A"] if s.decay == "per_key" else []),
         *(log_decay.inputs if log_decay else ())), ("o",)))
    notes = [f"dataflow nodes computed per token: {', '.join(token_nodes) or 'none'}"]
    return Plan(model=name, family=s.family, decay=s.decay, timing=s.timing,
                unit_keys=s.unit_keys, inputs=tuple(InputPlan(i.name, i.per, i.per_token, i.domain)
                                                    for i in inputs),
                log_decay=log_decay, gain=gain, per_token=tuple(per_token),
                per_chunk=tuple(per_chunk), per_state=("S (the memory, [K, V] per head)",),
                kernels=tuple(kernels), notes=tuple(notes))


def _number(x, name: str) -> float:
    """A prior entry written out as a number."""
    x = sp.sympify(x)
    if not x.is_number:
        raise PlanError(f"{name}: a prior covariance given entry by entry takes numbers, got {x}")
    return float(x)


def _prior_matrix(spec) -> tuple[str, tuple, int | None]:
    """(torch code of the prior covariance [H, K, K] float32, the inputs it reads, K of a prior
    written out as numbers or None) for a diagonal or full prior. The code reads each input by
    its name, and H, K and `device`."""
    name, cov = spec.name, spec.prior.covariance
    f32 = "dtype=torch.float32, device=device"
    if cov.kind == "diagonal" and isinstance(cov.value, tuple):
        d = ", ".join(repr(_number(x, name)) for x in cov.value)
        return (f"torch.diag_embed(torch.tensor([{d}], {f32})).expand(H, K, K)", (), len(cov.value))
    if cov.kind == "diagonal":
        used = sorted(inputs_of(cov.value), key=lambda i: i.name)
        if any(i.per_token for i in used):
            raise PlanError(f"{name}: the prior's diagonal must be constant (no per-token inputs)")
        if not used:
            return (f"torch.diag_embed(torch.full((H, K), {_number(cov.value, name)!r}, {f32}))", (), None)
        # per-key constants are [H, K]; per-head ones [H], broadcast along the keys
        names = {i: f"{i.name}.float()" + ("" if i.per == "key" else "[:, None]") for i in used}
        code = torch_code(cov.value, names)
        return f"torch.diag_embed(({code}).expand(H, K))", tuple(used), None
    if isinstance(cov.value, str):
        return f"{cov.value}.float()", (cov.value,), None
    rows = ", ".join("[" + ", ".join(repr(_number(x, name)) for x in row) + "]"
                     for row in cov.value.tolist())
    return f"torch.tensor([{rows}], {f32}).expand(H, K, K)", (), cov.value.shape[0]


def plan_kalman(derivation) -> Plan:
    """The kernel plan of a kalman-family derivation (MATH.md 6.3).

    The covariance P is value-independent: one program per (sequence, head) carries it across
    the chunks (the Riccati recursion). With scalar decay that kernel does only what needs P
    (S_in, its blocked LDL, Z = D^-1 L^-1 U^, P') and stores L, D and U per chunk; a kernel
    parallel over chunks then computes W, U_v, B and the variance. With per-key decay one
    kernel still does both. The mean then passes across chunks like the reset family's,
    reading out as it goes.

    The prior may be any covariance of the spec. An isotropic prior p0 I is built inside the
    kernels (from p0 per head); a diagonal or full one (numbers, constants per key or per head,
    or a full [H, K, K] covariance named in the spec and given at run time) is built by the
    launcher as a [H, K, K] matrix (`Plan.prior_matrix`) and passed to the kernels as their
    initial covariance when the caller gives none.
    """
    s = derivation.structure
    name = derivation.spec.name
    spec = derivation.spec
    kind = spec.prior.covariance.kind
    exprs = {"log_decay": derivation.scalars["log_decay"], "noise": derivation.scalars["noise"],
             "process_noise": derivation.scalars["process_noise"]}
    if kind == "isotropic":
        exprs["prior"] = spec.prior.covariance.value
    used = [i for e in exprs.values() for i in inputs_of(sp.sympify(e))]
    inputs = sorted(set(used), key=lambda i: i.name)
    prior_matrix, prior_inputs, prior_size, read = None, (), None, ()
    if kind != "isotropic":
        prior_matrix, read, prior_size = _prior_matrix(spec)
        # a named full covariance is an input of its own, [H, K, K]; constants of a diagonal
        # are inputs unless the kernels read them already
        prior_inputs = tuple(
            InputPlan(x, "matrix", False, "real") if isinstance(x, str)
            else InputPlan(x.name, x.per, False, x.domain)
            for x in read if isinstance(x, str) or x not in inputs)
    for n in [i.name for i in inputs] + [i.name for i in prior_inputs]:
        if reserved(n):
            raise PlanError(f"{name}: input name {n!r} is reserved by the kernels; rename it")
    kernel_names = {i.name for i in inputs}
    clash = [i.name for i in prior_inputs if i.per == "matrix" and i.name in kernel_names]
    if clash:
        raise PlanError(f"{name}: the full prior covariance {clash[0]!r} has the name of an input")
    log_decay = _quantity("log_decay", exprs["log_decay"])
    noise = _quantity("noise", exprs["noise"])
    pnoise = _quantity("process_noise", exprs["process_noise"])
    if pnoise is not None and pnoise.expr == 0:
        pnoise = None
    prior = _quantity("prior", exprs["prior"]) if kind == "isotropic" else None
    if noise.per_key:
        raise PlanError(f"{name}: the observation noise r must be one number per head and token")
    if prior is not None and (any(i.per_token for i in inputs_of(sp.sympify(exprs["prior"])))
                              or prior.per_key):
        raise PlanError(f"{name}: the prior variance p0 must be a constant per head")
    per_key = s.decay == "per_key" or (pnoise is not None and pnoise.per_key)
    per_token = [n for n, q in (("log_decay", log_decay), ("noise", noise),
                                ("process_noise", pnoise)) if q is not None]
    bh = "N * H"
    if per_key:
        kernels = (
            KernelPlan("chunk_covariance_kernel", f"({bh})", "per state",
                       "S_in = K^ P K^^T + (K K^T) o C + diag(r) = L D L^T; W = L^-1 K^, U_v = L^-1 V, "
                       "Z = D^-1 L^-1 U^, B = tril(A L^-T) D^-1, variance; "
                       "P' = a_C^2 P + e_C I - (L^-1 U^)^T D^-1 (L^-1 U^)",
                       ("q", "k", "v", *[i.name for i in inputs], "P0"),
                       ("w", "u", "z", "Bm", "var", "Pt")),
        )
    else:
        # only what needs P stays sequential; the rest is recomputed per chunk in parallel
        kernels = (
            KernelPlan("chunk_riccati_kernel", f"({bh})", "per state",
                       "S_in = K^ P K^^T + (K K^T) o C + diag(r) = L D L^T (blocked, 16-row blocks); "
                       "U; Z = D^-1 L^-1 U^; P' = a_C^2 P + e_C I - (L^-1 U^)^T D^-1 (L^-1 U^)",
                       ("q", "k", *[i.name for i in inputs], "P0"),
                       ("z", "L", "D", "U", "var", "Pt")),
            KernelPlan("chunk_gain_kernel", f"(NT, {bh})", "per chunk",
                       "W = L^-1 K^, U_v = L^-1 V, B = tril(A L^-T) D^-1, variance",
                       ("q", "k", "v", *[i.name for i in inputs], "L", "D", "U", "var"),
                       ("w", "u", "Bm", "var")),
        )
    kernels = kernels + (
        KernelPlan("chunk_mean_kernel", f"(NV, {bh})", "per state",
                   "E = U_v - W S; S' = a_C S + Z^T E (stores S per chunk and E)",
                   ("w", "u", "z", *(log_decay.inputs if log_decay else ()), "S0"),
                   ("h", "e", "St")),
        KernelPlan("chunk_readout_kernel", f"(NV, NT, {bh})", "per chunk",
                   "O = (Q o a) S + B E",
                   ("q", "Bm", *(log_decay.inputs if log_decay else ()), "h", "e"),
                   ("o",)),
    )
    notes = [f"dataflow nodes computed per token: {', '.join(token_quantities(derivation)) or 'none'}",
             "decay and process noise per key: the decayed grams loop over the chunk's columns"
             if per_key else "scalar decay: the decayed grams are matrix products times Gamma"]
    return Plan(model=name, family="kalman", decay=s.decay, timing=s.timing, unit_keys=s.unit_keys,
                inputs=tuple(InputPlan(i.name, i.per, i.per_token, i.domain) for i in inputs),
                log_decay=log_decay, gain=None, per_token=tuple(per_token),
                per_chunk=("W = L^-1 (K o a)", "U_v = L^-1 V", "Z = D^-1 L^-1 U^",
                           "B = tril(A L^-T) D^-1"),
                per_state=("P (the covariance, [K, K] per head; sequential, value-independent)",
                           "S (the mean, [K, V] per head)"),
                kernels=kernels, notes=tuple(notes), noise=noise, process_noise=pnoise, prior=prior,
                prior_kind=kind, prior_inputs=prior_inputs, prior_matrix=prior_matrix,
                prior_reads=tuple(sorted(x if isinstance(x, str) else x.name for x in read)),
                prior_size=prior_size)


__all__ = ["Plan", "InputPlan", "Quantity", "KernelPlan", "PlanError", "plan", "token_quantities", "plan_kalman",
           "CHUNK", "SUB_CHUNK", "RESERVED", "reserved", "KNORM2"]
