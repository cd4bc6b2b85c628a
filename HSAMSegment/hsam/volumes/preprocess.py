"""From voxels to network input and back: intensity normalisation, slice axes, resizing.

The network sees a slice scaled to [0, 1], repeated to 3 channels, with no mean/std normalisation
(the authors' convention). CT is windowed to [-125, 275] HU as the authors prepared their data; MR
and other images are scaled between two percentiles of the volume. The choice is stored in the
model bundle (``to_dict``) so that inference repeats what training did.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime.errors import InputError
from .constants import INTENSITY_MODES


CT_WINDOW = (-125.0, 275.0)
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class IntensityPreprocessing:
    """``ct``: clip to ``window`` (HU) and scale to [0, 1]. ``percentile``: clip to the volume's
    ``percentiles`` (low, high) and scale to [0, 1]; a constant volume becomes 0."""

    mode: str = "ct"
    window: tuple[float, float] = CT_WINDOW
    percentiles: tuple[float, float] = PERCENTILES

    def __post_init__(self) -> None:
        if self.mode not in INTENSITY_MODES:
            raise InputError(f"unknown intensity preprocessing {self.mode!r}; choose one of {', '.join(INTENSITY_MODES)}")
        for name, (low, high), limits in (("window", self.window, None), ("percentiles", self.percentiles, (0, 100))):
            if not low < high or (limits is not None and not limits[0] <= low < high <= limits[1]):
                raise InputError(f"invalid {name} ({low}, {high}) for intensity preprocessing")
        object.__setattr__(self, "window", tuple(float(v) for v in self.window))
        object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))

    def intensity_range(self, array: np.ndarray) -> tuple[float, float]:
        """The (low, high) intensities mapped to 0 and 1 for ``array``."""
        if self.mode == "ct":
            return self.window
        low, high = np.percentile(array, self.percentiles)
        return float(low), float(high)

    def apply(self, array: np.ndarray, intensity_range: Optional[tuple[float, float]] = None) -> np.ndarray:
        """``array`` (any shape, any real dtype) -> float32 in [0, 1], same shape. ``intensity_range``:
        the (low, high) of the whole volume when ``array`` is only part of it (default: ``array``'s)."""
        low, high = self.intensity_range(array) if intensity_range is None else intensity_range
        out = np.array(array, dtype=np.float32, order="C")  # a new C-contiguous array
        if high <= low:
            out.fill(0.0)
            return out
        np.clip(out, low, high, out=out)
        out -= np.float32(low)
        out *= np.float32(1.0 / (high - low))
        return out

    def to_dict(self) -> dict:
        if self.mode == "ct":
            return {"mode": "ct", "window": list(self.window)}
        return {"mode": "percentile", "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> "IntensityPreprocessing":
        """The inverse of ``to_dict``; an ``InputError`` for anything else."""
        if not isinstance(values, dict) or "mode" not in values:
            raise InputError(f"the model's intensity preprocessing {values!r} is not a dict with a 'mode'")
        try:
            return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.items()})
        except TypeError as error:
            raise InputError(f"the model's intensity preprocessing {values!r} is not understood: {error}") from None


def resize_slices(slices: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) -> (B, size, size), bilinear; returned as is when already that size."""
    if tuple(slices.shape[-2:]) == (size, size):
        return slices
    return F.interpolate(slices[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def slices_to_model_input(slices: torch.Tensor, img_size: int) -> torch.Tensor:
    """(B, H, W) slices in [0, 1] -> (B, 3, S, S) network input (resized, repeated to 3 channels)."""
    if slices.ndim != 3:
        raise InputError(f"expected slices of shape (B, H, W), got {tuple(slices.shape)}")
    return resize_slices(slices, img_size)[:, None].expand(-1, 3, -1, -1)


def logits_to_grid(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, S, S) logits -> (B, C, H, W) on the slice's own grid, bilinear."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
