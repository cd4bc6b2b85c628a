"""Background jobs for the GUI: heavy work in a thread, progress through a queue, cooperative cancel.

PyTorch releases the GIL while it computes, so Slicer's event loop stays responsive. The widget
polls ``BackgroundJob.poll()`` from a timer; nothing here touches Qt or MRML (MRML is not thread
safe, so results are written into the scene by the caller, on the main thread).
"""

import queue
import threading
from typing import Any, Callable, Optional

from hsam.errors import Cancelled

# function(progress, cancel) -> result; progress(item) may be called any number of times.
JobFunction = Callable[[Callable[..., None], threading.Event], Any]


class BackgroundJob:
    """Run ``function(progress, cancel)`` in a daemon thread."""

    def __init__(self, function: JobFunction, name: str = "HSAM job"):
        self._function = function
        self._progress: "queue.Queue[Any]" = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def start(self) -> "BackgroundJob":
        self._thread.start()
        return self

    def _report(self, *item: Any) -> None:
        self._progress.put(item[0] if len(item) == 1 else item)

    def _run(self) -> None:
        try:
            self.result = self._function(self._report, self._cancel)
        except BaseException as e:  # handed to the main thread, which reports it
            self.error = e

    def cancel(self) -> None:
        """Ask the job to stop at its next check (between batches)."""
        self._cancel.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)

    def poll(self) -> list[Any]:
        """Progress items reported since the last poll, oldest first."""
        items = []
        while True:
            try:
                items.append(self._progress.get_nowait())
            except queue.Empty:
                return items

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job ends (``False`` on timeout)."""
        self._thread.join(timeout)
        return not self.running
