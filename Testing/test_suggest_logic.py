"""HSAMLib's correction loop against a real MRML scene (PyPI slicer-core) and a real tiny model:
uncertainty overlay on the volume's grid, score table, suggestions that skip annotated slices, jump;
without a model, the gaps where flow propagation disagrees (a real `python -m hsam suggest` worker)."""

import sys

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

from hsam.inference.segment import segment_volume  # noqa: E402
from hsam.inference.suggest import suggest_slices  # noqa: E402
from hsam.inference.uncertainty import DEFAULT_SIGNAL, OVERLAY_THRESHOLD  # noqa: E402
from hsam.models.build import build_hsam  # noqa: E402
from hsam.models.bundle import BundleMetadata, load_bundle, save_bundle  # noqa: E402
from hsam.volumes.preprocess import IntensityPreprocessing  # noqa: E402
from hsam.volumes.segmentation import Segment  # noqa: E402
from hsam.volumes.volume import Volume  # noqa: E402
from HSAMLib import mrml  # noqa: E402
from HSAMLib.suggest_logic import COLOR_NODE_NAME, GAP_TABLE_COLUMNS, HSAMSuggestLogic  # noqa: E402

SHAPE = (10, 24, 20)  # (z, y, x)


def ijk_to_ras() -> np.ndarray:
    """Rotated about S, the k axis flipped (S decreases with k), anisotropic spacing."""
    a = np.deg2rad(30)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([0.9, 1.1, -2.5])
    matrix[:3, 3] = (12.5, -40.0, 7.25)
    return matrix


@pytest.fixture
def volume_node(scene):
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    blob = ((z - 5) / 4.5) ** 2 + ((y - 12) / 9) ** 2 + ((x - 10) / 7) ** 2 < 1
    node = mrml.node_from_volume(Volume((1000 * blob).astype(np.int16), (1, 1, 1), (0, 0, 0), tuple(np.eye(3).ravel())), scene, "MR")
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras()[r, c])
    node.SetIJKToRASMatrix(matrix)
    return node


@pytest.fixture
def bundle(tmp_path):
    torch.manual_seed(1)
    metadata = BundleMetadata(
        preset="tiny", img_size=224, num_classes=1, class_names=["blob"], class_colors=[(0.9, 0.4, 0.2)],
        label_values=[1], preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
    )
    return save_bundle(tmp_path / "blob.hsam", build_hsam("tiny", num_classes=1, img_size=224), metadata)


