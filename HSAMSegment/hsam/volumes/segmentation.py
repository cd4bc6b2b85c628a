"""Labelmaps and 3D Slicer ``.seg.nrrd`` segmentations (single- and multi-layer): ``Segment``, readers
that place the labels on a volume's voxel grid, and writers, on ``hsam.volumes.volume``'s files.

Labels come back as the smallest unsigned dtype, up to ``MAX_LABEL_VALUE``; a labelmap off the
volume's voxel lattice is refused unless resampling is asked for.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import HSAMWarning, InputError, printable
from .constants import MAX_LABEL_VALUE
from .files import Outputs
from .volume import (
    GEOMETRY_TOLERANCE,
    PathLike,
    Volume,
    _check_scalar_3d,
    _check_suffix,
    _num,
    _read_image,
    write_image,
)

SEGMENTATION_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")

# Colours given to segments that come without one (cycled by label value).
DEFAULT_COLORS = (
    (0.86, 0.32, 0.26),
    (0.33, 0.66, 0.41),
    (0.27, 0.49, 0.80),
    (0.95, 0.77, 0.25),
    (0.62, 0.38, 0.74),
    (0.26, 0.74, 0.78),
    (0.93, 0.53, 0.18),
    (0.78, 0.44, 0.60),
    (0.55, 0.71, 0.24),
    (0.60, 0.48, 0.36),
)

# RAS = diag(-1, -1, 1) · LPS: used for the IJK→RAS matrix Slicer keeps as the reference geometry.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Segment:
    """One class of a segmentation.

    ``terminology`` is a 3D Slicer terminology entry string, e.g. ``"Segmentation category and type -
    3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~~^^~^^"``.
    """

    name: str
    label_value: int
    color: tuple[float, float, float] = field(default=(0.5, 0.5, 0.5))
    terminology: Optional[str] = None

    def __post_init__(self) -> None:
        self.label_value = int(self.label_value)
        if self.label_value < 1:
            raise InputError(f"segment '{self.name}' has label value {self.label_value}; label values start at 1")
        self.color = tuple(float(c) for c in self.color)
        if len(self.color) != 3 or not all(0.0 <= c <= 1.0 for c in self.color):
            raise InputError(f"segment '{self.name}' colour {self.color} is not three numbers in 0–1")


def default_segment(label_value: int) -> Segment:
    """``Label_<v>`` with a colour from ``DEFAULT_COLORS``."""
    return Segment(f"Label_{label_value}", label_value, DEFAULT_COLORS[(label_value - 1) % len(DEFAULT_COLORS)])


def read_labelmap(
    path: PathLike, reference: Optional[Volume] = None, resample: bool = False
) -> tuple[np.ndarray, list[Segment]]:
    """Read a labelmap or a 3D Slicer ``.seg.nrrd``: (labels (z, y, x), segments).

    A ``.seg.nrrd`` gives its segments' names, colours, label values and terminology; its layers
    are merged into one array, later layers over earlier ones, with an ``HSAMWarning`` naming the
    segments that overlap (if two segments share a label value in different layers, all segments are
    renumbered 1…N in file order). A plain labelmap gives one ``Label_<v>`` segment per non-zero
    value. The labels come back as the smallest unsigned dtype; values above ``MAX_LABEL_VALUE``
    are refused.

    With ``reference``, the labels are placed on its grid: a labelmap on the same voxel lattice
    (e.g. a cropped ``.seg.nrrd``, or one reaching into empty space around the volume) is pasted
    exactly; any other geometry is refused with an ``InputError`` naming the difference, or resampled
    with nearest neighbour if ``resample``. Labelled voxels outside the volume are refused, or with
    ``resample`` dropped with an ``HSAMWarning`` saying how many, per segment.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path.name} is a folder; a labelmap must be a single file")
    image = _read_image(path)
    if path.name.lower().endswith(SEGMENTATION_SUFFIX):
        labels, segments = _merge_segmentation_layers(image, path.name)
    else:
        _check_scalar_3d(image, path.name)
        labels = _integer_labels(sitk.GetArrayFromImage(image), path.name)
        segments = [default_segment(int(v)) for v in np.unique(labels) if v != 0]
    if reference is not None:
        labels = _place_on_grid(labels, image, reference, resample, path.name, segments)
    return labels, segments


