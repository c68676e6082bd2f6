"""The design-model layers (designmodel/layers.py) against float64 recomputations.

Each zoo layer's output is recomputed here from the layer's own parameters in float64
(projections, F.conv1d, the gates written out again, designmodel.reference.recurrent, the norm,
gate and o_proj), independently of the layer's code. Padding masks, decoding with a cache and
the Gated DeltaNet -> Bayesian Layer conversion are checked against runs of the same layer on
unpadded sequences, whole sequences and the Gated DeltaNet. Kernels run in Triton's
interpreter on CPU (conftest.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import designmodel
from designmodel import layers as L
from designmodel import reference
from designmodel.spec import Readout

from .conftest import DEVICE
from .helpers import relative_error as _relative_error

HID, HEADS, HEAD_DIM = 32, 2, 16
FWD_TOL = 1e-5       # fp32 forward vs float64 (PREAMBLE: 1e-5 for the forward)
VAR_TOL = 1e-4       # the Kalman covariance path in fp32 (the tolerance of test_kalman.py)


def relative_error(x, ref):
    """max |x - ref| / max |ref| of a layer output (on the CPU, detached) and its reference."""
    return _relative_error(x.detach().cpu(), ref.detach().cpu())


def make(name, seed=0, **kwargs):
    """A zoo layer with all parameters random (so that no parameter is left untested)."""
    torch.manual_seed(seed)
    layer = L.layer(name, hidden_size=HID, num_heads=HEADS, head_dim=HEAD_DIM, layer_idx=0, **kwargs)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif pname.endswith("bias") and "conv" not in pname:
                p.add_(0.5 * torch.randn_like(p))
    return layer.to(DEVICE)


def hidden(B, T, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, HID, generator=gen).to(DEVICE)


# --- the float64 recomputation ------------------------------------------------------------------

def _linear(P, name, x):
    """x @ W^T (+ b) for a Linear or a low-rank Sequential(Linear, Linear) named `name`."""
    if f"{name}.0.weight" in P:
        return _linear(P, f"{name}.1", _linear(P, f"{name}.0", x))
    y = x @ P[f"{name}.weight"].T
    return y + P[f"{name}.bias"] if f"{name}.bias" in P else y


def _conv(P, name, z, W):
    """silu(causal depthwise conv) with torch's own conv1d: z [B, T, D]."""
    D, T = z.shape[-1], z.shape[1]
    y = F.conv1d(z.transpose(1, 2), P[f"{name}.weight"], P.get(f"{name}.bias"), padding=W - 1, groups=D)
    return F.silu(y[..., :T].transpose(1, 2))


def _gate_inputs(layer, P, x, B, T):
    """The spec's inputs, written out per zoo model from the documented parameterizations."""
    H, K = HEADS, HEAD_DIM
    name = type(layer).__name__
    ins = {}
    per_key = name in ("GLA", "KDA")
    if name in ("Mamba2", "GatedDeltaNet", "BayesianLayer", "GLA", "KDA"):
        if layer.decay == "logsigmoid":
            g = F.logsigmoid(_linear(P, "gk_proj", x)) / 16
        elif per_key:
            dt = F.softplus(_linear(P, "f_proj", x) + P["dt_bias"]).view(B, T, H, K)
            g = -P["A_log"].exp()[:, None] * dt
        else:
            g = -P["A_log"].exp() * F.softplus(_linear(P, "a_proj", x) + P["dt_bias"])
        ins["g"] = g.view(B, T, H, K) if per_key else g                       # [B, T, H(, K)]
    if name in ("DeltaNet", "GatedDeltaNet", "KDA"):
        ins["beta"] = torch.sigmoid(_linear(P, "b_proj", x))
    if name == "RetNet":
        ins["gamma"] = torch.sigmoid(P["gamma_logit"])
    if name == "BayesianLayer":
        ins["r"] = torch.exp(-_linear(P, "b_proj", x))
        ins["p0"] = P["log_p0"].exp()
        ins["sigma"] = ins["p0"] * (1 - torch.exp(2 * ins["g"]))
    return ins


