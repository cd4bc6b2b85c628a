"""The engine in its own process: ``python -m hsam COMMAND ... --progress json``, polled without threads.

Inside Slicer a Python thread only runs while the main thread executes Python, so heavy work runs in a
separate interpreter (``PythonSlicer``), as the well-kept Slicer extensions do. Each job gets its own
temporary folder holding its inputs, its results and the worker's output streams: stdout (JSON
progress events, ``hsam.runtime.progress``) and stderr go to files there, which ``poll()`` reads from where
it stopped. Reading a regular file never blocks, on every operating system, so the widget calls
``poll()`` from a QTimer and nothing here needs Qt, a thread or torch.

Cancel ends the worker and its children (its own process group) and removes the job folder, so
nothing the job wrote is left behind. In Slicer the worker is ``PythonSlicer``, CTK's launcher, around
``python-real``: the launcher dies of SIGTERM without passing it on and reports a crash or a kill as
exit status 1, so cancel kills the whole group after a grace period, and the worker writes its own
exit status into the job folder (``hsam.runtime.watchdog``): without it, the worker was stopped from outside.
The worker also ends by itself when Slicer is gone, and the next job removes the folders of jobs
whose Slicer is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from hsam.runtime.errors import Cancelled, HSAMError
from hsam.runtime.watchdog import PARENT_PID_VARIABLE, STATUS_FILE_VARIABLE, process_exists

# The folder that holds the ``hsam`` package (the HSAMSegment module folder in Slicer).
ENGINE_PARENT = Path(__file__).resolve().parent.parent
CANCEL_GRACE_SECONDS = 1.0
ERROR_PREFIX = "hsam: error: "
WARNING_PREFIX = "hsam: warning: "
EXIT_INPUT_ERROR = 2
STATUS_FILE = "worker-status.txt"
# Job folders are named ``<name>-job-<pid of the process that made them>-<random>``.
JOB_FOLDER = re.compile(r"^hsam[\w-]*?-job-(\d+)-")

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


def remove_orphaned_job_folders() -> None:
    """Remove the job folders, in the temporary folder, of processes that are gone: Slicer crashed or
    was killed while a job ran."""
    for path in Path(tempfile.gettempdir()).iterdir():
        match = JOB_FOLDER.match(path.name)
        if match and path.is_dir() and not process_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def make_job_folder(name: str) -> Path:
    """A new folder ``<name>-job-<pid>-<random>`` in the temporary folder: removed by
    ``remove_orphaned_job_folders`` once this process is gone."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-job-{os.getpid()}-"))


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` (Slicer's Python with Slicer's environment) when there is one, else
    this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class _LineReader:
    """New complete lines of a file that another process appends to."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._pending = b""

    def read_lines(self) -> list[str]:
        chunk = self._file.read()
        if not chunk:
            return []
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]

    def close(self) -> None:
        self._file.close()


class WorkerJob:
    """One ``hsam`` command in a worker process, with a temporary folder of its own (``folder``).

    Build the command's paths inside ``folder``, ``start()`` it, then call ``poll()`` until
    ``running`` is False: ``state`` is ``succeeded``, ``failed`` (``error`` holds one line) or
    ``cancelled``. ``result`` is the last JSON object the worker printed (the ``result`` event).
    Call ``cleanup()`` once the results are read; ``cancel()`` cleans up by itself.
    """

    def __init__(self, python: Optional[str] = None, name: str = "hsam"):
        self.python = python or python_executable()
        remove_orphaned_job_folders()
        self.folder = make_job_folder(name)
        self.state = RUNNING
        self.error: Optional[str] = None
        self.result: Optional[dict] = None
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        self.process: Optional[subprocess.Popen] = None
        self._stdout: Optional[_LineReader] = None
        self._stderr: Optional[_LineReader] = None

    # --- starting ---------------------------------------------------------------------------

    def command(self, arguments: Sequence[str]) -> list[str]:
        return [self.python, "-m", "hsam", *[str(a) for a in arguments]]

    def start(self, arguments: Sequence[str]) -> WorkerJob:
        """Run ``hsam ARGUMENTS`` (with ``--progress json`` where the command takes it)."""
        stdout_path, stderr_path = self.folder / "worker-stdout.jsonl", self.folder / "worker-stderr.log"
        try:
            with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
                self.process = subprocess.Popen(
                    self.command(arguments),
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=self.folder,
                    env=self._environment(),
                    **_new_process_group(),
                )
        except BaseException:  # e.g. no such executable: the inputs already written go too
            self.cleanup()
            raise
        self._stdout, self._stderr = _LineReader(stdout_path), _LineReader(stderr_path)
        return self

    def _environment(self) -> dict:
        env = dict(os.environ)
        paths = [str(ENGINE_PARENT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        env[PARENT_PID_VARIABLE] = str(os.getpid())
        env[STATUS_FILE_VARIABLE] = str(self.folder / STATUS_FILE)
        return env

    # --- following --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def warnings(self) -> list[str]:
        """The worker's ``hsam: warning:`` lines so far, without the prefix (e.g. a class found nowhere)."""
        return [line[len(WARNING_PREFIX):].strip() for line in self.stderr_lines if line.startswith(WARNING_PREFIX)]

    def poll(self) -> list[dict]:
        """JSON events printed since the last call, oldest first; updates ``state`` when the worker
        has ended. Never blocks."""
        if self._stdout is None:
            return []
        exit_code = self.process.poll()  # before reading, so that no line written before the exit is missed
        new_events = self._read()
        if exit_code is not None and self.state == RUNNING:
            self._finish(exit_code)
        return new_events

    def _read(self) -> list[dict]:
        new_events = []
        for line in self._stdout.read_lines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not an event (a library printing to stdout)
            if isinstance(event, dict):
                new_events.append(event)
        self.stderr_lines += self._stderr.read_lines()
        self.events += new_events
        if new_events:
            self.result = new_events[-1]
        return new_events

    def _finish(self, exit_code: int) -> None:
        self._close_streams()
        if exit_code == 0:
            self.state = SUCCEEDED
            return
        self.state = FAILED
        self.error = self._error_line(exit_code)

    def _error_line(self, exit_code: int) -> str:
        """One line saying why the worker failed."""
        lines = [line.strip() for line in self.stderr_lines if line.strip()]
        reported = [line[len(ERROR_PREFIX):] for line in lines if line.startswith(ERROR_PREFIX)]
        if reported:
            return reported[-1]
        if exit_code < 0:
            name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else str(-exit_code)
            hint = " (the computer may have run out of memory)" if name == "SIGKILL" else ""
            return f"the HSAM worker process was stopped by signal {name}{hint}"
        last = lines[-1] if lines else "no error message"
        if not (self.folder / STATUS_FILE).exists():  # stopped from outside; PythonSlicer reports it as 1
            return (f"the HSAM worker process ended abruptly (exit status {exit_code}): the computer may have run out "
                    f"of memory, or the worker crashed. Its last words: {last}")
        return f"the HSAM worker process failed (exit status {exit_code}): {last}"

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05,
             on_events: Optional[Callable[[list[dict]], None]] = None) -> bool:
        """Poll until the worker ends (``False`` on timeout); ``on_events`` gets each batch of events.
        An exception meanwhile (Ctrl-C, an error in ``on_events``) cancels the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                events = self.poll()
                if events and on_events is not None:
                    on_events(events)
                if not self.running:
                    return True
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(interval)
        except BaseException:
            self.cancel()
            raise

    def check(self) -> None:
        """Raise ``Cancelled``, or ``HSAMError`` with the worker's one-line message, unless the job succeeded."""
        if self.state == CANCELLED:
            raise Cancelled("cancelled")
        if self.state != SUCCEEDED:
            raise HSAMError(self.error or "the HSAM worker process has not finished")

    # --- stopping ---------------------------------------------------------------------------

    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """End the worker and its children (terminate, then kill what is left after ``grace`` seconds)
        and remove the job folder. Returns once the worker is gone."""
        if self.process is not None:
            _end_process_group(self.process, grace)
        if self.state == RUNNING:
            self.state = CANCELLED
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the job folder and everything in it (call after reading the results)."""
        self._close_streams()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _close_streams(self) -> None:
        for reader in (self._stdout, self._stderr):
            if reader is not None:
                reader.close()
        self._stdout = self._stderr = None


def _new_process_group() -> dict:
    """Popen options that put the worker in a process group of its own (so that its children end with it)."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _end_process_group(process: subprocess.Popen, grace: float) -> None:
    """End the worker's process tree (Windows) or process group: SIGTERM, then SIGKILL to every process
    of the group still there after ``grace`` seconds, even when the worker itself (a launcher) has
    already ended."""
    if sys.platform == "win32":
        if process.poll() is None:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                           creationflags=subprocess.CREATE_NO_WINDOW)
        process.wait()
        return
    if not _signal_group(process, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while _group_alive(process) and time.monotonic() < deadline:
        time.sleep(0.02)
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> bool:
    """Send ``signum`` to the worker's process group; False when the group has no process left."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        return False
    return True


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the worker itself, so that it does not count as alive
    return _signal_group(process, 0)
