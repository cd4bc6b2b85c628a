"""Checks of a NIfTI file's raw voxels that ITK does not make.

ITK's NIfTI reader fills the voxels missing from a short file with zeros and reads NaN and infinite
voxels as zeros, without an error. ``check_nifti`` reads the header (NIfTI-1 or NIfTI-2) and streams
the voxel data (decompressed for ``.nii.gz``) to refuse both.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..runtime.errors import InputError

CHUNK_BYTES = 1 << 22
# NIfTI datatype code -> numpy type (the scalar and complex ones ITK reads).
DATATYPES = {
    2: "u1", 4: "i2", 8: "i4", 16: "f4", 32: "c8", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
    1024: "i8", 1280: "u8", 1792: "c16", 128: "u1", 2304: "u1",
}
COMPONENTS = {128: 3, 2304: 4}  # RGB24, RGBA32: several bytes per voxel
# Header size -> (offset, struct format) of the fields used, and the single-file magic.
LAYOUTS = {
    348: {"dim": (40, "8h"), "datatype": (70, "h"), "vox_offset": (108, "f"), "magic": (344, b"n+1\0")},
    540: {"dim": (16, "8q"), "datatype": (12, "h"), "vox_offset": (168, "q"), "magic": (4, b"n+2\0\r\n\x1a\n")},
}


def check_nifti(path: Path) -> None:
    """Raise ``InputError`` if ``path`` (``.nii``, ``.nii.gz``) holds fewer voxel bytes than its header
    announces, or NaN or infinite voxels."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            offset, dtype, count = _layout(f.read(540), path.name)
            f.seek(offset)
            read, bad = _scan(f, dtype, count)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path.name} is truncated or corrupt ({error})") from None
    if read < count * dtype.itemsize:
        raise InputError(
            f"{path.name} is truncated: its header announces {count * dtype.itemsize} bytes of voxels, the file holds {read}"
        )
    if bad:
        raise InputError(f"{path.name} has {bad} NaN or infinite voxels")


def _layout(header: bytes, name: str) -> tuple[int, np.dtype, int]:
    """(data offset, voxel dtype, number of values) from a NIfTI-1 or NIfTI-2 header."""
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
        if size in LAYOUTS and len(header) >= size:
            layout = LAYOUTS[size]
            break
    else:
        raise InputError(f"{name} is not a NIfTI file or is truncated (no valid header)")
    magic_at, magic = layout["magic"]
    if header[magic_at:magic_at + len(magic)] != magic:
        raise InputError(f"{name} is not a single-file NIfTI image (.nii)")
    dim, (datatype,), (offset,) = (struct.unpack_from(order + layout[key][1], header, layout[key][0])
                                   for key in ("dim", "datatype", "vox_offset"))
    if datatype not in DATATYPES:
        raise InputError(f"{name} has NIfTI voxel type {datatype}, which HSAM cannot read")
    if not 1 <= dim[0] <= 7 or any(n < 1 for n in dim[1:dim[0] + 1]):
        raise InputError(f"{name} has an invalid size {dim[1:dim[0] + 1]} in its header")
    count = int(np.prod(dim[1:dim[0] + 1], dtype=object)) * COMPONENTS.get(datatype, 1)
    return int(offset), np.dtype(order + DATATYPES[datatype]), count


def _scan(f: BinaryIO, dtype: np.dtype, count: int) -> tuple[int, int]:
    """(bytes read up to the announced size, non-finite values among them)."""
    wanted, read, bad = count * dtype.itemsize, 0, 0
    floating = dtype.kind in "fc"
    pending = b""
    while read < wanted:
        chunk = f.read(min(CHUNK_BYTES, wanted - read))
        if not chunk:
            break
        read += len(chunk)
        if floating:
            data = pending + chunk
            usable = len(data) - len(data) % dtype.itemsize
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype))))
            pending = data[usable:]
    return read, bad
