"""Segment a volume slice by slice with an H-SAM model: batching with out-of-memory back-off on the
device and in the precision ``hsam.runtime.devices`` resolves, progress and cancellation.

The volume is normalised with the bundle's intensity preprocessing, cut into slices along the
bundle's slice axis, resized to the network's input and back, and each voxel gets the label value of
the class with the highest logit (the mean of both decoding stages, the authors' default
prediction). Memory beyond the output arrays does not grow with the number of slices.
"""

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..guidance.atlas import Atlas, atlas_prior
from ..guidance.flow import flow_images, modality_of
from ..guidance.priors import SlicePrior, annotated_slices, volume_class_labels
from ..modeling.hsam import HSAM
from ..modeling.image_encoder import release_scratch_buffer
from ..runtime.devices import resolve_precision, select_device
from ..runtime.errors import Cancelled, HSAMError, InputError
from ..volumes.constants import SLICE_AXES
from ..volumes.preprocess import IntensityPreprocessing, logits_to_grid, slices_to_model_input
from .uncertainty import SIGNALS, slice_scores, stage_logits_on_grid, voxel_uncertainty

Progress = Callable[[float, str], None]
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


@dataclass
class SegmentationResult:
    """labels: (z, y, x) with the bundle's label values (0 = background); probabilities: (C+1, z, y, x)
    float16 softmax, channel 0 the background, when requested; uncertainty: (z, y, x) float32 in
    [0, 1] and slice_scores: (slices along the bundle's axis,) float64, NaN outside the segmented
    range, when requested (see ``hsam.inference.uncertainty``); prior: what a guided model corrected
    (``annotations``, ``atlas``; None: prompt-free); notes: warnings for the user (classes found
    nowhere), one line each."""

    labels: np.ndarray
    probabilities: Optional[np.ndarray] = None
    uncertainty: Optional[np.ndarray] = None
    slice_scores: Optional[np.ndarray] = None
    prior: Optional[str] = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- inference


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU/MPS allocators' out-of-memory RuntimeErrors."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in OUT_OF_MEMORY_MESSAGES)


