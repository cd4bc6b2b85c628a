"""Output files written safely: complete and checked before they appear, all or none, never over an input.

Each output is written to a temporary file beside it, ``.hsam-tmp-<host>-<pid>-<random><suffix>``
(short whatever the output's name, recognisable, created with the mode the umask allows), flushed to
disk, checked by the writer's ``verify`` (SimpleITK's NIfTI writer, for one, can leave a short file
without an error), and only then renamed onto the output's name. A command that writes several
files renames them once all of them are written and checked. Temporaries that a killed process left
behind are removed by the next write into the same folder. A command may first claim its outputs
(``Outputs.claim``: an empty ``.hsam-tmp-<host>-<pid>-claim-<hash>-<time>``), so that a second command
writing the same file is refused before its work rather than after.

This module imports nothing heavy, so that the command line checks its outputs before loading torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from ..runtime.errors import InputError

PathLike = Union[str, os.PathLike]
TEMPORARY_PREFIX = ".hsam-tmp-"
# Suffixes of two parts that SimpleITK needs to recognise a format (the temporary keeps the suffix).
COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd")
LONGEST_SUFFIX = 16
# Where the writer's process cannot be looked up (Windows), a temporary this old is abandoned.
ABANDONED_AFTER_SECONDS = 24 * 3600
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def file_suffix(path: PathLike) -> str:
    """The lower-case format suffix of ``path``: ``.nii.gz``, ``.seg.nrrd`` or its last suffix."""
    name = Path(path).name.lower()
    return next((s for s in COMPOUND_SUFFIXES if name.endswith(s)), Path(name).suffix)


def real_path(path: PathLike) -> str:
    """``path`` with links resolved, in the file system's case convention: equal for the same file."""
    return os.path.normcase(os.path.realpath(path))


def check_writable(path: PathLike, overwrite: bool) -> None:
    """Fail (``InputError``) unless ``path`` can be created, or replaced when ``overwrite``."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"folder {folder} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a folder")
    if path.is_symlink() and not path.exists() and not overwrite:  # else refused only after the work
        raise InputError(f"{path} is a broken symbolic link (to {os.readlink(path)}); pass --overwrite to replace the link")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass --overwrite to replace it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to folder {folder}: it is not writable")


def check_distinct(outputs: Iterable[PathLike], inputs: Iterable[PathLike]) -> None:
    """Fail unless every output differs from every input (symbolic and hard links included), lies
    outside every input folder, and differs from the other outputs."""
    inputs = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    seen: dict[str, Path] = {}
    for output in (Path(p) for p in outputs if p is not None):
        real = real_path(output)
        if real in seen or any(_same_file(output, other) for other in seen.values()):
            raise InputError(f"{output} is given for two outputs")
        seen[real] = output
        for source in inputs:
            if _same_file(output, source):
                raise InputError(f"the output {output} is the input {source}")
            if source.is_dir() and Path(real).is_relative_to(real_path(source)):
                raise InputError(f"the output {output} is inside the input folder {source}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether both exist and are one file (the same inode: hard and symbolic links included)."""
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _owner(entry: Path) -> Optional[int]:
    """The process id in the name of a temporary or claim made on this host, else None."""
    host, _, rest = entry.name[len(TEMPORARY_PREFIX):].partition("-")
    pid = rest.partition("-")[0]
    return int(pid) if host == _HOST and pid.isdigit() else None


def remove_abandoned_temporaries(folder: PathLike) -> None:
    """Delete this host's temporaries and claims in ``folder`` whose process has ended."""
    for entry in Path(folder).glob(TEMPORARY_PREFIX + "*"):
        pid = _owner(entry)
        if pid is not None and _abandoned(entry, pid):
            with contextlib.suppress(OSError):
                entry.unlink()


def _abandoned(temporary: Path, pid: int) -> bool:
    if pid == os.getpid():
        return False
    if os.name == "nt":  # os.kill would terminate the process there
        try:
            return time.time() - temporary.stat().st_mtime > ABANDONED_AFTER_SECONDS
        except OSError:  # removed meanwhile
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _create_temporary(path: Path) -> Path:
    suffix = file_suffix(path)
    suffix = suffix if len(suffix) <= LONGEST_SUFFIX else ""
    while True:
        temporary = path.parent / f"{TEMPORARY_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies
            return temporary
        except FileExistsError:
            continue


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _flush_folder(folder: Path) -> None:
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the data itself is on disk
        pass
    finally:
        os.close(fd)


def expect_size(size: int) -> Callable[[Path], None]:
    """A ``verify`` for writers of a known number of bytes."""

    def verify(temporary: Path) -> None:
        written = temporary.stat().st_size
        if written != size:
            raise OSError(f"{written} of {size} bytes written (is the disk full?)")

    return verify


