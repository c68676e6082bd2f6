"""A compiled design model as a drop-in sequence layer (torch.nn.Module), in fla's conventions.

    layer = DesignLayer(designmodel.compile(spec), hidden_size=1024, num_heads=4, head_dim=128)
    o, _, cache = layer(hidden_states, attention_mask=None, past_key_values=None, use_cache=False)

A DesignLayer wraps a compiled op (codegen/compiler.py): it projects the hidden states to
queries, keys and values (optionally through a short causal convolution with SiLU), computes
every input of the spec from the hidden states with a parameterization chosen from the
input's domain and layout (below), runs the op, and normalizes, gates and projects the
readout back to the hidden size. The zoo layers (LinearAttention, RetNet, Mamba2, GLA,
DeltaNet, GatedDeltaNet, KDA, BayesianLayer) are DesignLayers with the zoo spec and fla's
defaults, and use fla 0.6.0's parameter names wherever the parameter is the same thing, so
that `load_fla_state_dict` moves an fla layer's weights into ours.

Parameterizations (x is the hidden state of one token; H heads, K key dims per head):

    per-token log-decay g <= 0   "mamba" (Mamba-2, Gated DeltaNet, KDA):
                                     g = -exp(A_log) * softplus(a_proj(x) + dt_bias)
                                 A_log [H]; dt_bias [H] (per head) or [H*K] (per key, with a
                                 low-rank f_proj as KDA's). "logsigmoid" (GLA, simple GLA):
                                     g = logsigmoid(gk_proj(x)) / gate_logit_normalizer
    per-token unit (a gain beta) beta = sigmoid(b_proj(x))
    per-token positive or        a noise variance from a learned log signal-to-noise ratio:
    nonnegative (r, sigma)           log_snr = proj(x) + bias,   r = exp(-log_snr)
                                 relative to a unit signal variance: with unit keys and a
                                 prior variance c = 1 the Kalman gain is c / (c + r) =
                                 sigmoid(log_snr) (MATH.md section 3).
    per-token real               proj(x)
    constant unit (gamma)        sigmoid(<name>_logit)
    constant positive (p0)       exp(log_<name>)
    constant logdecay            -exp(<name>_A_log)
    constant real                <name>

The BayesianLayer's process noise sigma may instead be "stationary", sigma = p0 (1 - alpha^2)
(MATH.md section 4: the prior covariance p0 I is then kept by every direction no key has
written), which makes the layer start from a Gated DeltaNet (`bayesian_from_gated_deltanet`).

Padding: an attention_mask [B, T] of 0/1 (left or right padding) turns the batch into
variable-length sequences packed along T (cu_seqlens); the outputs are padded back with
zeros. Decoding: `use_cache=True` returns a LayerCache holding, per layer, the recurrent
state and the convolution windows; a call with one new token and a cache runs
`op.recurrent` when the op has one, else the op itself.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DesignLayer", "LayerCache", "ShortConvolution", "GatedRMSNorm", "LinearAttention",
           "RetNet", "Mamba2", "GLA", "DeltaNet", "GatedDeltaNet", "KDA", "BayesianLayer",
           "ZOO_LAYERS", "layer", "load_fla_state_dict", "from_fla", "bayesian_from_gated_deltanet",
           "mask_to_cu_seqlens"]


# --- the cache ------------------------------------------------------------------------------

class LayerCache:
    """Decoding state of a stack of layers, indexed by layer_idx (in the manner of fla's Cache).

    `cache[i]` is a dict with "recurrent_state" (the op's final state: S [N, H, K, V], or
    (S, P) for a Kalman layer), "conv_state" (a tuple of q, k, v windows [N, D, W], or None)
    and "offset" (tokens seen); None for a layer that has not run yet.
    """

    def __init__(self):
        self.states: list[dict | None] = []

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> dict | None:
        return self.states[layer_idx] if layer_idx < len(self.states) else None

    def update(self, layer_idx: int, recurrent_state=None, conv_state=None, offset: int = 0) -> dict:
        """Store a layer's new state; the token count grows by `offset`."""
        while len(self.states) <= layer_idx:
            self.states.append(None)
        seen = 0 if self.states[layer_idx] is None else self.states[layer_idx]["offset"]
        self.states[layer_idx] = dict(recurrent_state=recurrent_state, conv_state=conv_state,
                                      offset=seen + offset)
        return self.states[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the layer has seen."""
        state = self[layer_idx]
        return 0 if state is None else state["offset"]


# --- padding ---------------------------------------------------------------------------------

def mask_to_cu_seqlens(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(indices of the real tokens in the flattened [B * T] batch, cu_seqlens [B + 1]).

    attention_mask [B, T] holds 1 for real tokens and 0 for padding; each row's real tokens
    must be contiguous (left or right padding), else ValueError.
    """
    m = attention_mask
    if m.dtype == torch.bool:
        m = m.long()
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    m = m.long()
    lens = m.sum(1)
    T = m.shape[1]
    first = m.argmax(1)
    last = T - 1 - m.flip(1).argmax(1)
    gaps = (lens > 0) & (last - first + 1 != lens)
    if bool(gaps.any()):
        row = int(gaps.nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has padding between real tokens; only left "
                         "or right padding is supported")
    indices = m.flatten().nonzero().flatten()
    cu_seqlens = F.pad(lens.cumsum(0), (1, 0))
    return indices, cu_seqlens


def _segments(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(sequence id, position within the sequence) of every packed token, each [total]."""
    t = torch.arange(total, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:], t, right=True)
    return seg, t - cu_seqlens[seg]


# --- modules ---------------------------------------------------------------------------------

class ShortConvolution(nn.Conv1d):
    """Depthwise causal convolution with optional SiLU and a window cache, in plain torch.

    Parameters as fla's ShortConvolution (an nn.Conv1d: weight [D, 1, W], bias [D]), so its
    state_dict entries load. The cache is the last W inputs of each sequence, [N, D, W], the
    newest last (fla's layout). Sequences packed along T (cu_seqlens, B = 1) do not see each
    other; a sequence starts from its cache row, or from zeros.
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False,
                 activation: str | None = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size,
                         padding=kernel_size - 1, bias=bias)
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"ShortConvolution: activation must be None or 'silu', got {activation!r}")
        self.hidden_size = hidden_size
        self.activation = activation

    def forward(self, x: Tensor, cache: Tensor | None = None, output_final_state: bool = False,
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """y [B, T, D] and the new window [N, D, W] (None unless output_final_state)."""
        B, T, D = x.shape
        W = self.kernel_size[0]
        if cu_seqlens is None:   # B sequences of T tokens, packed
            cu_seqlens = torch.arange(B + 1, device=x.device) * T
        N = cu_seqlens.numel() - 1
        flat = x.reshape(B * T, D)
        total = flat.shape[0]
        past = x.new_zeros(N, D, W) if cache is None else cache.to(x.dtype)
        # the pool: the tokens, then each sequence's window (W inputs before its first token)
        pool = torch.cat([flat, past.transpose(1, 2).reshape(N * W, D)], 0)    # [total + N W, D]
        seg, pos = _segments(cu_seqlens, total)
        y = 0
        for back in range(W):          # tap `back` reads the input `back` tokens earlier
            idx = torch.where(pos >= back, torch.arange(total, device=x.device) - back,
                              total + seg * W + W - (back - pos))
            y = y + pool[idx] * self.weight[:, 0, W - 1 - back]
        if self.bias is not None:
            y = y + self.bias
        if self.activation is not None:
            y = F.silu(y)
        final = None
        if output_final_state:
            lens = cu_seqlens[1:] - cu_seqlens[:-1]
            back = torch.arange(W - 1, -1, -1, device=x.device)                 # [W], newest last
            step = lens[:, None] - 1 - back[None, :]                             # position in sequence
            idx = torch.where(step >= 0, cu_seqlens[:-1, None] + step,
                              total + torch.arange(N, device=x.device)[:, None] * W + W + step)
            final = pool[idx].transpose(1, 2).contiguous()                       # [N, D, W]
        return y.reshape(B, T, D), final


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dimension with an optional output gate (fla's FusedRMSNormGated):

        o = x / sqrt(mean(x^2) + eps) * weight * act(gate),   act = silu or sigmoid

    computed in float32; without a gate it is fla's RMSNorm. Parameter: weight [D].
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, activation: str | None = "silu"):
        super().__init__()
        if activation not in (None, "silu", "swish", "sigmoid"):
            raise ValueError(f"GatedRMSNorm: activation must be silu, sigmoid or None, got {activation!r}")
        self.eps = eps
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        """Normalized (and gated) x, in the dtype of x."""
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if gate is not None:
            gf = gate.float()
            y = y * (torch.sigmoid(gf) if self.activation == "sigmoid" else F.silu(gf))
        return y.to(x.dtype)


# --- parameterizations of the spec's inputs -------------------------------------------------

@dataclass
class _Param:
    """How one input of the spec is computed: its kind, shape and the layer attributes it owns."""

    name: str
    kind: str            # mamba, logsigmoid, sigmoid, log_snr, linear, stationary, zero, constant, matrix
    domain: str
    per_token: bool
    per_key: bool
    attrs: dict          # role -> attribute name on the layer


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def _dt_bias(n: int) -> Tensor:
    """Mamba-2's dt initialization: softplus(dt_bias) log-uniform in [1e-3, 0.1]."""
    dt = torch.exp(torch.rand(n) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    return _inverse_softplus(dt)


def _low_rank(hidden: int, rank: int | None, out: int, bias: bool) -> nn.Module:
    """Linear(hidden, out), or a rank-`rank` bottleneck Sequential(Linear, Linear) as fla's gates."""
    if rank is None:
        return nn.Linear(hidden, out, bias=bias)
    return nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, out, bias=bias))


# --- the layer -------------------------------------------------------------------------------

def _compile(op_or_spec):
    """A CompiledOp from an op, a DesignModel, a zoo name or a spec file."""
    if hasattr(op_or_spec, "plan") and callable(op_or_spec):
        return op_or_spec
    import designmodel
    return designmodel.compile(op_or_spec)


class _SharedOp:
    """A layer's compiled op, outside its state: copies of the layer share it (it holds no
    parameters, and its generated module cannot be copied), and a pickled layer stores the
    spec and compiles it again when loaded."""

    def __init__(self, op):
        self.op = op

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _shared_op_of_spec, (self.op.derivation.spec,)


def _shared_op_of_spec(spec) -> _SharedOp:
    return _SharedOp(_compile(spec))


def _accepts(fn, name: str) -> bool:
    """True when fn takes the keyword `name` (or any keyword)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


class DesignLayer(nn.Module):
    """A sequence layer computing its memory with a compiled design model (see module docstring).

    op: a CompiledOp (designmodel.compile(spec)), a DesignModel, a zoo name or a spec file.
    hidden_size: model width; num_heads, head_dim: H heads of K = head_dim key dims;
    expand_v: value dims per head V = head_dim * expand_v.
    use_short_conv, conv_size, conv_bias: short causal depthwise convolutions on q, k, v.
    feature_activation: "silu" or None, applied to q, k, v (inside the convolution when there
        is one; fla's delta-rule layers use silu, its GLA without convolutions none).
    qk_norm: "l2" normalizes q and k per head (fla's use_qk_l2norm_in_kernel), or None.
        Required when the spec declares unit keys; "l2" by default then.
    use_output_gate, gate_activation: o = rmsnorm(o) * act(g_proj(x)) (silu or sigmoid);
        without a gate o = rmsnorm(o). output_gate_rank: a low-rank g_proj (KDA).
    decay: "mamba" or "logsigmoid" parameterization of per-token log-decays;
        decay_rank: the rank of the per-key decay projection (None: a full Linear);
        gate_logit_normalizer: the divisor of the "logsigmoid" gate.
    names: input name -> attribute name of its projection (e.g. {"r": "b_proj"}).
    process_noise: for an input named sigma of a spec with a log-decay: "log_snr" (learned),
        "stationary" (sigma = p0 (1 - alpha^2)) or "zero".
    scale: the query scale (default K ** -0.5); norm_eps: the output norm's epsilon;
    layer_idx: this layer's index in a LayerCache.
    """

    def __init__(self, op, hidden_size: int, num_heads: int, head_dim: int, *, expand_v: float = 1.0,
                 use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False,
                 feature_activation: str | None = "silu", qk_norm: str | None = "auto",
                 use_output_gate: bool = True, gate_activation: str = "silu",
                 output_gate_rank: int | None = None, decay: str = "mamba",
                 decay_rank: int | None = 16, gate_logit_normalizer: float = 16.0,
                 names: dict | None = None, process_noise: str = "log_snr", scale: float | None = None,
                 norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__()
        self._shared_op = _SharedOp(_compile(op))
        plan = self.op.plan
        self.family = plan.family
        self.unit_keys = bool(plan.unit_keys)
        _check_options(hidden_size, num_heads, head_dim, expand_v, feature_activation, qk_norm,
                       decay, process_noise, self.unit_keys)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.head_k_dim = head_dim
        self.head_v_dim = int(round(head_dim * expand_v))
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * self.head_v_dim
        self.use_short_conv, self.conv_size = use_short_conv, conv_size
        self.feature_activation = feature_activation
        self.qk_norm = ("l2" if self.unit_keys else None) if qk_norm == "auto" else qk_norm
        self.use_output_gate = use_output_gate
        self.decay, self.gate_logit_normalizer = decay, gate_logit_normalizer
        self.process_noise = process_noise
        self.scale = scale
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            act = feature_activation
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, act)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, act)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, conv_bias, act)
        if use_output_gate:
            self.g_proj = _low_rank(hidden_size, output_gate_rank, self.value_dim,
                                    bias=output_gate_rank is not None)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps,
                                   activation=gate_activation if use_output_gate else None)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        # every input the op takes: the kernels' and, for a kalman spec, its prior's
        self.params = [self._make_param(i, names or {}, decay_rank) for i in plan.arguments]

    @property
    def op(self):
        """The compiled op (designmodel.compile(spec)) this layer runs."""
        return self._shared_op.op

    # -- parameters of the inputs ------------------------------------------------------------

    def _make_param(self, i, names: dict, decay_rank) -> _Param:
        """Register the parameters that compute spec input `i` (an InputPlan)."""
        H, K, D = self.num_heads, self.head_k_dim, self.hidden_size
        per_key = i.per == "key"
        width = H * K if per_key else H
        prefix = "" if i.name in ("g", "beta") else f"{i.name}_"
        if i.per == "matrix":
            return self._make_matrix(i)
        if not i.per_token:
            return self._make_constant(i, per_key)
        if i.domain == "logdecay" and self.decay == "logsigmoid":
            proj = names.get(i.name, f"{prefix}gk_proj")
            self._own(proj, _low_rank(D, decay_rank if per_key else None, width, bias=True))
            return _Param(i.name, "logsigmoid", i.domain, True, per_key, dict(proj=proj))
        if i.domain == "logdecay":
            proj = names.get(i.name, f"{prefix}{'f_proj' if per_key else 'a_proj'}")
            self._own(proj, _low_rank(D, decay_rank if per_key else None, width, bias=False))
            a_log, dt = f"{prefix}A_log", f"{prefix}dt_bias"
            self._own(a_log, nn.Parameter(torch.empty(H).uniform_(1, 16).log()))
            self._own(dt, nn.Parameter(_dt_bias(width)))
            return _Param(i.name, "mamba", i.domain, True, per_key, dict(proj=proj, A_log=a_log, dt_bias=dt))
        if i.name == "sigma" and self.process_noise != "log_snr":
            gates = [j for j in self.op.plan.inputs if j.name == "g" and j.per_token]
            if self.process_noise == "stationary" and (per_key or not gates or gates[0].per == "key"):
                raise ValueError("process_noise='stationary' (sigma = p0 (1 - alpha^2)) needs a scalar "
                                 "gate g per head and a per-head sigma; use process_noise='log_snr'")
            return _Param(i.name, self.process_noise, i.domain, True, per_key, {})
        if i.domain == "unit":
            proj = names.get(i.name, "b_proj" if i.name == "beta" else f"{i.name}_proj")
            self._own(proj, nn.Linear(D, width, bias=False))
            return _Param(i.name, "sigmoid", i.domain, True, per_key, dict(proj=proj))
        proj = names.get(i.name, f"{i.name}_proj")
        kind = "linear" if i.domain == "real" else "log_snr"
        layer = nn.Linear(D, width, bias=kind == "log_snr")
        if kind == "log_snr":
            nn.init.zeros_(layer.bias)
        self._own(proj, layer)
        return _Param(i.name, kind, i.domain, True, per_key, dict(proj=proj))

    def _own(self, name: str, value) -> None:
        """Register a parameter or projection of an input, refusing a name already taken
        (two inputs whose parameterizations would share a projection)."""
        if hasattr(self, name):
            raise ValueError(f"two parameters of this layer are called {name!r}: rename one "
                             "with names={input: projection name}")
        setattr(self, name, value)

    def _make_constant(self, i, per_key: bool) -> _Param:
        """A learned constant per head (or per head and key) in the input's domain."""
        H, K = self.num_heads, self.head_k_dim
        shape = (H, K) if per_key else (H,)
        if i.domain == "unit":
            # RetNet's decays 1 - 2^(-5 - h) as the start (fla's MultiScaleRetention)
            gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))
            init = torch.logit(gamma).reshape(H, *([1] * per_key)).expand(shape).clone()
            name = f"{i.name}_logit"
        elif i.domain in ("positive", "nonnegative"):
            init, name = torch.zeros(shape), f"log_{i.name}"
        elif i.domain == "logdecay":
            init, name = torch.full(shape, -3.0), f"{i.name}_A_log"
        else:
            init, name = torch.zeros(shape), i.name
        self._own(name, nn.Parameter(init))
        return _Param(i.name, "constant", i.domain, False, per_key, dict(value=name))

    def _make_matrix(self, i) -> _Param:
        """A learned covariance per head ([H, K, K], a named full prior): A A^T from a learned
        factor A, so it stays symmetric positive semidefinite; A starts at I (the unit prior)."""
        H, K = self.num_heads, self.head_k_dim
        name = f"{i.name}_factor"
        self._own(name, nn.Parameter(torch.eye(K).expand(H, K, K).clone()))
        return _Param(i.name, "matrix", i.domain, False, False, dict(factor=name))

    def _constant(self, p: _Param) -> Tensor:
        v = getattr(self, p.attrs["value"]).float()
        return {"unit": torch.sigmoid, "positive": torch.exp, "nonnegative": torch.exp,
                "logdecay": lambda x: -torch.exp(x), "real": lambda x: x}[p.domain](v)

    def input_values(self, x: Tensor) -> dict:
        """Every input of the spec from hidden states x [B, T, D]: float32, in the op's shapes."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_k_dim
        out = {}
        for p in sorted(self.params, key=lambda p: p.kind in ("stationary", "zero")):
            if p.kind == "constant":
                out[p.name] = self._constant(p)
                continue
            if p.kind == "matrix":
                A = getattr(self, p.attrs["factor"]).float()
                out[p.name] = A @ A.mT                                          # [H, K, K]
                continue
            if p.kind in ("stationary", "zero"):
                out[p.name] = self._process_noise(p, out, B, T)
                continue
            z = getattr(self, p.attrs["proj"])(x).float()
            if p.kind == "mamba":
                A = torch.exp(getattr(self, p.attrs["A_log"]).float())
                dt = F.softplus(z + getattr(self, p.attrs["dt_bias"]).float())
                val = -(dt.view(B, T, H, -1) * A[:, None])
            elif p.kind == "logsigmoid":
                val = F.logsigmoid(z) / self.gate_logit_normalizer
            elif p.kind == "sigmoid":
                val = torch.sigmoid(z)
            elif p.kind == "log_snr":
                val = torch.exp(-z)
            else:
                val = z
            out[p.name] = val.reshape(B, T, H, K) if p.per_key else val.reshape(B, T, H)
        return out

    def _process_noise(self, p: _Param, values: dict, B: int, T: int) -> Tensor:
        """sigma for process_noise "stationary" (p0 (1 - alpha^2), alpha = exp(g)) or "zero"."""
        if p.kind == "zero":
            return torch.zeros(B, T, self.num_heads, device=self.o_proj.weight.device)
        g = values["g"]                                                         # [B, T, H]
        p0 = values.get("p0", torch.ones(self.num_heads, device=g.device))
        return -torch.expm1(2 * g) * p0                                         # [B, T, H]

    # -- features ----------------------------------------------------------------------------

    def _features(self, x: Tensor, conv_state, use_cache: bool, cu_seqlens):
        """q, k [B, T, H, K], v [B, T, H, V] and the new convolution windows."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_conv = None
        if self.use_short_conv:
            cq, ck, cv = conv_state if conv_state is not None else (None, None, None)
            q, cq = self.q_conv1d(q, cq, use_cache, cu_seqlens)
            k, ck = self.k_conv1d(k, ck, use_cache, cu_seqlens)
            v, cv = self.v_conv1d(v, cv, use_cache, cu_seqlens)
            new_conv = (cq, ck, cv) if use_cache else None
        elif self.feature_activation == "silu":
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        B, T = x.shape[:2]
        q = q.view(B, T, self.num_heads, self.head_k_dim)
        k = k.view(B, T, self.num_heads, self.head_k_dim)
        v = v.view(B, T, self.num_heads, self.head_v_dim)
        if self.qk_norm == "l2":
            # fla's l2norm: x / sqrt(|x|^2 + 1e-6), in float32
            q = (q.float() * torch.rsqrt(q.float().pow(2).sum(-1, keepdim=True) + 1e-6)).to(v.dtype)
            k = (k.float() * torch.rsqrt(k.float().pow(2).sum(-1, keepdim=True) + 1e-6)).to(v.dtype)
        return q, k, v, new_conv

    # -- forward -----------------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                past_key_values: LayerCache | None = None, use_cache: bool = False,
                output_variance: bool = False, **kwargs):
        """(o [B, T, hidden_size], None, past_key_values), as fla's layers return.

        attention_mask [B, T] (or [B, T_past + T] with a cache): 1 for real tokens, 0 for
        left or right padding. past_key_values: a LayerCache (created when use_cache and None).
        output_variance (Kalman layers): also return the predictive variance of each head's
        readout, q^T P_t q with the scaled query, [B, T, H] float32 (zero on padding), as a
        fourth element.
        """
        caching = past_key_values is not None or use_cache
        B, T = self._check_forward(hidden_states, attention_mask, caching, output_variance)
        last = past_key_values[self.layer_idx] if past_key_values is not None else None
        x, indices, cu_seqlens = hidden_states, None, None
        if attention_mask is not None:
            indices, cu_seqlens = mask_to_cu_seqlens(attention_mask[:, -T:])
            x = hidden_states.reshape(B * T, -1)[indices][None]                # [1, total, D]
        q, k, v, conv_state = self._features(x, None if last is None else last["conv_state"],
                                             use_cache, cu_seqlens)
        inputs = self.input_values(x)
        state = None if last is None else last["recurrent_state"]
        result = self._run(q, k, v, inputs, state, use_cache, cu_seqlens, output_variance,
                           decoding=state is not None and T == 1)
        o, final = result[0], result[1]
        if use_cache:
            if past_key_values is None:
                past_key_values = LayerCache()
            past_key_values.update(self.layer_idx, recurrent_state=final, conv_state=conv_state,
                                   offset=T)
        o = self._readout(o, x)
        if indices is not None:
            o = _repad(o, indices, B, T)
        if not output_variance:
            return o, None, past_key_values
        var = result[2]
        if indices is not None:
            var = _repad(var, indices, B, T)
        return o, None, past_key_values, var

    def _run(self, q, k, v, inputs, state, use_cache, cu_seqlens, output_variance, decoding):
        """The op (op.recurrent for one decoded token when the op has it)."""
        fn = getattr(self.op, "recurrent", None) if decoding else None
        fn = fn if fn is not None else self.op
        kwargs = dict(scale=self.scale, initial_state=state, output_final_state=use_cache,
                      cu_seqlens=cu_seqlens)
        if output_variance:
            kwargs["output_variance"] = True
        # the parameterizations keep every input in its domain (up to float rounding at
        # saturation, which the kernels tolerate): skip the check and its host sync
        if _accepts(fn, "check_domain"):
            kwargs["check_domain"] = False
        return fn(q, k, v, **inputs, **kwargs)

    def _readout(self, o: Tensor, x: Tensor) -> Tensor:
        """o_proj(rmsnorm(o) [* act(g_proj(x))]), [B, T, hidden_size]."""
        B, T = o.shape[:2]
        gate = None
        if self.use_output_gate:
            gate = self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim)
        o = self.o_norm(o, gate).reshape(B, T, self.value_dim)
        return self.o_proj(o.to(self.o_proj.weight.dtype))

    def _check_forward(self, h, mask, caching, output_variance) -> tuple[int, int]:
        """(B, T); ValueError naming the problem for anything the layer cannot take.

        caching: a cache was given or asked for (use_cache)."""
        if not isinstance(h, Tensor) or h.dim() != 3:
            raise ValueError(f"hidden_states must be [B, T, hidden_size], got {getattr(h, 'shape', type(h))}")
        B, T, D = h.shape
        if D != self.hidden_size:
            raise ValueError(f"hidden_states has hidden size {D}, the layer takes {self.hidden_size}")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != B:
                raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}] of 0/1 (padding), "
                                 f"got {getattr(mask, 'shape', type(mask))}")
            if mask.shape[1] < T or (mask.shape[1] > T and not caching):
                raise ValueError(f"attention_mask has {mask.shape[1]} columns for {T} tokens "
                                 "(more only with past_key_values)")
        if caching and self.layer_idx is None:
            raise ValueError("past_key_values and use_cache need the layer's layer_idx (set layer_idx=...)")
        if output_variance and self.family != "kalman":
            raise ValueError(f"output_variance: a {self.family} layer has no predictive variance "
                             "(only Kalman layers such as BayesianLayer)")
        return B, T

    def extra_repr(self) -> str:
        return (f"{self.op.__name__} ({self.family}), hidden_size={self.hidden_size}, "
                f"num_heads={self.num_heads}, head_k_dim={self.head_k_dim}, head_v_dim={self.head_v_dim}")