def _check_volume(array: np.ndarray) -> None:
    if array.ndim != 3:
        raise InputError(f"expected a 3D volume, got an array of {array.ndim} dimensions {array.shape}")
    if min(array.shape) < 1:
        raise InputError(f"the volume is empty {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("the volume holds NaN or infinite voxels")


def _check_model(model: HSAM, metadata) -> None:
    if model.num_classes != metadata.num_classes or model.img_size != metadata.img_size:
        raise InputError(
            f"the model ({model.num_classes} classes, {model.img_size}px) does not match its metadata "
            f"({metadata.num_classes} classes, {metadata.img_size}px)"
        )


def _slice_bounds(slice_range: Optional[tuple[int, int]], depth: int) -> tuple[int, int]:
    """[start, stop) from an inclusive (first, last) range."""
    if slice_range is None:
        return 0, depth
    first, last = (int(i) for i in slice_range)
    if not 0 <= first <= last < depth:
        raise InputError(f"slice range {first}–{last} is not within 0–{depth - 1}")
    return first, last + 1


def _label_dtype(label_values: list[int]) -> np.dtype:
    largest = max(label_values, default=0)
    if min(label_values, default=0) < 1 or largest >= 2**32:
        raise InputError("label values must be between 1 and 2^32 − 1")
    return np.dtype(np.uint8 if largest < 2**8 else np.uint16 if largest < 2**16 else np.uint32)


def _forward(
    model: HSAM,
    slices: torch.Tensor,
    autocast_dtype: Optional[torch.dtype],
    uncertainty: Optional[str] = None,
    prior: Optional[torch.Tensor] = None,
    choice: Optional[Sequence[str]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """slices: (B, H, W) in [0, 1] on the model's device -> (float32 logits (B, C+1, H, W), the
    ``uncertainty`` signal (B, H, W) or None). prior: (B, C+1, H, W) prior logits on the slices' grid
    (guided mode): the logits are then the prior plus the model's correction, resized to the grid;
    ``choice`` (guided): each class's source among ``CHOICE_SOURCES`` (``combine_sources``)."""
    images = slices_to_model_input(slices, model.img_size)
    size = tuple(slices.shape[-2:])
    model_prior = None if prior is None else logits_to_grid(prior, (model.img_size, model.img_size))
    device_type = slices.device.type
    autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        output = model(images) if model_prior is None else model(images, prior=model_prior)
    voxels = None
    if uncertainty is not None:
        voxels = voxel_uncertainty(*stage_logits_on_grid(output.stage1_logits, output.stage2_logits, size), uncertainty)
    if prior is None:
        return logits_to_grid(output.masks.float(), size), voxels
    sources = {"prior": prior, "guided": prior + logits_to_grid(output.correction.float(), size)}
    if choice is None or set(choice) <= {"guided"}:
        return sources["guided"], voxels
    if "prompt-free" in choice:
        with autocast:
            sources["prompt-free"] = logits_to_grid(model(images).masks.float(), size)
    return combine_sources(sources, choice), voxels


NOTHING_FOUND = ("this guided model found none of its classes without annotations: paint a few slices "
                 "(--annotations), or fine-tune it with --atlas so that it segments new volumes")
UNCLAIMED = -1e4  # the score of a class no source puts at a pixel


def combine_sources(sources: dict[str, torch.Tensor], choice: Sequence[str]) -> torch.Tensor:
    """(B, K+1, H, W) scores whose arg-max is the labelmap that takes each class k from
    ``sources[choice[k − 1]]``. Where every class has one source, that source's logits as they are.
    Mixed, each source speaks only through its own arg-max, as logits of different scales cannot be
    compared: a pixel gets class k where k's source puts k; where several classes are put, the one
    its source is surest of (log-probability); where none is, the background. Probabilities of the
    result are then one-hot."""
    if len(set(choice)) == 1:
        return sources[choice[0]]
    first = next(iter(sources.values()))
    out = torch.full_like(first, UNCLAIMED)
    for k, name in enumerate(choice, start=1):
        log_probabilities = torch.log_softmax(sources[name], dim=1)
        claimed = log_probabilities.argmax(1) == k
        out[:, k] = torch.where(claimed, log_probabilities[:, k], out[:, k])
    out[:, 0] = torch.where((out[:, 1:] > UNCLAIMED).any(1), out[:, 0], 0.0)
    return out


def class_indices(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, H, W) index of the largest logit, the first on ties (uint8, int32 for K > 256).

    The same as ``argmax(dim=1)``, which reduces over a strided axis and is 3–15× slower on CPUs for
    the few channels of a segmentation model."""
    best = logits[:, 0].clone()
    indices = torch.zeros(best.shape, dtype=torch.uint8 if logits.shape[1] <= 256 else torch.int32, device=logits.device)
    for k in range(1, logits.shape[1]):
        indices.masked_fill_(logits[:, k] > best, k)
        torch.maximum(best, logits[:, k], out=best)
    return indices


def keep_largest_components(labels: np.ndarray, label_values: list[int], cancel=None) -> None:
    """In place: keep only the largest 3D connected component (face-connected) of each label value."""
    import SimpleITK as sitk

    for value in label_values:
        if cancel is not None and cancel.is_set():
            raise Cancelled("segmentation cancelled")
        mask = labels == value
        if not mask.any():
            continue
        components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8))))
        largest = sitk.GetArrayViewFromImage(components) == 1
        labels[mask & ~largest] = 0


class _AnnotationGuide:
    """The prior of every slice from the annotated ones, along axis 0 of ``class_labels``; ``images``:
    the volume's slices along that axis (for the ``flow`` prior)."""

    def __init__(self, class_labels: np.ndarray, num_classes: int, kind: str, images: np.ndarray) -> None:
        self.annotated = annotated_slices(class_labels, 0)
        flow = flow_images(images, modality_of(images)) if kind == "flow" else None
        self.prior = SlicePrior(class_labels, self.annotated, num_classes, kind, flow)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """(stop − start, K+1, H, W) prior logits."""
        return torch.from_numpy(np.stack([self.prior.logits(i) for i in range(start, stop)]))

    def keep_annotated(self, labels: np.ndarray, annotations: np.ndarray) -> None:
        """The annotated slices of ``labels`` (slices on axis 0) set to ``annotations``'."""
        labels[self.annotated] = annotations[self.annotated]


class _AtlasGuide:
    """The prior of every slice along ``axis`` from the training volumes' atlases registered onto the volume."""

    def __init__(self, volume, atlases: list[Atlas], metadata, axis: int, report: Progress, cancel) -> None:
        settings = metadata.guidance["atlas"]
        self.prior = atlas_prior(volume, atlases, metadata.num_classes, axis, settings["registration"],
                                 progress=lambda fraction, message: report(0.0, message), cancel=cancel)
        self.choice = settings.get("choice")

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.prior.logits(i) for i in range(start, stop)]))

    def restore(self, labels: np.ndarray, lookup: np.ndarray, classes: list[int]) -> None:
        """Where ``labels`` (slices on axis 0) hold none of ``classes`` (indices), the prior's arg-max
        puts them on the background."""
        for index in range(len(labels)):
            prior = self.prior.class_indices(index)
            empty = labels[index] == 0
            for k in classes:
                labels[index][empty & (prior == k)] = lookup[k]


