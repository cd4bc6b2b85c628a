"""The ``hsam`` command line: segment, fine-tune, evaluate, inspect models, download SAM weights, demo.

Exit status: 0 on success, 2 for bad input or an impossible request (one ``hsam: error: ...`` line),
1 for an internal error (one line; ``hsam --debug ...`` shows the traceback), 130 when interrupted
with Ctrl-C. Arguments, paths and model files are checked before torch is imported, so ``--help``,
``info`` and bad input answer at once. Warnings from HSAM are one ``hsam: warning: ...`` line each;
other libraries' warnings are not shown.
``segment``, ``propagate``, ``suggest``, ``finetune`` and ``download`` take ``--progress json`` for programs that follow them
(``hsam.runtime.progress``: one JSON object per line on stdout).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Iterator, Optional, Sequence

from ..runtime.errors import HSAMError, HSAMWarning, printable

from .parser import build_parser

EXIT_INTERNAL_ERROR = 1
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other tools in a pipeline
EXIT_TERMINATED = 143  # 128 + SIGTERM


class _Terminated(BaseException):
    """SIGTERM (e.g. a cancelled worker): unwinds like Ctrl-C, so that claims and temporaries go away."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into ``_Terminated`` while a command runs (main thread only), then restore the handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _only_hsam_warnings() -> Iterator[None]:
    """HSAM's warnings as one ``hsam: warning: ...`` line each; other libraries' are not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", HSAMWarning)
        warnings.showwarning = lambda message, *_: print(f"hsam: warning: {printable(message, 400)}", file=sys.stderr)
        yield


def _stdout_to_nowhere() -> None:
    """After a closed pipe (``hsam info … | head``): no second error when Python flushes stdout at exit."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``hsam`` with ``argv`` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _only_hsam_warnings(), _sigterm_unwinds():
            args.run(args)
            sys.stdout.flush()
    except HSAMError as error:
        print(f"hsam: error: {printable(error, 600)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("hsam: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("hsam: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        _stdout_to_nowhere()
        return EXIT_BROKEN_PIPE
    except MemoryError:
        print("hsam: error: out of memory; try a smaller batch, volume or model", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, OSError) and error.filename is not None:  # a file the system refused
            print(f"hsam: error: {printable(error.filename)}: {error.strerror or error}", file=sys.stderr)
            return EXIT_INPUT_ERROR
        print(f"hsam: internal error: {type(error).__name__}: {printable(error, 300)} "
              f"(rerun as `hsam --debug {args.command} ...` for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return 0
