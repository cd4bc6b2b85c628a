"""HSAM: H-SAM (hierarchical decoding Segment Anything) for few-shot medical image segmentation.

``import hsam`` is cheap (no torch import) so that callers can check dependencies first; the model
API below is imported on first use.
"""

from importlib import import_module

from .errors import Cancelled, CheckpointError, HSAMError, HSAMWarning, InputError

__version__ = "0.1.0"

_LAZY = {
    "HSAM": "hsam.modeling.hsam",
    "HSAMOutput": "hsam.modeling.hsam",
    "build_hsam": "hsam.build",
    "PRESETS": "hsam.build",
    "from_reference_state_dict": "hsam.checkpoint",
    "load_reference_checkpoint": "hsam.checkpoint",
    "save_reference_checkpoint": "hsam.checkpoint",
    "load_sam_weights": "hsam.checkpoint",
    "BundleMetadata": "hsam.bundle",
    "load_bundle": "hsam.bundle",
    "save_bundle": "hsam.bundle",
}

__all__ = ["Cancelled", "CheckpointError", "HSAMError", "HSAMWarning", "InputError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hsam' has no attribute {name!r}")
