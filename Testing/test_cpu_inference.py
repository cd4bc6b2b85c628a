"""CPU inference kernels: oneDNN fused linear layers, the reused bias buffer, bfloat16 attention and the
channels-last LayerNorm2d compute the same function as the plain modules."""

import copy
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import Tensor, nn

from hsam.modeling.common import ChannelLayerNorm2d
from hsam.modeling.fused_linear import PACKED_WEIGHTS, fused_dtype, linear, onednn_works
from hsam.modeling.image_encoder import _SCRATCH, ImageEncoder, _bfloat16_attention, release_scratch_buffer
from hsam.modeling.lora import LoRAQKV
from hsam.runtime.cpu import cpu_capability

onednn = pytest.mark.skipif(not onednn_works(), reason="no working oneDNN in this PyTorch build")
onednn_bf16 = pytest.mark.skipif(
    not onednn_works(torch.bfloat16),
    reason=f"this CPU ({cpu_capability()}) has no oneDNN bfloat16 kernels (they need AVX512-BW/VL/DQ or "
    "AVX-NE-CONVERT); the fallback it takes instead is tested in test_cpu_precision.py",
)


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _linear_case(gelu: bool, with_residual: bool) -> tuple[nn.Linear, torch.Tensor, Optional[torch.Tensor], Tensor]:
    """A layer, its input, the residual (or None) and the expected ``[residual +] [gelu](layer(x))``."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 40)
    x, residual = torch.randn(2, 5, 7, 48), torch.randn(2, 5, 7, 40) if with_residual else None
    expected = F.gelu(layer(x)) if gelu else layer(x)
    expected = expected if residual is None else expected + residual
    return layer, x, residual, expected.detach()


@onednn
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_linear_equals_the_modules(gelu: bool, with_residual: bool) -> None:
    layer, x, residual, expected = _linear_case(gelu, with_residual)
    with torch.inference_mode():
        assert fused_dtype(x) == torch.float32
        actual = linear(layer, x, gelu=gelu, residual=residual)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@onednn_bf16
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_bfloat16_linear_stays_close_to_the_modules(gelu: bool, with_residual: bool) -> None:
    layer, x, residual, expected = _linear_case(gelu, with_residual)
    with torch.inference_mode(), bf16_autocast():
        assert fused_dtype(x) == torch.bfloat16
        low = linear(layer, x, gelu=gelu, residual=residual)
    assert low.shape == expected.shape
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)


def test_fused_linear_keeps_autograd_for_training() -> None:
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    assert fused_dtype(x) is None
    y = linear(layer, x, gelu=True, residual=torch.zeros(3, 4))
    y.sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(y, F.gelu(layer(x)))


@onednn_bf16
def test_bfloat16_weight_copy_follows_weight_changes() -> None:
    """The cached bfloat16 weight is rebuilt after an in-place update (optimiser step, merge, load)."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(4, 32)

    def run() -> torch.Tensor:
        with torch.inference_mode(), bf16_autocast():
            return linear(layer, x).float()

    before = run()
    with torch.no_grad():
        layer.weight.mul_(-2)
    after = run()
    torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias).detach(), rtol=0.05, atol=0.05)
    assert not torch.allclose(after, before, atol=0.1)
    layer.load_state_dict({"weight": torch.ones(16, 32), "bias": torch.zeros(16)})
    torch.testing.assert_close(run(), x.sum(1, keepdim=True).expand(4, 16), rtol=0.02, atol=0.05)


