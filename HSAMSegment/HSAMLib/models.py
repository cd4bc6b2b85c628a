"""The HSAM models folder: fine-tuned bundles (``*.hsam``) and the official SAM weights cache.

Bundle metadata is read from the safetensors header (``safetensors`` with numpy), never with torch:
this module runs in Slicer's own process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hsam.runtime.errors import CheckpointError, InputError

MODELS_DIR_ENV = "HSAM_MODELS_DIR"
HSAM_HOME_ENV = "HSAM_HOME"
BUNDLE_SUFFIX = ".hsam"
METADATA_KEY = "hsam"  # ``hsam.models.bundle.METADATA_KEY``
# The official SAM weights (``hsam.models.sam_weights.SAM_CHECKPOINTS``): file names and sizes, listed here so
# that the panels can show them without torch.
SAM_WEIGHTS = {
    "vit_b": ("sam_vit_b_01ec64.pth", 375042383),
    "vit_l": ("sam_vit_l_0b3195.pth", 1249524607),
    "vit_h": ("sam_vit_h_4b8939.pth", 2564550879),
}
SAM_WEIGHTS_NAMES = tuple(SAM_WEIGHTS)


def models_dir(create: bool = True) -> Path:
    """``$HSAM_MODELS_DIR``, else ``~/.HSAM/models``."""
    folder = Path(os.environ.get(MODELS_DIR_ENV) or Path.home() / ".HSAM" / "models")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class ModelEntry:
    """A bundle in the models folder and its metadata (``hsam.models.bundle.BundleMetadata`` fields as a
    dict, read without loading weights)."""

    path: Path
    metadata: dict

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.get("class_names", []))

    def describe(self) -> str:
        classes = ", ".join(self.class_names)
        return f"{self.name} ({self.metadata.get('preset')}, {len(self.class_names)} classes: {classes})"


def bundle_paths(folder: Optional[Path] = None) -> list[Path]:
    """Bundle files in the models folder, sorted by name (cheap: no file is opened)."""
    folder = Path(folder) if folder else models_dir()
    return sorted(folder.glob(f"*{BUNDLE_SUFFIX}"), key=lambda path: path.stem.lower())


def read_model(path) -> ModelEntry:
    """Metadata of one bundle file; ``CheckpointError`` if it is not an HSAM bundle."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not an HSAM model or is truncated ({e})") from e
    try:
        metadata = json.loads(raw) if raw is not None else None
    except ValueError as e:
        raise CheckpointError(f"{path.name} has unreadable HSAM metadata ({e})") from e
    if not isinstance(metadata, dict) or "preset" not in metadata:
        raise CheckpointError(f"{path.name} is a safetensors file without HSAM metadata")
    return ModelEntry(path, metadata)


def list_models(folder: Optional[Path] = None) -> tuple[list[ModelEntry], list[str]]:
    """Bundles in the models folder, sorted by name, and one line per file that could not be read."""
    entries, problems = [], []
    for path in bundle_paths(folder):
        try:
            entries.append(read_model(path))
        except CheckpointError as e:
            problems.append(str(e))
            logging.warning("HSAM: skipping %s: %s", path, e)
    return entries, problems


def sam_cache_dir() -> Path:
    """The SAM weights cache: ``$HSAM_HOME/checkpoints``, else ``~/.cache/hsam/checkpoints``
    (``hsam.models.sam_weights.default_cache_dir``)."""
    home = os.environ.get(HSAM_HOME_ENV)
    return Path(home) / "checkpoints" if home else Path.home() / ".cache" / "hsam" / "checkpoints"


def sam_weights_path(name: str) -> Path:
    """Where the official SAM weights ``name`` (vit_b, vit_l, vit_h) live once downloaded."""
    if name not in SAM_WEIGHTS:
        raise InputError(f"unknown SAM weights '{name}' (choose from {', '.join(SAM_WEIGHTS)})")
    return sam_cache_dir() / SAM_WEIGHTS[name][0]


def available_sam_weights() -> list[str]:
    """Official SAM weights already in the cache (complete files only)."""
    return [
        name
        for name, (_, size) in SAM_WEIGHTS.items()
        if sam_weights_path(name).is_file() and sam_weights_path(name).stat().st_size == size
    ]


def safe_model_name(name: str) -> str:
    """A file-name-safe version of a user-typed model name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return cleaned or "model"


def unique_model_path(name: str, folder: Optional[Path] = None) -> Path:
    """``folder/<name>.hsam``, with ``-2``, ``-3``, … appended if that file exists."""
    folder = Path(folder) if folder else models_dir()
    stem = safe_model_name(name)
    path, counter = folder / f"{stem}{BUNDLE_SUFFIX}", 2
    while path.exists():
        path, counter = folder / f"{stem}-{counter}{BUNDLE_SUFFIX}", counter + 1
    return path


def import_model_file(source, folder: Optional[Path] = None) -> ModelEntry:
    """Copy a bundle into the models folder (offline installs); the copy keeps a unique name."""
    source = Path(source)
    read_model(source)  # refuse anything that is not a readable bundle before copying
    target = unique_model_path(source.stem, folder)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return read_model(target)
