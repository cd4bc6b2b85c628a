"""Checkpoints: official SAM weights, the authors' formats, HSAM bundles; bad files refused clearly."""

import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from hsam.models.build import build_hsam
from hsam.models.bundle import BundleMetadata, default_color, load_bundle, read_bundle_metadata, save_bundle
from hsam.models.checkpoint import (
    load_reference_checkpoint,
    load_sam_weights,
    read_state_dict,
    save_reference_checkpoint,
)
from hsam.models.presets import PRESETS
from hsam.runtime.errors import CheckpointError, InputError

TINY = PRESETS["tiny"]


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _upstream_tiny_sam(img_size: int = 1024) -> Sam:
    """segment-anything's own Sam with the tiny preset's widths, at SAM's native 1024 px."""
    dim = TINY.decoder_dim
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=16, embed_dim=TINY.encoder_embed_dim, depth=TINY.encoder_depth,
            num_heads=TINY.encoder_num_heads, mlp_ratio=4, out_chans=dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=TINY.window_size, global_attn_indexes=TINY.encoder_global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(dim, (img_size // 16, img_size // 16), (img_size, img_size), 16),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=TINY.decoder_mlp_dim, num_heads=TINY.decoder_heads),
        ),
    )


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory) -> Path:
    sam = _upstream_tiny_sam()
    _randomise(sam)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path


def test_sam_weights_resized_as_the_reference(sam_file: Path) -> None:
    sam_state = torch.load(sam_file, weights_only=True)
    model = build_hsam("tiny", num_classes=8, img_size=512)
    loaded = load_sam_weights(model, sam_file, "tiny")
    state = model.state_dict()

    pos = F.interpolate(sam_state["image_encoder.pos_embed"].permute(0, 3, 1, 2), (32, 32), mode="bilinear")
    assert torch.equal(state["image_encoder.pos_embed"], pos.permute(0, 2, 3, 1))
    global_block, windowed_block = TINY.encoder_global_attn_indexes[0], 0
    rel = sam_state[f"image_encoder.blocks.{global_block}.attn.rel_pos_h"]
    assert rel.shape[0] == 127 and state[f"image_encoder.blocks.{global_block}.attn.rel_pos_h"].shape[0] == 63
    assert torch.equal(
        state[f"image_encoder.blocks.{global_block}.attn.rel_pos_h"],
        F.interpolate(rel[None, None], (63, rel.shape[1]), mode="bilinear")[0, 0],
    )
    assert torch.equal(
        state[f"image_encoder.blocks.{windowed_block}.attn.rel_pos_w"],
        sam_state[f"image_encoder.blocks.{windowed_block}.attn.rel_pos_w"],
    )
    assert torch.equal(state["image_encoder.blocks.0.attn.qkv.qkv.weight"], sam_state["image_encoder.blocks.0.attn.qkv.weight"])
    # As the authors' failed strict load: SAM's 4 hypernetworks and the IoU head's first layers are copied,
    # the 9 mask tokens and the hypernetworks beyond SAM's 4 are not.
    for i in range(4):
        assert f"mask_decoder.output_hypernetworks_mlps.{i}.layers.0.weight" in loaded
    assert "mask_decoder.output_hypernetworks_mlps.4.layers.0.weight" not in loaded
    assert "mask_decoder.mask_tokens.weight" not in loaded
    assert "mask_decoder.iou_prediction_head.layers.0.weight" in loaded
    assert not any(k.startswith("hierarchical_decoder.") for k in loaded)
    assert not any(".qkv.a_" in k or ".qkv.b_" in k for k in loaded)


def test_sam_weights_of_another_size_are_refused(sam_file: Path) -> None:
    with pytest.raises(CheckpointError, match="another ViT size"):
        load_sam_weights(build_hsam("vit_b", 2, 224), sam_file, "vit_b")


