"""Dice and HD95 (mm) against values computed by hand; per-class evaluation of files."""

import numpy as np
import pytest

from hsam.evaluation.metrics import dice_score, evaluate, hausdorff95
from hsam.volumes.segmentation import Segment, write_labelmap, write_segmentation
from hsam.volumes.volume import Volume

SPACING = (0.8, 0.7, 2.0)  # (x, y, z) mm


def _points(shape, *indices) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for index in indices:
        mask[index] = True
    return mask


def test_dice_by_hand():
    a = _points((1, 4, 4), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3))
    b = _points((1, 4, 4), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 1, 3))
    assert dice_score(a, b) == pytest.approx(2 * 2 / (4 + 6))
    assert dice_score(a, a) == 1.0
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0


def test_hd95_uses_the_spacing_of_each_axis():
    shape = (5, 5, 5)
    a = _points(shape, (0, 0, 0))
    assert hausdorff95(a, _points(shape, (0, 0, 3)), SPACING) == pytest.approx(3 * 0.8)  # along x
    assert hausdorff95(a, _points(shape, (0, 3, 0)), SPACING) == pytest.approx(3 * 0.7)  # along y
    assert hausdorff95(a, _points(shape, (2, 0, 0)), SPACING) == pytest.approx(2 * 2.0)  # along z
    assert hausdorff95(a, _points(shape, (1, 1, 1)), SPACING) == pytest.approx(np.sqrt(0.8**2 + 0.7**2 + 2.0**2))


def test_hd95_pools_both_directions_and_takes_the_95th_percentile():
    shape = (1, 5, 5)
    a = _points(shape, (0, 0, 0))
    b = _points(shape, (0, 0, 3), (0, 2, 0))  # 2.4 mm and 1.4 mm from a
    # distances: a -> b: 1.4; b -> a: 2.4, 1.4. Sorted [1.4, 1.4, 2.4]: 95th percentile = 1.4 + 0.9 * 1.0
    assert hausdorff95(a, b, SPACING) == pytest.approx(2.3)
    assert hausdorff95(b, a, SPACING) == pytest.approx(2.3)


def test_hd95_of_parallel_planes_and_shifted_boxes():
    shape = (4, 6, 8)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[:, :, 1], b[:, :, 3] = True, True
    assert hausdorff95(a, b, SPACING) == pytest.approx(2 * 0.8)
    box, shifted = np.zeros((8, 8, 12), bool), np.zeros((8, 8, 12), bool)
    box[2:6, 2:6, 2:8], shifted[2:6, 2:6, 4:10] = True, True
    # The x faces (32 of 80 surface voxels of each box) lie 2 voxels from the other box's x face;
    # every other surface voxel is 0 or 1 voxel away along x: the 95th percentile is 1.6 mm.
    assert hausdorff95(box, shifted, SPACING) == pytest.approx(1.6)


def test_empty_masks():
    a = _points((2, 3, 3), (1, 1, 1))
    assert hausdorff95(np.zeros_like(a), np.zeros_like(a)) == 0.0
    assert hausdorff95(a, np.zeros_like(a)) is None
    assert hausdorff95(np.zeros_like(a), a) is None


def test_evaluate_matches_segments_by_name_then_value(tmp_path):
    volume = Volume(np.zeros((4, 6, 8), np.int16), SPACING, (1.0, 2.0, 3.0))
    reference = np.zeros(volume.array.shape, np.uint8)
    reference[:, :, 1], reference[:, :, 5] = 1, 2
    write_segmentation(tmp_path / "reference.seg.nrrd", reference, volume,
                       [Segment("liver", 1, (1, 0, 0)), Segment("spleen", 2, (0, 1, 0))])
    prediction = np.zeros_like(reference)
    prediction[:, :, 3] = 7  # "liver", two voxels off along x
    prediction[:, :, 5] = 2  # "spleen", exact
    prediction[0, 0, 7] = 9  # a class the reference does not have
    write_segmentation(tmp_path / "prediction.seg.nrrd", prediction, volume,
                       [Segment("Liver", 7, (1, 0, 0)), Segment("spleen", 2, (0, 1, 0)), Segment("extra", 9, (0, 0, 1))])
    rows = {row["name"]: row for row in evaluate(tmp_path / "prediction.seg.nrrd", tmp_path / "reference.seg.nrrd")}
    assert rows["liver"]["dice"] == 0.0 and rows["liver"]["hd95_mm"] == pytest.approx(1.6)
    assert rows["spleen"]["dice"] == 1.0 and rows["spleen"]["hd95_mm"] == 0.0
    assert rows["extra"]["dice"] == 0.0 and rows["extra"]["hd95_mm"] is None

    write_labelmap(tmp_path / "prediction.nrrd", prediction, volume)
    rows = {row["label"]: row for row in evaluate(tmp_path / "prediction.nrrd", tmp_path / "reference.seg.nrrd")}
    assert rows[1]["dice"] == 0.0 and rows[1]["hd95_mm"] is None  # label 1 is not predicted
    assert rows[2]["dice"] == 1.0
