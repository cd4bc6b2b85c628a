"""Synthetic subjects from the MNI152 template: labels move with the image, one seed one subject."""

import numpy as np
import pytest

from hsam.evaluation.metrics import dice_score
from hsam.evaluation.mni import brain_labels, template_path
from hsam.evaluation.subjects import NO_INTENSITY_CHANGE, Variation, make_subject
from hsam.volumes.volume import Volume, read_volume

pytest.importorskip("nilearn")


@pytest.fixture(scope="module")
def template():
    t1 = read_volume(template_path("t1"))
    return t1, brain_labels(read_volume(template_path("gm")).array, read_volume(template_path("wm")).array)


@pytest.mark.slow
def test_labels_move_with_the_image(template):
    t1, labels = template
    painted = Volume(100.0 * labels.astype(np.float32), t1.spacing, t1.origin, t1.direction)
    subject = make_subject(painted, labels, seed=3, variation=Variation(**NO_INTENSITY_CHANGE))
    image = subject.volume.array
    # Where linear interpolation saw one label only, the warped image is exactly that label's value.
    for value in (1, 2):
        pure = np.isclose(image, 100.0 * value, atol=1e-3)
        assert pure.sum() > 0.5 * (subject.labels == value).sum()
        assert np.all(subject.labels[pure] == value)
        assert dice_score(np.rint(image / 100) == value, subject.labels == value) > 0.97
        assert dice_score(labels == value, subject.labels == value) < 0.8  # it did move


@pytest.mark.slow
def test_one_seed_one_subject(template):
    t1, labels = template
    first, again, other = (make_subject(t1, labels, seed) for seed in (5, 5, 6))
    assert np.array_equal(first.volume.array, again.volume.array) and np.array_equal(first.labels, again.labels)
    assert dice_score(first.labels == 1, other.labels == 1) < 0.8
    assert not np.allclose(first.volume.array, other.volume.array)
    assert first.volume.array.dtype == np.float32 and first.labels.dtype == labels.dtype
    assert first.volume.spacing == t1.spacing and first.labels.shape == labels.shape


@pytest.mark.slow
def test_intensities_change_smoothly_and_stay_positive(template):
    t1, labels = template
    plain = make_subject(t1, labels, 8, Variation(**NO_INTENSITY_CHANGE))
    changed = make_subject(t1, labels, 8)
    assert np.array_equal(plain.labels, changed.labels)  # the same warp
    assert changed.volume.array.min() >= 0
    white = (plain.labels == 2) & (plain.volume.array > 0)
    ratio = changed.volume.array[white] / plain.volume.array[white]
    assert ratio.std() > 0.05  # contrast, bias and noise changed the white matter's intensities
    assert np.corrcoef(changed.volume.array[white], plain.volume.array[white])[0, 1] > 0.3