def reference_layer(layer, x, variance=False, inputs=None):
    """The layer's output (and the Kalman predictive variance) in float64, [B, T, hidden];
    `inputs` (float64) replaces the zoo models' gate inputs for other specs."""
    P = {n: p.detach().cpu().double() for n, p in layer.named_parameters()}
    x = x.detach().cpu().double()
    B, T, _ = x.shape
    H, K, V = HEADS, HEAD_DIM, layer.head_v_dim
    q, k, v = (_linear(P, n, x) for n in ("q_proj", "k_proj", "v_proj"))
    if layer.use_short_conv:
        q, k, v = (_conv(P, n, z, layer.conv_size) for n, z in (("q_conv1d", q), ("k_conv1d", k), ("v_conv1d", v)))
    elif layer.feature_activation == "silu":
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
    if layer.qk_norm == "l2":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    spec = layer.op.derivation.spec
    if variance:
        spec = dataclasses.replace(spec, readout=Readout(timing=spec.readout.timing, variance=True))
    inputs = _gate_inputs(layer, P, x, B, T) if inputs is None else inputs
    ref = reference.recurrent(spec, q * K ** -0.5, k, v, inputs, unit_key_tol=1e-5)
    o = ref.o
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * P["o_norm.weight"]
    if layer.use_output_gate:
        g = _linear(P, "g_proj", x).view(B, T, H, V)
        o = o * (torch.sigmoid(g) if layer.o_norm.activation == "sigmoid" else F.silu(g))
    out = o.reshape(B, T, H * V) @ P["o_proj.weight"].T
    return (out, ref.variance) if variance else out


# --- (a) every zoo layer against its recomputation -----------------------------------------------

CASES = [(name, {}) for name in L.ZOO_LAYERS] + [
    ("GLA", dict(use_short_conv=True, feature_activation="silu")),
    ("DeltaNet", dict(use_output_gate=True)),
    ("GatedDeltaNet", dict(expand_v=2.0, use_short_conv=False)),
    ("Mamba2", dict(decay="logsigmoid", use_short_conv=True, feature_activation="silu")),
]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_layer_matches_float64_recomputation(name, options):
    layer = make(name, **options)
    x = hidden(2, 40)
    o, attn, cache = layer(x)
    assert o.shape == (2, 40, HID) and attn is None and cache is None
    assert relative_error(o.cpu(), reference_layer(layer, x)) <= FWD_TOL


@pytest.mark.parametrize("name", ["GatedDeltaNet", "GLA", "BayesianLayer"])
def test_layer_in_bf16_matches_float64(name):
    layer = make(name).to(torch.bfloat16)
    x = hidden(2, 40).to(torch.bfloat16)
    o = layer(x)[0]
    assert o.dtype == torch.bfloat16
    assert relative_error(o.float(), reference_layer(layer, x)) <= 2e-2


def test_bayesian_layer_variance_matches_float64():
    layer = make("BayesianLayer")
    x = hidden(2, 40)
    o, _, _, var = layer(x, output_variance=True)
    ref_o, ref_var = reference_layer(layer, x, variance=True)
    assert var.shape == (2, 40, HEADS)
    assert relative_error(o.cpu(), ref_o) <= FWD_TOL
    assert relative_error(var.cpu(), ref_var) <= VAR_TOL


def test_layer_from_a_custom_spec(tmp_path):
    """A spec outside the zoo: reset gain c / (c |k|^2 + r) with per-token noises c and r, both
    from a learned log signal-to-noise ratio (noise = exp(-(proj(x) + bias))), keys not
    normalized."""
    from designmodel.spec import DesignModel, Input, Regression, Transition, exp, reset
    c, r, g = Input("c", domain="positive"), Input("r", domain="positive"), Input("g", domain="logdecay")
    spec = DesignModel("reset_snr", transition=Transition(decay=exp(g)), observation=Regression(noise=r),
                       filter=reset(c))
    op = designmodel.compile(spec, cache=tmp_path)
    torch.manual_seed(0)
    layer = L.DesignLayer(op, HID, HEADS, HEAD_DIM, qk_norm=None, layer_idx=0).to(DEVICE)
    with torch.no_grad():
        layer.c_proj.bias.normal_()
        layer.r_proj.bias.normal_()
    x = hidden(2, 40)
    P = {n: p.detach().cpu().double() for n, p in layer.named_parameters()}
    xd = x.cpu().double()
    inputs = {"g": -P["A_log"].exp() * F.softplus(_linear(P, "a_proj", xd) + P["dt_bias"]),
              "c": torch.exp(-_linear(P, "c_proj", xd)), "r": torch.exp(-_linear(P, "r_proj", xd))}
    assert relative_error(layer(x)[0], reference_layer(layer, x, inputs=inputs)) <= FWD_TOL
    with pytest.raises(ValueError, match="called 'g_proj'"):
        L.DesignLayer(op, HID, HEADS, HEAD_DIM, qk_norm=None, names={"c": "g_proj"})


