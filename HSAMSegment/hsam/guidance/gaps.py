"""Where to paint next, from flow propagation alone: the gaps between annotated slices where the
two propagation directions disagree.

Every slice strictly between two annotated slices gets two carried maps (``FlowPropagation.carry``):
one from the annotated slice below, one from the slice above. Where they disagree, the structures
change in a way that neither annotated slice shows. A gap's disagreement for class k is
Σ |p_below,k − p_above,k| over the gap's slices and pixels; its score divides each class's by the
class's mean area on the annotated slices and sums over the classes (in slices' worth of each
structure), so that a small structure weighs as much as a large one, as in a mean Dice over the
classes (see docs/performance.md for how it compares with the total variation
½ Σ_k |p_below,k − p_above,k| and with evenly spread gaps). The slice to paint is the gap's middle,
never an annotated slice. The slices beyond the first and the last annotated slice have one carried
map, hence no disagreement: they are not ranked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..runtime.errors import InputError
from .flow import FlowPropagation


@dataclass(frozen=True)
class Gap:
    """The slices strictly between annotated slices ``low`` and ``high``. ``disagreement``: (K+1,)
    Σ |p_below,k − p_above,k| per class (background first) over the gap's slices and pixels;
    ``score``: Σ over the classes k ≥ 1 of disagreement_k / (mean area of class k on the annotated slices)."""

    low: int
    high: int
    disagreement: np.ndarray
    score: float

    @property
    def slice(self) -> int:
        """The slice to paint: the gap's middle."""
        return (self.low + self.high) // 2


def gap_disagreement(propagation: FlowPropagation, low: int, high: int) -> np.ndarray:
    """(K+1,) Σ |p_below,k − p_above,k| over the slices strictly between ``low`` and ``high``."""
    below = dict(propagation.carry(low, high - 1))
    total = np.zeros(propagation.num_classes + 1, dtype=np.float64)
    for index, above in propagation.carry(high, low + 1):
        total += np.abs(below.pop(index) - above).sum(axis=(1, 2), dtype=np.float64)
    return total


def class_areas(propagation: FlowPropagation) -> np.ndarray:
    """(K,) mean pixel count of each class on the annotated slices (at least 1)."""
    painted = propagation.labels[propagation.annotated]
    counts = np.bincount(painted.ravel(), minlength=propagation.num_classes + 1)[1:]
    return np.maximum(counts / len(propagation.annotated), 1.0)


def rank_gaps(
    propagation: FlowPropagation, count: Optional[int] = None,
    progress: Optional[Callable[[float, str], None]] = None,
) -> list[Gap]:
    """The gaps between ``propagation``'s annotated slices (at least one slice wide), most disagreeing
    first (ties: lower first), at most ``count``; ``progress(fraction, message)`` after each gap."""
    if count is not None and count < 1:
        raise InputError(f"the number of suggested slices must be at least 1, got {count}")
    annotated = propagation.annotated
    if len(annotated) < 2:
        raise InputError("ranking the gaps between annotated slices needs at least two annotated slices")
    bounds = [(low, high) for low, high in zip(annotated, annotated[1:]) if high - low > 1]
    inside = [i for low, high in bounds for i in range(low + 1, high)]
    propagation.flows.prepare([(i, i - 1) for i in inside] + [(i, i + 1) for i in inside])  # at once: both workers busy
    areas = class_areas(propagation)
    gaps = []
    for done, (low, high) in enumerate(bounds, start=1):
        disagreement = gap_disagreement(propagation, low, high)
        gaps.append(Gap(low, high, disagreement, float(np.sum(disagreement[1:] / areas))))
        if progress is not None:
            progress(done / len(bounds), f"gap {done}/{len(bounds)}")
    return sorted(gaps, key=lambda gap: (-gap.score, gap.low))[:count]
