"""Atlas priors (``hsam.guidance.atlas``): real flow completion, real SimpleITK registration and fusion
on a small synthetic CT cohort whose patients differ by known shifts and scalings."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest

from hsam.evaluation.metrics import dice_score
from hsam.guidance.atlas import (
    Atlas,
    AtlasPrior,
    annotated_span,
    atlas_from_arrays,
    atlas_prior,
    complete_labels,
    make_atlas,
    register,
)
from hsam.guidance.priors import PRIOR_LOGIT, annotated_slices
from hsam.runtime.errors import InputError
from hsam.volumes.volume import Volume

SHAPE = (40, 64, 64)  # (z, y, x) voxels
SPACING = (2.5, 2.5, 3.0)  # (x, y, z) mm: the 3 mm atlas grid is 53 × 53 × 40 voxels
CENTRE = np.array([80.0, 80.0, 58.5])  # (x, y, z) mm: the middle of the field of view
# (centre (x, y, z) mm, semi-axes mm, HU) in a patient's own frame; later shapes drawn over earlier ones.
BODY = ((0, 0, 0), (55, 45, 40), 40.0)
SPINE = ((0, 30, 0), (8, 8, 60), 700.0)  # not labelled
ORGANS = (((-22, 0, 0), (18, 18, 18), 200.0),  # class 1
          ((22, -8, 4), (14, 20, 24), -120.0))  # class 2
# (scale per axis, shift mm (x, y, z)) of each atlas patient's anatomy, and of the new patient's.
ATLAS_POSES = (((1.0, 1.0, 1.0), (10, -8, 4)), ((0.9, 0.95, 1.0), (-8, 6, -5)), ((1.1, 1.05, 0.95), (4, 10, 6)))
NEW_POSE = ((0.95, 1.05, 1.0), (-10, -6, 3))
MIN_DICE, MIN_MARGIN = 0.8, 0.2


def patient(scale: Sequence[float], shift: Sequence[float], seed: int) -> tuple[Volume, np.ndarray]:
    """(CT volume in HU, class labels (z, y, x)): the shapes scaled about the centre, then shifted (mm)."""
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(SHAPE, SPACING[::-1])), indexing="ij")
    frame = [(p - c - t) / s for p, c, t, s in zip((x, y, z), CENTRE, shift, scale)]  # in the patient's frame
    inside = lambda centre, axes: sum(((f - c) / a) ** 2 for f, c, a in zip(frame, centre, axes)) <= 1
    image = np.full(SHAPE, -1000.0, dtype=np.float32)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for centre, axes, hu in (BODY, SPINE):
        image[inside(centre, axes)] = hu
    for k, (centre, axes, hu) in enumerate(ORGANS, start=1):
        mask = inside(centre, axes)
        image[mask], labels[mask] = hu, k
    image += np.random.default_rng(seed).normal(0.0, 10.0, SHAPE).astype(np.float32)
    return Volume(image, SPACING, (0.0, 0.0, 0.0)), labels


@pytest.fixture(scope="module")
def atlases() -> list[Atlas]:
    """One atlas per atlas patient, its labels drawn on every 4th labelled axial slice only."""
    out = []
    for seed, (scale, shift) in enumerate(ATLAS_POSES):
        volume, labels = patient(scale, shift, seed)
        annotated = annotated_slices(labels, 0)[::4]
        sparse = np.zeros_like(labels)
        sparse[annotated] = labels[annotated]
        out.append(make_atlas(volume, sparse, annotated, axis=0, num_classes=2, name=f"p{seed}", modality="ct"))
    return out


def prior_dice(atlases: list[Atlas], mode: str) -> list[float]:
    """Dice of each class of the atlas prior's arg-max on the new patient, by registration ``mode``."""
    volume, labels = patient(*NEW_POSE, seed=99)
    prior = atlas_prior(volume, atlases, num_classes=2, axis=0, mode=mode, modality="ct")
    predicted = np.stack([prior.class_indices(i) for i in range(SHAPE[0])])
    return [dice_score(predicted == k, labels == k) for k in (1, 2)]