@pytest.mark.parametrize("model", ["bayesian_layer_diag", "rls"])
def test_kalman_layers_with_learned_noises(model):
    """Kalman specs with a per-key gate or none, the noises r and sigma from learned log
    signal-to-noise ratios, the prior variance exp(log_p0)."""
    torch.manual_seed(0)
    layer = L.DesignLayer(model, HID, HEADS, HEAD_DIM, qk_norm="l2", process_noise="log_snr").to(DEVICE)
    with torch.no_grad():
        layer.log_p0.normal_()
        for proj in ("r_proj", "sigma_proj"):
            if hasattr(layer, proj):
                getattr(layer, proj).bias.normal_()
    x = hidden(2, 40)
    P = {n: p.detach().cpu().double() for n, p in layer.named_parameters()}
    xd = x.cpu().double()
    inputs = {"p0": P["log_p0"].exp(), "r": torch.exp(-_linear(P, "r_proj", xd))}
    if model == "bayesian_layer_diag":
        dt = F.softplus(_linear(P, "f_proj", xd) + P["dt_bias"]).view(2, 40, HEADS, HEAD_DIM)
        inputs["g"] = -P["A_log"].exp()[:, None] * dt
        inputs["sigma"] = torch.exp(-_linear(P, "sigma_proj", xd))
    o, _, _, var = layer(x, output_variance=True)
    ref_o, ref_var = reference_layer(layer, x, variance=True, inputs=inputs)
    assert relative_error(o, ref_o) <= FWD_TOL
    assert relative_error(var, ref_var) <= VAR_TOL


@pytest.mark.parametrize("prior", ["diagonal", "full"])
def test_kalman_layer_learns_its_prior(tmp_path, prior):
    """A Bayesian Layer spec whose prior is a per-key Constant p (diagonal) or a named full
    covariance: the layer owns it (exp(log_p) per head and key, or A A^T from a factor A), and
    its gradient reaches that parameter; output against the float64 recomputation."""
    from designmodel.spec import Constant, DesignModel, Input, Prior, Regression, Transition, diagonal, exp, full
    g, r = Input("g", domain="logdecay"), Input("r", domain="positive")
    cov = diagonal(Constant("p", per="key", domain="positive")) if prior == "diagonal" else full("Pprior")
    spec = DesignModel(f"bl_{prior}_prior", prior=Prior(covariance=cov), transition=Transition(decay=exp(g)),
                       observation=Regression(noise=r))
    op = designmodel.compile(spec, cache=tmp_path)
    torch.manual_seed(0)
    layer = L.DesignLayer(op, HID, HEADS, HEAD_DIM, qk_norm="l2", layer_idx=0).to(DEVICE)
    name = "log_p" if prior == "diagonal" else "Pprior_factor"
    with torch.no_grad():
        getattr(layer, name).add_(0.3 * torch.randn_like(getattr(layer, name)))
        layer.r_proj.bias.normal_()
    x = hidden(2, 40)
    P = {n: p.detach().cpu().double() for n, p in layer.named_parameters()}
    xd = x.cpu().double()
    inputs = {"g": -P["A_log"].exp() * F.softplus(_linear(P, "a_proj", xd) + P["dt_bias"]),
              "r": torch.exp(-_linear(P, "r_proj", xd))}
    if prior == "diagonal":
        inputs["p"] = P["log_p"].exp()
    else:
        inputs["Pprior"] = P["Pprior_factor"] @ P["Pprior_factor"].mT
    out = layer(x)[0]
    assert relative_error(out, reference_layer(layer, x, inputs=inputs)) <= FWD_TOL
    out.square().sum().backward()
    grad = getattr(layer, name).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0


# --- (b) padding masks become variable-length sequences -----------------------------------------

