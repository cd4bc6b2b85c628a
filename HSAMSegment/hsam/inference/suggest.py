"""Which slices to annotate next: the most uncertain ones, spread over the volume.

Greedy: each pick maximises ``score × spread``, where ``spread = 1 − exp(−d² / 2σ²)`` and ``d`` is
the distance (in slices) to the nearest slice already annotated or picked. Slices closer than
``min_distance`` to one of them are not eligible while farther ones remain, so the N picks are not
neighbours; annotated slices and slices without a score (NaN: outside the segmented range) are
never picked. With no annotated slice and no pick yet, the spread term is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from ..runtime.errors import InputError


@dataclass
class SpreadRule:
    """``sigma`` and ``min_distance`` in slices; None: derived from the eligible range and the number
    of slices that will be annotated (``auto_spacing``)."""

    sigma: Optional[float] = None
    min_distance: Optional[int] = None

    def resolve(self, eligible: np.ndarray, total: int) -> tuple[float, int]:
        spacing = auto_spacing(eligible, total)
        sigma = self.sigma if self.sigma is not None else spacing / 2
        min_distance = self.min_distance if self.min_distance is not None else max(1, int(spacing // 2))
        return max(sigma, 1e-6), min_distance


def auto_spacing(eligible: np.ndarray, total: int) -> float:
    """The spacing of ``total`` slices spread evenly over the eligible range."""
    indices = np.flatnonzero(eligible)
    extent = indices[-1] - indices[0] + 1 if len(indices) else 1
    return extent / max(total, 1)


def suggest_slices(
    scores: np.ndarray, count: int, annotated: Iterable[int] = (), rule: Optional[SpreadRule] = None
) -> list[int]:
    """Up to ``count`` slice indices in the order picked (the first is the most useful).

    ``scores``: (depth,) uncertainty per slice, NaN where a slice cannot be chosen; ``annotated``:
    indices to skip and to keep away from."""
    scores = np.asarray(scores, dtype=np.float64)
    if count < 1:
        raise InputError(f"the number of suggested slices must be at least 1, got {count}")
    depth = len(scores)
    taken = sorted({int(i) for i in annotated})
    outside = [i for i in taken if not 0 <= i < depth]
    if outside:
        raise InputError(f"annotated slice {outside[0]} is outside the volume (0–{depth - 1})")
    eligible = np.isfinite(scores)
    eligible[taken] = False
    sigma, min_distance = (rule or SpreadRule()).resolve(np.isfinite(scores), len(taken) + count)

    positions = np.arange(depth)
    distance = np.full(depth, np.inf)
    for index in taken:
        distance = np.minimum(distance, np.abs(positions - index))
    picks: list[int] = []
    while len(picks) < count and eligible.any():
        spread = -np.expm1(-np.square(distance) / (2 * sigma**2)) if np.isfinite(distance).any() else np.ones(depth)
        value = np.where(eligible, np.maximum(scores, 0.0) * spread + 1e-12 * spread, -np.inf)
        far = eligible & (distance >= min_distance)
        if far.any():
            value = np.where(far, value, -np.inf)
        pick = int(np.argmax(value))
        picks.append(pick)
        eligible[pick] = False
        distance = np.minimum(distance, np.abs(positions - pick))
    return picks


def uniform_slices(eligible: np.ndarray, count: int, annotated: Iterable[int] = ()) -> list[int]:
    """The baseline: ``count`` slices each farthest from every annotated or picked slice (constant
    uncertainty), i.e. filling the largest gaps."""
    scores = np.where(np.asarray(eligible, dtype=bool), 1.0, np.nan)
    return suggest_slices(scores, count, annotated, SpreadRule(sigma=1e9, min_distance=0))
