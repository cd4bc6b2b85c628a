"""What the commands share: output suffixes, checks of paths before any work, the progress reporter,
argument types."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..runtime.errors import InputError, printable
from ..runtime.progress import JsonProgress
from ..volumes.files import check_writable

SEGMENTATION_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
PROBABILITY_SUFFIXES = (".npy", ".nrrd", ".nii.gz", ".nii", ".mha")


def _check_output(path: Path, overwrite: bool, allowed: Sequence[str], what: str) -> None:
    """Fail before any work when ``path`` has the wrong suffix or cannot be written."""
    if not path.name.lower().endswith(tuple(allowed)):
        raise InputError(f"{what} {printable(path.name)} must end with {', '.join(allowed)}")
    check_writable(path, overwrite)


def _check_input(path: Optional[str], what: str) -> None:
    """Fail before any work when the file or folder ``path`` (if given) cannot be read."""
    if path is None:
        return
    if not Path(path).exists():
        raise InputError(f"{what} not found: {printable(path)}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {printable(path)} is not readable (permission denied)")


class _ProgressBar:
    """A tqdm bar driven by ``(fraction, message)`` callbacks, shown from the first callback on (an
    early error stays a single line); silent when ``enabled`` is False. When stderr is not a terminal
    (logs, CI), a line per phase and at most one every ``LOG_INTERVAL`` seconds instead."""

    STEPS = 1000
    LOG_INTERVAL = 10.0

    def __init__(self, description: str, enabled: bool = True) -> None:
        self._description = description
        self._enabled = enabled
        self._bar = None
        self._lines = not sys.stderr.isatty()
        self._last_line = -math.inf
        self._phase: Optional[str] = None  # shown once the phase reports progress or ends well

    def _line(self, text: str) -> None:
        if self._enabled:
            print(f"{self._description}: {text}", file=sys.stderr, flush=True)

    def _show_phase(self) -> None:
        if self._phase is not None:
            self._line(self._phase)
            self._phase = None

    def __call__(self, fraction: float, message: str, **details) -> None:
        if self._lines:
            self._show_phase()
            if time.monotonic() - self._last_line >= self.LOG_INTERVAL or fraction >= 1.0:
                self._line(f"{fraction:4.0%} {message}")
                self._last_line = time.monotonic()
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.STEPS, desc=self._description, disable=not self._enabled, file=sys.stderr,
                dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
            )
        self._bar.update(max(0, round(fraction * self.STEPS) - self._bar.n))
        self._bar.set_postfix_str(message, refresh=True)

    def start(self, phase: str, message: str) -> None:
        """A new step of the command; the bar shows it with the next callback, a log as a line."""
        if self._lines:
            self._show_phase()
            self._phase = message

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        if exc_type is None:
            self._show_phase()


def _progress(args: argparse.Namespace, description: str, phase: str, enabled: bool = True):
    """The command's progress reporter: a tqdm bar on stderr, or JSON lines on stdout (``--progress json``)."""
    if args.progress == "json" and enabled:
        return JsonProgress(phase)
    return _ProgressBar(description, enabled=enabled)


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slice indices, got {text!r}") from None


def _slice_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        return (int(first), int(last)) if sep else (int(first), int(first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST slice indices, got {text!r}") from None


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse
