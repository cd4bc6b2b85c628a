"""Synthetic subjects made from one labelled image, for cross-subject experiments on data we can ship.

A subject is the source image and its labels moved by one seeded spatial transform (a small random
affine after a smooth random B-spline deformation), the image resampled linearly and the labels by
nearest neighbour through the very same transform. The image then gets a random contrast change
(gamma on the [0, 1]-scaled intensities), a smooth multiplicative bias field and Rician noise.
Everything is drawn from ``numpy.random.default_rng(seed)``: one seed, one subject.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..volumes.volume import Volume, read_volume
from .mni import brain_labels, template_path

BIAS_GRID = 4  # control points per axis of the bias field
FIELD_SPACING_MM = 4.0  # sampling of the smooth fields (deformation, bias) before linear interpolation


@dataclass(frozen=True)
class Variation:
    """How far subjects stray from the source image.

    ``deformation_mm``: standard deviation of the B-spline control-point displacements, every
    ``control_spacing_mm``; ``rotation_deg``, ``scaling`` (relative), ``translation_mm``: bounds of the
    uniform affine parameters; ``gamma``: (low, high) of the log-uniform contrast exponent; ``bias``:
    standard deviation of the log bias field at its control points; ``noise``: Rician noise level
    as a fraction of the brightest intensity."""

    deformation_mm: float = 3.0
    control_spacing_mm: float = 40.0
    rotation_deg: float = 5.0
    scaling: float = 0.05
    translation_mm: float = 4.0
    gamma: tuple[float, float] = (0.7, 1.4)
    bias: float = 0.15
    noise: float = 0.02


NO_INTENSITY_CHANGE = dict(gamma=(1.0, 1.0), bias=0.0, noise=0.0)


@dataclass
class Subject:
    """volume: the subject's image (float32, the source's grid); labels: (z, y, x) on that grid;
    transform: maps the subject's physical points to the source's (SimpleITK's resampling convention)."""

    volume: Volume
    labels: np.ndarray
    seed: int
    transform: sitk.Transform


def random_transform(reference: sitk.Image, rng: np.random.Generator, variation: Variation) -> sitk.Transform:
    """A smooth random deformation followed by a small random affine about the image centre, as a
    displacement field sampled every ``FIELD_SPACING_MM`` over ``reference``."""
    size_mm = [n * s for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    mesh = [max(1, round(extent / variation.control_spacing_mm)) for extent in size_mm]
    deformation = sitk.BSplineTransformInitializer(reference, mesh, order=3)
    coefficients = rng.normal(0.0, variation.deformation_mm, len(deformation.GetParameters()))
    deformation.SetParameters(coefficients.tolist())

    centre = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()])
    angles = np.deg2rad(rng.uniform(-variation.rotation_deg, variation.rotation_deg, 3))
    rotation = sitk.Euler3DTransform(centre, *angles.tolist())
    scales = 1.0 + rng.uniform(-variation.scaling, variation.scaling, 3)
    matrix = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.diag(scales)
    translation = rng.uniform(-variation.translation_mm, variation.translation_mm, 3)
    affine = sitk.AffineTransform(matrix.ravel().tolist(), translation.tolist(), centre)

    sampling = sitk.TransformToDisplacementFieldFilter()
    sampling.SetReferenceImage(coarse_grid(reference))
    field = sampling.Execute(sitk.CompositeTransform([affine, deformation]))
    return sitk.DisplacementFieldTransform(field)


def coarse_grid(reference: sitk.Image, spacing_mm: float = FIELD_SPACING_MM) -> sitk.Image:
    """An empty image covering ``reference`` (same origin and direction) every ``spacing_mm``."""
    size = [int(np.ceil((n - 1) * s / spacing_mm)) + 1 for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetOrigin(reference.GetOrigin())
    grid.SetDirection(reference.GetDirection())
    grid.SetSpacing([spacing_mm] * 3)
    return grid


def warp(image: sitk.Image, transform: sitk.Transform, nearest: bool) -> sitk.Image:
    """``image`` resampled on its own grid through ``transform`` (nearest neighbour or linear), 0 outside."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, image, transform, interpolator, 0.0, image.GetPixelID())


def bias_field(reference: sitk.Image, rng: np.random.Generator, strength: float) -> np.ndarray:
    """(z, y, x) float32 smooth positive field: exp of a B-spline interpolated coarse random grid."""
    knots = sitk.GetImageFromArray(rng.normal(0.0, strength, (BIAS_GRID,) * 3).astype(np.float32))
    knots.SetOrigin(reference.GetOrigin())
    knots.SetDirection(reference.GetDirection())
    knots.SetSpacing([(n - 1) * s / (BIAS_GRID - 1) for n, s in zip(reference.GetSize(), reference.GetSpacing())])
    smooth = sitk.Resample(knots, coarse_grid(reference), sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    field = sitk.Resample(smooth, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.exp(sitk.GetArrayFromImage(field))


def make_subject(volume: Volume, labels: np.ndarray, seed: int, variation: Optional[Variation] = None) -> Subject:
    """The subject of ``seed`` made from ``volume`` and its (z, y, x) ``labels``."""
    variation = variation or Variation()
    rng = np.random.default_rng(seed)
    image = volume.to_sitk(np.asarray(volume.array, dtype=np.float32))
    transform = random_transform(image, rng, variation)
    moved = sitk.GetArrayFromImage(warp(image, transform, nearest=False))
    moved_labels = sitk.GetArrayFromImage(warp(volume.to_sitk(labels), transform, nearest=True))

    low, high = float(volume.array.min()), float(volume.array.max())
    scaled = np.clip((moved - low) / max(high - low, 1e-12), 0.0, 1.0)
    gamma = float(np.exp(rng.uniform(*np.log(variation.gamma))))
    intensity = scaled**gamma * bias_field(image, rng, variation.bias)
    noise = rng.normal(0.0, variation.noise, (2, *intensity.shape))
    noisy = low + np.hypot(intensity + noise[0], noise[1]) * (high - low)
    subject = Volume(noisy.astype(np.float32), volume.spacing, volume.origin, volume.direction)
    return Subject(subject, moved_labels.astype(labels.dtype), seed, transform)


def mni_subjects(seeds, variation: Optional[Variation] = None) -> list[Subject]:
    """Subjects made from the MNI152 2009a template and its grey/white-matter labels (``hsam.evaluation.mni``)."""
    t1 = read_volume(template_path("t1"))
    labels = brain_labels(read_volume(template_path("gm")).array, read_volume(template_path("wm")).array)
    return [make_subject(t1, labels, seed, variation) for seed in seeds]
