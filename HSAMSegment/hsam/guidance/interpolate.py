"""The painted slices interpolated through the volume (the guided prior's arg-max), without a model
and without torch: the first preview of the Segment Editor's *HSAM fill* (``hsam interpolate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import read_labelmap, read_volume, write_output
from ..presets import DEFAULT_PRIOR, SLICE_AXES
from .priors import SlicePrior, annotated_slices, volume_class_labels


def interpolate_annotations(volume_path: Path, annotations_path: Path, output: Path, axis: str,
                            overwrite: bool = False, kind: str = DEFAULT_PRIOR) -> int:
    """Write the interpolation of the annotated slices of ``annotations_path`` (on the volume's grid, or a
    crop of it) along ``axis`` into ``output``; the annotated slices are kept as drawn. Returns their count."""
    volume = read_volume(volume_path)
    labels, segments = read_labelmap(annotations_path, reference=volume)
    values = [segment.label_value for segment in segments]
    classes = np.moveaxis(volume_class_labels(labels, values), SLICE_AXES[axis], 0)
    annotated = annotated_slices(classes, 0)
    prior = SlicePrior(classes, annotated, len(values), kind)
    filled = np.stack([classes[i] if i in annotated else prior.logits(i).argmax(0) for i in range(classes.shape[0])])
    lookup = np.array([0, *values], dtype=labels.dtype)
    write_output(output, np.moveaxis(lookup[filled], 0, SLICE_AXES[axis]), volume, segments, overwrite=overwrite)
    return len(annotated)
