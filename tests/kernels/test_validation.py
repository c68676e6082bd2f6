"""Wrong shapes, dtypes, devices and gates outside their domain raise ValueError before any launch."""
import pytest
import torch
import torch.nn.functional as F

from designmodel import ops
from designmodel.codegen import runtime


def qkv(B=1, T=20, H=2, K=16, V=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    return q, k, v


def test_mismatched_key_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k must have the shape of q"):
        ops.linear_attention(q, k[:, :, :, :8], v)


def test_values_of_another_length():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\]"):
        ops.linear_attention(q, k, v[:, :10])


def test_three_dimensional_queries():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, D\]"):
        ops.linear_attention(q[0], k, v)


def test_integer_dtype_and_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.linear_attention(q.long(), k, v)
    with pytest.raises(ValueError, match="share one dtype"):
        ops.linear_attention(q, k.bfloat16(), v)


def test_tensors_on_different_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        ops.linear_attention(q, k, v.to("meta"))
    g = torch.zeros(1, 20, 2, device="meta")
    with pytest.raises(ValueError, match="g must be on"):
        ops.mamba2(q, k, v, g)


def test_gate_of_the_wrong_layout():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"g must be \[B, T, H\]"):
        ops.mamba2(q, k, v, torch.zeros(1, 20, 2, 16))
    with pytest.raises(ValueError, match=r"g must be \[B, T, H, K\]"):
        ops.gla(q, k, v, torch.zeros(1, 20, 2))


def test_positive_log_decay_is_outside_the_domain():
    q, k, v = qkv()
    g = torch.full((1, 20, 2), -0.1)
    g[0, 3, 1] = 0.5
    with pytest.raises(ValueError, match=r"g must be <= 0 \(a log-decay\)"):
        ops.mamba2(q, k, v, g)
    ops.mamba2(q, k, v, g, check_domain=False)  # the check can be skipped


def test_beta_outside_the_unit_interval():
    q, k, v = qkv()
    beta = torch.full((1, 20, 2), 0.5)
    beta[0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        ops.deltanet(q, k, v, beta)
    g = torch.full((1, 20, 2), -0.1)
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        ops.gated_deltanet(q, k, v, g, beta)


def test_non_finite_gate():
    q, k, v = qkv()
    g = torch.full((1, 20, 2, 16), -0.1)
    g[0, 1, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="g must be"):
        ops.gla(q, k, v, g)


def test_initial_state_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\]"):
        ops.linear_attention(q, k, v, initial_state=torch.zeros(1, 2, 16, 8))


def test_cu_seqlens_checks():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="rise from 0 to T"):
        ops.linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 5, 19], dtype=torch.int32))
    q2, k2, v2 = qkv(B=2)
    with pytest.raises(ValueError, match="B must be 1"):
        ops.linear_attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32 or int64"):
        ops.linear_attention(q, k, v, cu_seqlens=torch.tensor([0.0, 20.0]))


def test_head_dim_limit():
    q, k, v = qkv(K=300, V=16)
    with pytest.raises(ValueError, match="up to 256"):
        ops.linear_attention(q, k, v)


def test_unknown_config_kernel():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown kernel"):
        ops.linear_attention(q, k, v, config={"nope": {}})
    with pytest.raises(ValueError, match="path must be"):
        ops.linear_attention(q, k, v, config={"path": "sideways"})


def test_unknown_config_setting():
    """A setting a kernel does not have (a typo) or a kernel's settings that are not a dict:
    one ValueError naming it, in the chunked and the recurrent forms."""
    q, k, v = qkv()
    g = -torch.rand_like(q)
    with pytest.raises(ValueError, match="unknown setting 'bk' of kernel 'attention'"):
        ops.gla(q, k, v, g, config={"attention": {"bk": 32}})
    with pytest.raises(ValueError, match=r"config\['state'\] must be a dict"):
        ops.linear_attention(q, k, v, config={"state": 64})
    with pytest.raises(ValueError, match="config must be a dict of per-kernel overrides, got str"):
        ops.linear_attention(q, k, v, config="fused")
    module = runtime.load_zoo("linear_attention")
    with pytest.raises(ValueError, match="unknown setting 'BKK' of kernel 'recurrent'"):
        module.recurrent(q, k, v, config={"recurrent": {"BKK": 16}})


def test_unknown_attention_diag():
    q, k, v = qkv()
    g = -torch.rand_like(q)
    with pytest.raises(ValueError, match="diag must be"):
        ops.gla(q, k, v, g, config={"attention": {"diag": "diagonal"}})
