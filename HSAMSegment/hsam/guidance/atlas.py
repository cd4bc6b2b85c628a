"""Atlas priors: what the training volumes say about a volume nobody painted.

Each training volume becomes an ``Atlas``: its labels completed from its annotated slices (flow
propagation, ``complete_labels``) and, with its image, resampled to a coarse grid. To segment a new
volume, every atlas is registered onto it (affine by mutual information, then symmetric-forces demons
on histogram-matched intensities, ``register``), its one-hot labels are carried along, and the carried
maps are averaged: a soft majority vote per class (``fuse_atlases``). The ``AtlasPrior`` serves that
vote slice by slice on the new volume's own grid, as ``SlicePrior`` serves the propagation of painted
slices, so a guided model corrects either the same way.

Registration runs on the coarse grid (``ATLAS_SPACING``), where a 3D CT takes seconds per atlas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import Cancelled, InputError
from .flow import FlowPropagation, flow_images, modality_of
from .kinds import REGISTRATION_MODES

ATLAS_SPACING = 3.0  # mm: the grid atlases are kept and registered on
AFFINE_SPACING = 6.0  # mm: the grid the affine stage runs on
REGISTRATION_CT_WINDOW = (-1000.0, 1000.0)  # HU: air, lungs, soft tissue and bone stay apart
REGISTRATION_PERCENTILES = (0.5, 99.5)
AFFINE_ITERATIONS = 200
DEMONS_ITERATIONS = 60
DEMONS_SMOOTHING = 1.5  # voxels of the coarse grid: the displacement field's Gaussian
HISTOGRAM_LEVELS = 128
MATCH_POINTS = 15
REGION_MARGIN = 10  # coarse voxels around the carried labels where the demons field is computed

Progress = Callable[[float, str], None]


@dataclass
class Atlas:
    """One training volume on the coarse grid: ``image`` uint8 (registration intensities) and
    ``labels`` uint8 class indices (0 = background), both SimpleITK images of one geometry."""

    image: sitk.Image
    labels: sitk.Image
    name: str = ""

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return sitk.GetArrayFromImage(self.image), sitk.GetArrayFromImage(self.labels)


def registration_intensities(array: np.ndarray, modality: Optional[str] = None) -> np.ndarray:
    """(z, y, x) voxels -> uint8: CT in a −1000…1000 HU window, other images between two percentiles."""
    array = np.asarray(array, dtype=np.float32)
    if (modality or modality_of(array)) == "ct":
        low, high = REGISTRATION_CT_WINDOW
    else:
        low, high = (float(v) for v in np.percentile(array[:: max(1, array.shape[0] // 64)], REGISTRATION_PERCENTILES))
    scaled = (np.clip(array, low, high) - low) * (255.0 / max(high - low, 1e-6))
    return scaled.round().astype(np.uint8)


def coarse_grid(image: sitk.Image, spacing: float = ATLAS_SPACING) -> sitk.Image:
    """An empty image on ``image``'s extent, origin and direction, with voxels no finer than ``spacing``."""
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.maximum(old_spacing, spacing)
    size = np.maximum(1, np.round(np.array(image.GetSize()) * old_spacing / new_spacing)).astype(int)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing([float(s) for s in new_spacing])
    return grid


