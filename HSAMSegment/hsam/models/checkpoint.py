"""Checkpoints: official SAM weights (registry in ``hsam.models.sam_weights``), the authors' H-SAM state
dicts and released checkpoints.

Every file is read with ``torch.load(weights_only=True)``: tensors only, never pickled code.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

from ..modeling.hsam import HSAM
from ..runtime.errors import CheckpointError
from ..volumes.files import error_reason
from .build import build_hsam
from .presets import PRESETS, Preset

PathLike = Union[str, os.PathLike]


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a ``torch.save``-d dict of tensors safely; clear errors for missing, truncated or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path.name} was refused: it holds pickled code or objects, not only tensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is truncated or not a PyTorch checkpoint ({error_reason(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name} is not a plain dict of tensors")
    return state


def _resize_grid_embeddings(state: dict[str, torch.Tensor], preset: Preset, grid: int) -> None:
    """The authors' resize of SAM's 64×64 embeddings: pos_embed bilinearly to grid×grid, the global
    blocks' relative positions linearly to 2·grid−1 rows (windowed blocks keep theirs)."""
    pos = state["image_encoder.pos_embed"]
    if pos.shape[1] == grid:
        return
    pos = F.interpolate(pos.permute(0, 3, 1, 2), (grid, grid), mode="bilinear", align_corners=False)
    state["image_encoder.pos_embed"] = pos.permute(0, 2, 3, 1)
    for i in preset.encoder_global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if key not in state:
                continue  # not this preset's checkpoint: reported by the shape check
            rel = state[key][None, None]
            state[key] = F.interpolate(rel, (2 * grid - 1, rel.shape[-1]), mode="bilinear", align_corners=False)[0, 0]


def _sam_key_to_ours(key: str) -> str:
    return re.sub(r"(image_encoder\.blocks\.\d+\.attn\.qkv)\.", r"\1.qkv.", key)