def _repad(x: Tensor, indices: Tensor, B: int, T: int) -> Tensor:
    """[1, total, *] packed tokens back to [B, T, *], zeros on padding (differentiable)."""
    flat = x[0]
    out = flat.new_zeros(B * T, *flat.shape[1:]).index_copy(0, indices, flat)
    return out.view(B, T, *flat.shape[1:])


def _check_options(hidden, heads, head_dim, expand_v, activation, qk_norm, decay, noise, unit_keys):
    """ValueError for constructor arguments the layer cannot take."""
    for name, val in (("hidden_size", hidden), ("num_heads", heads), ("head_dim", head_dim)):
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not math.isclose(head_dim * expand_v, round(head_dim * expand_v)) or head_dim * expand_v < 1:
        raise ValueError(f"expand_v={expand_v} times head_dim={head_dim} must be a positive integer")
    if activation not in (None, "silu"):
        raise ValueError(f"feature_activation must be 'silu' or None, got {activation!r}")
    if qk_norm not in ("auto", "l2", None):
        raise ValueError(f"qk_norm must be 'l2' or None, got {qk_norm!r}")
    if unit_keys and qk_norm is None:
        raise ValueError("qk_norm=None: this spec declares unit keys, so keys must be l2-normalized")
    if decay not in ("mamba", "logsigmoid"):
        raise ValueError(f"decay must be 'mamba' or 'logsigmoid', got {decay!r}")
    if noise not in ("log_snr", "stationary", "zero"):
        raise ValueError(f"process_noise must be 'log_snr', 'stationary' or 'zero', got {noise!r}")