@pytest.fixture
def views(scene):
    """Slice views as Slicer's layout makes them: red axial, green coronal, each with its composite node."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    nodes = {}
    for name, orientation in (("Red", "Axial"), ("Green", "Coronal")):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        slice_node.SetOrientation(orientation)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        nodes[name] = (slice_node, composite)
    return nodes


@pytest.mark.slow
def test_suggest_shows_the_map_on_the_volume_grid_and_skips_annotated_slices(scene, volume_node, bundle, views):
    annotated = np.zeros(SHAPE, np.uint8)
    annotated[[2, 7]] = mrml.volume_from_node(volume_node).array[[2, 7]] > 0
    segmentation = mrml.labels_to_segmentation(annotated, [Segment("blob", 1, (0.9, 0.4, 0.2), None)], volume_node)

    result = HSAMSuggestLogic().suggest(volume_node, bundle, count=3, segmentationNode=segmentation, device="cpu")

    model, metadata = load_bundle(bundle)
    expected = segment_volume(model, mrml.volume_from_node(volume_node), metadata, device="cpu", uncertainty=DEFAULT_SIGNAL)
    assert result.slices == suggest_slices(expected.slice_scores, 3, [2, 7])
    assert len(result.slices) == 3 and not {2, 7} & set(result.slices)

    # the map: a scalar volume on the volume's grid, same transform, coloured and thresholded
    node = result.uncertaintyNode
    np.testing.assert_allclose(mrml.ijk_to_ras(node), mrml.ijk_to_ras(volume_node), atol=1e-9)
    np.testing.assert_allclose(mrml.volume_from_node(node).array, expected.uncertainty, atol=1e-6)
    display = node.GetDisplayNode()
    assert display.GetColorNode().GetName() == COLOR_NODE_NAME
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(OVERLAY_THRESHOLD)
    for _, composite in views.values():
        assert composite.GetForegroundVolumeID() == node.GetID() and composite.GetForegroundOpacity() == 0.5

    # the table: every slice with its score and the suggestion rank
    table = result.tableNode.GetTable()
    assert table.GetNumberOfRows() == SHAPE[0]
    rows = [(table.GetValue(r, 0).ToInt(), table.GetValue(r, 1).ToDouble(), table.GetValue(r, 2).ToInt()) for r in range(SHAPE[0])]
    np.testing.assert_allclose([s for _, s, _ in rows], expected.slice_scores, atol=1e-6)  # CSV: 6 decimals
    assert [i for i, _, rank in sorted(rows, key=lambda row: row[2]) if rank] == result.slices

    # the views: the axial one on the first suggestion (S decreases by 2.5 mm per slice), centred in-plane
    red, green = views["Red"][0], views["Green"][0]
    centre = HSAMSuggestLogic.sliceCenterRAS(volume_node, "axial", result.slices[0])
    assert red.GetSliceOffset() == pytest.approx(7.25 - 2.5 * result.slices[0])
    assert green.GetSliceOffset() == pytest.approx(centre[1])


def test_slice_centre_for_each_axis(volume_node):
    matrix = ijk_to_ras()
    for axis, ijk in (("axial", (9.5, 11.5, 4)), ("coronal", (9.5, 4, 4.5)), ("sagittal", (4, 11.5, 4.5))):
        expected = (matrix @ np.array([*ijk, 1.0]))[:3]
        np.testing.assert_allclose(HSAMSuggestLogic.sliceCenterRAS(volume_node, axis, 4), expected)


def test_map_on_another_grid_is_refused(volume_node):
    from hsam.runtime.errors import InputError

    with pytest.raises(InputError, match="grid"):
        HSAMSuggestLogic().showUncertainty(np.zeros((2, 2, 2), np.float32), volume_node)


def test_repeated_suggestions_replace_the_map_and_reuse_the_colour_map(scene, volume_node):
    logic = HSAMSuggestLogic()
    first = logic.showUncertainty(np.full(SHAPE, 0.2, np.float32), volume_node)
    second = logic.showUncertainty(np.full(SHAPE, 0.3, np.float32), volume_node, previous=first)
    assert not scene.IsNodePresent(first) and scene.IsNodePresent(second)
    colour_nodes = [scene.GetNthNodeByClass(i, "vtkMRMLColorNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorNode"))]
    assert [n.GetName() for n in colour_nodes].count(COLOR_NODE_NAME) == 1


def test_gap_suggestions_list_the_slices_to_paint_and_jump_to_each(scene, volume_node, views):
    painted = [1, 4, 9]
    annotated = np.zeros(SHAPE, np.uint8)
    annotated[painted] = mrml.volume_from_node(volume_node).array[painted] > 0
    segmentation = mrml.labels_to_segmentation(annotated, [Segment("blob", 1, (0.9, 0.4, 0.2), None)], volume_node)
    logic = HSAMSuggestLogic(python=sys.executable)

    gaps, table_node = logic.suggestGaps(volume_node, segmentation, "axial", count=5)

    assert sorted((g.low, g.high, g.slice) for g in gaps) == [(1, 4, 2), (4, 9, 6)]  # the gaps' middles
    assert [g.score for g in gaps] == sorted((g.score for g in gaps), reverse=True)
    assert gaps[0].describe("axial").startswith(f"axial slice {gaps[0].slice} (between {gaps[0].low} and")
    table = table_node.GetTable()
    assert [table.GetColumnName(c) for c in range(5)] == ["suggestion", "axial slice", *GAP_TABLE_COLUMNS[2:]]
    assert [(table.GetValue(r, 0).ToInt(), table.GetValue(r, 1).ToInt()) for r in range(table.GetNumberOfRows())] == [
        (rank, g.slice) for rank, g in enumerate(gaps, start=1)]

    # the views land on the first suggestion (S decreases by 2.5 mm per slice); a click on another jumps there
    red, green = views["Red"][0], views["Green"][0]
    assert red.GetSliceOffset() == pytest.approx(7.25 - 2.5 * gaps[0].slice)
    logic.jumpToSlice(volume_node, "axial", gaps[1].slice)
    assert red.GetSliceOffset() == pytest.approx(7.25 - 2.5 * gaps[1].slice)
    assert green.GetSliceOffset() == pytest.approx(HSAMSuggestLogic.sliceCenterRAS(volume_node, "axial", gaps[1].slice)[1])

    # a second ranking refills the same table
    again, same = logic.suggestGaps(volume_node, segmentation, "axial", count=1, tableNode=table_node)
    assert same is table_node and table_node.GetTable().GetNumberOfRows() == 1 and again[0].slice == gaps[0].slice


def test_gap_ranking_errors_come_back_as_one_line(scene, volume_node):
    from hsam.runtime.errors import HSAMError

    annotated = np.zeros(SHAPE, np.uint8)
    annotated[4] = mrml.volume_from_node(volume_node).array[4] > 0
    segmentation = mrml.labels_to_segmentation(annotated, [Segment("blob", 1, (0.9, 0.4, 0.2), None)], volume_node)
    with pytest.raises(HSAMError, match="needs at least two"):
        HSAMSuggestLogic(python=sys.executable).suggestGaps(volume_node, segmentation, "axial")
