"""Where the model is unsure: a per-voxel uncertainty in [0, 1] from H-SAM's two decoding stages, and
a per-slice score that ranks slices for annotation.

Signals (``SIGNALS``), measured on the MNI152 demo in docs/model.md ("Uncertainty"):

* ``disagreement``: total-variation distance between the class probabilities of stage 1 (the prior
  mask) and stage 2 (the refined mask), ½·Σ_k |p1_k − p2_k|.
* ``entropy``: entropy of the mean of both stages' class probabilities, divided by log K.
* ``combined``: the mean of the two.

A slice's score is its mean voxel uncertainty: averaging only over the slice's uncertain region
(voxels labelled as a class or above ``OVERLAY_THRESHOLD``, the lowest value an overlay draws)
ranked slices worse by their error on the demo (docs/model.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.errors import InputError

if TYPE_CHECKING:
    import torch

SIGNALS = ("disagreement", "entropy", "combined")
DEFAULT_SIGNAL = "disagreement"
OVERLAY_THRESHOLD = 0.05
MAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")


def voxel_uncertainty(stage1_logits: torch.Tensor, stage2_logits: torch.Tensor, signal: str = DEFAULT_SIGNAL) -> torch.Tensor:
    """(B, K, H, W) logits of each stage on the same grid -> (B, H, W) float32 uncertainty in [0, 1]."""
    import torch

    if signal not in SIGNALS:
        raise InputError(f"unknown uncertainty signal {signal!r}; choose one of {', '.join(SIGNALS)}")
    p1 = torch.softmax(stage1_logits.float(), dim=1)
    p2 = torch.softmax(stage2_logits.float(), dim=1)
    parts = []
    if signal in ("disagreement", "combined"):
        parts.append(0.5 * (p1 - p2).abs().sum(dim=1))
    if signal in ("entropy", "combined"):
        mean = 0.5 * (p1 + p2)
        entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum(dim=1)
        parts.append(entropy / math.log(stage1_logits.shape[1]))
    return (sum(parts) / len(parts)).clamp_(0.0, 1.0)


def stage_logits_on_grid(stage1_logits: torch.Tensor, stage2_logits: torch.Tensor, size: tuple[int, int]):
    """Both stages' logits ((B, K, S/4, S/4), (B, K, S, S)) bilinearly resized to a slice grid (H, W)."""
    import torch.nn.functional as F

    def resize(logits: torch.Tensor) -> torch.Tensor:
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits.float()
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

    return resize(stage1_logits), resize(stage2_logits)


def slice_scores(uncertainty: np.ndarray, axis: int = 0) -> np.ndarray:
    """(depth,) mean uncertainty of each slice along ``axis`` of a (z, y, x) map."""
    other = tuple(a for a in range(uncertainty.ndim) if a != axis)
    return uncertainty.mean(axis=other, dtype=np.float64)


def scores_csv_path(map_path) -> Path:
    """The per-slice CSV written beside an uncertainty map: ``u.nrrd`` -> ``u.csv``."""
    path = Path(map_path)
    name = path.name
    for suffix in MAP_SUFFIXES:
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".csv")
    return path.with_name(name + ".csv")


def scores_csv(scores: np.ndarray, axis: str) -> str:
    """``axis,slice,score`` rows (score empty where not computed)."""
    lines = ["axis,slice,score"]
    lines += [f"{axis},{i},{'' if not np.isfinite(s) else f'{s:.6f}'}" for i, s in enumerate(scores)]
    return "\n".join(lines) + "\n"


def write_uncertainty(path, uncertainty: np.ndarray, scores: np.ndarray, reference, axis: str, outputs) -> tuple[Path, Path]:
    """Stage the map (float32 on ``reference``'s grid, an ``hsam.volumes.volume.Volume``) and the per-slice CSV
    beside it in ``outputs`` (an ``hsam.volumes.files.Outputs``); returns both paths."""
    from ..volumes.files import write_bytes_atomic
    from ..volumes.volume import Volume, write_volume

    path, csv_path = Path(path), scores_csv_path(path)
    write_volume(path, Volume(uncertainty.astype(np.float32), reference.spacing, reference.origin, reference.direction),
                 outputs=outputs)
    write_bytes_atomic(csv_path, scores_csv(scores, axis).encode("utf-8"), outputs=outputs)
    return path, csv_path