# --- the zoo ---------------------------------------------------------------------------------

# zoo layer -> (zoo spec, defaults after fla 0.6.0's layer of the same model)
_WRITE = dict(use_short_conv=False, feature_activation=None)
_RESET = dict(use_short_conv=True, feature_activation="silu")
ZOO_LAYERS = {
    "LinearAttention": ("linear_attention", dict(_WRITE)),
    "RetNet": ("retnet", dict(_WRITE)),
    "Mamba2": ("mamba2", dict(_WRITE)),
    "GLA": ("gla", dict(_WRITE, decay="logsigmoid")),
    "DeltaNet": ("deltanet", dict(_RESET, use_output_gate=False)),
    "GatedDeltaNet": ("gated_deltanet", dict(_RESET)),
    "KDA": ("kda", dict(_RESET, gate_activation="sigmoid")),
    "BayesianLayer": ("bayesian_layer", dict(_RESET, qk_norm="l2", names={"r": "b_proj"},
                                             process_noise="stationary")),
}


def _zoo_class(cls_name: str, doc: str):
    spec, defaults = ZOO_LAYERS[cls_name]

    def __init__(self, hidden_size: int = 256, num_heads: int = 4, head_dim: int = 64, **kwargs):
        options = {**defaults, **kwargs}
        if cls_name == "KDA":   # KDA's low-rank gates have the rank of one value head
            rank = int(round(head_dim * options.get("expand_v", 1.0)))
            options.setdefault("decay_rank", rank)
            options.setdefault("output_gate_rank", rank)
        DesignLayer.__init__(self, spec, hidden_size, num_heads, head_dim, **options)

    return type(cls_name, (DesignLayer,), {"__init__": __init__, "__doc__": doc, "SPEC": spec,
                                           "__module__": __name__})


