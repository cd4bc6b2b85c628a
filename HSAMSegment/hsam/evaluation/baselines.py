"""What a 3D Slicer user gets today without a learned model, as functions on (z, y, x) arrays.

* ``nearest_slice_copy``: every slice takes the labels of the nearest annotated slice.
* ``flow_propagation``: the annotated slices carried along the optical flow between neighbouring
  slices, both directions blended by distance (``hsam.guidance.flow``): the strongest of these.
* ``fill_between_slices`` (``hsam.guidance.fill``, where the ``fill`` prior finds it): the Segment
  Editor's *Fill between slices* effect.
* ``atlas_registration``: the classical cross-subject baseline, a labelled subject registered onto
  another (affine, then B-spline, Mattes mutual information) with SimpleITK and its labels carried over.
* ``majority_vote``: fuses the labelmaps of several atlases voxel by voxel.
"""

from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..guidance.fill import check_annotated
from ..runtime.errors import InputError

Spacing = Sequence[float]  # (x, y, z) in mm, for (z, y, x) arrays


def nearest_slice_copy(labels: np.ndarray, annotated: Sequence[int], axis: int = 0) -> np.ndarray:
    """Every slice along ``axis`` takes the labels of the nearest annotated slice (the lower on ties)."""
    source = np.asarray(check_annotated(labels, annotated, axis))
    nearest = source[np.abs(np.arange(labels.shape[axis])[:, None] - source[None]).argmin(1)]
    return np.take(labels, nearest, axis=axis)


def flow_propagation(image: np.ndarray, labels: np.ndarray, annotated: Sequence[int], axis: int = 0,
                     modality: Optional[str] = None, progress: Optional[Callable[[float, str], None]] = None) -> np.ndarray:
    """The ``annotated`` slices (along ``axis``) of ``labels`` carried through ``image`` (same shape)
    along the optical flow between neighbouring slices; ``modality`` ``ct`` or ``mr`` sets the
    intensities the flow sees (default: told from the image). The annotated slices come out unchanged.
    ``progress(fraction, message)`` is called after every slice."""
    propagation, values = flow_propagator(image, labels, annotated, axis, modality)
    out = np.concatenate([[0], values]).astype(labels.dtype)[propagation.volume(progress)]
    return np.moveaxis(out, 0, axis)


def flow_propagator(image: np.ndarray, labels: np.ndarray, annotated: Sequence[int], axis: int = 0,
                    modality: Optional[str] = None):
    """(``hsam.guidance.flow.FlowPropagation`` of the ``annotated`` slices along ``axis``, the label
    values of its classes 1…K), for ``flow_propagation``'s arguments."""
    from ..guidance.flow import FlowPropagation, flow_images, modality_of

    chosen = check_annotated(labels, annotated, axis)
    if image.shape != labels.shape:
        raise InputError(f"the labels {labels.shape} do not match the image {image.shape}")
    if labels.min() < 0 or labels.max() >= 2**16:
        raise InputError("label values must be between 0 and 65535")
    slices = np.moveaxis(image, axis, 0)
    values = np.unique(np.take(labels, chosen, axis=axis))
    values = values[values != 0]
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    lookup[values] = np.arange(1, len(values) + 1)
    class_labels = lookup[np.moveaxis(labels, axis, 0)]
    propagation = FlowPropagation(flow_images(slices, modality or modality_of(slices)), class_labels, chosen, len(values))
    return propagation, values


# Atlas registration: Mattes mutual information (robust to contrast changes) on a random 5 % (affine)
# and 2 % (B-spline) of the voxels, at 1/4 then 1/2 resolution; B-spline control points every
# ~40 mm, 30 L-BFGS-B iterations (more over-fits the noise and bias field: lower Dice).
HISTOGRAM_BINS = 32
SHRINK_FACTORS = (4, 2)
SMOOTHING_VOXELS = (2.0, 1.0)
AFFINE_SAMPLING = 0.05
BSPLINE_SAMPLING = 0.02
CONTROL_POINT_SPACING_MM = 40.0
BSPLINE_ITERATIONS = 30
SAMPLING_SEED = 2345


def _registration(sampling: float) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_VOXELS))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def register(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """The transform mapping ``fixed``'s physical points into ``moving``: affine (from the images'
    centres of mass), then a B-spline deformation on top."""
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = _registration(AFFINE_SAMPLING)
    method.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=100, convergenceMinimumValue=1e-6, convergenceWindowSize=10
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(initial, inPlace=False)
    affine = method.Execute(fixed, moving)

    extent_mm = [n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, round(e / CONTROL_POINT_SPACING_MM)) for e in extent_mm]
    deformation = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    method = _registration(BSPLINE_SAMPLING)
    method.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5, numberOfIterations=BSPLINE_ITERATIONS, maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=200, costFunctionConvergenceFactor=1e7,
    )
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(deformation, inPlace=True)
    method.Execute(fixed, moving)
    return sitk.CompositeTransform([affine, deformation])


def atlas_registration(
    atlas_image: np.ndarray, atlas_labels: np.ndarray, target_image: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """The atlas's labels carried onto ``target_image``: the atlas image registered onto the target
    (``register``), its (z, y, x) labels resampled through that transform by nearest neighbour.
    Both images are (z, y, x) with voxel ``spacing`` (x, y, z) mm; returns labels on the target's grid."""
    if atlas_image.shape != atlas_labels.shape:
        raise InputError(f"the atlas labels {atlas_labels.shape} do not match the atlas image {atlas_image.shape}")
    images = []
    for array in (atlas_image, target_image):
        if array.ndim != 3:
            raise InputError(f"expected 3D images, got an array of shape {array.shape}")
        image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
        image.SetSpacing([float(s) for s in spacing])
        images.append(image)
    moving, fixed = images
    transform = register(fixed, moving)
    labels = sitk.GetImageFromArray(np.asarray(atlas_labels))
    labels.CopyInformation(moving)
    return sitk.GetArrayFromImage(sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0))


def majority_vote(labelmaps: Sequence[np.ndarray]) -> np.ndarray:
    """Voxel-wise most frequent label of same-shaped labelmaps; ties go to the smaller label value."""
    stack = np.stack([np.asarray(m) for m in labelmaps])
    values = np.unique(stack)
    votes = np.stack([(stack == v).sum(0) for v in values])
    return values[votes.argmax(0)].astype(stack.dtype)
