"""Volume and segmentation files, read and written with SimpleITK so that geometry is kept exactly.

Arrays are indexed ``(z, y, x)``; spacing and origin are ``(x, y, z)`` in mm and direction is a
row-major 3×3 tuple, all in SimpleITK's LPS convention. Readers raise ``InputError`` with one line
for anything HSAM cannot use: truncated files (NIfTI checked by ``hsam.nifti``, as ITK zero-fills
them), NaN or infinite voxels, complex or vector voxels, labelmaps off the volume's voxel lattice.
Writers go through ``hsam.files``: each file is read back before it is renamed into place, so a
failed or short write (a full disk) leaves nothing behind. ITK's and GDCM's own console messages
are silenced; what HSAM has to say comes as an ``InputError`` or an ``HSAMWarning``.

Supported: NRRD, NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd`` for reading), a DICOM
series folder, and 3D Slicer's ``.seg.nrrd`` segmentation files (single- and multi-layer).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import HSAMWarning, InputError, printable
from .constants import MAX_LABEL_VALUE
from .files import Outputs, error_reason, expect_size, file_suffix, real_path, write_atomic
from .nifti import check_nifti

PathLike = Union[str, os.PathLike]

SEGMENTATION_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
VOLUME_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
GEOMETRY_TOLERANCE = 1e-4
COMPLEX_PIXEL_IDS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
# Set by ITK's series reader on an image whose slices are missing or unevenly spaced.
NON_UNIFORM_SAMPLING_KEY = "ITK_non_uniform_sampling_deviation"

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
class Volume:
    """A 3D scalar image: voxels ``array`` (z, y, x) and its LPS geometry.

    ``spacing`` and ``origin`` are ``(x, y, z)`` in mm; ``direction`` is the row-major 3×3 matrix
    whose columns are the x, y, z index axes in LPS.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        """The voxels and geometry of a 3D scalar SimpleITK image."""
        return cls(
            sitk.GetArrayFromImage(image),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    def to_sitk(self, array: Optional[np.ndarray] = None) -> sitk.Image:
        """A SimpleITK image with this geometry holding ``array`` (default: this volume's voxels)."""
        voxels = self.array if array is None else np.asarray(array)
        if voxels.shape != self.array.shape:
            raise InputError(f"array of shape {voxels.shape} does not fit a volume of shape {self.array.shape}")
        if voxels.dtype == bool:
            voxels = voxels.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
        _set_geometry(image, self)
        return image

    def geometry_difference(self, other: "Volume", tol: float = GEOMETRY_TOLERANCE) -> Optional[str]:
        """How ``other``'s grid differs from this one ("size …; spacing …"), or None if it is the same.

        Spacing and origin are compared in mm with tolerance ``tol``, direction cosines with ``tol``.
        """
        differences = []
        if other.array.shape[:3] != self.array.shape[:3]:
            differences.append(f"size {_xyz(other.array.shape)} vs {_xyz(self.array.shape)} voxels")
        for name in ("spacing", "origin", "direction"):
            mine, theirs = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(mine, theirs, rtol=0.0, atol=tol):
                differences.append(f"{name} {_fmt(theirs)} vs {_fmt(mine)}")
        return "; ".join(differences) or None

    def same_geometry(self, other: "Volume", tol: float = GEOMETRY_TOLERANCE) -> bool:
        """Whether ``other`` lies on the same voxel grid (size, spacing, origin, direction)."""
        return self.geometry_difference(other, tol) is None

    @property
    def index_to_physical(self) -> np.ndarray:
        """4×4 matrix from (i, j, k) = (x, y, z) voxel index to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix


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


# ------------------------------------------------------------------------------------- reading


def read_volume(path: PathLike, series: Optional[str] = None) -> Volume:
    """Read a 3D scalar volume: NRRD, NIfTI, MetaImage, or a folder holding a DICOM series.

    Floating-point images come back as float32, integer images keep their own dtype (e.g. int16
    for CT). In a folder with several DICOM series, ``series`` (a Series Instance UID) picks one;
    without it the series with the most files is read and an ``HSAMWarning`` says which.
    """
    path = Path(path)
    image = _read_dicom_series(path, series) if path.is_dir() else _read_image(path)
    _check_scalar_3d(image, path.name)
    volume = Volume.from_sitk(image)
    if np.issubdtype(volume.array.dtype, np.floating):
        volume.array = volume.array.astype(np.float32, copy=False)
    elif volume.array.dtype == bool:
        volume.array = volume.array.astype(np.uint8)
    return volume


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


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """ITK, GDCM and MetaIO print warnings straight to the process's stderr: send them nowhere."""
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _read_image(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path} is not readable (permission denied)")
    if file_suffix(path) in (".nii", ".nii.gz"):
        check_nifti(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _native_output_silenced():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read {path.name}: {error_reason(error)}") from None
    _check_voxels(image, path.name)
    return image


def _read_dicom_series(folder: Path, series: Optional[str]) -> sitk.Image:
    with _native_output_silenced():
        found = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
                 for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}
    if not found:
        raise InputError(f"no DICOM series found in folder {folder}")
    listed = {real_path(name) for names in found.values() for name in names}
    unreadable = [f for f in sorted(folder.iterdir()) if _looks_like_dicom(f) and real_path(f) not in listed]
    if unreadable:
        raise InputError(
            f"folder {folder.name} holds {len(unreadable)} DICOM file(s) that cannot be read (truncated or corrupt?), "
            f"e.g. {printable(unreadable[0].name)}"
        )
    if series is not None and series not in found:
        raise InputError(f"folder {folder.name} has no DICOM series {series}; it has {', '.join(found)}")
    if series is None:
        series = max(found, key=lambda uid: len(found[uid]))
        if len(found) > 1:
            warnings.warn(HSAMWarning(
                f"folder {folder.name} holds {len(found)} DICOM series; read {series} ({len(found[series])} files), "
                "choose another with --series UID"
            ), stacklevel=3)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(found[series])
    try:
        with _native_output_silenced():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read the DICOM series in {folder.name}: {error_reason(error)}") from None
    if image.HasMetaDataKey(NON_UNIFORM_SAMPLING_KEY):
        raise InputError(f"the DICOM series in {folder.name} has missing or unevenly spaced slices")
    _check_voxels(image, folder.name)
    return image


def _looks_like_dicom(path: Path) -> bool:
    """A file with the DICOM preamble ("DICM" after 128 bytes)."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _check_voxels(image: sitk.Image, name: str) -> None:
    """Refuse complex voxels and NaN or infinite ones (in any format)."""
    if image.GetPixelID() in COMPLEX_PIXEL_IDS:
        raise InputError(f"{name} has complex-valued voxels; HSAM needs real scalar voxels")
    voxels = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(voxels.dtype, np.floating):
        bad = np.count_nonzero(~np.isfinite(voxels))
        if bad:
            raise InputError(f"{name} has {bad} NaN or infinite voxels")


def _check_scalar_3d(image: sitk.Image, name: str) -> None:
    dimension = image.GetDimension()
    if dimension == 2:
        raise InputError(f"{name} is a 2D image; HSAM needs a 3D volume")
    if dimension != 3:
        raise InputError(f"{name} is a {dimension}D image; HSAM needs a 3D volume (split time series first)")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            f"{name} has {components} components per voxel (a vector, colour or 4D image); HSAM needs a scalar 3D volume"
        )


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


# ------------------------------------------------------------------------------------- writing


def write_image(path: PathLike, image: sitk.Image, overwrite: bool = False, outputs: Optional[Outputs] = None,
                compress: bool = True) -> None:
    """Write ``image`` (compressed unless ``compress`` is False) in the format of ``path``'s suffix through
    ``hsam.files.write_atomic`` (staged in ``outputs`` if given): it is read back with HSAM's checks and
    compared voxel by voxel before it is renamed into place, as ITK's NIfTI writer does not report a
    full disk."""
    def write(temporary: Path) -> None:
        with _native_output_silenced():
            sitk.WriteImage(image, str(temporary), compress)

    def verify(temporary: Path) -> None:
        try:
            written = _read_image(temporary)
            same = np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image))
        except InputError:
            same = False
        if not same:
            raise OSError("the written file reads back incomplete or different (is the disk full?)")

    write_atomic(path, write, overwrite, verify, outputs)


def write_volume(path: PathLike, volume: Volume, overwrite: bool = False, outputs: Optional[Outputs] = None) -> None:
    """Write ``volume`` (its own dtype, compressed) to ``.nrrd``, ``.nii``, ``.nii.gz`` or ``.mha``."""
    path = Path(path)
    _check_suffix(path, VOLUME_SUFFIXES, "volume")
    write_image(path, volume.to_sitk(), overwrite, outputs)


NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "short", "uint16": "ushort", "int32": "int",
              "uint32": "uint", "float32": "float", "float64": "double"}


def write_raw_nrrd(path: PathLike, volume: Volume, overwrite: bool = False) -> None:
    """Write ``volume`` as an uncompressed ``.nrrd`` straight from its voxels (no copy; checked by size,
    not read back): fast for a large temporary volume that ``read_volume`` checks when it reads it."""
    array = np.ascontiguousarray(volume.array).astype(volume.array.dtype.newbyteorder("<"), copy=False)
    if array.dtype.name not in NRRD_TYPES:
        raise InputError(f"cannot write voxels of type {array.dtype} to NRRD")
    axes = np.reshape(volume.direction, (3, 3)) * np.asarray(volume.spacing, dtype=float)  # columns: index axes
    header = (f"NRRD0004\ntype: {NRRD_TYPES[array.dtype.name]}\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {' '.join(str(n) for n in array.shape[::-1])}\n"
              f"space directions: {' '.join(_nrrd_vector(axes[:, i]) for i in range(3))}\n"
              f"kinds: domain domain domain\nendian: little\nencoding: raw\nspace origin: {_nrrd_vector(volume.origin)}\n\n"
              ).encode("ascii")

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            file.write(header)
            array.tofile(file)

    write_atomic(path, write, overwrite, expect_size(len(header) + array.nbytes))


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


def _check_suffix(path: Path, suffixes: Sequence[str], what: str) -> None:
    if not path.name.lower().endswith(tuple(suffixes)):
        raise InputError(f"{path.name}: a {what} file must end with one of {', '.join(suffixes)}")


# ------------------------------------------------------------------------------------- helpers


def _set_geometry(image: sitk.Image, volume: Volume) -> None:
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection([float(d) for d in volume.direction])


def _xyz(shape: tuple[int, ...]) -> str:
    return "×".join(str(n) for n in shape[:3][::-1])


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _nrrd_vector(values: Sequence[float]) -> str:
    return "(" + ",".join(_num(v) for v in values) + ")"


def _num(value: float) -> str:
    return repr(float(value)).removesuffix(".0") if float(value).is_integer() else repr(float(value))
