"""HSAM: H-SAM (hierarchical decoding Segment Anything) for few-shot medical image segmentation."""

from .errors import Cancelled, CheckpointError, HSAMError, InputError

__version__ = "0.1.0"

__all__ = ["Cancelled", "CheckpointError", "HSAMError", "InputError", "__version__"]
