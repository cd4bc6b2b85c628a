"""The training data of a cohort: classes matched across volumes, the annotated slices and those held
out for validation, at the network's size, with each slice's leave-one-out prior and atlas prior."""

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..guidance.atlas import Atlas, AtlasPrior, atlas_prior, make_atlas
from ..guidance.flow import flow_images, modality_of
from ..guidance.priors import SlicePrior, annotated_slices
from ..models.bundle import default_color
from ..models.presets import MAX_CLASSES
from ..runtime.errors import InputError
from ..volumes.constants import MAX_LABEL_VALUE, SLICE_AXES
from .config import MIN_SLICES_FOR_VALIDATION, VALIDATION_FRACTION, FinetuneConfig, TrainingCase


@dataclass
class _Classes:
    label_values: list[int]
    names: list[str]
    colors: list[tuple[float, float, float]]
    terminology: list[Optional[str]]

    def add(self, value: int, name: str, color, term: Optional[str]) -> int:
        """Append a class (a new label value if ``value`` is taken); its 1-based index."""
        if value in self.label_values:
            value = max(self.label_values) + 1
        self.label_values.append(value)
        self.names.append(name)
        self.colors.append(tuple(color))
        self.terminology.append(term)
        return len(self.label_values)


def _case_classes(labels: np.ndarray, segments: Sequence) -> _Classes:
    """The classes one labelmap describes: its segments, or every non-zero value."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not segments:
        if not present:
            raise InputError("the labelmap has no labelled voxel")
        return _Classes(present, [f"Segment_{v}" for v in present], [default_color(i) for i in range(len(present))],
                        [None] * len(present))
    values = [int(s.label_value) for s in segments]
    if len(set(values)) != len(values):
        raise InputError("two segments share a label value")
    unknown = sorted(set(present) - set(values))
    if unknown:
        raise InputError(f"the labelmap has value {unknown[0]}, which no segment describes")
    return _Classes(values, [s.name for s in segments], [tuple(s.color) for s in segments],
                    [getattr(s, "terminology", None) for s in segments])


def _match_classes(merged: _Classes, own: _Classes) -> dict[int, int]:
    """Label value of ``own`` -> 1-based class index in ``merged`` (extended with unmatched classes):
    by name first (case and surrounding spaces ignored), then by label value."""
    keys = [n.strip().casefold() for n in merged.names]
    mapping: dict[int, int] = {}
    for value, name in zip(own.label_values, own.names):
        key = name.strip().casefold()
        if key in keys and keys.index(key) + 1 not in mapping.values():
            mapping[value] = keys.index(key) + 1
    for value in own.label_values:
        if value not in mapping and value in merged.label_values:
            index = merged.label_values.index(value) + 1
            if index not in mapping.values():
                mapping[value] = index
    for i, value in enumerate(own.label_values):
        if value not in mapping:
            mapping[value] = merged.add(value, own.names[i], own.colors[i], own.terminology[i])
    return mapping


def _cohort_classes(cases: Sequence[TrainingCase], config: FinetuneConfig) -> tuple[_Classes, list[np.ndarray]]:
    """The classes of all cases and each case's labels as class indices (0 = background)."""
    merged = _Classes([], [], [], [])
    class_labels = []
    for case in cases:
        mapping = _match_classes(merged, _case_classes(case.labels, case.segments))
        lookup = np.zeros(max([*mapping, int(case.labels.max())]) + 1, dtype=np.int64)
        lookup[list(mapping)] = list(mapping.values())
        class_labels.append(lookup[case.labels])
    for given, what in ((config.class_names, "class names"), (config.class_colors, "class colours")):
        if given is not None and len(given) != len(merged.label_values):
            raise InputError(f"{len(given)} {what} given for {len(merged.label_values)} classes")
    if len(merged.label_values) > MAX_CLASSES or max(merged.label_values) > MAX_LABEL_VALUE:
        raise InputError(f"a model holds at most {MAX_CLASSES} classes with label values up to {MAX_LABEL_VALUE}")
    if config.class_names is not None:
        merged.names = list(config.class_names)
    if config.class_colors is not None:
        merged.colors = [tuple(c) for c in config.class_colors]
    return merged, class_labels


