"""The official SAM weight files: names, URLs, sizes, sha256, the download cache, and a sha256
verification that is done once per file and remembered.

No torch here: ``hsam info`` and the command line's checks use it before loading the network code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import HSAMError
from .files import write_bytes_atomic

PathLike = Union[str, os.PathLike]
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# Beside a verified file ``x.pth``: ``x.pth.sha256`` records its digest for its size and modification time.
VERIFIED_SUFFIX = ".sha256"


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


def default_cache_dir() -> Path:
    """Where downloaded SAM weights live: $HSAM_HOME/checkpoints, else ~/.cache/hsam/checkpoints."""
    home = os.environ.get("HSAM_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "hsam") / "checkpoints"


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_sha256(path: PathLike) -> str:
    """``sha256_file(path)``, computed once: the digest is remembered beside the file (when its folder
    is writable) with the size and modification time it was computed for."""
    path = Path(path)
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = path.with_name(path.name + VERIFIED_SUFFIX)
    remembered = _read_record(record)
    if remembered is not None and {k: remembered.get(k) for k in key} == key:
        return remembered["sha256"]
    digest = sha256_file(path)
    try:
        write_bytes_atomic(record, json.dumps({**key, "sha256": digest}).encode("utf-8"), overwrite=True)
    except HSAMError:  # a read-only folder: verified again next time
        pass
    return digest


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