def load_sam_weights(model: HSAM, sam_state: Union[PathLike, dict], preset: Union[str, Preset] = "vit_b") -> list[str]:
    """Load official SAM weights into an H-SAM the way the authors' code does.

    The image encoder must load completely (after the pos/rel-pos resize); every prompt-encoder and
    stage-1 decoder tensor whose name and shape match is copied (this includes SAM's first 4
    hypernetwork MLPs and first two IoU-head layers, as the authors' failed strict load does); the rest
    keeps its initialisation. Returns the names of the model tensors that were loaded.
    """
    state = read_state_dict(sam_state) if not isinstance(sam_state, dict) else dict(sam_state)
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if "image_encoder.pos_embed" not in state:
        raise CheckpointError("not a SAM checkpoint: it has no image_encoder.pos_embed")
    _resize_grid_embeddings(state, preset, model.img_size // 16)
    state = {_sam_key_to_ours(k): v for k, v in state.items()}

    own = model.state_dict()
    encoder_keys = [k for k in own if k.startswith("image_encoder.") and ".qkv.a_" not in k and ".qkv.b_" not in k]
    bad = [k for k in encoder_keys if k not in state or state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(
            f"this SAM checkpoint does not match the {model.img_size}px model's image encoder "
            f"({len(bad)} tensors missing or of another shape, e.g. {bad[0]}): is it another ViT size?"
        )
    loaded = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loaded, strict=False)
    if model.guidance is not None:
        model.guidance.prior_encoder.initialise_from(model.prompt_encoder.mask_downscaling)
    return sorted(loaded)


def _reference_key_to_ours(key: str) -> str:
    """Map a key of the authors' LoRA_Sam state dict (or released checkpoint) to ours."""
    key = re.sub(r"\.attn\.qkv\.linear_([ab])_([qv])\.", r".attn.qkv.\1_\2.", key.removeprefix("sam."))
    if not key.startswith("mask_decoder2."):
        return key
    rest = key.removeprefix("mask_decoder2.")
    if re.match(r"(self_attn2?|norm[12]|mlp|med_sel)\.", rest):
        return "hierarchical_decoder.cmattn." + rest
    rest = re.sub(r"\.norm([123])\.", lambda m: f".unused_norms.{int(m.group(1)) - 1}.", rest) if ".cross_attn_" in rest else rest
    return "hierarchical_decoder." + rest


def _ours_key_to_reference(key: str) -> str:
    key = re.sub(r"\.attn\.qkv\.([ab])_([qv])\.", r".attn.qkv.linear_\1_\2.", key)
    key = re.sub(r"\.unused_norms\.(\d)\.", lambda m: f".norm{int(m.group(1)) + 1}.", key)
    return re.sub(r"^hierarchical_decoder\.(cmattn\.)?", "mask_decoder2.", key)


def _load_strict(model: HSAM, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", mismatched))
            if keys
        )
        raise CheckpointError(f"{source} does not fit this model ({details}): check vit, num_classes and img_size")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _check_identity_normalisation(state: dict[str, torch.Tensor]) -> None:
    mean, std = state.get("sam.pixel_mean"), state.get("sam.pixel_std")
    if mean is not None and (mean.abs().max() > 0 or (std - 1).abs().max() > 0):
        raise CheckpointError("the reference model used pixel mean/std normalisation; H-SAM's recipe uses none")


def from_reference_state_dict(
    state_dict: dict[str, torch.Tensor],
    vit: Union[str, Preset] = "vit_b",
    num_classes: int = 8,
    img_size: int = 512,
    cmattn: str = "reference",
) -> HSAM:
    """Our model computing the same function as the authors' LoRA-wrapped model whose
    ``state_dict()`` (every key, base SAM included) is given."""
    _check_identity_normalisation(state_dict)
    preset_name = vit if isinstance(vit, str) else "custom"
    model = build_hsam(vit, num_classes, img_size, cmattn)
    state = {
        _reference_key_to_ours(k): v
        for k, v in state_dict.items()
        if not k.removeprefix("sam.").startswith(("prompt_encoder2.", "pixel_mean", "pixel_std"))
    }
    _load_strict(model, state, f"reference state dict ({preset_name})")
    return model


def _lora_key(index: int, kind: str) -> tuple[int, str]:
    """Authors' w_{a,b}_NNN: even NNN = q adapter, odd = v adapter of block NNN // 2."""
    return index // 2, f"{kind}_{'q' if index % 2 == 0 else 'v'}"


def load_reference_checkpoint(
    hsam_checkpoint: PathLike,
    sam_checkpoint: PathLike,
    vit: str = "vit_b",
    num_classes: int = 8,
    img_size: int = 512,
    cmattn: str = "reference",
) -> HSAM:
    """Rebuild a model from the authors' released checkpoint (LoRA + prompt encoder + both decoders)
    on top of the official SAM weights, resized as their code does."""
    released = read_state_dict(hsam_checkpoint)
    model = build_hsam(vit, num_classes, img_size, cmattn)
    load_sam_weights(model, sam_checkpoint, vit)
    state = {}
    for key, value in released.items():
        match = re.fullmatch(r"w_([ab])_(\d{3})", key)
        if match:
            block, name = _lora_key(int(match.group(2)), match.group(1))
            state[f"image_encoder.blocks.{block}.attn.qkv.{name}.weight"] = value
        elif not key.startswith("prompt_encoder2."):
            state[_reference_key_to_ours(key)] = value
    base = {k: v for k, v in model.state_dict().items() if k.startswith("image_encoder.") and k not in state}
    _load_strict(model, {**base, **state}, f"H-SAM checkpoint {Path(hsam_checkpoint).name}")
    return model


def save_reference_checkpoint(model: HSAM, path: PathLike) -> None:
    """Write the authors' checkpoint format (a plain dict, see :func:`load_reference_checkpoint`)."""
    state: dict[str, torch.Tensor] = {}
    for i, adapter in enumerate(model.lora_adapters()):
        state[f"w_a_{2 * i:03d}"] = adapter.a_q.weight.detach().clone()
        state[f"w_a_{2 * i + 1:03d}"] = adapter.a_v.weight.detach().clone()
        state[f"w_b_{2 * i:03d}"] = adapter.b_q.weight.detach().clone()
        state[f"w_b_{2 * i + 1:03d}"] = adapter.b_v.weight.detach().clone()
    for key, value in model.state_dict().items():
        if key.startswith("prompt_encoder."):
            state[key] = value
            state["prompt_encoder2." + key.removeprefix("prompt_encoder.")] = value
        elif key.startswith(("mask_decoder.", "hierarchical_decoder.")):
            state[_ours_key_to_reference(key)] = value
    torch.save(state, path)