def annotated_span(annotated: Sequence[int], depth: int) -> tuple[int, int]:
    """(first, last) slice that completion fills: the annotated range grown by half the median gap
    between annotated slices, within the volume."""
    chosen = sorted(annotated)
    gap = int(np.median(np.diff(chosen))) if len(chosen) > 1 else 0
    return max(0, chosen[0] - gap // 2), min(depth - 1, chosen[-1] + gap // 2)


def complete_labels(slices: np.ndarray, class_labels: np.ndarray, annotated: Sequence[int], num_classes: int,
                    modality: Optional[str] = None) -> np.ndarray:
    """(n, H, W) class indices of every slice, the ``annotated`` ones carried along the optical flow
    through ``slices`` ((n, H, W) voxels); background outside ``annotated_span``."""
    images = flow_images(slices, modality or modality_of(slices))
    labels = FlowPropagation(images, class_labels, annotated, num_classes).volume()
    first, last = annotated_span(annotated, len(labels))
    labels[:first] = 0
    labels[last + 1 :] = 0
    return labels


def make_atlas(volume, class_labels: np.ndarray, annotated: Sequence[int], axis: int, num_classes: int,
               name: str = "", modality: Optional[str] = None) -> Atlas:
    """The ``Atlas`` of an ``hsam.volumes.volume.Volume`` whose (z, y, x) ``class_labels`` are drawn on the
    slices ``annotated`` along ``axis``."""
    modality = modality or modality_of(volume.array)
    completed = complete_labels(np.moveaxis(volume.array, axis, 0), np.moveaxis(class_labels, axis, 0),
                                annotated, num_classes, modality)
    full_labels = volume.to_sitk(np.moveaxis(completed, 0, axis).astype(np.uint8))
    full_image = volume.to_sitk(registration_intensities(volume.array, modality))
    grid = coarse_grid(full_image)
    image = sitk.Resample(full_image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkUInt8)
    labels = sitk.Resample(full_labels, grid, sitk.Transform(), sitk.sitkLabelGaussian, 0, sitk.sitkUInt8)
    return Atlas(image, labels, name)


def atlas_from_arrays(image: np.ndarray, labels: np.ndarray, spacing, origin, direction, name: str = "") -> Atlas:
    """An ``Atlas`` from stored arrays and geometry (x, y, z spacing and origin, row-major direction)."""
    images = []
    for array in (image, labels):
        item = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
        item.SetSpacing([float(v) for v in spacing])
        item.SetOrigin([float(v) for v in origin])
        item.SetDirection([float(v) for v in direction])
        images.append(item)
    return Atlas(images[0], images[1], name)


def _resampled(image: sitk.Image, spacing: float) -> sitk.Image:
    return sitk.Resample(image, coarse_grid(image, spacing), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def affine_transform(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """The affine transform that maps ``fixed``'s points into ``moving`` (Mattes mutual information,
    centred on the images' intensity moments, on the ``AFFINE_SPACING`` grid)."""
    fixed_coarse, moving_coarse = _resampled(fixed, AFFINE_SPACING), _resampled(moving, AFFINE_SPACING)
    initial = sitk.CenteredTransformInitializer(fixed_coarse, moving_coarse, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=AFFINE_ITERATIONS,
                                                   relaxationFactor=0.7)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed_coarse, moving_coarse)


def label_region(labels: sitk.Image, margin: int = REGION_MARGIN) -> Optional[tuple[list[int], list[int]]]:
    """(index, size) of the box around ``labels``' non-zero voxels grown by ``margin`` voxels, within
    the image; None when it has none."""
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(sitk.Cast(labels != 0, sitk.sitkUInt8))
    if not statistics.HasLabel(1):
        return None
    box = statistics.GetBoundingBox(1)
    low = [max(0, b - margin) for b in box[:3]]
    high = [min(n, b + s + margin) for b, s, n in zip(box[:3], box[3:], labels.GetSize())]
    return low, [h - l for l, h in zip(low, high)]


def deformable_transform(fixed: sitk.Image, atlas: Atlas, affine: sitk.Transform) -> sitk.Transform:
    """``affine`` followed by a symmetric-forces demons field, on ``fixed``'s grid within the box
    around the affinely carried labels, the atlas image histogram-matched to the fixed one. Outside
    that box the field is zero."""
    carried = sitk.Resample(atlas.labels, fixed, affine, sitk.sitkNearestNeighbor, 0)
    region = label_region(carried)
    if region is None:
        return affine
    fixed_region = sitk.Cast(sitk.RegionOfInterest(fixed, region[1], region[0]), sitk.sitkFloat32)
    moved = sitk.Resample(atlas.image, fixed_region, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved = sitk.HistogramMatching(moved, fixed_region, HISTOGRAM_LEVELS, MATCH_POINTS, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(DEMONS_ITERATIONS)
    demons.SetStandardDeviations(DEMONS_SMOOTHING)
    field = demons.Execute(fixed_region, moved)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    return composite


def register(fixed: sitk.Image, atlas: Atlas, mode: str = "deformable") -> sitk.Transform:
    """The transform from ``fixed``'s points (an atlas-grid image) into ``atlas``', by ``mode`` of
    ``REGISTRATION_MODES`` (``none``: the identity in physical space)."""
    if mode not in REGISTRATION_MODES:
        raise InputError(f"unknown registration {mode!r}; choose one of {', '.join(REGISTRATION_MODES)}")
    if mode == "none":
        return sitk.Transform(3, sitk.sitkIdentity)
    affine = affine_transform(fixed, atlas.image)
    return affine if mode == "affine" else deformable_transform(fixed, atlas, affine)


def carried_probabilities(atlas: Atlas, target: sitk.Image, transform: sitk.Transform, num_classes: int) -> np.ndarray:
    """(K+1, z, y, x) float32: the atlas's one-hot labels carried onto ``target``'s grid."""
    labels = sitk.GetArrayViewFromImage(atlas.labels)
    out = np.empty((num_classes + 1, *sitk.GetArrayViewFromImage(target).shape), dtype=np.float32)
    for k in range(num_classes + 1):
        channel = sitk.GetImageFromArray((labels == k).astype(np.float32))
        channel.CopyInformation(atlas.labels)
        out[k] = sitk.GetArrayFromImage(sitk.Resample(channel, target, transform, sitk.sitkLinear, float(k == 0)))
    return out


def fuse_atlases(target: sitk.Image, atlases: Sequence[Atlas], num_classes: int, mode: str = "deformable",
                 progress: Optional[Progress] = None, cancel=None) -> np.ndarray:
    """(K+1, z, y, x) float32 class probabilities on ``target``'s grid (an atlas-grid image of the new
    volume): the mean of every atlas's labels registered onto it."""
    if not atlases:
        raise InputError("an atlas prior needs at least one atlas")
    total = np.zeros((num_classes + 1, *sitk.GetArrayViewFromImage(target).shape), dtype=np.float32)
    for done, atlas in enumerate(atlases):
        if cancel is not None and cancel.is_set():
            raise Cancelled("atlas registration cancelled")
        transform = register(target, atlas, mode)
        total += carried_probabilities(atlas, target, transform, num_classes)
        if progress is not None:
            progress((done + 1) / len(atlases), f"registered atlas {done + 1}/{len(atlases)} {atlas.name}".rstrip())
    return total / len(atlases)


def _interpolate_axis(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """``array`` sampled linearly at fractional ``positions`` along ``axis`` (clamped to its ends)."""
    positions = np.clip(positions, 0, array.shape[axis] - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, array.shape[axis] - 1)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = (positions - low).astype(np.float32).reshape(shape)
    return np.take(array, low, axis=axis) * (1 - weight) + np.take(array, high, axis=axis) * weight


class AtlasPrior:
    """Fused atlas probabilities of a new volume served on its own grid, slice by slice along ``axis``.

    ``probabilities``: (K+1, z, y, x) on the volume's atlas grid (``coarse_grid``), which shares the
    volume's origin and direction; ``shape`` and ``spacing`` (x, y, z): the volume's own grid."""

    def __init__(self, probabilities: np.ndarray, coarse_spacing, shape: tuple[int, int, int], spacing, axis: int):
        self.probabilities = probabilities
        self.axis = axis
        self.num_classes = probabilities.shape[0] - 1
        ratios = np.array(spacing, dtype=np.float64)[::-1] / np.array(coarse_spacing, dtype=np.float64)[::-1]
        self.positions = [np.arange(n) * r for n, r in zip(shape, ratios)]  # (z, y, x) on the coarse grid

    def slice_probabilities(self, index: int) -> np.ndarray:
        """(K+1, H, W) probabilities of slice ``index`` along ``axis``."""
        out = _interpolate_axis(self.probabilities, self.axis + 1, self.positions[self.axis][index : index + 1])
        out = np.squeeze(out, self.axis + 1)
        for plane_axis, positions in enumerate(p for a, p in enumerate(self.positions) if a != self.axis):
            out = _interpolate_axis(out, plane_axis + 1, positions)
        return out.astype(np.float32)

    def logits(self, index: int) -> np.ndarray:
        """(K+1, H, W) prior logits of slice ``index`` (as ``SlicePrior.logits``)."""
        from .priors import probability_logits

        return probability_logits(self.slice_probabilities(index))

    def class_indices(self, index: int) -> np.ndarray:
        """(H, W) arg-max class of slice ``index``."""
        return self.slice_probabilities(index).argmax(0)


def atlas_prior(volume, atlases: Sequence[Atlas], num_classes: int, axis: int, mode: str = "deformable",
                modality: Optional[str] = None, progress: Optional[Progress] = None, cancel=None) -> AtlasPrior:
    """The ``AtlasPrior`` of an ``hsam.volumes.volume.Volume`` from ``atlases`` registered onto it by ``mode``."""
    full = volume.to_sitk(registration_intensities(volume.array, modality))
    grid = coarse_grid(full)
    target = sitk.Resample(full, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkUInt8)
    probabilities = fuse_atlases(target, atlases, num_classes, mode, progress, cancel)
    return AtlasPrior(probabilities, target.GetSpacing(), volume.array.shape, volume.spacing, axis)