def test_authors_checkpoint_format_round_trip(tmp_path: Path, sam_file: Path) -> None:
    torch.manual_seed(0)
    model = build_hsam("tiny", num_classes=3, img_size=224)
    load_sam_weights(model, sam_file, "tiny")
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.05)
    save_reference_checkpoint(model, tmp_path / "epoch_299.pth")
    keys = torch.load(tmp_path / "epoch_299.pth", weights_only=True).keys()
    assert {"w_a_000", "w_b_003", "prompt_encoder2.no_mask_embed.weight", "mask_decoder2.med_sel.0.weight"} <= set(keys)

    rebuilt = load_reference_checkpoint(tmp_path / "epoch_299.pth", sam_file, vit="tiny", num_classes=3, img_size=224)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.eval()(x).masks, rebuilt.eval()(x).masks)

    with pytest.raises(CheckpointError, match="num_classes"):
        load_reference_checkpoint(tmp_path / "epoch_299.pth", sam_file, vit="tiny", num_classes=4, img_size=224)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_callable_is_refused_without_running(tmp_path: Path) -> None:
    payload = _RunsCode()
    payload.marker = tmp_path / "ran"
    torch.save({"weight": torch.zeros(2), "evil": payload}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="pickled"):
        read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()


def test_truncated_and_missing_checkpoints(tmp_path: Path, sam_file: Path) -> None:
    data = sam_file.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")


def _metadata(num_classes: int = 2, **overrides) -> BundleMetadata:
    fields = dict(
        preset="tiny", img_size=224, num_classes=num_classes,
        class_names=[f"class {i}" for i in range(1, num_classes + 1)],
        class_colors=[default_color(i) for i in range(num_classes)],
        label_values=list(range(1, num_classes + 1)),
        preprocessing={"mode": "ct", "window": [-125, 275]},
        training={"epochs": 3, "slices": [1, 5]},
    )
    fields.update(overrides)
    return BundleMetadata(**fields)


def test_bundle_round_trip_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_hsam("tiny", 2, 224)
    with torch.no_grad():
        for a in model.lora_adapters():
            a.b_q.weight.normal_()
    metadata = _metadata(terminology=["SCT^123037004^Anatomical Structure", None])
    path = save_bundle(tmp_path / "model.hsam", model, metadata)
    loaded, loaded_metadata = load_bundle(path)
    assert loaded_metadata == metadata == read_bundle_metadata(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(InputError, match="exists"):
        save_bundle(path, model, metadata)


def test_bundle_on_sam_weights_stores_only_what_changed(tmp_path: Path, sam_file: Path) -> None:
    model = build_hsam("tiny", 2, 224)
    load_sam_weights(model, sam_file, "tiny")
    metadata = _metadata(base_checkpoint={"name": "sam_tiny.pth", "sha256": "0" * 64})
    path = save_bundle(tmp_path / "small.hsam", model, metadata)
    full = save_bundle(tmp_path / "full.hsam", model, _metadata())
    assert path.stat().st_size < full.stat().st_size
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        stored = set(f.keys())
    assert "image_encoder.blocks.0.attn.qkv.a_q.weight" in stored
    assert "image_encoder.pos_embed" not in stored


def test_bundle_errors(tmp_path: Path) -> None:
    model = build_hsam("tiny", 2, 224)
    path = save_bundle(tmp_path / "model.hsam", model, _metadata())
    with pytest.raises(CheckpointError, match="not vit_b"):
        load_bundle(path, expected_preset="vit_b")
    with pytest.raises(CheckpointError, match="2 classes, not 3"):
        load_bundle(path, expected_num_classes=3)

    data = path.read_bytes()
    (tmp_path / "cut.hsam").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_bundle(tmp_path / "cut.hsam")

    other = save_bundle(tmp_path / "other.hsam", build_hsam("tiny", 3, 224), _metadata())
    with pytest.raises(CheckpointError, match="do not fit"):
        load_bundle(other)