def error_reason(error: BaseException) -> str:
    """The informative last line of an error message (ITK's span several lines)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class Outputs:
    """Files published together: ``stage`` writes and checks each one under a temporary name,
    ``publish`` renames them all onto their names; leaving the ``with`` block without publishing
    (an error, Ctrl-C) deletes the temporaries and leaves the outputs as they were."""

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._staged: list[tuple[Path, Path]] = []
        self._claims: list[Path] = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def claim(self, paths: Iterable[Optional[PathLike]]) -> None:
        """Mark ``paths`` as being written by this process until the ``with`` block ends, so that
        another process about to write one of them is refused before its work, not after. Of two
        processes claiming a file at once, the earlier claim wins."""
        for path in (Path(p) for p in paths if p is not None):
            remove_abandoned_temporaries(path.parent)
            tag = hashlib.sha256(real_path(path).encode()).hexdigest()[:12]
            mine = path.parent / f"{TEMPORARY_PREFIX}{_HOST}-{os.getpid()}-claim-{tag}-{time.time_ns()}"
            try:
                os.close(os.open(mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except OSError as error:
                raise InputError(f"cannot write {path}: {error_reason(error)}") from None
            self._claims.append(mine)
            if any(_claimed_before(other, mine) for other in path.parent.glob(f"{TEMPORARY_PREFIX}*-claim-{tag}-*")):
                raise InputError(f"another hsam process is writing {path}; wait for it or choose another name")

    def stage(self, path: PathLike, write: Callable[[Path], None], verify: Optional[Callable[[Path], None]] = None) -> None:
        """Call ``write(temporary)`` (the temporary keeps ``path``'s suffix, so that SimpleITK picks the
        format), flush it to disk and call ``verify(temporary)``, which raises if the file is wrong."""
        path = Path(path)
        check_writable(path, self.overwrite)
        check_distinct([*(p for p, _ in self._staged), path], [])
        remove_abandoned_temporaries(path.parent)
        temporary = _create_temporary(path)
        self._staged.append((path, temporary))
        try:
            write(temporary)
            _flush_to_disk(temporary)
            if verify is not None:
                verify(temporary)
        except (RuntimeError, OSError, ValueError) as error:
            raise InputError(f"cannot write {path}: {error_reason(error)}") from None

    def publish(self) -> None:
        """Rename every staged file onto its name (never over a file created meanwhile unless
        overwriting). If a rename fails, the files this call created are removed again (files it
        replaced cannot be brought back)."""
        created: list[Path] = []
        try:
            for path, temporary in self._staged:
                existed = path.exists()
                self._rename(temporary, path)
                if not existed:
                    created.append(path)
        except (OSError, InputError) as error:
            for done in created:
                with contextlib.suppress(OSError):
                    done.unlink()
            if isinstance(error, InputError):
                raise
            raise InputError(f"cannot write {path}: {error_reason(error)}") from None
        finally:
            for folder in {path.parent for path, _ in self._staged}:
                _flush_folder(folder)
            self.discard()

    def discard(self) -> None:
        """Delete the staged temporaries and release the claims."""
        for temporary in [*(temporary for _, temporary in self._staged), *self._claims]:
            with contextlib.suppress(OSError):
                temporary.unlink()
        self._staged, self._claims = [], []

    def _rename(self, temporary: Path, path: Path) -> None:
        if self.overwrite:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)  # fails if another process created the file since it was checked
        except FileExistsError:
            raise InputError(f"{path} was created by someone else meanwhile; pass --overwrite to replace it") from None
        except OSError:  # a file system without hard links
            if os.path.lexists(path):
                raise InputError(f"{path} was created by someone else meanwhile; pass --overwrite to replace it") from None
            os.replace(temporary, path)
            return
        temporary.unlink()


def _claimed_before(other: Path, mine: Path) -> bool:
    """Whether ``other`` is a live claim on this host made before ``mine`` (by the time in their
    names, file times being too coarse; ties by name)."""
    pid = _owner(other)
    if other == mine or pid is None or _abandoned(other, pid):
        return False
    return _claim_order(other) < _claim_order(mine)


def _claim_order(claim: Path) -> tuple[int, str]:
    stamp = claim.name.rpartition("-")[2]
    return int(stamp) if stamp.isdigit() else 0, claim.name


def write_atomic(
    path: PathLike,
    write: Callable[[Path], None],
    overwrite: bool = False,
    verify: Optional[Callable[[Path], None]] = None,
    outputs: Optional[Outputs] = None,
) -> None:
    """Stage ``path`` in ``outputs`` (published with the others), or write it on its own: either way
    nothing appears under ``path`` unless it is complete."""
    if outputs is not None:
        outputs.stage(path, write, verify)
        return
    with Outputs(overwrite) as own:
        own.stage(path, write, verify)
        own.publish()


def write_bytes_atomic(path: PathLike, payload: bytes, overwrite: bool = False, outputs: Optional[Outputs] = None) -> None:
    """``write_atomic`` of ``payload``, its size checked."""
    write_atomic(path, lambda temporary: temporary.write_bytes(payload), overwrite, expect_size(len(payload)), outputs)
