"""Slice axes by name, without any heavy import (the Slicer side uses them before PyTorch exists)."""

# Slice axis name -> axis of a (z, y, x) array.
SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