def classes_in_every_volume(metadata) -> list[int]:
    """Indices (1…K) of the classes every training volume of the model has."""
    cases = metadata.training.get("cases") or []
    names = metadata.class_names
    return [k for k, name in enumerate(names, start=1)
            if cases and all(case.get("labelled_voxels", {}).get(name, 0) > 0 for case in cases)]


def _atlas_guide(model: HSAM, metadata, atlases: Sequence[Atlas], volume, axis: int, report: Progress, cancel):
    if not atlases or not metadata.guided or not model.guided or "atlas" not in metadata.guidance:
        return None
    return _AtlasGuide(volume, list(atlases), metadata, axis, report, cancel)


def _annotation_prior(model: HSAM, metadata, annotations: Optional[np.ndarray], array: np.ndarray, axis: int):
    if annotations is None:
        return None
    if not metadata.guided or not model.guided:
        raise InputError("this model is prompt-free: fine-tune a guided model (hsam finetune --guided) to use annotations")
    annotations = np.asarray(annotations)
    if annotations.shape != array.shape:
        raise InputError(f"the annotations' grid {annotations.shape} differs from the volume's {array.shape}")
    class_labels = np.moveaxis(volume_class_labels(annotations, metadata.label_values), axis, 0)
    return _AnnotationGuide(class_labels, metadata.num_classes, metadata.guidance["prior"], np.moveaxis(array, axis, 0))


