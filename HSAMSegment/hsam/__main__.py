"""``python -m hsam`` (and ``torchrun -m hsam``): the ``hsam`` command line."""

from .cli import main

raise SystemExit(main())
