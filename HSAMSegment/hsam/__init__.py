"""HSAM: H-SAM (hierarchical decoding Segment Anything) for few-shot medical image segmentation.

``import hsam`` is cheap (no torch import) so that callers can check dependencies first; the model
API below is imported on first use.
"""

from importlib import import_module

from .runtime.errors import Cancelled, CheckpointError, HSAMError, HSAMWarning, InputError
from .runtime.version import __version__

_LAZY = {
    "HSAM": "hsam.modeling.hsam",
    "HSAMOutput": "hsam.modeling.hsam",
    "build_hsam": "hsam.models.build",
    "PRESETS": "hsam.models.presets",
    "from_reference_state_dict": "hsam.models.checkpoint",
    "load_reference_checkpoint": "hsam.models.checkpoint",
    "save_reference_checkpoint": "hsam.models.checkpoint",
    "load_sam_weights": "hsam.models.checkpoint",
    "BundleMetadata": "hsam.models.bundle",
    "load_bundle": "hsam.models.bundle",
    "save_bundle": "hsam.models.bundle",
}

__all__ = ["Cancelled", "CheckpointError", "HSAMError", "HSAMWarning", "InputError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hsam' has no attribute {name!r}")
