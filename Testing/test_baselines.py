"""The baselines a Slicer user has, on the real MNI152 template: nearest-slice copy, the Segment
Editor's Fill between slices (slicer-core's vtkITK), atlas registration (SimpleITK)."""

import sys

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.evaluation.baselines import atlas_registration, majority_vote, nearest_slice_copy
from hsam.evaluation.metrics import dice_score
from hsam.evaluation.mni import brain_labels, template_path
from hsam.evaluation.subjects import Variation, make_subject
from hsam.guidance.fill import fill_between_slices
from hsam.guidance.priors import annotated_slices
from hsam.runtime.errors import InputError
from hsam.volumes.volume import read_volume

pytest.importorskip("nilearn")


@pytest.fixture(scope="module")
def template():
    t1 = read_volume(template_path("t1"))
    return t1, brain_labels(read_volume(template_path("gm")).array, read_volume(template_path("wm")).array)


def mean_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean([dice_score(prediction == v, reference == v) for v in (1, 2)]))


def test_nearest_slice_copy_along_any_axis():
    labels = np.zeros((6, 4, 5), np.uint8)
    labels[1], labels[:, :, 4] = 1, 2
    copied = nearest_slice_copy(labels, [4, 0], axis=2)
    assert np.array_equal(copied[:, :, :3], np.repeat(labels[:, :, :1], 3, axis=2))  # slice 2: a tie, the lower wins
    assert np.array_equal(copied[:, :, 3:], np.repeat(labels[:, :, 4:], 2, axis=2))
    with pytest.raises(InputError, match="outside the volume"):
        nearest_slice_copy(labels, [5], axis=2)


@pytest.mark.slow
def test_fill_between_slices_interpolates_the_unannotated_slices(template):
    pytest.importorskip("slicer")
    _, labels = template
    labelled = annotated_slices(labels, 0)
    annotated = labelled[5::10]
    held_out = [z for z in labelled if z not in annotated]
    filled = fill_between_slices(labels, annotated)
    assert filled.dtype == labels.dtype and filled.shape == labels.shape
    assert np.array_equal(filled[annotated], labels[annotated])
    nothing = np.zeros_like(labels)
    nothing[annotated] = labels[annotated]
    copy = nearest_slice_copy(labels, annotated)
    for value in (1, 2):
        fill_dice = dice_score(filled[held_out] == value, labels[held_out] == value)
        copy_dice = dice_score(copy[held_out] == value, labels[held_out] == value)
        assert dice_score(nothing[held_out] == value, labels[held_out] == value) == 0.0
        # The measured 0.785 / 0.787: the nearest-slice copy's ballpark, not far below or above it.
        assert abs(fill_dice - copy_dice) < 0.05
    # Between two annotated slices the filled slices differ from both (a copy would equal one).
    z = annotated[4] + 5
    assert not np.array_equal(filled[z], labels[annotated[4]]) and not np.array_equal(filled[z], labels[annotated[5]])


def test_fill_between_slices_blends_two_squares():
    pytest.importorskip("slicer")
    labels = np.zeros((11, 40, 40), np.uint16)
    labels[0, 10:30, 10:30] = 300
    labels[10, 14:26, 14:26] = 300
    filled = fill_between_slices(labels, [0, 10])
    areas = (filled == 300).sum(axis=(1, 2))
    assert areas[0] == 400 and areas[10] == 144
    assert all(a >= b for a, b in zip(areas, areas[1:])) and 144 < areas[5] < 400


def test_fill_between_slices_without_slicer_core(monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer", None)  # import slicer raises ImportError
    with pytest.raises(InputError, match="pip install slicer-core"):
        fill_between_slices(np.ones((3, 4, 4), np.uint8), [0, 2])


@pytest.mark.slow
def test_atlas_registration_undoes_a_deformation(template):
    t1, labels = template
    subject = make_subject(t1, labels, seed=11, variation=Variation(gamma=(0.8, 0.8)))
    before = mean_dice(labels, subject.labels)
    carried = atlas_registration(t1.array, labels, subject.volume.array, t1.spacing)
    assert carried.shape == labels.shape and carried.dtype == labels.dtype
    after = mean_dice(carried, subject.labels)
    assert before < 0.75 and after > before + 0.15


def test_atlas_registration_rejects_labels_off_the_atlas_grid():
    with pytest.raises(InputError, match="do not match"):
        atlas_registration(np.zeros((4, 5, 6)), np.zeros((4, 5, 5), np.uint8), np.zeros((4, 5, 6)))


def test_majority_vote():
    maps = [np.array([[0, 1, 2, 2]]), np.array([[1, 1, 2, 0]]), np.array([[1, 2, 0, 1]])]
    assert majority_vote(maps).tolist() == [[1, 1, 2, 0]]
