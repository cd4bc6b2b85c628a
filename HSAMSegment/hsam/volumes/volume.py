"""Volume files, read and written with SimpleITK so that geometry is kept exactly.

Arrays are indexed ``(z, y, x)``; spacing and origin are ``(x, y, z)`` in mm and direction is a
row-major 3×3 tuple, all in SimpleITK's LPS convention. Readers raise ``InputError`` with one line
for anything HSAM cannot use: truncated files (NIfTI checked by ``hsam.volumes.nifti``, as ITK
zero-fills them), NaN or infinite voxels, complex or vector voxels. Writers go through
``hsam.volumes.files``: each file is read back before it is renamed into place, so a failed or short
write (a full disk) leaves nothing behind. ITK's and GDCM's own console messages are silenced; what
HSAM has to say comes as an ``InputError`` or an ``HSAMWarning``.

Supported: NRRD, NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd`` for reading) and a DICOM
series folder. Labelmaps and 3D Slicer segmentations: ``hsam.volumes.segmentation``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import HSAMWarning, InputError, printable
from .files import Outputs, error_reason, expect_size, file_suffix, real_path, write_atomic
from .nifti import check_nifti

PathLike = Union[str, os.PathLike]
VOLUME_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
GEOMETRY_TOLERANCE = 1e-4
COMPLEX_PIXEL_IDS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
# Set by ITK's series reader on an image whose slices are missing or unevenly spaced.
NON_UNIFORM_SAMPLING_KEY = "ITK_non_uniform_sampling_deviation"


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


def write_image(path: PathLike, image: sitk.Image, overwrite: bool = False, outputs: Optional[Outputs] = None,
                compress: bool = True) -> None:
    """Write ``image`` (compressed unless ``compress`` is False) in the format of ``path``'s suffix through
    ``hsam.volumes.files.write_atomic`` (staged in ``outputs`` if given): it is read back with HSAM's checks and
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


def _check_suffix(path: Path, suffixes: Sequence[str], what: str) -> None:
    if not path.name.lower().endswith(tuple(suffixes)):
        raise InputError(f"{path.name}: a {what} file must end with one of {', '.join(suffixes)}")


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
