"""On a GPU: fla 0.6.0's GatedDeltaNet, DeltaNet, GLA, simple GLA and KDA layers load into ours.

An fla layer's state_dict goes into the matching zoo layer (designmodel.layers.from_fla, which
uses load_fla_state_dict) and both layers run on the same bf16 hidden states, with and
without a padding mask: the outputs agree within bf16 tolerance.
"""
import pytest
import torch

from designmodel import layers as L

from .helpers import relative_error

BF16_TOL = 2e-2
HIDDEN = 256

CASES = [
    ("GatedDeltaNet", dict(head_dim=64, num_heads=4, expand_v=1)),
    ("GatedDeltaNet", dict(head_dim=64, num_heads=2, expand_v=2, use_gate=False)),
    ("GatedDeltaNet", dict(head_dim=64, num_heads=3, expand_v=1, use_short_conv=False)),
    ("DeltaNet", dict(num_heads=4)),
    ("DeltaNet", dict(num_heads=4, use_gate=True, use_short_conv=False)),
    ("GatedLinearAttention", dict(num_heads=4)),
    ("GatedLinearAttention", dict(num_heads=2, use_short_conv=True)),
    ("KimiDeltaAttention", dict(head_dim=64, num_heads=4)),
    ("SimpleGatedLinearAttention", dict(num_heads=4)),
]


def _fla_layer(kind, options):
    """An fla layer in bf16 on the GPU, with its norm weights and biases away from their init
    (so that loading them matters)."""
    import fla.layers
    from fla.layers.simple_gla import SimpleGatedLinearAttention   # not exported by fla.layers
    torch.manual_seed(0)
    cls = SimpleGatedLinearAttention if kind == "SimpleGatedLinearAttention" else getattr(fla.layers, kind)
    layer = cls(hidden_size=HIDDEN, layer_idx=0, **options)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias") and "conv" not in name:
                p.add_(0.5 * torch.randn_like(p))
    return layer.cuda().to(torch.bfloat16).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("kind,options", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_fla_layer_state_dict_gives_same_outputs(kind, options):
    pytest.importorskip("fla")
    theirs = _fla_layer(kind, options)
    ours = L.from_fla(theirs)
    assert set(ours.state_dict()) >= {k for k in theirs.state_dict() if "g_norm" not in k}
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 300, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        o_theirs, o_ours = theirs(x)[0], ours(x)[0]
    assert relative_error(o_ours.float(), o_theirs.float()) <= BF16_TOL

    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    mask[1, :77] = 0                                    # left padding of the second sequence
    with torch.no_grad():
        o_theirs, o_ours = theirs(x, attention_mask=mask)[0], ours(x, attention_mask=mask)[0]
    real = mask.bool()
    assert relative_error(o_ours[real].float(), o_theirs[real].float()) <= BF16_TOL


@pytest.mark.gpu
def test_bayesian_layer_from_fla_gated_deltanet_first_token():
    """The conversion is exact on the first token of a sequence (MATH.md section 3): there the
    Bayesian layer built from an fla GDN reproduces fla's output."""
    pytest.importorskip("fla")
    theirs = _fla_layer("GatedDeltaNet", dict(head_dim=64, num_heads=4, expand_v=1))
    bl = L.bayesian_from_gated_deltanet(theirs)
    x = torch.randn(8, 1, HIDDEN, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        o_theirs, o_ours = theirs(x)[0], bl(x)[0]
    assert relative_error(o_ours.float(), o_theirs.float()) <= BF16_TOL