LinearAttention = _zoo_class("LinearAttention", "Linear attention (write model, no decay).")
RetNet = _zoo_class("RetNet", "RetNet: write model with a learned constant decay gamma per head "
                              "(sigmoid(gamma_logit), starting at 1 - 2^(-5 - h)).")
Mamba2 = _zoo_class("Mamba2", "Mamba-2 / SSD / simple GLA: write model, scalar gate per token "
                              "g = -exp(A_log) softplus(a_proj(x) + dt_bias).")
GLA = _zoo_class("GLA", "Gated linear attention: per-key gate logsigmoid(gk_proj(x)) / 16 from a "
                        "low-rank gk_proj, as fla's GatedLinearAttention.")
DeltaNet = _zoo_class("DeltaNet", "DeltaNet: reset model, beta = sigmoid(b_proj(x)), l2 keys, "
                                  "short convolutions, RMSNorm without a gate (fla's defaults).")
GatedDeltaNet = _zoo_class("GatedDeltaNet", "Gated DeltaNet: reset model with the Mamba-2 gate "
                                            "(a_proj, A_log, dt_bias) and beta = sigmoid(b_proj(x)).")
KDA = _zoo_class("KDA", "Kimi Delta Attention: reset model, per-key Mamba-style gate from a "
                        "low-rank f_proj, sigmoid output gate from a low-rank g_proj.")