def _integer_labels(array: np.ndarray, name: str) -> np.ndarray:
    """Labels as the smallest unsigned integer dtype; floats must hold whole numbers."""
    if array.size == 0:
        raise InputError(f"{name} is empty")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise InputError(f"{name} holds non-integer values; a labelmap must hold whole numbers")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError(f"{name} has voxel type {array.dtype}; a labelmap must hold integers")
    low, high = array.min(), array.max()
    if low < 0:
        raise InputError(f"{name} holds negative label values (minimum {low})")
    return array.astype(_label_dtype(int(high)), copy=False)


def _label_dtype(largest: int) -> np.dtype:
    if largest > MAX_LABEL_VALUE:
        raise InputError(f"label value {largest} is too large (at most {MAX_LABEL_VALUE})")
    return np.dtype(np.uint8 if largest < 2**8 else np.uint16)


def _merge_segmentation_layers(image: sitk.Image, name: str) -> tuple[np.ndarray, list[Segment]]:
    """One label array from a ``.seg.nrrd`` image (3D, or layers as vector components)."""
    if image.GetDimension() != 3:
        raise InputError(f"{name} is a {image.GetDimension()}D image; a segmentation must be 3D")
    array = sitk.GetArrayFromImage(image)
    layers = array[..., None] if array.ndim == 3 else array  # (z, y, x, layer)
    fields = _segment_fields(image)
    if not fields:
        raise InputError(f"{name} has no Segment metadata; is it a 3D Slicer segmentation?")
    old_format = "LabelValue" not in fields[0]  # before Slicer 4.11: one layer of 0/1 per segment
    entries = []
    for index, values in enumerate(fields):
        where = f"{name}: segment {index}"
        (layer,) = _segment_numbers(values, "Layer", [index if old_format else 0], where)
        (label_value,) = _segment_numbers(values, "LabelValue", [1 if old_format else index + 1], where)
        if not 0 <= layer < layers.shape[-1]:
            raise InputError(f"{name}: segment {index} is in layer {layer} but the file has {layers.shape[-1]}")
        color = _segment_numbers(values, "Color", DEFAULT_COLORS[index % len(DEFAULT_COLORS)], where)
        color = tuple(min(max(c, 0.0), 1.0) for c in color)
        entries.append((layer, label_value, values.get("Name", f"Segment_{index + 1}"), color, _terminology(values)))
    _label_dtype(max(value for _, value, *_ in entries))
    renumber = len({value for _, value, *_ in entries}) < len(entries)
    segments = [
        Segment(seg_name, index + 1 if renumber else value, color, terminology)
        for index, (_, value, seg_name, color, terminology) in enumerate(entries)
    ]
    labels = np.zeros(layers.shape[:3], dtype=_label_dtype(max(s.label_value for s in segments)))
    overlaps = []
    for (layer, value, *_), segment in sorted(zip(entries, segments), key=lambda pair: pair[0][0]):
        mask = layers[..., layer] == value
        overlaps += _overlaps(labels, mask, segment, segments)
        labels[mask] = segment.label_value
    if overlaps:
        warnings.warn(HSAMWarning(f"{printable(name)}: {'; '.join(overlaps)} (the later layer is kept)"), stacklevel=3)
    return labels, segments


def _segment_numbers(values: dict[str, str], key: str, default: Sequence, where: str) -> list:
    """The numbers of a ``Segment<i>_<key>`` field (integers except colours)."""
    text = values.get(key)
    if text is None:
        return list(default)
    kind = float if key == "Color" else int
    try:
        numbers = [kind(item) for item in text.split()]
    except ValueError:
        raise InputError(f"{where} has a non-numeric {key} {printable(text)!r}") from None
    if len(numbers) != len(default):
        raise InputError(f"{where} has {key} {printable(text)!r}; expected {len(default)} number(s)")
    return numbers


def _overlaps(labels: np.ndarray, mask: np.ndarray, segment: Segment, segments: Sequence[Segment]) -> list[str]:
    """'segments A and B overlap in N voxels' for each segment already in ``labels`` that ``mask`` covers."""
    covered = labels[mask]
    names = {s.label_value: s.name for s in segments}
    values, counts = np.unique(covered[covered != 0], return_counts=True)
    return [
        f"segments {printable(names[int(v)])!r} and {printable(segment.name)!r} overlap in {n} voxels"
        for v, n in zip(values, counts)
    ]


