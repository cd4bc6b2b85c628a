"""Machine-readable progress of a command (``--progress json``): one JSON object per line on stdout.

Every line is flushed at once, so a process reading the stream sees each event as it happens::

    {"event": "progress", "phase": "segment", "fraction": 0.42, "message": "slice 13/31"}
    {"event": "progress", "phase": "train", "fraction": 0.1, "message": "...", "epoch": 3, "step": 12,
     "loss": 0.52, "val_dice": 0.61}
    {"event": "result", "phase": "done", "fraction": 1.0, "message": "...", "output": "/path/to/file"}

``fraction`` is the whole command's progress in [0, 1] and never decreases; ``phase`` names the step
(``load``, ``segment``, ``write``, ``train``, ``save``, ``download``). Errors keep the CLI's one
``hsam: error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO


class JsonProgress:
    """A progress callback ``(fraction, message, **details)`` that prints JSON lines; usable as a
    context manager like the CLI's progress bar."""

    def __init__(self, phase: str, stream: TextIO | None = None) -> None:
        self.phase = phase
        self._stream = stream
        self._fraction = 0.0

    def __call__(self, fraction: float, message: str, **details: Any) -> None:
        self._fraction = max(self._fraction, min(max(float(fraction), 0.0), 1.0))
        self.emit("progress", message, **details)

    def start(self, phase: str, message: str) -> None:
        """Begin another step of the command (the fraction carries on)."""
        self.phase = phase
        self.emit("progress", message)

    def result(self, message: str, **details: Any) -> None:
        """The command's last line: it succeeded; ``details`` name what it produced."""
        self.phase, self._fraction = "done", 1.0
        self.emit("result", message, **details)

    def emit(self, event: str, message: str, **details: Any) -> None:
        record = {"event": event, "phase": self.phase, "fraction": round(self._fraction, 6), "message": message}
        record.update({key: _plain(value) for key, value in details.items()})
        stream = self._stream or sys.stdout
        stream.write(json.dumps(record) + "\n")
        stream.flush()

    def __enter__(self) -> JsonProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _plain(value: Any) -> Any:
    """JSON-safe values: paths as strings, NaN and infinities as null, lists and dicts of such values."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)