BayesianLayer = _zoo_class("BayesianLayer", """The Bayesian Layer: the exact Kalman filter over a
    matrix memory (MATH.md sections 2, 6.3), parameterized as a Gated DeltaNet:

        g     = -exp(A_log) * softplus(a_proj(x) + dt_bias)        log-decay, alpha = exp(g)
        r     = exp(-log_snr),  log_snr = b_proj(x) (+ b_proj.bias)  observation noise
        p0    = exp(log_p0)                                          prior variance per head
        sigma = p0 (1 - alpha^2)  ("stationary", default),  or learned ("log_snr"),  or 0

    forward(..., output_variance=True) also returns the predictive variance q^T P q per head.""")


def layer(name: str, **kwargs) -> DesignLayer:
    """A zoo layer by class name ("GatedDeltaNet") or zoo spec name ("gated_deltanet")."""
    by_spec = {spec: cls for cls, (spec, _) in ZOO_LAYERS.items()}
    cls_name = by_spec.get(name, name)
    if cls_name not in ZOO_LAYERS:
        raise ValueError(f"unknown zoo layer {name!r}; known: {', '.join(ZOO_LAYERS)}")
    return globals()[cls_name](**kwargs)


# --- fla interop -----------------------------------------------------------------------------

# fla 0.6.0 parameter names that differ from ours (GLA's and simple GLA's output norms)
_FLA_RENAMES = {"g_norm_swish_gate.": "o_norm.", "g_norm.": "o_norm."}


