"""The header of a safetensors file, read and checked without torch and without reading any tensor.

Layout: an 8-byte little-endian length N, N bytes of JSON (``{name: {"dtype", "shape",
"data_offsets"}, "__metadata__": {str: str}}``), then the tensors' bytes. The header is refused if it
does not fit the file: a truncated file, tensors whose byte ranges do not match their shapes, overlap,
or leave bytes unaccounted for.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..runtime.errors import CheckpointError

PathLike = Union[str, os.PathLike]
MAX_HEADER_BYTES = 100 * 2**20
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: PathLike) -> SafetensorsHeader:
    """The tensors' dtypes and shapes and the string metadata of ``path``; ``CheckpointError`` (one
    line) for anything but a complete, consistent safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path.name} is not a safetensors model file or is truncated")
            header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path.name} has an unreadable header ({type(error).__name__})") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path.name}: {error.strerror or error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has an invalid header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path.name} has invalid metadata (not a string map)")
    return SafetensorsHeader(_tensors(header, size - 8 - length, path.name), metadata)


def _tensors(header: dict, data_bytes: int, name: str) -> dict[str, TensorInfo]:
    """The entries of ``header`` checked against the ``data_bytes`` that follow it."""
    tensors, ranges = {}, []
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (
                dtype in DTYPE_BYTES
                and isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
                and type(start) is int and type(end) is int and 0 <= start <= end
            )
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{name} has an invalid header entry for tensor {str(key)[:80]!r}")
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{name}: tensor {key[:80]!r} of shape {shape} does not fit its {end - start} bytes")
        tensors[key] = TensorInfo(dtype, tuple(shape))
        ranges.append((start, end))
    position = 0
    for start, end in sorted(ranges):
        if start != position:
            raise CheckpointError(f"{name} has overlapping or missing tensor data")
        position = end
    if position != data_bytes:
        state = "truncated" if position > data_bytes else "longer than its header says"
        raise CheckpointError(f"{name} is {state}: its tensors take {position} bytes, the file holds {data_bytes}")
    return tensors
