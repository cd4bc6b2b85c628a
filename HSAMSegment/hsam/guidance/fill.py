"""The Segment Editor's *Fill between slices* on (z, y, x) arrays: ITK's morphological contour
interpolation (Albu et al., IEEE TBME 2008) through Slicer's ``vtkITKMorphologicalContourInterpolator``
(PyPI ``slicer-core``), with the effect's settings; the ``fill`` prior and a baseline. Also the check
of annotated slice indices that the slice-wise baselines share."""

import os
from typing import Sequence

import numpy as np

from ..runtime.errors import InputError


def check_annotated(labels: np.ndarray, annotated: Sequence[int], axis: int) -> list[int]:
    """The distinct ``annotated`` slice indices, sorted, once checked against the 3D ``labels`` along ``axis``."""
    if labels.ndim != 3:
        raise InputError(f"expected a 3D labelmap, got an array of {labels.ndim} dimensions {labels.shape}")
    chosen = sorted({int(i) for i in annotated})
    if not chosen:
        raise InputError("no annotated slice given")
    outside = [i for i in chosen if not 0 <= i < labels.shape[axis]]
    if outside:
        raise InputError(f"slice {outside[0]} is outside the volume (0–{labels.shape[axis] - 1} along axis {axis})")
    return chosen


def fill_between_slices(labels: np.ndarray, annotated: Sequence[int], axis: int = 0) -> np.ndarray:
    """The Segment Editor's *Fill between slices* given the ``annotated`` slices (along ``axis``) of ``labels``.

    As the effect does, the annotated slices of every label go in as one labelmap and the
    interpolator keeps its defaults (all labels, all axes, heuristic alignment, repeated dilations
    with a cross); the annotated slices come out unchanged. Needs ``slicer-core``."""
    chosen = check_annotated(labels, annotated, axis)
    if labels.min() < 0 or labels.max() >= 2**16:
        raise InputError("label values must be between 0 and 65535")
    sparse = np.zeros(labels.shape, dtype=np.uint8 if labels.max() < 2**8 else np.uint16)
    index = [slice(None)] * 3
    index[axis] = chosen
    sparse[tuple(index)] = labels[tuple(index)]

    slicer, vtk, numpy_support = _slicer_core()
    image = vtk.vtkImageData()
    image.SetDimensions(*sparse.shape[::-1])
    vtk_type = vtk.VTK_UNSIGNED_CHAR if sparse.dtype == np.uint8 else vtk.VTK_UNSIGNED_SHORT
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(sparse.ravel(), deep=True, array_type=vtk_type))
    interpolator = slicer.vtkITKMorphologicalContourInterpolator()
    interpolator.SetInputData(image)
    interpolator.Update()
    filled = numpy_support.vtk_to_numpy(interpolator.GetOutput().GetPointData().GetScalars())
    return filled.reshape(sparse.shape).astype(labels.dtype)


def _slicer_core():
    """(slicer, vtk, vtk.util.numpy_support), with slicer-core's ITK on its thread pool: with its
    default TBB threader the process crashes when it exits after a large interpolation."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")
    try:
        import slicer
        import vtk
        from vtk.util import numpy_support
    except ImportError:
        raise InputError("Fill between slices needs Slicer's libraries outside Slicer: pip install slicer-core") from None
    return slicer, vtk, numpy_support