@onednn
def test_lora_adapters_are_used_until_merged() -> None:
    torch.manual_seed(0)
    adapter = LoRAQKV(nn.Linear(24, 72), rank=2)
    nn.init.normal_(adapter.b_q.weight)
    x = torch.randn(5, 24)
    expected = adapter(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(linear(adapter, x), expected)
        adapter.merge()
        torch.testing.assert_close(linear(adapter, x), expected, rtol=1e-5, atol=1e-5)


def encoders() -> tuple[ImageEncoderViT, ImageEncoder]:
    """segment-anything's encoder and ours with the same random weights (non-zero relative positions, a
    global block between windowed ones whose grid is padded)."""
    kwargs = dict(img_size=256, patch_size=16, embed_dim=64, depth=3, num_heads=4, out_chans=32, qkv_bias=True,
                  use_rel_pos=True, window_size=7, global_attn_indexes=(1,))
    torch.manual_seed(0)
    theirs = ImageEncoderViT(**kwargs).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "rel_pos" in name or "qkv.bias" in name or "pos_embed" in name:
                parameter.normal_(0, 0.5)
    ours = ImageEncoder(**kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def test_encoder_inference_equals_segment_anything_across_batch_sizes() -> None:
    """Float32 inference (fused linear layers, the shared bias buffer resized between batches, then
    released) gives segment-anything's outputs."""
    theirs, ours = encoders()
    for batch in (2, 1, 3, 2):
        x = torch.rand(batch, 3, 256, 256)
        with torch.inference_mode():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        if batch == 3:
            release_scratch_buffer()
            assert _SCRATCH.storage is None
    assert _SCRATCH.storage.numel() == 2 * 4 * 16**4  # batch × heads × (global tokens)²


@onednn_bf16
def test_encoder_bfloat16_inference_stays_close_to_float32() -> None:
    theirs, ours = encoders()
    x = torch.rand(2, 3, 256, 256)
    with torch.inference_mode():
        expected = theirs(x)
        with bf16_autocast():
            low = ours(x).float()
    assert ours.blocks[0].mlp.lin1 in PACKED_WEIGHTS  # the oneDNN path ran
    copy.deepcopy(ours)  # the packed copies stay out of the model
    assert ((low - expected).norm() / expected.norm()).item() < 0.02


def test_bfloat16_attention_equals_fused_attention() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16).to(torch.bfloat16) for _ in range(3))
    bias = torch.randn(2, 3, 50, 50)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=0.25)
    actual = _bfloat16_attention(q, k, v, bias.to(torch.bfloat16), 0.25)
    assert actual.shape == expected.shape and actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=0.03, atol=0.03)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_layer_norm_equals_segment_anything(channels_last: bool) -> None:
    torch.manual_seed(0)
    theirs = LayerNorm2d(16)
    nn.init.normal_(theirs.weight)
    nn.init.normal_(theirs.bias)
    ours = ChannelLayerNorm2d(16)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 9, 11) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [14, 32])
def test_relative_position_bias_is_the_same_written_either_way(dtype: torch.dtype, size: int) -> None:
    """Inference writes the bias into the scratch buffer (broadcast add or matmul by dtype and width);
    autograd uses a fresh matmul; both give segment-anything's sum of the two decomposed terms."""
    from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos

    from hsam.modeling.image_encoder import RelPosSDPAttention

    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, use_rel_pos=True, input_size=(size, size))
    attn.__class__ = RelPosSDPAttention
    nn.init.normal_(attn.rel_pos_h)
    nn.init.normal_(attn.rel_pos_w)
    q = torch.randn(2, 2, size * size, 16, dtype=dtype)
    with torch.inference_mode():
        buffered = attn.relative_position_bias(q, size, size).clone()
        buffered_again = attn.relative_position_bias(q, size, size)  # the same buffer, rewritten
    trained = attn.relative_position_bias(q, size, size).detach()
    assert buffered.dtype == dtype and buffered.shape == (2, 2, size * size, size * size)
    assert torch.equal(buffered, trained) and torch.equal(buffered_again, buffered)
    if dtype == torch.float32:
        zeros = torch.zeros(4, size * size, size * size)
        expected = add_decomposed_rel_pos(zeros, q.reshape(4, size * size, 16), attn.rel_pos_h, attn.rel_pos_w,
                                          (size, size), (size, size))
        torch.testing.assert_close(trained, expected.detach().reshape(2, 2, size * size, size * size))


def test_onednn_runs_where_pytorch_ships_it() -> None:
    """x86-64 builds of PyTorch have oneDNN: the fused path must not silently switch itself off there."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        pytest.skip("not an x86-64 build with oneDNN")
    assert onednn_works()