def load_fla_state_dict(layer: DesignLayer, state_dict: dict, strict: bool = True):
    """Load an fla 0.6.0 layer's state_dict (GatedDeltaNet, DeltaNet, GLA, KDA ...) into ours.

    Names are fla's except the output norm of GLA (g_norm_swish_gate / g_norm -> o_norm).
    Returns what nn.Module.load_state_dict returns.
    """
    renamed = {}
    for key, value in state_dict.items():
        for old, new in _FLA_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return layer.load_state_dict(renamed, strict=strict)


def from_fla(fla_layer) -> DesignLayer:
    """Our zoo layer equivalent to an fla 0.6.0 GatedDeltaNet, DeltaNet, GatedLinearAttention,
    SimpleGatedLinearAttention (as Mamba2 with decay="logsigmoid") or KimiDeltaAttention layer (same sizes and options), with its weights. Options fla has and we do not (grouped
    value heads, negative eigenvalues, feature maps, clamp_min) raise ValueError."""
    kind = type(fla_layer).__name__
    L = fla_layer
    common = dict(hidden_size=L.hidden_size, num_heads=L.num_heads, head_dim=L.head_k_dim,
                  expand_v=L.head_v_dim / L.head_k_dim, use_short_conv=L.use_short_conv,
                  conv_size=L.conv_size, conv_bias=getattr(L, "conv_bias", False),
                  layer_idx=L.layer_idx)
    if getattr(L, "allow_neg_eigval", False):
        raise ValueError(f"{kind}: allow_neg_eigval (beta in (0, 2)) has no design-model reading")
    if getattr(L, "num_v_heads", L.num_heads) != L.num_heads or getattr(L, "num_kv_groups", 1) != 1:
        raise ValueError(f"{kind}: grouped heads are not supported")
    if kind == "GatedDeltaNet":
        act = L.o_norm.activation if L.use_gate else None
        ours = GatedDeltaNet(**common, use_output_gate=L.use_gate, gate_activation=_act(act),
                             norm_eps=L.o_norm.eps)
    elif kind == "DeltaNet":
        if L.qk_activation != "silu" or L.qk_norm != "l2" or not L.use_beta:
            raise ValueError("DeltaNet: only qk_activation='silu', qk_norm='l2', use_beta=True")
        ours = DeltaNet(**common, use_output_gate=L.use_gate, norm_eps=L.o_norm.eps)
    elif kind == "GatedLinearAttention":
        if L.feature_map_fn is not None or L.clamp_min is not None or not L.fuse_norm_and_gate:
            raise ValueError("GatedLinearAttention: only feature_map=None, clamp_min=None and the "
                             "fused swish output gate")
        norm = L.g_norm_swish_gate
        ours = GLA(**common, feature_activation="silu" if L.use_short_conv else None,
                   decay_rank=L.gk_proj[0].out_features, gate_logit_normalizer=L.gate_logit_normalizer,
                   norm_eps=norm.eps)
    elif kind == "SimpleGatedLinearAttention":
        if L.feature_map_fn is not None or not L.fuse_norm_and_gate:
            raise ValueError("SimpleGatedLinearAttention: only feature_map=None and the fused swish "
                             "output gate")
        ours = Mamba2(**common, decay="logsigmoid", feature_activation="silu" if L.use_short_conv else None,
                      gate_logit_normalizer=L.gate_logit_normalizer, norm_eps=L.g_norm_swish_gate.eps)
    elif kind == "KimiDeltaAttention":
        if L.lower_bound is not None or L.safe_gate:
            raise ValueError("KimiDeltaAttention: only lower_bound=None, safe_gate=False (the Mamba gate)")
        ours = KDA(**common, norm_eps=L.o_norm.eps)
    else:
        raise ValueError(f"from_fla: no zoo layer for fla's {kind}")
    load_fla_state_dict(ours, L.state_dict())
    return ours.to(device=L.q_proj.weight.device, dtype=L.q_proj.weight.dtype)


