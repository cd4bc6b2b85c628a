"""Dice and the 95th-percentile Hausdorff distance in millimetres, per class.

Conventions (the authors' code differs, see docs/model.md): both masks empty -> Dice 1, HD95 0;
exactly one empty -> Dice 0, HD95 undefined (None). HD95 follows medpy's ``hd95``: the 95th
percentile of the distances from each mask's surface voxels to the other mask's surface, both
directions pooled, measured with the voxel spacing.
"""

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import InputError
from ..volumes.segmentation import Segment, read_labelmap
from ..volumes.volume import Volume

Spacing = Sequence[float]  # (x, y, z) in mm, for (z, y, x) arrays


def dice_score(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2|P∩R| / (|P| + |R|) of two boolean masks; 1.0 when both are empty."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & reference)) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def _distance_to(surface: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Euclidean distance in mm from every voxel to the nearest voxel of ``surface``."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayViewFromImage(distance), 0.0)


def hausdorff95(prediction: np.ndarray, reference: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0)) -> Optional[float]:
    """HD95 in mm between two boolean (z, y, x) masks; 0.0 when both are empty, None when one is."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.ndim == 2:
        prediction, reference = prediction[None], reference[None]
    if prediction.shape != reference.shape:
        raise InputError(f"masks of different shapes {prediction.shape} and {reference.shape}")
    has_prediction, has_reference = prediction.any(), reference.any()
    if not has_prediction and not has_reference:
        return 0.0
    if not has_prediction or not has_reference:
        return None
    surface_p, surface_r = _surface(prediction), _surface(reference)
    distances = np.concatenate([_distance_to(surface_r, spacing)[surface_p], _distance_to(surface_p, spacing)[surface_r]])
    return float(np.percentile(distances, 95))


def _match(reference: list[Segment], prediction: list[Segment]) -> list[tuple[Segment, Optional[Segment]]]:
    """Pairs each reference segment with the prediction's segment of the same name, else of the same label value."""
    by_name = {s.name.lower(): s for s in prediction}
    by_value = {s.label_value: s for s in prediction}
    pairs = []
    for segment in reference:
        pairs.append((segment, by_name.get(segment.name.lower()) or by_value.get(segment.label_value)))
    return pairs


def evaluate(prediction_path: Union[str, Path], reference_path: Union[str, Path], resample: bool = False) -> list[dict]:
    """Dice and HD95 (mm) per class of a predicted labelmap or ``.seg.nrrd`` against a reference one.

    Classes are the reference's segments, matched to the prediction's by name and then by label
    value; predicted segments with no reference counterpart are scored against an empty mask. The
    prediction must lie on the reference's voxel lattice (a crop is placed exactly), else it is
    refused, or resampled with nearest neighbour if ``resample``.
    Rows: ``{"name", "label", "dice", "hd95_mm"}``.
    """
    reference_labels, reference_segments = read_labelmap(reference_path)
    reference_image = sitk.ReadImage(str(reference_path))
    grid = Volume(reference_labels, reference_image.GetSpacing(), reference_image.GetOrigin(),
                  reference_image.GetDirection())
    prediction_labels, prediction_segments = read_labelmap(prediction_path, reference=grid, resample=resample)
    rows = []
    pairs = _match(reference_segments, prediction_segments)
    matched = {id(p) for _, p in pairs if p is not None}
    pairs += [(None, p) for p in prediction_segments if id(p) not in matched]
    for ref, pred in pairs:
        ref_mask = reference_labels == ref.label_value if ref else np.zeros(reference_labels.shape, bool)
        pred_mask = prediction_labels == pred.label_value if pred else np.zeros(reference_labels.shape, bool)
        named = ref or pred
        rows.append({
            "name": named.name,
            "label": named.label_value,
            "dice": dice_score(pred_mask, ref_mask),
            "hd95_mm": hausdorff95(pred_mask, ref_mask, grid.spacing),
        })
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per class name (first-seen order) over the cases of ``evaluate`` rows: number of cases, Dice and
    HD95 mean and sample standard deviation (0 for one case; HD95 over the cases where it is defined)."""
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["name"], []).append(row)
    summary = []
    for name, group in by_class.items():
        dice = np.array([r["dice"] for r in group], dtype=np.float64)
        hd95 = np.array([r["hd95_mm"] for r in group if r["hd95_mm"] is not None], dtype=np.float64)
        summary.append({
            "name": name,
            "cases": len(group),
            "dice_mean": float(dice.mean()),
            "dice_sd": _sd(dice),
            "hd95_mm_mean": float(hd95.mean()) if hd95.size else None,
            "hd95_mm_sd": _sd(hd95) if hd95.size else None,
        })
    return summary


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if values.size > 1 else 0.0
