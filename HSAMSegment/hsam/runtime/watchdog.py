"""A worker started by Slicer (``HSAMLib.worker``) outlives nothing: it ends when Slicer is gone, and it
leaves a status file saying that it ended by itself.

Slicer starts the worker through ``PythonSlicer``, CTK's launcher around ``python-real``: the
launcher neither forwards signals nor ends its child when Slicer dies, and it turns a crash or a
kill (the system running out of memory) into exit status 1. So the worker watches Slicer's process
itself (``HSAM_PARENT_PID``), and writes its own exit status (``HSAM_STATUS_FILE``): a worker that
ended without one was stopped from outside. Without these variables (the command line) nothing
happens.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

PARENT_PID_VARIABLE = "HSAM_PARENT_PID"
STATUS_FILE_VARIABLE = "HSAM_STATUS_FILE"
POLL_SECONDS = 1.0
UNWIND_SECONDS = 10.0  # after asking the command to end, the time it gets to clean up
EXIT_ORPHANED = 143  # as if terminated: 128 + SIGTERM


def process_exists(pid: int) -> bool:
    """True while process ``pid`` runs (or cannot be queried because another user owns it)."""
    if sys.platform == "win32":
        return _windows_process_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _windows_process_exists(pid: int) -> bool:
    import ctypes

    query_limited_information, still_active, access_denied = 0x1000, 259, 5
    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:
        return kernel32.GetLastError() == access_denied
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def watch_parent(interval: float = POLL_SECONDS) -> None:
    """End this process once the process in ``HSAM_PARENT_PID`` is gone: SIGTERM first, so that the
    command unwinds as when cancelled (temporary files removed), then a hard exit if it is stuck in a
    long native call. Exits at once when that process is already gone."""
    value = os.environ.get(PARENT_PID_VARIABLE)
    if not value:
        return
    parent = int(value)
    if not process_exists(parent):
        raise SystemExit(EXIT_ORPHANED)
    threading.Thread(target=_watch, args=(parent, interval), name="hsam-parent-watchdog", daemon=True).start()


def _watch(parent: int, interval: float) -> None:
    while process_exists(parent):
        time.sleep(interval)
    signal.raise_signal(signal.SIGTERM)
    time.sleep(UNWIND_SECONDS)
    os._exit(EXIT_ORPHANED)


def report_exit(status: int) -> int:
    """Write ``status`` into ``HSAM_STATUS_FILE`` (when set); returns ``status``."""
    path = os.environ.get(STATUS_FILE_VARIABLE)
    if path:
        try:
            Path(path).write_text(str(status), encoding="utf-8")
        except OSError:
            pass  # the job folder is gone: nobody reads it
    return status