def segment_volume(
    model: HSAM,
    volume,
    metadata,
    *,
    device: Union[str, torch.device] = "auto",
    batch_size: int = 4,
    precision: str = "auto",
    slice_range: Optional[tuple[int, int]] = None,
    progress: Optional[Progress] = None,
    cancel: Optional[threading.Event] = None,
    return_probabilities: bool = False,
    largest_component: bool = False,
    uncertainty: Optional[str] = None,
    annotations: Optional[np.ndarray] = None,
    atlases: Sequence[Atlas] = (),
) -> SegmentationResult:
    """Segment ``volume`` (an ``hsam.volumes.volume.Volume``) with ``model`` and its ``BundleMetadata``.

    The model is moved to ``device`` and put in eval mode (its previous mode is restored).
    ``slice_range``: (first, last) slice indices along the bundle's slice axis, both included; the
    other slices are left background. Batches that run out of memory are retried at half the size.
    ``progress(fraction, message)`` is called after every batch; ``cancel.is_set()`` is checked before
    each one and raises ``Cancelled``. ``largest_component`` keeps each label's largest 3D
    connected component (probabilities are left as predicted). ``uncertainty``: a signal of
    ``hsam.inference.uncertainty.SIGNALS`` to also return the uncertainty map and per-slice scores.
    ``annotations``: a labelmap of the model's label values on the volume's grid, for guided models:
    its annotated slices (any label along the model's axis) are propagated into the prior the model
    corrects (the bundle's prior kind), each class is taken from the source the model chose for it in
    training (prior, guided or prompt-free), and the annotated slices come out exactly as drawn.
    ``atlases`` (``hsam.models.bundle.read_atlases``): without annotations, a guided model corrects their
    registration onto the volume instead (the atlas prior), each class from the source chosen for it;
    without either, it runs prompt-free. A class that every training volume has and the result lacks
    is named in the result's notes and, with atlases, taken from the atlas prior; a guided model that
    finds none of them without annotations or atlases notes ``NOTHING_FOUND``.
    """
    array = np.asarray(volume.array)
    _check_arguments(model, metadata, array, batch_size, uncertainty)
    torch_device = select_device(device)
    autocast_dtype = resolve_precision(precision, torch_device)
    axis = SLICE_AXES[metadata.slice_axis]
    start, stop = _slice_bounds(slice_range, array.shape[axis])
    report = progress or (lambda fraction, message: None)
    guide, choice, prior_source = _choose_guide(model, metadata, annotations, atlases, volume, array, axis, report,
                                                cancel)
    outputs = _Outputs.allocate(metadata, array.shape, axis, return_probabilities, uncertainty is not None)
    preprocessing = IntensityPreprocessing.from_dict(metadata.preprocessing)
    intensity_range = preprocessing.intensity_range(array)
    source_slices = np.moveaxis(array, axis, 0)  # normalised batch by batch: no float copy of the volume

    def inputs(index: int, end: int):
        slices = torch.from_numpy(preprocessing.apply(source_slices[index:end], intensity_range))
        return slices, None if guide is None else guide.batch(index, end).to(torch_device)

    def forward(slices: torch.Tensor, prior: Optional[torch.Tensor]):
        return _forward(model, slices.to(torch_device), autocast_dtype, uncertainty, prior, choice)

    was_training = model.training
    model.to(torch_device).eval()
    try:
        with torch.inference_mode():
            _run_batches(inputs, forward, outputs, start, stop, batch_size, torch_device, report, cancel)
    finally:
        model.train(was_training)
        release_scratch_buffer()
    notes = _post_process(model, metadata, outputs, guide, annotations, axis, slice_range, largest_component, cancel)
    scores = None
    if outputs.uncertainty_map is not None:
        scores = slice_scores(outputs.uncertainty_map, axis)
        scores[:start] = scores[stop:] = np.nan
    return SegmentationResult(outputs.labels, outputs.probabilities, outputs.uncertainty_map, scores, prior_source,
                              notes)


def _check_arguments(model: HSAM, metadata, array: np.ndarray, batch_size: int, uncertainty: Optional[str]) -> None:
    _check_volume(array)
    _check_model(model, metadata)
    if batch_size < 1:
        raise InputError(f"the batch size must be at least 1, got {batch_size}")
    if metadata.slice_axis not in SLICE_AXES:
        raise InputError(f"unknown slice axis {metadata.slice_axis!r} in the model's metadata")
    if uncertainty is not None and uncertainty not in SIGNALS:
        raise InputError(f"unknown uncertainty signal {uncertainty!r}; choose one of {', '.join(SIGNALS)}")


def _choose_guide(model: HSAM, metadata, annotations, atlases, volume, array: np.ndarray, axis: int, report, cancel):
    """(guide, per-class choice, prior source): the annotations' prior, else the atlases', else none."""
    guide = _annotation_prior(model, metadata, annotations, array, axis)
    choice = metadata.guidance.get("choice") if guide is not None else None
    prior_source = "annotations" if guide is not None else None
    if guide is None:
        guide = _atlas_guide(model, metadata, atlases, volume, axis, report, cancel)
        if guide is not None:
            choice, prior_source = guide.choice, "atlas"
    return guide, choice, prior_source


