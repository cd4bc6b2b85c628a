"""HSAM model bundles: one safetensors file with what fine-tuning changed plus JSON metadata.

Loading never unpickles. When the model was fine-tuned from official SAM weights the frozen image
encoder is not stored (a few MB instead of hundreds); it is rebuilt from those weights, identified by
name and sha256. A model trained from scratch (the ``tiny`` preset) stores every tensor.
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from . import __version__
from .build import PRESETS, build_hsam
from .checkpoint import SAM_CHECKPOINTS, default_cache_dir, load_sam_weights
from .errors import CheckpointError, InputError
from .io import write_atomic
from .modeling.hsam import HSAM

PathLike = Union[str, os.PathLike]
BUNDLE_SUFFIX = ".hsam"
FORMAT_VERSION = 1
METADATA_KEY = "hsam"

# Distinct colours (RGB 0–1) for classes without a colour of their own.
DEFAULT_COLORS = [
    (0.90, 0.36, 0.26), (0.32, 0.62, 0.88), (0.98, 0.82, 0.26), (0.45, 0.78, 0.38),
    (0.70, 0.45, 0.85), (0.95, 0.60, 0.75), (0.35, 0.80, 0.78), (0.85, 0.55, 0.30),
]


def default_color(index: int) -> tuple[float, float, float]:
    return DEFAULT_COLORS[index % len(DEFAULT_COLORS)]


@dataclass
class BundleMetadata:
    """What a model needs to be used correctly: classes, preprocessing, provenance."""

    preset: str
    img_size: int
    num_classes: int
    class_names: list[str]
    class_colors: list[tuple[float, float, float]]
    label_values: list[int]
    preprocessing: dict
    slice_axis: str = "axial"
    terminology: list[Optional[str]] = field(default_factory=list)
    cmattn: str = "reference"
    lora_rank: int = 5
    base_checkpoint: Optional[dict] = None
    training: dict = field(default_factory=dict)
    hsam_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        n = self.num_classes
        if not (len(self.class_names) == len(self.class_colors) == len(self.label_values) == n):
            raise InputError(f"metadata must give {n} class names, colours and label values")
        if not self.terminology:
            self.terminology = [None] * n
        self.class_colors = [tuple(float(c) for c in rgb) for rgb in self.class_colors]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BundleMetadata":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _stored_state(model: HSAM, full: bool) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if full:
        return state
    return {k: v for k, v in state.items() if not k.startswith("image_encoder.") or ".qkv.a_" in k or ".qkv.b_" in k}


def save_bundle(path: PathLike, model: HSAM, metadata: BundleMetadata, overwrite: bool = False) -> Path:
    """Write the bundle atomically (temporary file, then rename). Returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; choose another name or allow overwriting")
    if not path.parent.is_dir():
        raise InputError(f"folder {path.parent} does not exist")
    merged = [a for a in model.lora_adapters() if a.merged]
    for adapter in merged:
        adapter.unmerge()
    try:
        state = _stored_state(model, full=metadata.base_checkpoint is None)
        payload = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, {METADATA_KEY: metadata.to_json()})
    finally:
        for adapter in merged:
            adapter.merge()
    write_atomic(path, lambda temporary: temporary.write_bytes(payload), overwrite=True)
    return path


def read_bundle_metadata(path: PathLike) -> BundleMetadata:
    """The bundle's metadata, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not an HSAM model or is truncated ({e})") from e
    if raw is None:
        raise CheckpointError(f"{path.name} is a safetensors file without HSAM metadata")
    try:
        return BundleMetadata.from_json(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path.name} has unreadable HSAM metadata ({e})") from e


def find_sam_checkpoint(preset: str, explicit: Optional[PathLike] = None) -> Path:
    """The official SAM file for a preset: the given path, else the download cache."""
    info = SAM_CHECKPOINTS[preset]
    path = Path(explicit) if explicit else default_cache_dir() / info.filename
    if not path.is_file():
        raise CheckpointError(
            f"this model needs the SAM {preset} weights {info.filename}: run `hsam download {preset}` "
            f"or pass the file (sha256 {info.sha256[:12]}…)"
        )
    if path.stat().st_size != info.size:
        raise CheckpointError(f"{path} is not the official {info.filename} (size {path.stat().st_size} != {info.size})")
    return path


def load_bundle(
    path: PathLike,
    map_location: Union[str, torch.device] = "cpu",
    sam_checkpoint: Optional[PathLike] = None,
    expected_preset: Optional[str] = None,
    expected_num_classes: Optional[int] = None,
) -> tuple[HSAM, BundleMetadata]:
    """Rebuild the model of a bundle (eval mode). Clear errors for a truncated file, a bundle whose
    tensors do not fit its metadata, or one made for another preset / class count than expected."""
    metadata = read_bundle_metadata(path)
    if metadata.preset not in PRESETS:
        raise CheckpointError(f"{Path(path).name} needs preset {metadata.preset!r}, unknown to HSAM {__version__}")
    if expected_preset and metadata.preset != expected_preset:
        raise CheckpointError(f"{Path(path).name} is a {metadata.preset} model, not {expected_preset}")
    if expected_num_classes and metadata.num_classes != expected_num_classes:
        raise CheckpointError(
            f"{Path(path).name} segments {metadata.num_classes} classes, not {expected_num_classes}"
        )
    model = build_hsam(metadata.preset, metadata.num_classes, metadata.img_size, metadata.cmattn, metadata.lora_rank)
    if metadata.base_checkpoint is not None:
        load_sam_weights(model, find_sam_checkpoint(metadata.preset, sam_checkpoint), metadata.preset)
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{Path(path).name} is truncated or corrupt ({e})") from e
    expected = _stored_state(model, full=metadata.base_checkpoint is None)
    missing = sorted(set(expected) - set(stored))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k].shape != stored[k].shape)
    unexpected = sorted(set(stored) - set(expected))
    if missing or wrong or unexpected:
        example = (missing or wrong or unexpected)[0]
        raise CheckpointError(
            f"{Path(path).name}: its weights do not fit a {metadata.preset} model with {metadata.num_classes} "
            f"classes at {metadata.img_size}px (e.g. {example})"
        )
    model.load_state_dict(stored, strict=False)
    return model.to(map_location).eval(), metadata
