"""The HSAM models folder: fine-tuned bundles (``*.hsam``) and the official SAM weights cache."""

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hsam.errors import CheckpointError, InputError

MODELS_DIR_ENV = "HSAM_MODELS_DIR"
BUNDLE_SUFFIX = ".hsam"
# Names of the official SAM weights (``hsam.checkpoint.SAM_CHECKPOINTS``), listed here so that the
# panels can show them before PyTorch is installed.
SAM_WEIGHTS_NAMES = ("vit_b", "vit_l", "vit_h")


def models_dir(create: bool = True) -> Path:
    """``$HSAM_MODELS_DIR``, else ``~/.HSAM/models``."""
    folder = Path(os.environ.get(MODELS_DIR_ENV) or Path.home() / ".HSAM" / "models")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class ModelEntry:
    """A bundle in the models folder and its metadata (read without loading weights)."""

    path: Path
    metadata: "BundleMetadata"  # noqa: F821 (hsam.bundle, imported on demand: it needs torch)

    @property
    def name(self) -> str:
        return self.path.stem

    def describe(self) -> str:
        classes = ", ".join(self.metadata.class_names)
        return f"{self.name} ({self.metadata.preset}, {self.metadata.num_classes} classes: {classes})"


def bundle_paths(folder: Optional[Path] = None) -> list[Path]:
    """Bundle files in the models folder, sorted by name (cheap: no file is opened)."""
    folder = Path(folder) if folder else models_dir()
    return sorted(folder.glob(f"*{BUNDLE_SUFFIX}"), key=lambda path: path.stem.lower())


def read_model(path) -> ModelEntry:
    """Metadata of one bundle file; ``CheckpointError`` if it is not an HSAM bundle."""
    from hsam.bundle import read_bundle_metadata

    return ModelEntry(Path(path), read_bundle_metadata(path))


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


def sam_weights_path(name: str) -> Path:
    """Where the official SAM weights ``name`` (vit_b, vit_l, vit_h) live once downloaded."""
    from hsam.checkpoint import SAM_CHECKPOINTS, default_cache_dir

    if name not in SAM_CHECKPOINTS:
        raise InputError(f"unknown SAM weights '{name}' (choose from {', '.join(SAM_CHECKPOINTS)})")
    return default_cache_dir() / SAM_CHECKPOINTS[name].filename


def available_sam_weights() -> list[str]:
    """Official SAM weights already in the cache (complete files only)."""
    from hsam.checkpoint import SAM_CHECKPOINTS

    return [
        name
        for name, info in SAM_CHECKPOINTS.items()
        if sam_weights_path(name).is_file() and sam_weights_path(name).stat().st_size == info.size
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