PAD_LAYERS = ["GatedDeltaNet", "GLA", "BayesianLayer", "RetNet"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", PAD_LAYERS)
def test_padding_mask_equals_sequences_alone(name, side):
    options = dict(use_short_conv=True, feature_activation="silu") if name in ("GLA", "RetNet") else {}
    layer = make(name, **options)
    T, lens = 24, [24, 17, 5]
    x = hidden(len(lens), T)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    variance = name == "BayesianLayer"
    out = layer(x, attention_mask=mask.to(DEVICE), output_variance=variance)
    for b in range(len(lens)):
        real = mask[b].bool()
        alone = layer(x[b:b + 1, real.to(DEVICE)], output_variance=variance)
        assert relative_error(out[0][b, real.to(DEVICE)].cpu(), alone[0][0].cpu()) <= FWD_TOL
        assert float(out[0][b, ~real.to(DEVICE)].detach().abs().sum()) == 0  # zeros on padding
        if variance:
            assert relative_error(out[3][b, real.to(DEVICE)].cpu(), alone[3][0].cpu()) <= VAR_TOL


# --- (c) prefill, then decoding token by token with the cache -----------------------------------

@pytest.mark.parametrize("name", ["GatedDeltaNet", "GLA", "BayesianLayer", "KDA"])
def test_decoding_with_cache_equals_one_pass(name):
    options = dict(use_short_conv=True, feature_activation="silu") if name == "GLA" else {}
    layer = make(name, **options)
    T, prefill = 12, 5
    x = hidden(2, T)
    whole = layer(x)[0]
    o, _, cache = layer(x[:, :prefill], use_cache=True)
    outs = [o]
    for t in range(prefill, T):
        o, _, cache = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert cache.get_seq_length(0) == T
    assert relative_error(torch.cat(outs, 1).cpu(), whole.cpu()) <= FWD_TOL


def test_decoding_calls_op_recurrent_when_the_op_has_one():
    layer = make("GatedDeltaNet")
    calls = []

    def recurrent(q, k, v, *args, **kwargs):        # the chunked op stands in for the kernel
        calls.append((q.shape[1], kwargs["initial_state"] is not None, kwargs["output_final_state"]))
        return layer.op(q, k, v, *args, **kwargs)

    layer.op.recurrent = recurrent
    x = hidden(2, 6)
    _, _, cache = layer(x[:, :4], use_cache=True)
    assert calls == []                                   # prefill: the chunked op
    for t in (4, 5):
        _, _, cache = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
    assert calls == [(1, True, True), (1, True, True)]


def test_decoding_after_left_padded_prefill():
    layer = make("GatedDeltaNet")
    T, prefill, lens = 10, 6, [6, 3]
    x = hidden(2, T)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :prefill - lens[1]] = 0          # row 1: left padding before its 3 prompt tokens
    mask = mask.to(DEVICE)
    o, _, cache = layer(x[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    outs = [o]
    for t in range(prefill, T):
        o, _, cache = layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                            use_cache=True)
        outs.append(o)
    got = torch.cat(outs, 1)
    for b in range(2):
        real = mask[b].bool()
        alone = layer(x[b:b + 1, real])[0][0]
        assert relative_error(got[b, real].cpu(), alone.cpu()) <= FWD_TOL


# --- (d) Gated DeltaNet -> Bayesian Layer --------------------------------------------------------

def _orthogonal_key_gdn():
    """A GDN without convolutions whose keys are one-hot: for x_t = e_t (t < 16), head h's key
    is silu(5) e_{perm_h(t)}, so the keys of a sequence are mutually orthogonal."""
    gdn = make("GatedDeltaNet", use_short_conv=False)
    gen = torch.Generator().manual_seed(7)
    W = torch.zeros(HEADS * HEAD_DIM, HID)
    for h in range(HEADS):
        perm = torch.randperm(HEAD_DIM, generator=gen)
        for t in range(HEAD_DIM):
            W[h * HEAD_DIM + perm[t], t] = 5.0
    with torch.no_grad():
        gdn.k_proj.weight.copy_(W.to(DEVICE))
    return gdn


def test_bayesian_from_gdn_exact_on_orthogonal_keys():
    gdn = _orthogonal_key_gdn()
    bl = L.bayesian_from_gated_deltanet(gdn)
    x = torch.zeros(2, HEAD_DIM, HID)
    x[0, :, :HEAD_DIM] = torch.eye(HEAD_DIM)                    # x_t = e_t
    x[1, :, :HEAD_DIM] = 2 * torch.eye(HEAD_DIM).flip(0)        # other order, other size
    x = x.to(DEVICE)
    ref = reference_layer(gdn, x)                               # float64 GDN
    assert relative_error(gdn(x)[0].cpu(), ref) <= FWD_TOL
    assert relative_error(bl(x)[0].cpu(), ref) <= FWD_TOL
    # the Bayesian layer's own float64 recomputation agrees with the GDN's in float64
    assert relative_error(reference_layer(bl, x), ref) <= 1e-12


def test_bayesian_from_gdn_exact_on_first_token_with_convolutions():
    gdn = make("GatedDeltaNet")
    bl = L.bayesian_from_gated_deltanet(gdn)
    x = hidden(3, 1)
    assert relative_error(bl(x)[0].cpu(), reference_layer(gdn, x)) <= FWD_TOL


def test_bayesian_from_gdn_differs_once_keys_overlap():
    """Not exact beyond the claim: with overlapping keys the Kalman gain shrinks along written
    directions, so the outputs move apart (and the Bayesian layer still matches its float64)."""
    gdn = make("GatedDeltaNet")
    bl = L.bayesian_from_gated_deltanet(gdn)
    x = hidden(2, 32)
    o_bl = bl(x)[0].cpu()
    assert relative_error(o_bl, reference_layer(bl, x)) <= FWD_TOL
    assert relative_error(o_bl, reference_layer(gdn, x)) > 1e-2


def test_bayesian_from_gdn_copies_everything_but_the_filter():
    gdn = make("GatedDeltaNet")
    bl = L.bayesian_from_gated_deltanet(gdn)
    ours = bl.state_dict()
    for key, value in gdn.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert not bl.b_proj.bias.detach().any() and not bl.log_p0.detach().any()


# --- (f) bad input -------------------------------------------------------------------------------

def test_bad_input_raises_value_error():
    layer = make("GatedDeltaNet")
    x = hidden(2, 8)
    with pytest.raises(ValueError, match="hidden size"):
        layer(torch.randn(2, 8, HID + 1, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[B, T, hidden_size\]"):
        layer(torch.randn(8, HID, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask must be"):
        layer(x, attention_mask=torch.ones(3, 8, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="columns"):
        layer(x, attention_mask=torch.ones(2, 9, dtype=torch.long, device=DEVICE))
    holes = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="padding between"):
        layer(x, attention_mask=holes)
    with pytest.raises(ValueError, match="only 0"):
        layer(x, attention_mask=2 * torch.ones(2, 8, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="predictive variance"):
        layer(x, output_variance=True)
    no_idx = L.GatedDeltaNet(hidden_size=HID, num_heads=HEADS, head_dim=HEAD_DIM).to(DEVICE)
    with pytest.raises(ValueError, match="layer_idx"):
        no_idx(x, past_key_values=L.LayerCache())
    with pytest.raises(ValueError, match="layer_idx"):
        no_idx(x, use_cache=True)
    with pytest.raises(ValueError, match="unit keys"):
        L.DeltaNet(hidden_size=HID, num_heads=HEADS, head_dim=HEAD_DIM, qk_norm=None)
    with pytest.raises(ValueError, match="stationary"):
        L.DesignLayer("bayesian_layer_diag", HID, HEADS, HEAD_DIM, process_noise="stationary")
    with pytest.raises(ValueError, match="unknown zoo layer"):
        L.layer("Transformer")


def test_short_convolution_window_cache():
    """The cached window of a sequence is its last W inputs (zeros before its start)."""
    conv = L.ShortConvolution(4, 3, bias=False, activation=None)
    x = torch.randn(1, 5, 4)
    cu = torch.tensor([0, 1, 5])
    _, state = conv(x, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(state[0], torch.stack([torch.zeros(4), torch.zeros(4), x[0, 0]], -1))
    assert torch.equal(state[1], x[0, 2:5].T)


# --- docs/layers.md's examples run ------------------------------------------------------------

def test_docs_examples_run():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "layers.md").read_text()
    ns = {}
    try:
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            exec(compile(block, "docs/layers.md", "exec"), ns)
    finally:
        torch.set_grad_enabled(True)
    assert ns["variance"].shape == (2, 20, 2)
    assert relative_error(ns["o_t"][:, 0], ns["whole"][:, -1]) <= FWD_TOL


def test_layer_deepcopies_and_pickles():
    """copy.deepcopy and torch.save / torch.load give a layer with the same outputs (the
    compiled op is shared by copies and compiled again from the spec when loaded)."""
    import copy
    import io
    layer = make("BayesianLayer")
    x = hidden(2, 6)
    clone = copy.deepcopy(layer)
    assert clone.op is layer.op and clone.q_proj.weight is not layer.q_proj.weight
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (clone, loaded):
        assert torch.equal(other(x)[0], layer(x)[0])


def test_compiled_op_module_is_the_design_layer_of_that_op():
    """`designmodel.compile(spec).module(...)` builds the same layer as DesignLayer(op, ...):
    with the same weights it gives the same outputs."""
    import designmodel
    from designmodel.layers import DesignLayer
    op = designmodel.compile("gated_deltanet")
    torch.manual_seed(0)
    mod = op.module(32, 2, 16)
    ref = DesignLayer(op, 32, 2, 16)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(2, 20, 32)
    assert isinstance(mod, DesignLayer) and mod.op is op
    assert torch.equal(mod(x)[0], ref(x)[0])