@pytest.mark.parametrize("mode", ["deformable", "affine"])
def test_registered_atlases_segment_a_new_patient(atlases: list[Atlas], mode: str) -> None:
    """Guards registration: atlases carried onto a shifted and scaled patient find its organs, and do
    clearly better than atlases laid on it unregistered (mode "none")."""
    registered, unregistered = prior_dice(atlases, mode), prior_dice(atlases, "none")
    assert min(registered) > MIN_DICE, (registered, unregistered)
    assert min(np.subtract(registered, unregistered)) > MIN_MARGIN, (registered, unregistered)


def step_probabilities() -> np.ndarray:
    """(3, z, y, x) one-hot on a 6 × 8 × 10 grid of 3 mm: class 1 where x ≥ 15 mm, class 2 where
    x < 15 mm and z ≥ 9 mm, background elsewhere."""
    z, _, x = np.meshgrid(np.arange(6), np.arange(8), np.arange(10), indexing="ij")
    classes = np.where(x >= 5, 1, np.where(z >= 3, 2, 0))
    return np.stack([classes == k for k in range(3)]).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_atlas_prior_serves_the_volume_grid(axis: int) -> None:
    """Guards ``AtlasPrior``'s geometry: coarse probabilities come back on the volume's own slices,
    linearly interpolated at each voxel's physical position; logits within ±PRIOR_LOGIT, background 0."""
    shape, spacing = (16, 12, 20), (1.5, 2.0, 1.0)  # (z, y, x) voxels, (x, y, z) mm
    prior = AtlasPrior(step_probabilities(), (3.0, 3.0, 3.0), shape, spacing, axis)
    x_mm = np.arange(shape[2]).reshape(1, 1, -1) * spacing[0]
    z_mm = np.arange(shape[0]).reshape(-1, 1, 1) * spacing[2]
    step_x = np.clip(x_mm / 3.0 - 4.0, 0, 1)  # linear from 12 mm to 15 mm
    step_z = np.clip(z_mm / 3.0 - 2.0, 0, 1)  # linear from 6 mm to 9 mm
    class_2 = (1 - step_x) * step_z
    channels = np.broadcast_arrays(1 - step_x - class_2, step_x, class_2, np.empty(shape))[:3]
    expected = np.stack(channels)
    for index in range(shape[axis]):
        probabilities = prior.slice_probabilities(index)
        np.testing.assert_allclose(probabilities, np.take(expected, index, axis=axis + 1), atol=1e-5)
        logits = prior.logits(index)
        assert np.all(np.abs(logits) <= PRIOR_LOGIT) and np.all(logits[0] == 0)
    if axis == 0:  # the arg-max steps to class 1 past 13.5 mm, midway between coarse voxels at 12 and 15 mm
        past = np.arange(shape[2]) * 1.5 > 13.5
        np.testing.assert_array_equal(prior.class_indices(0), np.broadcast_to(past.astype(int), shape[1:]))


def test_completion_stays_within_the_annotated_span() -> None:
    """Guards ``complete_labels``: annotated slices kept exactly, slices beyond the annotated range
    grown by half the median gap left background although the structure goes on there."""
    volume, labels = patient((1.0, 1.0, 1.0), (0, 0, 0), seed=5)
    annotated = [17, 21, 25]
    first, last = annotated_span(annotated, SHAPE[0])
    assert (first, last) == (15, 27)
    assert labels[:first].any() and labels[last + 1 :].any()  # the organs reach past the span
    sparse = np.zeros_like(labels)
    sparse[annotated] = labels[annotated]
    completed = complete_labels(volume.array, sparse, annotated, num_classes=2, modality="ct")
    np.testing.assert_array_equal(completed[annotated], labels[annotated])
    assert completed[first].any() and completed[last].any()
    assert not completed[:first].any() and not completed[last + 1 :].any()


def test_unknown_registration_mode_is_refused() -> None:
    """Guards ``register``'s input check: a mode outside ``REGISTRATION_MODES`` is an ``InputError``."""
    atlas = atlas_from_arrays(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (3, 3, 3), (0, 0, 0), np.eye(3).ravel())
    with pytest.raises(InputError, match="rigid"):
        register(atlas.image, atlas, "rigid")
