"""designmodel.layout's one-pass copies against the PyTorch copies they replace in the kalman
backward (a transpose, the dtype change, the query's scale, the last chunk's padding): equal bit
for bit, since each copies numbers and multiplies once in float32. Strided views (a slice of
tokens, as the packed sequences pass), head dims that are not powers of two, T not a multiple of
the chunk."""
import numpy as np
import pytest
import torch

from designmodel.chunked_adjoint import _in_chunks
from designmodel.layout import to_argument_layout, to_chunk_layout

from .conftest import DEVICE

CASES = [  # B, T, H, D, chunk
    (2, 64, 3, 16, 16),
    (1, 70, 2, 48, 32),
    (2, 5, 1, 8, 64),
    (1, 130, 2, 128, 64),
]


def _draw(B, T, H, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, D, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B, T, H, D, chunk", CASES)
def test_to_chunk_layout_is_the_pytorch_copy(B, T, H, D, chunk, dtype):
    x = _draw(B, T, H, D, dtype)
    for scale, fill in ((1.0, 0.0), (D ** -0.5, 0.0), (0.7, 1.0)):
        ref = _in_chunks((x.transpose(1, 2).float() * scale).contiguous(), chunk, fill)
        got = to_chunk_layout(x, chunk, torch.float32, scale, fill)
        assert got.shape == ref.shape and got.is_contiguous()
        assert torch.equal(got, ref), (scale, fill, (got - ref).abs().max())


def test_to_chunk_layout_reads_a_slice_of_tokens():
    x = _draw(2, 90, 3, 24, torch.bfloat16)
    view = x[:, 17:61]                                                  # strides of the whole
    ref = _in_chunks(view.transpose(1, 2).float().contiguous(), 16, 0.0)
    assert torch.equal(to_chunk_layout(view, 16), ref)
    ref_t = _in_chunks(x.transpose(1, 3).transpose(1, 2).float().contiguous(), 16, 0.0)
    assert torch.equal(to_chunk_layout(x.transpose(1, 3), 16), ref_t)  # a last stride other than 1
    ones = torch.ones((), device=DEVICE).expand(2, 90, 3, 24)          # the gradient of o.sum(): strides 0
    assert torch.equal(to_chunk_layout(ones, 16), _in_chunks(torch.ones(2, 3, 90, 24, device=DEVICE), 16, 0.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, T, H, D, chunk", CASES)
def test_to_argument_layout_is_the_pytorch_copy(B, T, H, D, chunk, dtype):
    gen = torch.Generator().manual_seed(1)
    NC = -(-T // chunk)
    y = torch.randn(B, H, NC, chunk, D, generator=gen).to(DEVICE)
    view = y.flatten(2, 3)[:, :, :T]                                    # as the backward passes it
    for scale in (1.0, 0.37):
        ref = (view * scale).transpose(1, 2).to(dtype).contiguous()
        got = to_argument_layout(view, dtype, scale)
        assert got.shape == (B, T, H, D) and got.is_contiguous()
        assert torch.equal(got, ref), (scale, (got.float() - ref.float()).abs().max())


def test_to_argument_layout_rounds_to_bf16_as_pytorch():
    # halfway ties both ways, carries into the exponent, overflow to inf, infs, NaN, subnormals
    special = [0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00008000, 0x0000FFFF,
               0x3F808000, 0x3F818000, 0x3F7FFFFF]
    gen = np.random.default_rng(2)
    high = gen.integers(0, 2 ** 16, 4096, dtype=np.uint32) << 16
    low = np.array([0x8000, 0x7FFF, 0x8001, 0xFFFF, 0x0000], dtype=np.uint32)
    bits = np.concatenate([np.array(special, dtype=np.uint32), (high[:, None] + low).reshape(-1)])
    y = torch.from_numpy(bits[: bits.size // 32 * 32].view(np.float32).copy())
    y = y.reshape(1, 1, -1, 32).to(DEVICE)
    got = to_argument_layout(y, torch.bfloat16).float()
    ref = y.transpose(1, 2).to(torch.bfloat16).float()
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], ref[~nan])


def test_layouts_refuse_what_is_not_4d():
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        to_chunk_layout(torch.zeros(2, 3, 4), 16)
    with pytest.raises(ValueError, match="y must be a 4-D tensor"):
        to_argument_layout(torch.zeros(2, 3, 4), torch.float32)
