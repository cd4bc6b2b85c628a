"""The H-SAM network: shapes, trainable parameters, LoRA, CMAttn modes, learning."""

import pytest
import torch

from hsam.models.build import build_hsam, count_parameters
from hsam.training.loss import HSAMLoss, soft_dice_loss, stage2_weight


@pytest.mark.parametrize("img_size", [224, 512])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 4, 8])
def test_output_shapes(img_size: int, batch: int, num_classes: int) -> None:
    model = build_hsam("tiny", num_classes, img_size).eval()
    with torch.no_grad():
        out = model(torch.rand(batch, 3, img_size, img_size))
    k = num_classes + 1
    assert out.stage1_logits.shape == (batch, k, img_size // 4, img_size // 4)
    assert out.stage2_logits.shape == (batch, k, img_size, img_size)
    assert out.masks.shape == (batch, k, img_size, img_size)
    stage1_full = torch.nn.functional.interpolate(out.stage1_logits, size=img_size, mode="bilinear")
    torch.testing.assert_close(out.masks, (stage1_full + out.stage2_logits) / 2)


def test_wrong_input_size_is_refused() -> None:
    with pytest.raises(ValueError, match="224"):
        build_hsam("tiny", 2, 224)(torch.rand(1, 3, 256, 256))


def test_reference_trainable_parameters_vit_b_512() -> None:
    """Spec §4: 24,003,536 trainable of 111,282,384, split per module as the authors' trainer prints."""
    model = build_hsam("vit_b", num_classes=8, img_size=512)
    assert count_parameters(model) == (24_003_536, 111_282_384)

    def trainable(prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix))

    assert trainable("image_encoder.") == 184_320  # LoRA only: 12 blocks × (q, v) × 7,680
    assert trainable("prompt_encoder.") == 8_012
    assert trainable("mask_decoder.") == 4_759_945
    assert trainable("hierarchical_decoder.") == 19_051_259
    assert trainable("hierarchical_decoder.cmattn.") == 12_598_282
    assert trainable("hierarchical_decoder.transformer2.") == 3_826_920
    assert trainable("hierarchical_decoder.output_hypernetworks_mlps2.") == 2_405_520
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.startswith("image_encoder.") and ".qkv.a_" not in n and ".qkv.b_" not in n for n in frozen)


def test_fresh_lora_changes_nothing() -> None:
    """With B = 0 the model equals the same weights with every adapter removed."""
    torch.manual_seed(0)
    model = build_hsam("tiny", 3, 224).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        with_lora = model(x).masks
        for block in model.image_encoder.blocks:
            block.attn.qkv = block.attn.qkv.qkv
        without = model(x).masks
    assert torch.equal(with_lora, without)


def test_lora_changes_q_and_v_only_and_merges() -> None:
    torch.manual_seed(0)
    model = build_hsam("tiny", 2, 224).eval()
    adapter = model.lora_adapters()[0]
    x = torch.rand(4, 7, adapter.dim)
    base = adapter.qkv(x)
    with torch.no_grad():
        adapter.b_q.weight.normal_()
        adapter.b_v.weight.normal_()
    adapted = adapter(x)
    d = adapter.dim
    assert not torch.allclose(adapted[..., :d], base[..., :d])
    assert torch.equal(adapted[..., d : 2 * d], base[..., d : 2 * d])
    assert not torch.allclose(adapted[..., 2 * d :], base[..., 2 * d :])
    adapter.merge()
    torch.testing.assert_close(adapter(x), adapted, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    torch.testing.assert_close(adapter(x), adapted, rtol=1e-5, atol=1e-5)


def test_reference_cmattn_only_doubles_the_embedding() -> None:
    model = build_hsam("tiny", 3, 224)
    cmattn = model.hierarchical_decoder.cmattn
    src, affinity = torch.randn(2, 64, 14, 14), torch.randn(2, 4, 196)
    assert torch.equal(cmattn(src, affinity), 2 * src)


def test_paper_cmattn_gate_varies_and_trains() -> None:
    torch.manual_seed(0)
    model = build_hsam("tiny", 3, 224, cmattn="paper")
    cmattn = model.hierarchical_decoder.cmattn.eval()
    src, affinity = torch.randn(2, 64, 14, 14), torch.randn(2, 4, 196)
    gate = torch.sigmoid(cmattn.gate_logits(affinity))
    assert gate.std() > 0
    out = cmattn(src, affinity)
    assert not torch.allclose(out, 2 * src)
    out.sum().backward()
    assert cmattn.self_attn.q_proj.weight.grad.abs().sum() > 0


def test_class_balancing_noise_hits_rare_classes_harder() -> None:
    torch.manual_seed(0)
    cmattn = build_hsam("tiny", 2, 224, cmattn="paper").hierarchical_decoder.cmattn
    labels = torch.zeros(1, 224, 224, dtype=torch.long)
    labels[:, :32, :32] = 2  # rarest
    labels[:, 112:, :] = 1
    affinity = torch.zeros(1, 3, 196)
    noisy = cmattn.class_balancing_noise(affinity, labels).reshape(3, 14, 14)
    rare, common = noisy[:, :2, :2], noisy[:, 8:, :]
    assert rare.std() > common.std() > 0


def test_loss_terms() -> None:
    assert stage2_weight(0) == pytest.approx(0.6)
    assert stage2_weight(100) == pytest.approx(0.6 ** (0.99**100))
    labels = torch.randint(0, 3, (2, 16, 16))
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, labels) < 1e-3
    assert soft_dice_loss(-perfect, labels) > 0.5