def _act(name):
    return None if name is None else ("sigmoid" if name == "sigmoid" else "silu")


def bayesian_from_gated_deltanet(gdn) -> DesignLayer:
    """A BayesianLayer starting from a Gated DeltaNet layer's weights (ours or fla's).

    Everything but the filter is copied: q/k/v projections, convolutions, the gate (a_proj,
    A_log, dt_bias), output gate, norm and o_proj. The delta rule's beta = sigmoid(b) is read
    as the gain of a reset Kalman step, c / (c + r) with unit keys (MATH.md section 3): the
    prior variance c = 1 and the noise r = exp(-b), so b_proj becomes the log signal-to-noise
    projection (its new bias starts at 0). p0 = 1, and the process noise is stationary,
    sigma = 1 - alpha^2, so that every direction no key has written keeps variance 1.

    What is exact: with unit keys the Bayesian layer's output equals the Gated DeltaNet's
    for every token as long as each key is orthogonal to all earlier keys of its sequence
    (then P^- k_t = k_t, the gain is c k_t with c = 1, and the Kalman update is the GDN
    update); in particular for the first token of any sequence. Once keys overlap, the
    Kalman filter shrinks the gain along directions it has already written (it keeps the
    covariance the GDN resets), and the layers differ: the starting point for distillation.
    """
    if not isinstance(gdn, DesignLayer):
        gdn = from_fla(gdn)
    if gdn.op.__name__ != "gated_deltanet":
        raise ValueError(f"bayesian_from_gated_deltanet takes a GatedDeltaNet, got {gdn.op.__name__}")
    gate_act, rank = (gdn.o_norm.activation or "silu"), None
    if gdn.use_output_gate and isinstance(gdn.g_proj, nn.Sequential):
        rank = gdn.g_proj[0].out_features
    bl = BayesianLayer(hidden_size=gdn.hidden_size, num_heads=gdn.num_heads, head_dim=gdn.head_k_dim,
                       expand_v=gdn.head_v_dim / gdn.head_k_dim, use_short_conv=gdn.use_short_conv,
                       conv_size=gdn.conv_size, conv_bias=gdn.use_short_conv and gdn.q_conv1d.bias is not None,
                       feature_activation=gdn.feature_activation, use_output_gate=gdn.use_output_gate,
                       gate_activation=gate_act, output_gate_rank=rank, scale=gdn.scale,
                       norm_eps=gdn.o_norm.eps, layer_idx=gdn.layer_idx, process_noise="stationary")
    missing, unexpected = bl.load_state_dict(gdn.state_dict(), strict=False)
    if unexpected or set(missing) != {"b_proj.bias", "log_p0"}:
        raise ValueError(f"bayesian_from_gated_deltanet: parameters do not line up (missing "
                         f"{missing}, unexpected {unexpected})")
    with torch.no_grad():
        bl.b_proj.bias.zero_()          # r = exp(-b): beta = 1 / (1 + r) = sigmoid(b)
        bl.log_p0.zero_()               # p0 = c = 1
    return bl.to(device=gdn.o_proj.weight.device, dtype=gdn.o_proj.weight.dtype)