def _segment_fields(image: sitk.Image) -> list[dict[str, str]]:
    """``Segment<i>_<Key>`` metadata as one dict per segment, in index order."""
    by_index: dict[int, dict[str, str]] = {}
    for key in image.GetMetaDataKeys():
        head, _, field_name = key.partition("_")
        if head.startswith("Segment") and head[7:].isdigit() and field_name:
            by_index.setdefault(int(head[7:]), {})[field_name] = image.GetMetaData(key)
    return [by_index[i] for i in sorted(by_index)]


def _terminology(values: dict[str, str]) -> Optional[str]:
    for tag in values.get("Tags", "").split("|"):
        key, _, value = tag.strip().partition(":")
        if key == "TerminologyEntry" and value:
            return value
    return None


def _place_on_grid(
    labels: np.ndarray, image: sitk.Image, reference: Volume, resample: bool, name: str, segments: Sequence[Segment]
) -> np.ndarray:
    """``labels`` (on ``image``'s grid) moved onto ``reference``'s grid."""
    source = Volume(
        labels,
        tuple(float(s) for s in image.GetSpacing()),
        tuple(float(o) for o in image.GetOrigin()),
        tuple(float(d) for d in image.GetDirection()),
    )
    difference = reference.geometry_difference(source)
    if difference is None:
        return labels
    offset = _lattice_offset(source, reference)
    if offset is None and not resample:
        raise InputError(
            f"{name} is not on the volume's voxel grid ({difference}); resample it onto the volume first "
            "or pass --resample-labels"
        )
    outside = _labels_outside(source, reference, segments)
    if outside and not resample:
        raise InputError(f"{name} has {outside} outside the volume ({difference}); "
                         "crop it or pass --resample-labels to drop them")
    placed = _paste(labels, offset, reference.array.shape) if offset is not None else _resample(source, reference)
    if labels.any() and not placed.any():
        raise InputError(f"{name} does not overlap the volume ({difference})")
    if outside:
        warnings.warn(HSAMWarning(f"{printable(name)}: dropped {outside} outside the volume"), stacklevel=3)
    return placed


def _labels_outside(source: Volume, reference: Volume, segments: Sequence[Segment]) -> Optional[str]:
    """'N labelled voxels (segment: n, ...)' for ``source``'s labelled voxels whose centres lie outside
    ``reference``, or None if there are none."""
    inside = sitk.Resample(  # 1 where a voxel centre of source lies in the volume
        reference.to_sitk(np.ones(reference.array.shape, np.uint8)),
        source.to_sitk(np.zeros(source.array.shape, np.uint8)),
        sitk.Transform(), sitk.sitkNearestNeighbor, 0,
    )
    lost = source.array[(sitk.GetArrayViewFromImage(inside) == 0) & (source.array != 0)]
    if lost.size == 0:
        return None
    names = {s.label_value: s.name for s in segments}
    values, counts = np.unique(lost, return_counts=True)
    per_segment = ", ".join(f"{printable(names[int(v)])}: {n}" for v, n in zip(values, counts))
    return f"{lost.size} labelled voxel{'s' if lost.size > 1 else ''} ({per_segment})"


def _resample(source: Volume, reference: Volume) -> np.ndarray:
    """``source``'s labels resampled onto ``reference``'s grid by nearest neighbour, 0 outside."""
    source_image = source.to_sitk()
    return sitk.GetArrayFromImage(sitk.Resample(
        source_image, reference.to_sitk(np.zeros(reference.array.shape, np.uint8)),
        sitk.Transform(), sitk.sitkNearestNeighbor, 0, source_image.GetPixelID(),
    ))


def _lattice_offset(source: Volume, reference: Volume, tol: float = GEOMETRY_TOLERANCE) -> Optional[np.ndarray]:
    """(z, y, x) index of ``source``'s first voxel in ``reference`` if both share one voxel lattice."""
    if not (
        np.allclose(source.spacing, reference.spacing, rtol=0.0, atol=tol)
        and np.allclose(source.direction, reference.direction, rtol=0.0, atol=tol)
    ):
        return None
    index = np.linalg.solve(reference.index_to_physical, [*source.origin, 1.0])[:3]
    if not np.allclose(index, np.round(index), rtol=0.0, atol=1e-3):
        return None
    return np.round(index[::-1]).astype(int)


