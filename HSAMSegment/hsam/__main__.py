"""``python -m hsam`` (and ``torchrun -m hsam``): the ``hsam`` command line."""

from .runtime.watchdog import report_exit, watch_parent

watch_parent()  # a worker started by Slicer ends with Slicer

from .cli import main  # noqa: E402

try:
    status = main()
except SystemExit as end:  # argparse: --help, a usage error
    status = end.code if isinstance(end.code, int) else int(end.code is not None)
raise SystemExit(report_exit(status))