@dataclass
class _Outputs:
    """The labelmap and, when asked for, probabilities and uncertainty, with slice-first views to fill."""

    lookup: np.ndarray
    labels: np.ndarray
    labels_slices: np.ndarray
    probabilities: Optional[np.ndarray] = None
    probabilities_slices: Optional[np.ndarray] = None
    uncertainty_map: Optional[np.ndarray] = None
    uncertainty_slices: Optional[np.ndarray] = None

    @classmethod
    def allocate(cls, metadata, shape: tuple, axis: int, probabilities: bool, uncertainty: bool) -> "_Outputs":
        lookup = np.array([0, *metadata.label_values], dtype=_label_dtype(metadata.label_values))
        labels = np.zeros(shape, dtype=lookup.dtype)
        outputs = cls(lookup, labels, np.moveaxis(labels, axis, 0))
        if probabilities:
            outputs.probabilities = np.zeros((metadata.num_classes + 1, *shape), dtype=np.float16)
            outputs.probabilities[0] = 1.0  # slices outside the range are background
            outputs.probabilities_slices = np.moveaxis(outputs.probabilities, axis + 1, 1)
        if uncertainty:
            outputs.uncertainty_map = np.zeros(shape, dtype=np.float32)
            outputs.uncertainty_slices = np.moveaxis(outputs.uncertainty_map, axis, 0)
        return outputs

    def write(self, index: int, end: int, logits: torch.Tensor, voxels) -> None:
        classes = class_indices(logits)
        self.labels_slices[index:end] = self.lookup[classes.cpu().numpy()]
        if self.probabilities_slices is not None:
            probs = torch.softmax(logits, dim=1).to(torch.float16).cpu().numpy()
            self.probabilities_slices[:, index:end] = probs.transpose(1, 0, 2, 3)
        if self.uncertainty_slices is not None:
            self.uncertainty_slices[index:end] = voxels.cpu().numpy()


def _run_batches(inputs, forward, outputs: _Outputs, start: int, stop: int, batch_size: int, torch_device, report,
                 cancel) -> None:
    """Slices ``start:stop`` through ``forward(*inputs(index, end))`` in batches, halving the batch on out of
    memory."""
    index, batch = start, batch_size
    while index < stop:
        if cancel is not None and cancel.is_set():
            raise Cancelled("segmentation cancelled")
        end = min(index + batch, stop)
        slices, prior = inputs(index, end)
        try:
            logits, voxels = forward(slices, prior)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            logits = None
        if logits is None:  # retried outside the handler so that the failed batch's memory is freed
            if batch == 1:
                raise HSAMError(
                    f"out of memory on {torch_device} with a single slice: use --device cpu, "
                    "a smaller volume, or a model with a smaller input size"
                )
            batch //= 2
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        outputs.write(index, end, logits, voxels)
        done = end - start
        report(done / (stop - start), f"slice {done}/{stop - start} (batch {batch})")
        index = end


def _post_process(model: HSAM, metadata, outputs: _Outputs, guide, annotations, axis: int, slice_range,
                  largest_component: bool, cancel) -> list[str]:
    """Keep the largest components, the annotated slices as drawn; the notes on missing classes."""
    if largest_component:
        keep_largest_components(outputs.labels, metadata.label_values, cancel)
    if isinstance(guide, _AnnotationGuide):
        guide.keep_annotated(outputs.labels_slices, np.moveaxis(annotations, axis, 0))
    elif slice_range is None:
        return _missing_classes(model, metadata, guide, outputs.labels_slices, outputs.lookup)
    return []


def _missing_classes(model: HSAM, metadata, guide: Optional[_AtlasGuide], labels: np.ndarray,
                     lookup: np.ndarray) -> list[str]:
    """Notes on the classes every training volume has and ``labels`` lacks; with an atlas ``guide``,
    they are taken from its prior. A guided model without one that finds none: ``NOTHING_FOUND``."""
    expected = classes_in_every_volume(metadata)
    found = set(np.unique(labels).tolist())
    missing = [k for k in expected if int(lookup[k]) not in found]
    if not missing:
        return []
    names = ", ".join(metadata.class_names[k - 1] for k in missing)
    if guide is not None:
        guide.restore(labels, lookup, missing)
        return [f"the model found no {names}, which every training volume has: kept the atlas prior for it"]
    if metadata.guided and len(missing) == len(expected):
        return [NOTHING_FOUND]
    return [f"the model found no {names}, which every training volume has"]
