"""Download the official SAM weights into the cache: streamed to ``<file>.part``, resumed with an
HTTP Range request after an interruption, sha256-checked before the final rename."""

import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Callable, Optional, Union

from ..runtime.errors import Cancelled, CheckpointError, HSAMError, InputError
from ..runtime.version import __version__
from .sam_weights import SAM_CHECKPOINTS, SamCheckpointInfo, default_cache_dir, remember_sha256, sha256_file

PathLike = Union[str, os.PathLike]
CHUNK_SIZE = 1 << 20
TIMEOUT_SECONDS = 30
HTTP_PARTIAL_CONTENT = 206
HTTP_RANGE_NOT_SATISFIABLE = 416


def download_sam_weights(
    name: str,
    cache_dir: Optional[PathLike] = None,
    progress: Optional[Callable[[float, str], None]] = None,
    cancel: Optional[threading.Event] = None,
) -> Path:
    """The path of SAM's ``name`` weights (``vit_b``, ``vit_l``, ``vit_h``) in ``cache_dir`` (default
    ``hsam.models.sam_weights.default_cache_dir()``), downloaded first when missing.

    ``progress(fraction, message)`` follows the download; ``cancel.is_set()`` stops it with
    ``Cancelled``, keeping the partial file for the next call to resume.
    """
    if name not in SAM_CHECKPOINTS:
        raise InputError(f"unknown SAM weights {name!r}; choose one of {', '.join(SAM_CHECKPOINTS)}")
    info = SAM_CHECKPOINTS[name]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / info.filename
    if target.is_file() and target.stat().st_size == info.size:
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HSAMError(f"cannot create the cache folder {folder}: {e.strerror or e}") from e
    partial = target.with_name(target.name + ".part")
    report = progress or (lambda fraction, message: None)

    _fetch(info, partial, folder, report, cancel)
    report(1.0, f"checking the sha256 of {info.filename}")
    if partial.stat().st_size != info.size or sha256_file(partial) != info.sha256:
        partial.unlink()
        raise CheckpointError(
            f"the downloaded {info.filename} does not have the expected sha256 {info.sha256[:12]}…; "
            "it was deleted, run the download again"
        )
    os.replace(partial, target)
    remember_sha256(target, info.sha256)  # verified just now: not hashed again on first use
    return target


def _fetch(info: SamCheckpointInfo, partial: Path, folder: Path, report, cancel) -> None:
    """Append the missing bytes of ``info.url`` to ``partial`` (starting over if the server ignores the range)."""
    offset = partial.stat().st_size if partial.is_file() else 0
    if offset > info.size:
        partial.unlink()
        offset = 0
    if offset == info.size:
        return
    host = urllib.parse.urlsplit(info.url).hostname
    headers = {"User-Agent": f"hsam/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(info.url, headers=headers), timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as e:
        if e.code == HTTP_RANGE_NOT_SATISFIABLE:
            partial.unlink()
            return _fetch(info, partial, folder, report, cancel)
        raise HSAMError(f"downloading {info.url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise HSAMError(
            f"cannot reach {host}: {reason}; copy {info.filename} into {folder} or pass --sam-checkpoint"
        ) from e

    with response:
        if offset and response.status != HTTP_PARTIAL_CONTENT:
            offset = 0
        done = offset
        try:
            with open(partial, "ab" if offset else "wb") as f:
                while True:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"download of {info.filename} cancelled; run it again to resume")
                    chunk = response.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    f.write(chunk)
                    done += len(chunk)
                    report(min(done / info.size, 1.0), f"{info.filename}: {done / 2**20:.0f}/{info.size / 2**20:.0f} MiB")
        except (OSError, HTTPException) as e:
            raise HSAMError(
                f"the download of {info.filename} from {host} was interrupted ({e}); run it again to resume"
            ) from e
    if done < info.size:
        raise HSAMError(
            f"the download of {info.filename} stopped at {done} of {info.size} bytes; run it again to resume"
        )
