"""Priors from annotated slices: what interpolating the user's slices predicts for every other slice.

A prior is per-class logits (K+1, H, W) on a slice's own grid, channel 0 the background at 0, each
class between −``PRIOR_LOGIT`` and +``PRIOR_LOGIT``; its arg-max is the interpolated labelmap.

Kinds (``PRIOR_KINDS``):

* ``linear``: the labels of the two annotated slices around a slice, blended linearly by distance
  (p = (1 − w)·one-hot(below) + w·one-hot(above)): the arg-max is the nearest slice's labels, and
  the prior is uncertain exactly where the two slices disagree.
* ``distance``: shape-based interpolation (Raya & Udupa, IEEE TMI 1990): each class's signed distance
  map (pixels, negative inside) is interpolated linearly between the two annotated slices around a
  slice; a class annotated on one side only shrinks away by the midpoint. Logits −d/τ, τ =
  ``DISTANCE_SCALE`` pixels: soft near boundaries, where interpolation errs.
* ``nearest``: the labels of the nearest annotated slice (one-hot logits).
* ``fill``: the Segment Editor's *Fill between slices* (``hsam.guidance.fill.fill_between_slices``).
* ``flow`` (the default): the annotated slices' labels carried along the optical flow between
  neighbouring image slices, both directions blended by distance (``hsam.guidance.flow``); it needs
  the volume's slices. Probabilities p give logits log p − log p₀, as ``linear``.

Outside the annotated range ``flow`` carries the end slice on; every other kind copies it. ``leave_one_out`` builds an
annotated slice's prior from the other annotated slices only, as fine-tuning needs it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import InputError
from ..volumes.constants import SLICE_AXES
from .flow import FlowPropagation
from .kinds import PRIOR_KINDS

PRIOR_LOGIT = 6.0
DISTANCE_SCALE = 2.0
MIN_ANNOTATED = 2


def annotated_slices(labels: np.ndarray, axis: Union[int, str] = 0) -> list[int]:
    """Indices of the slices along ``axis`` (0 = axial for (z, y, x) arrays) carrying any label."""
    axis = SLICE_AXES[axis] if isinstance(axis, str) else axis
    other = tuple(a for a in range(labels.ndim) if a != axis)
    return np.flatnonzero(np.any(labels != 0, axis=other)).tolist()


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> float32 signed distance in pixels to the boundary, negative inside."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=False)
    return sitk.GetArrayFromImage(distance).astype(np.float32)


class SlicePrior:
    """Priors for the slices of one volume along axis 0 of ``class_labels`` ((n, H, W) class indices,
    0 = background), from the slices ``annotated``. ``images``: the volume's (n, H, W) uint8 slices
    (``hsam.guidance.flow.flow_images``), needed by the ``flow`` kind."""

    def __init__(self, class_labels: np.ndarray, annotated: Sequence[int], num_classes: int, kind: str = "linear",
                 images: Optional[np.ndarray] = None):
        if kind not in PRIOR_KINDS:
            raise InputError(f"unknown prior {kind!r}; choose one of {', '.join(PRIOR_KINDS)}")
        if kind == "flow" and images is None:
            raise ValueError("the flow prior needs the volume's slices")
        self.labels = class_labels
        self.annotated = sorted({int(i) for i in annotated})
        if len(self.annotated) < MIN_ANNOTATED:
            raise InputError(f"guided mode needs at least {MIN_ANNOTATED} annotated slices, got {len(self.annotated)}")
        self.num_classes = num_classes
        self.kind = kind
        self._distances = lru_cache(maxsize=None)(self._class_distances)
        self._filled = lru_cache(maxsize=2)(self._fill)
        self._flow = FlowPropagation(images, class_labels, self.annotated, num_classes) if kind == "flow" else None

    def logits(self, index: int, exclude: Optional[int] = None) -> np.ndarray:
        """(K+1, H, W) float32 prior of slice ``index``, ignoring the annotated slice ``exclude``."""
        if self._flow is not None:
            return probability_logits(self._flow.probabilities(index, exclude))
        known = [a for a in self.annotated if a != exclude]
        below = [a for a in known if a <= index]
        above = [a for a in known if a >= index]
        if not below or not above:  # outside the annotated range
            return one_hot_logits(self.labels[below[-1] if below else above[0]], self.num_classes)
        low, high = below[-1], above[0]
        if low == high:
            return one_hot_logits(self.labels[low], self.num_classes)
        if self.kind == "linear":
            weight = (index - low) / (high - low)
            return self._blend(self.labels[low], self.labels[high], weight)
        if self.kind == "nearest":
            return one_hot_logits(self.labels[low if index - low <= high - index else high], self.num_classes)
        if self.kind == "fill":
            return one_hot_logits(self._filled(low, high)[index - low], self.num_classes)
        return self._interpolated_distance(low, high, (index - low) / (high - low))

    def leave_one_out(self, index: int) -> np.ndarray:
        """The prior of the annotated slice ``index`` from the other annotated slices only."""
        if index not in self.annotated:
            raise ValueError(f"slice {index} is not annotated")
        return self.logits(index, exclude=index)

    def _blend(self, below: np.ndarray, above: np.ndarray, weight: float) -> np.ndarray:
        """Logits of (1 − weight)·one-hot(below) + weight·one-hot(above), relative to the background."""
        probabilities = np.stack([(1.0 - weight) * (below == k) + weight * (above == k)
                                  for k in range(self.num_classes + 1)]).astype(np.float32)
        return probability_logits(probabilities)

    def _class_distances(self, index: int) -> list[Optional[np.ndarray]]:
        """Signed distance of every class in annotated slice ``index`` (None: class absent)."""
        return [signed_distance(self.labels[index] == k) if (self.labels[index] == k).any() else None
                for k in range(1, self.num_classes + 1)]

    def _interpolated_distance(self, low: int, high: int, weight: float) -> np.ndarray:
        out = np.full((self.num_classes + 1, *self.labels.shape[1:]), -PRIOR_LOGIT, dtype=np.float32)
        out[0] = 0.0
        for k, (d_low, d_high) in enumerate(zip(self._distances(low), self._distances(high)), start=1):
            if d_low is None and d_high is None:
                continue
            if d_high is None:  # vanishes at the midpoint: every inside distance reaches 0 there
                d_high = d_low + 2.0 * max(0.0, -float(d_low.min()))
            elif d_low is None:
                d_low = d_high + 2.0 * max(0.0, -float(d_high.min()))
            distance = (1.0 - weight) * d_low + weight * d_high
            out[k] = np.clip(-distance / DISTANCE_SCALE, -PRIOR_LOGIT, PRIOR_LOGIT)
        return out

    def _fill(self, low: int, high: int) -> np.ndarray:
        from .fill import fill_between_slices

        slab = self.labels[low : high + 1]
        return fill_between_slices(slab, [0, high - low], axis=0)


def one_hot_logits(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices (..., e.g. (H, W)) -> (K+1, ...) float32 prior logits: the background 0, each class
    +``PRIOR_LOGIT`` on its pixels and −``PRIOR_LOGIT`` elsewhere."""
    out = np.full((num_classes + 1, *labels.shape), -PRIOR_LOGIT, dtype=np.float32)
    out[0] = 0.0
    for k in range(1, num_classes + 1):
        out[k][labels == k] = PRIOR_LOGIT
    return out


def probability_logits(probabilities: np.ndarray) -> np.ndarray:
    """(K+1, H, W) class probabilities -> prior logits relative to the background, within ±PRIOR_LOGIT."""
    floor = np.float32(np.exp(-PRIOR_LOGIT))
    logits = np.log(probabilities + floor) - np.log(probabilities[:1] + floor)
    return np.clip(logits, -PRIOR_LOGIT, PRIOR_LOGIT, out=logits)


def volume_class_labels(labels: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """A labelmap of ``label_values`` -> class indices (1..K, 0 background); other values refused."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    unknown = [v for v in present if v not in label_values]
    if unknown:
        raise InputError(f"the annotations hold label value {unknown[0]}, which is none of the model's classes")
    lookup = np.zeros(max([*present, *label_values]) + 1, dtype=np.uint8 if len(label_values) < 256 else np.int64)
    lookup[list(label_values)] = np.arange(1, len(label_values) + 1)
    return lookup[labels]