def _square_batch(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares (class 1) and dim disks (class 2) on a dark background."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.zeros(n, size, size), torch.zeros(n, size, size, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        x0, y0 = torch.randint(8, size // 2, (2,), generator=g).tolist()
        labels[i, y0 : y0 + size // 4, x0 : x0 + size // 4] = 1
        cx, cy = torch.randint(size // 2, size - 24, (2,), generator=g).tolist()
        labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 10) ** 2] = 2
    images[labels == 1], images[labels == 2] = 0.9, 0.5
    return images[:, None].repeat(1, 3, 1, 1), labels


def test_training_lowers_loss_and_raises_dice() -> None:
    torch.manual_seed(0)
    model = build_hsam("tiny", 2, 224)
    images, labels = _square_batch(4, 224)
    loss_fn = HSAMLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.1)

    def dice() -> float:
        model.eval()
        with torch.no_grad():
            pred = model(images).masks.argmax(1)
        model.train()
        scores = [2 * ((pred == c) & (labels == c)).sum() / ((pred == c).sum() + (labels == c).sum()) for c in (1, 2)]
        return float(sum(scores) / 2)

    dice_before = dice()
    losses = []
    for step in range(40):
        loss, _ = loss_fn(model(images, labels), labels, epoch=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert dice() > max(0.6, dice_before + 0.3)


def test_sdpa_encoder_attention_equals_segment_anything() -> None:
    """Our fused attention computes segment-anything's function with the same parameters."""
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(0)
    attn = Attention(64, num_heads=2, use_rel_pos=True, input_size=(14, 14))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, 14, 14, 64)
    expected = attn(x)
    from hsam.modeling.image_encoder import RelPosSDPAttention

    attn.__class__ = RelPosSDPAttention
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    model = build_hsam("tiny", 2, 224)
    assert all(isinstance(b.attn, RelPosSDPAttention) for b in model.image_encoder.blocks)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = build_hsam("tiny", 2, 224).eval()  # eval: no dropout or noise, so both passes are comparable
    with torch.no_grad():
        for a in model.lora_adapters():
            a.b_q.weight.normal_(0, 0.1)
    x = torch.rand(2, 3, 224, 224)
    adapter = model.lora_adapters()[0]

    def grad() -> torch.Tensor:
        model.zero_grad()
        model(x).masks.square().mean().backward()
        return adapter.a_q.weight.grad.clone()

    plain = grad()
    model.image_encoder.gradient_checkpointing = True
    torch.testing.assert_close(grad(), plain)


def test_encoder_equals_segment_anything_with_padded_windows() -> None:
    """Windowed blocks whose grid is not a multiple of the window (16 tokens, window 7 -> padded to 21)
    give segment-anything's outputs and the same gradients, LoRA included."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    from hsam.modeling.image_encoder import ImageEncoder
    from hsam.modeling.lora import add_lora

    kwargs = dict(img_size=256, patch_size=16, embed_dim=64, depth=3, num_heads=4, out_chans=32, qkv_bias=True,
                  use_rel_pos=True, window_size=7, global_attn_indexes=(1,))
    torch.manual_seed(0)
    theirs = ImageEncoderViT(**kwargs)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "rel_pos" in name or "qkv.bias" in name or "pos_embed" in name:
                parameter.normal_(0, 0.5)
    ours = ImageEncoder(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(2, 3, 256, 256)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)

    for model in (theirs, ours):
        add_lora(model, rank=2)
        for adapter in (b.attn.qkv for b in model.blocks):
            adapter.qkv.requires_grad_(True)
            torch.manual_seed(1)
            adapter.reset_parameters()
            torch.nn.init.normal_(adapter.b_v.weight, 0, 0.1)
    gradients = []
    for model in (theirs, ours):
        model.zero_grad()
        model(x).square().mean().backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and any("qkv.qkv.bias" in n for n in gradients[1])
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-4, atol=1e-6, msg=name)