def _check_inputs(volume, labels: np.ndarray, name: str = "") -> None:
    of = f" of {name}" if name else ""
    if labels.shape != volume.array.shape:
        raise InputError(
            f"the labelmap grid {labels.shape}{of} differs from the volume's {volume.array.shape}: "
            "resample it onto the volume first (hsam.volumes.segmentation.read_labelmap(path, reference=volume))"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise InputError(f"the labelmap{of} holds non-integer values")
    if labels.min() < 0:
        raise InputError(f"the labelmap{of} holds negative values")


def _select_slices(labels: np.ndarray, axis: int, requested: Optional[Sequence[int]]) -> list[int]:
    depth = labels.shape[axis]
    if requested is None:
        chosen = annotated_slices(labels, axis)
        if not chosen:
            raise InputError("no annotated slice: label at least one slice of the volume")
        return chosen
    chosen = sorted({int(i) for i in requested})
    if not chosen:
        raise InputError("the list of training slices is empty")
    outside = [i for i in chosen if not 0 <= i < depth]
    if outside:
        raise InputError(f"slice {outside[0]} is outside the volume (0–{depth - 1} along this axis)")
    return chosen


def _split_validation(slices: list[int], enabled: bool) -> tuple[list[int], list[int]]:
    """(training, validation): ~15 % held out, evenly spread, when there are at least 6 slices."""
    if not enabled or len(slices) < MIN_SLICES_FOR_VALIDATION:
        return slices, []
    count = max(1, round(VALIDATION_FRACTION * len(slices)))
    held = {slices[int((i + 0.5) * len(slices) / count)] for i in range(count)}
    return [s for s in slices if s not in held], sorted(held)


def _slice_tensors(
    image: np.ndarray, labels: np.ndarray, axis: int, indices: list[int], img_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed (0–1) image and class-index slices resized to the network: ((N, S, S) float32,
    (N, S, S) int64); images bilinearly, labels by nearest neighbour."""
    images = torch.from_numpy(np.stack([np.take(image, i, axis=axis) for i in indices]).astype(np.float32))
    targets = torch.from_numpy(np.stack([np.take(labels, i, axis=axis) for i in indices]).astype(np.int64))
    size = (img_size, img_size)
    images = F.interpolate(images[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    targets = F.interpolate(targets[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return images, targets


@dataclass
class _TrainingData:
    """Slices of all cases at the network's size: (images (N, S, S), targets (N, S, S)) for training
    and validation (None, None when nothing is held out), and each case's (training, validation) slices."""

    train: tuple[torch.Tensor, ...]
    validation: tuple[Optional[torch.Tensor], ...]
    split: list[tuple[list[int], list[int]]]


def volume_prior(labels: np.ndarray, axis: int, annotated: list[int], num_classes: int, kind: str,
                 image: np.ndarray) -> SlicePrior:
    """The ``SlicePrior`` of kind ``kind`` of one volume's class labels (z, y, x) along ``axis``;
    ``image``: the volume's voxels, which the ``flow`` prior follows."""
    slices = np.moveaxis(image, axis, 0)
    flow = flow_images(slices, modality_of(slices)) if kind == "flow" else None
    return SlicePrior(np.moveaxis(labels, axis, 0), annotated, num_classes, kind, flow)


def leave_one_out_priors(prior: SlicePrior, part: list[int], img_size: int) -> torch.Tensor:
    """(N, K+1, S, S) prior logits of the annotated slices ``part``, each built from the other
    annotated slices only (``SlicePrior.leave_one_out``), resized to the network's input."""
    return _network_size([prior.leave_one_out(i) for i in part], img_size)


def _network_size(logits: list[np.ndarray], img_size: int) -> torch.Tensor:
    """(K+1, H, W) logits of N slices -> (N, K+1, S, S) at the network's input size."""
    return F.interpolate(torch.from_numpy(np.stack(logits)), size=(img_size, img_size), mode="bilinear",
                         align_corners=False)


def training_atlases(cases, class_labels, slices, axis: int, num_classes: int, report) -> list[Atlas]:
    """Every case's ``Atlas``: its labels completed from its annotated ``slices``."""
    atlases = []
    for index, (case, labels, chosen) in enumerate(zip(cases, class_labels, slices)):
        report(f"atlas {index + 1}/{len(cases)}: completing {case.name}'s labels")
        atlases.append(make_atlas(case.volume, labels, chosen, axis, num_classes, name=case.name))
    return atlases


def leave_one_out_atlas_priors(cases, atlases: list[Atlas], num_classes: int, axis: int, report,
                               cancel=None) -> list[Optional[AtlasPrior]]:
    """Each case's ``AtlasPrior`` from the other cases' atlases registered onto it, never its own
    labels; None for the case of a single-volume run."""
    if len(atlases) < 2:
        return [None] * len(cases)
    priors = []
    for index, case in enumerate(cases):
        report(f"atlas {index + 1}/{len(cases)}: registering the other volumes onto {case.name}")
        others = atlases[:index] + atlases[index + 1 :]
        priors.append(atlas_prior(case.volume, others, num_classes, axis, cancel=cancel))
    return priors


def _training_data(cases, class_labels, slices, preprocessing, config: FinetuneConfig, img_size: int,
                   guidance: Optional[str] = None, num_classes: int = 0,
                   atlas_priors: Sequence[Optional[AtlasPrior]] = ()) -> _TrainingData:
    """Each case normalised by its own statistics; the last ``validation_volumes`` cases held out
    whole, else ~15 % of each case's slices (``_split_validation``). Guided, every slice also gets its
    leave-one-out prior of kind ``guidance``: (images, targets, priors), and its case's atlas prior
    where ``atlas_priors`` gives one: (images, targets, priors, atlas priors)."""
    axis = SLICE_AXES[config.slice_axis]
    held_out_from = len(cases) - config.validation_volumes
    train, validation, split = [], [], []
    for index, (case, labels, chosen) in enumerate(zip(cases, class_labels, slices)):
        if index >= held_out_from:
            parts = ([], chosen)
        else:
            parts = _split_validation(chosen, config.validation and not config.validation_volumes)
        image = preprocessing.apply(case.volume.array)
        prior = volume_prior(labels, axis, chosen, num_classes, guidance, case.volume.array) if guidance else None
        atlas = atlas_priors[index] if atlas_priors else None
        for tensors, part in zip((train, validation), parts):
            if part:
                tensors.append(_slice_tensors(image, labels, axis, part, img_size))
                if prior is not None:
                    tensors[-1] += (leave_one_out_priors(prior, part, img_size),)
                if atlas is not None:
                    tensors[-1] += (_network_size([atlas.logits(i) for i in part], img_size),)
        split.append(parts)
    if not train:
        raise InputError("no training slice is left once the validation slices are held out")
    width = 2 + (guidance is not None) + any(p is not None for p in atlas_priors)
    joined = [tuple(torch.cat(t) for t in zip(*tensors)) if tensors else (None,) * width for tensors in (train, validation)]
    return _TrainingData(joined[0], joined[1], split)
