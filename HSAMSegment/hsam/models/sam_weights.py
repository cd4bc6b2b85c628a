"""The official SAM weight files: names, URLs, sizes, sha256, the download cache, and a sha256
verification that is done once per file and remembered in HSAM's user cache (never beside the file).

No torch here: ``hsam info`` and the command line's checks use it before loading the network code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..runtime.errors import CheckpointError, HSAMError, InputError
from ..volumes.files import real_path, write_bytes_atomic

PathLike = Union[str, os.PathLike]
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class SamCheckpointInfo:
    filename: str
    sha256: str
    size: int

    @property
    def url(self) -> str:
        return SAM_URL + self.filename


SAM_CHECKPOINTS: dict[str, SamCheckpointInfo] = {
    "vit_b": SamCheckpointInfo(
        "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375042383
    ),
    "vit_l": SamCheckpointInfo(
        "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1249524607
    ),
    "vit_h": SamCheckpointInfo(
        "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879
    ),
}


def cache_home() -> Path:
    """HSAM's user cache folder: $HSAM_HOME, else ~/.cache/hsam."""
    home = os.environ.get("HSAM_HOME")
    return Path(home) if home else Path.home() / ".cache" / "hsam"


def default_cache_dir() -> Path:
    """Where downloaded SAM weights live: $HSAM_HOME/checkpoints, else ~/.cache/hsam/checkpoints."""
    return cache_home() / "checkpoints"


def sha256_record(path: PathLike) -> Path:
    """Where the digest of ``path`` is remembered: ``<cache_home>/sha256/<hash of its real path>.json``."""
    name = hashlib.sha256(real_path(path).encode("utf-8")).hexdigest()[:32]
    return cache_home() / "sha256" / f"{name}.json"


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_sha256(path: PathLike) -> str:
    """``sha256_file(path)``, computed once: the digest is remembered in ``sha256_record(path)`` with
    the file's path, size and modification time (a digest only, never a verdict on the file)."""
    key = _record_key(path)
    record = sha256_record(path)
    remembered = _read_record(record)
    if remembered is not None and {k: remembered.get(k) for k in key} == key:
        return remembered["sha256"]
    digest = sha256_file(path)
    _write_record(record, {**key, "sha256": digest})  # the key from before hashing: a change meanwhile shows
    return digest


def remember_sha256(path: PathLike, digest: str) -> None:
    """Record ``digest``, just computed, as the sha256 of ``path`` as it is now."""
    _write_record(sha256_record(path), {**_record_key(path), "sha256": digest})


def _record_key(path: PathLike) -> dict:
    stat = Path(path).stat()
    return {"path": real_path(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_record(record: Path, data: dict) -> None:
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(record, json.dumps(data).encode("utf-8"), overwrite=True)
    except (OSError, HSAMError):  # no writable cache: verified again next time
        pass


def _read_record(record: Path) -> Optional[dict]:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = isinstance(data, dict) and isinstance(data.get("sha256"), str) and len(data["sha256"]) == 64
    return data if valid else None


def identify_sam_checkpoint(path: PathLike) -> Optional[str]:
    """The SAM preset whose official file this is (size, then sha256), or None."""
    size = Path(path).stat().st_size
    for name, info in SAM_CHECKPOINTS.items():
        if size == info.size and cached_sha256(path) == info.sha256:
            return name
    return None


def check_sam_checkpoint(path: PathLike, preset: str) -> None:
    """Refuse anything but the official SAM weights of ``preset`` (size, then sha256)."""
    if preset not in SAM_CHECKPOINTS:
        raise InputError(f"the {preset} preset has no official SAM weights")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint not found: {path}")
    if identify_sam_checkpoint(path) != preset:
        raise CheckpointError(f"{path.name} is not the official SAM {preset} file")