def _paste(labels: np.ndarray, offset: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` written at ``offset`` into zeros of ``shape``, cropped where it sticks out."""
    out = np.zeros(shape, dtype=labels.dtype)
    start = np.maximum(offset, 0)
    stop = np.minimum(offset + np.asarray(labels.shape), shape)
    if np.any(stop <= start):
        return out
    target = tuple(slice(a, b) for a, b in zip(start, stop))
    source = tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, offset))
    out[target] = labels[source]
    return out


def write_labelmap(
    path: PathLike, labels: np.ndarray, reference: Volume, overwrite: bool = False, outputs: Optional[Outputs] = None
) -> None:
    """Write ``labels`` (z, y, x) on ``reference``'s grid, compressed: uint8 if the largest value is
    below 256, else uint16. Formats: ``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha``."""
    path = Path(path)
    _check_suffix(path, LABELMAP_SUFFIXES, "labelmap")
    write_image(path, reference.to_sitk(_labels_for_writing(labels, reference)), overwrite, outputs)


def write_segmentation(
    path: PathLike,
    labels: np.ndarray,
    reference: Volume,
    segments: Sequence[Segment],
    overwrite: bool = False,
    outputs: Optional[Outputs] = None,
    compress: bool = True,
) -> None:
    """Write a single-layer 3D Slicer ``.seg.nrrd`` on ``reference``'s grid (compressed unless ``compress``
    is False).

    Each segment keeps its name, colour, label value and terminology. Non-zero values of ``labels``
    that no segment describes get a default ``Label_<v>`` segment.
    """
    path = Path(path)
    if not path.name.lower().endswith(SEGMENTATION_SUFFIX):
        raise InputError(f"{path.name}: a segmentation file must end with {SEGMENTATION_SUFFIX}")
    array = _labels_for_writing(labels, reference)
    segments = list(segments)
    values = [s.label_value for s in segments]
    if len(set(values)) != len(values):
        raise InputError("two segments share a label value")
    if not set(range(1, int(array.max(initial=0)) + 1)) <= set(values):  # else every value is described
        present = {int(v) for v in np.unique(array) if v != 0}
        segments += [default_segment(v) for v in sorted(present - set(values))]
    if max(values, default=0) > np.iinfo(array.dtype).max:
        array = array.astype(_label_dtype(max(values)))

    image = reference.to_sitk(array)
    for key, value in _segmentation_metadata(segments, reference).items():
        image.SetMetaData(key, value)
    write_image(path, image, overwrite, outputs, compress)


def write_output(
    path: PathLike,
    labels: np.ndarray,
    reference: Volume,
    segments: Sequence[Segment] = (),
    overwrite: bool = False,
    outputs: Optional[Outputs] = None,
) -> None:
    """``write_segmentation`` for a ``.seg.nrrd`` path, else ``write_labelmap``."""
    if str(path).lower().endswith(SEGMENTATION_SUFFIX):
        write_segmentation(path, labels, reference, segments, overwrite, outputs)
    else:
        write_labelmap(path, labels, reference, overwrite, outputs)


def _labels_for_writing(labels: np.ndarray, reference: Volume) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape:
        raise InputError(f"labels of shape {labels.shape} do not match the volume's {reference.array.shape}")
    return _integer_labels(labels, "the labelmap")


def _segmentation_metadata(segments: Sequence[Segment], reference: Volume) -> dict[str, str]:
    """The NRRD header fields 3D Slicer's segmentation storage node reads and writes."""
    nz, ny, nx = reference.array.shape
    extent = f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}"
    ijk_to_ras = reference.index_to_physical
    ijk_to_ras[:3] = _LPS_TO_RAS @ ijk_to_ras[:3]
    geometry = ";".join(_num(v) for v in ijk_to_ras.ravel()) + ";" + extent.replace(" ", ";") + ";"
    metadata = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": (
            f"Reference image geometry|{geometry}|Image geometry description string determining the geometry "
            "of the labelmap that is created in course of conversion."
        ),
    }
    for index, segment in enumerate(segments):
        tags = "Segmentation.Status:inprogress|"
        if segment.terminology:
            tags += f"TerminologyEntry:{segment.terminology}|"
        metadata.update({
            f"Segment{index}_ID": f"Segment_{segment.label_value}",
            f"Segment{index}_Name": segment.name,
            f"Segment{index}_NameAutoGenerated": "0",
            f"Segment{index}_Color": " ".join(_num(c) for c in segment.color),
            f"Segment{index}_ColorAutoGenerated": "0",
            f"Segment{index}_LabelValue": str(segment.label_value),
            f"Segment{index}_Layer": "0",
            # The full extent for every segment: Slicer crops a shared layer to its first segment's extent.
            f"Segment{index}_Extent": extent,
            f"Segment{index}_Tags": tags,
        })
    return metadata
