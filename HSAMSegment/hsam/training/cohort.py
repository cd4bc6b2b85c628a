"""Cohorts on the command line: pairs of files given one after the other, or a manifest.

A manifest is a CSV file with a header row, or a JSON list of objects (or ``{"cases": [...]}``), whose
columns or keys name the two files of each case (``image`` and ``labels`` for fine-tuning,
``prediction`` and ``reference`` for evaluation), with optional ``slices`` (training slice indices,
separated by spaces, commas or semicolons) and ``name``. Relative paths are relative to the manifest.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..runtime.errors import InputError


@dataclass
class CohortCase:
    """Two files that go together, with the case's name and, for training, its slices."""

    first: Path
    second: Path
    name: str
    slices: Optional[list[int]] = None


def cases_from_arguments(
    paths: Sequence[str], manifest: Optional[str], columns: tuple[str, str]
) -> list[CohortCase]:
    """The cases of ``paths`` (A1 B1 A2 B2 …) followed by those of ``manifest``; every file must exist."""
    if len(paths) % 2:
        raise InputError(f"files come in pairs ({' and '.join(columns)}); got {len(paths)} paths")
    cases = [CohortCase(Path(a), Path(b), Path(a).name) for a, b in zip(paths[::2], paths[1::2])]
    if manifest is not None:
        cases += read_manifest(Path(manifest), columns)
    if not cases:
        raise InputError(f"give {' and '.join(columns)} files, or --manifest")
    for case in cases:
        for path in (case.first, case.second):
            if not path.exists():
                raise InputError(f"{case.name}: file not found: {path}")
    return cases


def read_manifest(path: Path, columns: tuple[str, str]) -> list[CohortCase]:
    """The cases a CSV or JSON manifest lists (see the module's docstring)."""
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the manifest {path.name}: {e}") from e
    rows = _json_rows(text, path) if path.suffix.lower() == ".json" else list(csv.DictReader(text.splitlines()))
    if not rows:
        raise InputError(f"the manifest {path.name} lists no case")
    return [_case(row, index, path, columns) for index, row in enumerate(rows, start=1)]


def _json_rows(text: str, path: Path) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"the manifest {path.name} is not valid JSON ({e.msg}, line {e.lineno})") from e
    rows = data.get("cases") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise InputError(f"the manifest {path.name} must be a list of cases or {{\"cases\": [...]}}")
    return rows


def _case(row: object, index: int, manifest: Path, columns: tuple[str, str]) -> CohortCase:
    where = f"{manifest.name}, case {index}"
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with {' and '.join(columns)}")
    files = []
    for column in columns:
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: no {column!r} file")
        files.append(manifest.parent / value.strip())
    name = str(row.get("name") or files[0].name)
    return CohortCase(files[0], files[1], name, _slices(row.get("slices"), where))


def _slices(value: object, where: str) -> Optional[list[int]]:
    if value is None or value == "":
        return None
    items = value if isinstance(value, list) else re.split(r"[\s,;]+", str(value).strip())
    try:
        return [int(item) for item in items if str(item) != ""]
    except (TypeError, ValueError):
        raise InputError(f"{where}: slices must be integers, got {value!r}") from None
