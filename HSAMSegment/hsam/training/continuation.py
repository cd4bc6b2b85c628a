"""Continue fine-tuning a model: the new annotations are expressed in the base model's classes.

A segment matches the model's class of the same name (case and surrounding spaces ignored); a
segment with a default name (``Label_<v>``, ``Segment_<v>``: a plain labelmap) matches the class of
label value ``v``. A segment matching no class means the model was made for other structures, and
is refused. The result keeps the model's class names, colours, label values and terminology, so the
continued model is a drop-in replacement of its base.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from ..runtime.errors import InputError
from ..volumes.segmentation import Segment

DEFAULT_NAME = re.compile(r"^(?:Label|Segment)_(\d+)$")


def _normalised(name: str) -> str:
    return name.strip().casefold()


def _class_index(segment: Segment, metadata) -> Optional[int]:
    """Index of the model's class that ``segment`` stands for, or None."""
    names = [_normalised(n) for n in metadata.class_names]
    if _normalised(segment.name) in names:
        return names.index(_normalised(segment.name))
    default = DEFAULT_NAME.match(segment.name.strip())
    if default and int(default.group(1)) == segment.label_value and segment.label_value in metadata.label_values:
        return metadata.label_values.index(segment.label_value)
    return None


def align_to_base(
    labels: np.ndarray, segments: Sequence[Segment], metadata, model_name: str
) -> tuple[np.ndarray, list[Segment]]:
    """(labels with the model's label values, one ``Segment`` per class of the model).

    ``segments`` describe ``labels`` (none: every non-zero value is a class named by its value).
    Raises ``InputError`` when a labelled class is not one of the model's."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    segments = list(segments) or [Segment(f"Label_{v}", v, (0.5, 0.5, 0.5)) for v in present]
    described = {s.label_value for s in segments}
    undescribed = [v for v in present if v not in described]
    if undescribed:
        raise InputError(f"the labelmap has value {undescribed[0]}, which no segment describes")
    lookup = np.zeros(max([int(labels.max()), *described]) + 1, dtype=np.int64)
    for segment in segments:
        index = _class_index(segment, metadata)
        if index is None:
            if segment.label_value not in present:
                continue  # an empty segment teaches nothing and needs no class
            known = ", ".join(f"{n} ({v})" for n, v in zip(metadata.class_names, metadata.label_values))
            raise InputError(
                f"{model_name} segments {known}; segment {segment.name!r} (label {segment.label_value}) is not "
                "one of them: continue from a model made for these classes, or start a new one"
            )
        lookup[segment.label_value] = metadata.label_values[index]
    aligned = lookup[labels].astype(np.min_scalar_type(max(metadata.label_values)))
    terminology = metadata.terminology or [None] * metadata.num_classes
    base = [
        Segment(name, int(value), tuple(color), term)
        for name, value, color, term in zip(metadata.class_names, metadata.label_values, metadata.class_colors, terminology)
    ]
    return aligned, base
