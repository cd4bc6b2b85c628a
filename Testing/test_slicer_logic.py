"""HSAMLib against a real MRML scene (PyPI slicer-core): geometry, segmentations, export, models.
The worker-process paths (segment, fine-tune) are in test_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
slicerio = pytest.importorskip("slicerio")
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from hsam.runtime.errors import CheckpointError, HSAMError, InputError  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from hsam.volumes.segmentation import Segment  # noqa: E402
from HSAMLib import dependencies, models, mrml  # noqa: E402
from HSAMLib.plots import TrainingCurves  # noqa: E402
from HSAMLib.segment_logic import HSAMSegmentLogic  # noqa: E402
from HSAMLib.training_logic import HSAMTrainingLogic  # noqa: E402

SHAPE = (6, 9, 11)  # (z, y, x)
ROOT = Path(__file__).resolve().parent.parent


def rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def oblique_ijk_to_ras() -> np.ndarray:
    """Anisotropic spacing, rotated axes and a flipped k axis."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_z(30) @ np.diag([-1.0, 1.0, -1.0]) @ np.diag([0.7, 1.3, 2.5])
    matrix[:3, 3] = (12.5, -40.0, 7.25)
    return matrix


def add_volume(scene, array: np.ndarray, ijk_to_ras: np.ndarray, node_class="vtkMRMLScalarVolumeNode", name="CT"):
    node = scene.AddNewNodeByClass(node_class, name)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras[r, c])
    node.SetIJKToRASMatrix(matrix)
    return node


@pytest.fixture
def volume_node(scene):
    rng = np.random.default_rng(0)
    return add_volume(scene, rng.integers(-1000, 1000, SHAPE, dtype=np.int16), oblique_ijk_to_ras())


@pytest.fixture
def labels_and_segments():
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 2:5, 3:7] = 3
    labels[1, 6:8, 1:3] = 5
    labels[4, 1:4, 4:10] = 5
    segments = [
        Segment("liver", 3, (0.8, 0.3, 0.2), "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"),
        Segment("kidney", 5, (0.1, 0.6, 0.9), None),
        Segment("spleen", 7, (0.5, 0.5, 0.1), None),  # predicted nowhere: an empty segment
    ]
    return labels, segments


def ordinal(labels: np.ndarray, segments) -> np.ndarray:
    """``labels`` renumbered 1..N in segment order (what ``labels_from_segmentation`` returns)."""
    out = np.zeros_like(labels)
    for i, segment in enumerate(segments, start=1):
        out[labels == segment.label_value] = i
    return out


# --- volumes ------------------------------------------------------------------------------------


def test_volume_geometry_matches_simpleitk_reading_the_saved_file(volume_node, tmp_path):
    path = tmp_path / "ct.nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(volume_node)
    image = sitk.ReadImage(str(path))

    volume = mrml.volume_from_node(volume_node)

    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(volume.direction, image.GetDirection(), atol=1e-6)
    assert volume.array.shape == SHAPE


def test_volume_round_trip_restores_ijk_to_ras(volume_node, scene):
    volume = mrml.volume_from_node(volume_node)
    copy = mrml.node_from_volume(volume, scene, "copy")
    np.testing.assert_allclose(mrml.ijk_to_ras(copy), oblique_ijk_to_ras(), atol=1e-9)
    np.testing.assert_array_equal(mrml.volume_from_node(copy).array, volume.array)


def test_vector_volume_is_rejected(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(image)
    with pytest.raises(InputError, match="components"):
        mrml.volume_from_node(node)


def test_volume_without_image_is_rejected(scene):
    with pytest.raises(InputError, match="no image data"):
        mrml.volume_from_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


# --- segmentations ------------------------------------------------------------------------------


def test_labels_to_segmentation_and_back(volume_node, labels_and_segments):
    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)

    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(3)] == ["liver", "kidney", "spleen"]
    for i, segment in enumerate(segments):
        np.testing.assert_allclose(segmentation.GetNthSegment(i).GetColor(), segment.color, atol=1e-6)
    reference = vtk.reference("")
    assert segmentation.GetNthSegment(0).GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), reference)
    assert str(reference) == segments[0].terminology
    # the reference geometry is the volume's grid
    geometry = node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole())
    assert geometry == volume_node.GetID()

    back, back_segments = mrml.labels_from_segmentation(node, volume_node)
    np.testing.assert_array_equal(back, ordinal(labels, segments))
    assert [(s.name, s.label_value) for s in back_segments] == [("liver", 1), ("kidney", 2), ("spleen", 3)]
    assert back_segments[0].terminology == segments[0].terminology


def test_segmentation_follows_the_volume_transform(scene, volume_node, labels_and_segments):
    labels, segments = labels_and_segments
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(matrix)
    volume_node.SetAndObserveTransformNodeID(transform.GetID())

    node = mrml.labels_to_segmentation(labels, segments, volume_node)

    assert node.GetTransformNodeID() == transform.GetID()
    np.testing.assert_array_equal(mrml.labels_from_segmentation(node, volume_node)[0], ordinal(labels, segments))


def test_overwriting_replaces_all_segments(volume_node, labels_and_segments):
    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)
    single = [Segment("tumour", 1, (1.0, 1.0, 0.0), None)]
    tumour = np.zeros(SHAPE, np.uint8)
    tumour[2, 2, 2] = 1
    assert mrml.labels_to_segmentation(tumour, single, volume_node, node) is node
    back, back_segments = mrml.labels_from_segmentation(node, volume_node)
    assert [s.name for s in back_segments] == ["tumour"]
    np.testing.assert_array_equal(back, tumour)


def test_labels_with_wrong_shape_are_rejected(volume_node, labels_and_segments):
    _, segments = labels_and_segments
    with pytest.raises(InputError, match="shape"):
        mrml.labels_to_segmentation(np.zeros((2, 2, 2), np.uint8), segments, volume_node)


def expected_counts(labels, segments, axis):
    moved = np.moveaxis(labels, axis, 0)
    return {
        s.name: {i: int((moved[i] == s.label_value).sum()) for i in range(moved.shape[0]) if (moved[i] == s.label_value).any()}
        for s in segments
    }


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_annotated_slices_in_a_shared_layer(volume_node, labels_and_segments, axis):
    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)
    assert node.GetSegmentation().GetNumberOfLayers() == 1  # all segments share one labelmap

    annotated = HSAMTrainingLogic().annotatedSlices(volume_node, node, axis)

    counts = expected_counts(labels, segments, mrml.SLICE_AXES[axis])
    assert annotated.counts == counts
    assert annotated.slices == sorted({i for c in counts.values() for i in c})
    assert annotated.missing == ["spleen"]


def test_annotated_slices_of_a_segmentation_on_another_grid(scene, volume_node):
    """Segments drawn on a cropped, separately stored grid are resampled onto the volume's grid."""
    crop = (slice(1, 5), slice(2, 8), slice(3, 10))  # (z, y, x) sub-block of the volume grid
    sub = np.zeros((4, 6, 7), np.uint8)
    sub[0, 1:3, 1:4] = 1  # volume slice z=1
    sub[3, 2:5, 2:6] = 1  # volume slice z=4
    cropped_ras = oblique_ijk_to_ras()
    cropped_ras[:3, 3] = cropped_ras[:3, :3] @ np.array([crop[2].start, crop[1].start, crop[0].start]) + cropped_ras[:3, 3]
    labelmap = add_volume(scene, sub, cropped_ras, "vtkMRMLLabelMapVolumeNode", "first")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ImportLabelmapToSegmentationNode(labelmap, node)
    second = np.zeros_like(sub)
    second[0, 1:4, 2:5] = 1  # overlaps the first segment: needs its own layer
    labelmap2 = add_volume(scene, second, cropped_ras, "vtkMRMLLabelMapVolumeNode", "second")
    assert logic.ImportLabelmapToSegmentationNode(labelmap2, node)
    assert node.GetSegmentation().GetNumberOfSegments() == 2
    assert node.GetSegmentation().GetNumberOfLayers() == 2

    labels, segments = mrml.labels_from_segmentation(node, volume_node)

    expected = np.zeros(SHAPE, np.uint8)
    expected[crop][sub == 1] = 1
    expected[crop][second == 1] = 2  # the later segment wins where they overlap
    np.testing.assert_array_equal(labels, expected)
    annotated = mrml.count_annotated_slices(labels, segments, "axial")
    assert annotated.slices == [1, 4]
    assert annotated.missing == []


def test_painting_fires_an_annotation_change_event_and_changes_the_summary(scene, volume_node, labels_and_segments):
    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)
    fired = []
    for event in mrml.annotation_change_events():
        node.GetSegmentation().AddObserver(event, lambda caller, name: fired.append(name))
    before = mrml.annotated_slices(node, volume_node).slices

    painted = np.zeros(SHAPE, np.uint8)
    painted[3, 4:6, 4:6] = 1
    brush = mrml.node_from_volume(mrml.volume_from_node(volume_node), scene, "brush", labelmap=True)
    mrml._set_image(brush, painted)
    stroke = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(brush)
    segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("spleen")
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(  # what the Segment Editor does
        stroke, node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MAX)

    assert fired
    assert before == [1, 4] and mrml.annotated_slices(node, volume_node).slices == [1, 3, 4]


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_reading_and_exporting_segments_adds_no_node_to_the_scene(scene, volume_node, labels_and_segments, tmp_path):
    """Slicer's ExportSegmentsToLabelmapNode leaves a display node and a colour table per call: after
    each pause in painting they would pile up and be saved with the scene."""
    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)
    before = node_ids(scene)

    for _ in range(3):
        mrml.labels_from_segmentation(node, volume_node)
        mrml.annotated_slices(node, volume_node, "coronal")
        mrml.export_labelmap(node, volume_node, tmp_path / "labels.nrrd")
        mrml.labels_to_segmentation(labels, segments, volume_node, node)

    assert node_ids(scene) == before


def paint(scene, volume_node, segmentation_node, segment_name: str, mask: np.ndarray) -> None:
    """One stroke, as the Segment Editor applies it (``SetBinaryLabelmapToSegment``)."""
    brush = mrml.node_from_volume(mrml.volume_from_node(volume_node), scene, "brush", labelmap=True)
    mrml._set_image(brush, mask.astype(np.uint8))
    stroke = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(brush)
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        stroke, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MAX)
    scene.RemoveNode(brush)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_annotation_tracker_counts_like_the_exported_labels(scene, volume_node, labels_and_segments, axis):
    from HSAMLib.annotations import AnnotationTracker

    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)
    changes = []
    tracker = AnnotationTracker(onChanged=lambda: changes.append(1))
    assert tracker.follow(node, volume_node, axis) and not tracker.follow(node, volume_node, axis)
    assert tracker.summary().counts == mrml.annotated_slices(node, volume_node, axis).counts

    stroke = np.zeros(SHAPE, bool)
    stroke[3, 4:6, 4:6] = stroke[5, 0, 0] = True  # within the volume, on slices without annotation
    paint(scene, volume_node, node, "spleen", stroke)
    node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("kidney")).SetName("renal")
    assert changes
    assert tracker.summary().counts == mrml.annotated_slices(node, volume_node, axis).counts
    tracker.stop()


def test_annotation_tracker_resamples_a_segmentation_on_another_grid(scene, volume_node):
    from HSAMLib.annotations import AnnotationTracker

    cropped_ras = oblique_ijk_to_ras()
    cropped_ras[:3, 3] = cropped_ras[:3, :3] @ np.array([3.0, 2.0, 1.0]) + cropped_ras[:3, 3]  # (i, j, k) = (3, 2, 1)
    sub = np.zeros((4, 6, 7), np.uint8)
    sub[0, 1:3, 1:4] = 1
    sub[3, 2:5, 2:6] = 1
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        add_volume(scene, sub, cropped_ras, "vtkMRMLLabelMapVolumeNode", "drawn"), node)
    tracker = AnnotationTracker(onChanged=lambda: None)
    tracker.follow(node, volume_node, "axial")

    assert list(tracker.summary().counts.values()) == [{1: 6, 4: 12}]


def test_a_stroke_counts_only_the_layer_of_the_painted_segment(scene, volume_node, labels_and_segments):
    """Kidney is moved to a layer of its own and changed without telling anyone: painting liver (the
    other layer) must not count kidney's layer again; an event for kidney does."""
    from HSAMLib.annotations import AnnotationTracker

    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)
    segmentation = node.GetSegmentation()
    kidney = segmentation.GetSegmentIdBySegmentName("kidney")
    segmentation.SeparateSegmentLabelmap(kidney)
    assert segmentation.GetLayerIndex(kidney) != segmentation.GetLayerIndex(segmentation.GetSegmentIdBySegmentName("liver"))
    tracker = AnnotationTracker(onChanged=lambda: None)
    tracker.follow(node, volume_node, "axial")
    assert tracker.summary().slices == [1, 4]

    layer = segmentation.GetLayerDataObject(segmentation.GetLayerIndex(kidney))
    extent = layer.GetExtent()
    voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(layer.GetDimensions()[::-1])
    voxels[2 - extent[4], 0, 0] = segmentation.GetSegment(kidney).GetLabelValue()  # slice 2, no event
    stroke = np.zeros(SHAPE, bool)
    stroke[3, 1, 1] = True
    paint(scene, volume_node, node, "liver", stroke)

    summary = tracker.summary()
    assert summary.counts["liver"] == {1: 12, 3: 1} and 2 not in summary.counts["kidney"]
    segmentation.InvokeEvent(slicer.vtkSegmentation.RepresentationModified, kidney)
    assert 2 in tracker.summary().counts["kidney"]


def test_annotation_tracker_stops_observing_when_the_panel_is_left(scene, volume_node, labels_and_segments):
    from HSAMLib.annotations import AnnotationTracker

    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)
    changes = []
    tracker = AnnotationTracker(onChanged=lambda: changes.append(1))
    tracker.follow(node, volume_node, "axial")
    tracker.summary()
    tracker.stop()

    stroke = np.zeros(SHAPE, bool)
    stroke[3, 1, 1] = True
    paint(scene, volume_node, node, "liver", stroke)
    assert changes == []
    assert tracker.follow(node, volume_node, "axial")  # back in the panel: everything is counted again
    assert tracker.summary().slices == [1, 3, 4]
    tracker.follow(None, volume_node, "axial")
    assert tracker.summary() is None


def test_segmentation_without_segments_is_rejected(scene, volume_node):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(InputError, match="no segments"):
        mrml.labels_from_segmentation(node, volume_node)


# --- export -------------------------------------------------------------------------------------


def test_export_seg_nrrd_and_labelmap(volume_node, labels_and_segments, tmp_path):
    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node, name="result")
    seg_path, labelmap_path = HSAMSegmentLogic().export(node, volume_node, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([seg_path.name, labelmap_path.name])

    written = slicerio.read_segmentation(str(seg_path))
    assert [s["name"] for s in written["segments"]] == ["liver", "kidney", "spleen"]
    for read, segment in zip(written["segments"], segments):
        np.testing.assert_allclose(read["color"], segment.color, atol=1e-3)
    reference = mrml.volume_from_node(volume_node)
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ oblique_ijk_to_ras()
    np.testing.assert_allclose(written["ijkToLPS"], ijk_to_lps, atol=1e-6)  # the volume's grid
    for read, segment in zip(written["segments"], segments):
        mask = slicerio.extract_segments(written, [(read["name"], 1)])["voxels"]  # (i, j, k)
        np.testing.assert_array_equal(np.asarray(mask).transpose(2, 1, 0), labels == segment.label_value)
    assert written["segments"][0]["terminology"]["type"][2] == "Liver"

    image = sitk.ReadImage(str(labelmap_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)  # the model's label values
    np.testing.assert_allclose(image.GetOrigin(), reference.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), reference.spacing, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.direction, atol=1e-6)


def test_export_refuses_wrong_extensions(volume_node, labels_and_segments, tmp_path):
    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)
    with pytest.raises(InputError, match=".seg.nrrd"):
        mrml.export_segmentation(node, tmp_path / "a.nrrd")
    with pytest.raises(InputError):
        mrml.export_labelmap(node, volume_node, tmp_path / "a.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


# --- models folder, dependencies, jobs, plots ---------------------------------------------------


def test_sam_weights_table_and_cache_match_the_engine(tmp_path, monkeypatch):
    from hsam.models.sam_weights import SAM_CHECKPOINTS, default_cache_dir

    assert models.SAM_WEIGHTS == {name: (info.filename, info.size) for name, info in SAM_CHECKPOINTS.items()}
    monkeypatch.delenv("HSAM_HOME")
    assert models.sam_cache_dir() == default_cache_dir()
    monkeypatch.setenv("HSAM_HOME", str(tmp_path))
    assert models.sam_cache_dir() == default_cache_dir() == tmp_path / "checkpoints"
    for name, info in SAM_CHECKPOINTS.items():
        assert models.sam_weights_path(name) == default_cache_dir() / info.filename


def test_unique_model_paths(tmp_path):
    first = models.unique_model_path("liver CT / v1", tmp_path)
    assert first.parent == tmp_path and first.name == "liver_CT_v1.hsam"
    first.write_bytes(b"x")
    assert models.unique_model_path("liver CT / v1", tmp_path).name == "liver_CT_v1-2.hsam"
    assert models.unique_model_path("  ..  ", tmp_path).name == "model.hsam"


def test_models_folder_reports_unreadable_bundles(tmp_path, monkeypatch):
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path / "models"))
    folder = models.models_dir()
    assert folder == tmp_path / "models" and folder.is_dir()
    (folder / "broken.hsam").write_bytes(b"not a safetensors file")
    entries, problems = models.list_models()
    assert entries == [] and len(problems) == 1 and "broken.hsam" in problems[0]
    with pytest.raises(CheckpointError):
        models.import_model_file(folder / "broken.hsam", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_models_folder_lists_and_imports_bundles(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path / "models"))
    entry = models.import_model_file(tiny_bundle)
    assert entry.path == tmp_path / "models" / "tiny.hsam"
    assert models.import_model_file(tiny_bundle).path.name == "tiny-2.hsam"  # never overwrites
    entries, problems = models.list_models()
    assert [e.name for e in entries] == ["tiny", "tiny-2"] and problems == []
    assert entries[0].class_names == ["liver", "kidney"] and entries[0].metadata["preset"] == "tiny"
    assert "liver, kidney" in entries[0].describe()


def test_base_model_choices(tiny_bundle, tmp_path, monkeypatch):
    from HSAMLib.training_logic import base_model_arguments

    monkeypatch.setenv("HSAM_HOME", str(tmp_path))
    assert base_model_arguments("tiny") == ["--preset", "tiny"]
    assert base_model_arguments(str(tiny_bundle)) == ["--base-model", str(tiny_bundle.resolve())]
    with pytest.raises(InputError, match="vit_b weights are not downloaded"):
        base_model_arguments("sam:vit_b")
    weights = models.sam_weights_path("vit_b")
    weights.parent.mkdir(parents=True)
    with open(weights, "wb") as f:
        f.truncate(models.SAM_WEIGHTS["vit_b"][1])
    assert base_model_arguments("sam:vit_b") == ["--preset", "vit_b", "--sam-checkpoint", str(weights)]
    with pytest.raises(InputError, match="unknown SAM weights"):
        base_model_arguments("sam:vit_x")
    with pytest.raises(CheckpointError):
        base_model_arguments(str(tmp_path / "missing.hsam"))


def test_training_options_become_cli_arguments():
    from hsam.cli import build_parser

    config = HSAMTrainingLogic().makeConfig("tiny", epochs=5, timeBudgetSeconds=60.0, learningRate=0.0, batchSize=3,
                                            device="cpu", imageSize=224)
    args = build_parser().parse_args(["finetune", "v.nrrd", "l.nrrd", "-o", "m.hsam", *config.arguments()])
    assert (args.preset, args.epochs, args.time_budget, args.lr, args.batch_size, args.device, args.img_size) == (
        "tiny", 5, 60.0, None, 3, "cpu", 224)
    with pytest.raises(InputError, match="slice axis"):
        HSAMTrainingLogic().makeConfig("tiny", sliceAxis="oblique")


def test_requirements_file_reads_like_slicer_packaging_and_is_installed_here():
    lines = [line.strip() for line in dependencies.REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()]
    specs = [line for line in lines if line and not line.startswith(("#", "-"))]
    assert [Requirement(line) for line in specs] == dependencies.read_requirements()  # no inline comments
    assert {dependencies.import_name(r) for r in dependencies.read_requirements()} == {"segment_anything", "safetensors",
                                                                                       "cv2"}
    assert dependencies.install_plan().empty


def test_any_opencv_distribution_satisfies_opencv(monkeypatch):
    installed = dependencies.installed_version("opencv-python-headless")
    wanted = Requirement(f"opencv-contrib-python=={installed}")  # another distribution of cv2, not installed here
    assert dependencies.install_plan([wanted]).pip == [str(wanted)]
    monkeypatch.setitem(dependencies.ALTERNATIVES, "opencv-contrib-python", ("opencv-python-headless",))
    assert dependencies.install_plan([wanted]).pip == []  # the installed one stands in: no second cv2


def test_torch_minimum_matches_the_engine_and_pyproject():
    import tomllib  # the test environment's Python (3.11+); Slicer never reads pyproject.toml

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert str(dependencies.TORCH_REQUIREMENT) in pyproject["project"]["dependencies"]
    assert str(dependencies.TORCHVISION_REQUIREMENT) in pyproject["project"]["dependencies"]
    import torch

    assert dependencies.TORCH_REQUIREMENT.specifier.contains(torch.__version__.split("+")[0])
    assert hasattr(torch.amp, "GradScaler")


def test_missing_torchvision_alone_keeps_the_installed_torch():
    plan = dependencies.install_plan([Requirement("torch>=2.3"), Requirement("torchvision>=999")])
    assert plan.torch == f"=={dependencies.installed_version('torch')}" and plan.torchvision == ">=999"
    assert plan.pip == [] and not plan.empty and "for the installed PyTorch" in plan.describe()

    plan = dependencies.install_plan([Requirement("torch>=999"), Requirement("torchvision>=0.18")])
    assert plan.torch == ">=999" and plan.torchvision == ">=0.18"


def test_install_plan_never_replaces_what_slicer_ships():
    requirements = [Requirement("numpy>=999"), Requirement("SimpleITK"), Requirement("hsam-missing-package-xyz>=1")]
    plan = dependencies.install_plan(requirements)
    assert plan.unavailable == ["numpy"] and plan.pip == ["hsam-missing-package-xyz>=1"] and plan.torch is None
    with pytest.raises(HSAMError, match="numpy"):
        dependencies.install(plan, install_torch=lambda *a: True, pip_install=lambda spec: None)

    # In a fresh interpreter, as in Slicer before any module imported torch (a loaded torchvision is refused).
    code = (
        "from packaging.requirements import Requirement\n"
        "from HSAMLib import dependencies\n"
        "calls = []\n"
        "plan = dependencies.install_plan([Requirement('hsam-missing-package-xyz>=1'), Requirement('torchvision>=999')])\n"
        "dependencies.install(plan, install_torch=lambda *a: calls.append(list(a)) or True, pip_install=calls.append)\n"
        "print(repr(calls))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "HSAMSegment")))
    torch = f"=={dependencies.installed_version('torch')}"
    assert result.stdout.strip() == repr([[torch, ">=999"], "--no-deps hsam-missing-package-xyz>=1"]), result.stderr


@pytest.fixture
def installed_package(tmp_path, monkeypatch):
    """A real distribution ``hsamtestpkg`` 1.0 on sys.path (module and metadata, as pip writes them);
    the fixture's ``upgrade`` replaces it by 2.0 as pip would."""
    import importlib

    (tmp_path / "hsamtestpkg.py").write_text("VALUE = 1\n")
    metadata = tmp_path / "hsamtestpkg-1.0.dist-info" / "METADATA"
    metadata.parent.mkdir()
    metadata.write_text("Metadata-Version: 2.1\nName: hsamtestpkg\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield lambda spec: metadata.write_text("Metadata-Version: 2.1\nName: hsamtestpkg\nVersion: 2.0\n")
    sys.modules.pop("hsamtestpkg", None)


def test_a_package_in_use_is_refused_before_anything_is_installed(installed_package):
    """torch imported by another extension (PyTorchUtils) cannot be replaced in place: on Windows its
    loaded DLLs would leave a half-replaced torch. The plan says so before any download."""
    import importlib

    requirements = [Requirement("hsamtestpkg>=2")]
    plan = dependencies.install_plan(requirements)
    assert plan.replaced == ["hsamtestpkg"] and plan.problem is None  # upgraded, but never imported
    importlib.import_module("hsamtestpkg")  # loaded in this session
    plan = dependencies.install_plan(requirements)
    assert "hsamtestpkg" in plan.problem and "Restart Slicer" in plan.problem

    calls = []
    with pytest.raises(HSAMError, match="hsamtestpkg"):
        dependencies.install(plan, lambda *a: calls.append(a) or True, lambda spec: calls.append(installed_package(spec)))
    assert calls == [] and dependencies.installed_version("hsamtestpkg") == "1.0"


def test_torch_that_stays_is_not_replaced():
    plan = dependencies.install_plan([Requirement("torch>=2.3"), Requirement("torchvision>=999")])
    assert plan.replaced == ["torchvision"]
    plan = dependencies.install_plan([Requirement("torch>=999"), Requirement("torchvision>=0.18")])
    assert sorted(plan.replaced) == ["torch", "torchvision"]


def test_intel_macs_are_told_before_any_download_that_pytorch_cannot_be_installed():
    requirements = [Requirement("torch>=999"), Requirement("torchvision>=0.18")]
    plan = dependencies.install_plan(requirements, system="darwin", machine="x86_64")
    assert "x86_64" in plan.problem and "2.2.2" in plan.problem
    calls = []
    with pytest.raises(HSAMError, match="x86_64"):
        dependencies.install(plan, lambda *a: calls.append(a) or True, calls.append)
    assert calls == []
    assert dependencies.install_plan(requirements, system="darwin", machine="arm64").platform_limit is None
    assert dependencies.install_plan([Requirement("safetensors")], system="darwin", machine="x86_64").problem is None


def test_mps_is_offered_only_on_apple_silicon():
    from HSAMLib.devices import device_choices

    assert device_choices("darwin", "arm64") == ("auto", "cuda", "cpu", "mps")
    for system, machine in (("darwin", "x86_64"), ("linux", "x86_64"), ("linux", "aarch64"), ("win32", "AMD64")):
        assert "mps" not in device_choices(system, machine)


def test_a_second_install_cannot_start_while_one_runs():
    """Slicer's pip_install processes GUI events for minutes: a click meanwhile enters again."""
    answers = []

    def pip_install(spec):
        with dependencies.exclusive() as allowed:  # Segment clicked while pip runs
            answers.append(allowed)

    with dependencies.exclusive() as allowed:
        assert allowed
        dependencies.install(dependencies.InstallPlan(pip=["hsam-missing-package-xyz"]), lambda *a: True, pip_install)
    assert answers == [False]
    with pytest.raises(RuntimeError):
        with dependencies.exclusive() as allowed:
            assert allowed
            raise RuntimeError("pip failed")
    with dependencies.exclusive() as allowed:
        assert allowed


def test_training_curves_table_and_chart(scene):
    curves = TrainingCurves(scene, "run")
    curves.append(1, 0.9, None)
    curves.append(2, 0.5, 0.61)
    rows = curves.rows()
    assert rows[0][:2] == (1.0, 0.9) and np.isnan(rows[0][2])
    assert rows[1] == (2.0, 0.5, 0.61)
    assert curves.chartNode.GetNumberOfPlotSeriesNodes() == 2
    before = scene.GetNumberOfNodes()
    curves.remove()
    assert scene.GetNumberOfNodes() == before - 4


@pytest.fixture
def tiny_bundle(tmp_path):
    import torch
    from hsam.models.build import build_hsam
    from hsam.models.bundle import BundleMetadata, save_bundle
    from hsam.volumes.preprocess import IntensityPreprocessing

    torch.manual_seed(0)
    model = build_hsam("tiny", num_classes=2, img_size=224).eval()
    metadata = BundleMetadata(
        preset="tiny",
        img_size=224,
        num_classes=2,
        class_names=["liver", "kidney"],
        class_colors=[(0.8, 0.3, 0.2), (0.1, 0.6, 0.9)],
        label_values=[1, 2],
        preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
    )
    return save_bundle(tmp_path / "tiny.hsam", model, metadata)


def test_finetune_refuses_segments_without_annotation(volume_node, labels_and_segments, tmp_path):
    labels, segments = labels_and_segments
    node = mrml.labels_to_segmentation(labels, segments, volume_node)  # spleen is empty
    with pytest.raises(InputError, match="spleen"):
        HSAMTrainingLogic().prepare(volume_node, node)


def test_training_pairs_follow_the_scene(scene, volume_node, labels_and_segments):
    from HSAMLib.training_logic import TrainingPairs

    labels, segments = labels_and_segments
    first = mrml.labels_to_segmentation(labels, segments[:2], volume_node)
    other_volume = add_volume(scene, np.zeros(SHAPE, np.int16), np.eye(4), name="CT 2")
    second = mrml.labels_to_segmentation(labels, segments[:2], other_volume)
    pairs = TrainingPairs()
    pairs.add(volume_node, first)
    pairs.add(other_volume, second)
    pairs.add(other_volume, second)  # listed once
    assert pairs.names(scene) == [f"CT — {first.GetName()}", f"CT 2 — {second.GetName()}"]
    assert pairs.cohort(scene, volume_node, first) == [(volume_node, first), (other_volume, second)]
    scene.RemoveNode(second)
    assert pairs.nodes(scene) == [(volume_node, first)]
    pairs.remove(0)
    assert pairs.cohort(scene, other_volume, first) == [(other_volume, first)]
    with pytest.raises(InputError, match="select a volume"):
        pairs.add(None, first)


def test_a_cohort_refuses_a_segment_annotated_in_no_pair(scene, volume_node, labels_and_segments):
    labels, segments = labels_and_segments  # spleen (7) is painted nowhere
    other_volume = add_volume(scene, np.zeros(SHAPE, np.int16), np.eye(4), name="CT 2")
    pairs = [(volume_node, mrml.labels_to_segmentation(labels, segments, volume_node)),
             (other_volume, mrml.labels_to_segmentation(np.where(labels == 5, 0, labels), segments[:1], other_volume))]
    with pytest.raises(InputError, match="without any annotated slice: spleen$"):
        HSAMTrainingLogic().prepareCohort(pairs)
    assert len(HSAMTrainingLogic().prepareCohort([pairs[1]])) == 1  # kidney missing from this pair only is fine


# --- parameter node ⇄ widgets (Slicer 5.8) ------------------------------------------------------


class ComboBox:
    """A QComboBox as the connectors see it: clearing it selects index -1 and adding the first item
    selects it, each firing ``currentIndexChanged``."""

    def __init__(self, parameter: str):
        self.parameter, self.items, self.currentIndex, self.listeners = parameter, [], -1, []

    def property(self, name: str):
        return self.parameter if name == "SlicerParameterName" else None

    def select(self, index: int) -> None:
        self.currentIndex = index
        for listener in list(self.listeners):
            listener()

    def clear(self) -> None:
        self.items = []
        self.select(-1)

    def addItem(self, text: str) -> None:
        self.items.append(text)
        if self.currentIndex < 0:
            self.select(0)


class SlicerChoiceWrapper:
    """What Slicer 5.8.1's parameterNodeWrapper does with a ``Choice`` parameter shown in a combo box
    (Base/Python/slicer/parameterNodeWrapper/wrapper.py and guiConnectors.py at v5.8.1): each
    connection builds a connector that clears and refills the combo box, then writes the value and
    listens; ``connectGui`` drops the tag (fixed in 5.10.0, commit b5a65a4); ``disconnectGui`` of an
    unknown tag does nothing. Qt and Slicer's wrapper cannot run here."""

    def __init__(self, choices, value):
        self.choices, self.value, self._connections, self._next = list(choices), value, {}, 0

    def connectParametersToGui(self, widgets):
        listeners = []
        for combo in widgets.values():
            combo.clear()
            for choice in self.choices:
                combo.addItem(choice)
            combo.select(self.choices.index(self.value))

            def listener(combo=combo):
                self.value = self.choices[combo.currentIndex]  # index -1 reads the last choice

            combo.listeners.append(listener)
            listeners.append((combo, listener))
        tag, self._next = self._next, self._next + 1
        self._connections[tag] = listeners
        return tag

    def connectGui(self, ui):
        from HSAMLib.parameters import parameter_widgets

        self.connectParametersToGui(parameter_widgets(ui))  # 5.8.1: no return

    def disconnectGui(self, tag):
        for combo, listener in self._connections.pop(tag, []):
            combo.listeners.remove(listener)


def panel():
    ui = type("", (), {})()  # like slicer.util.childWidgetVariables
    ui.sliceAxisComboBox = ComboBox("sliceAxis")
    ui.statusLabel = ComboBox("")  # a widget without a parameter
    return ui


def test_leaving_and_reopening_the_panel_keeps_the_choice_on_slicer_5_8():
    from HSAMLib.parameters import ParameterGui, parameter_widgets

    ui = panel()
    assert parameter_widgets(ui) == {"sliceAxis": ui.sliceAxisComboBox}
    parameters = SlicerChoiceWrapper(["axial", "coronal", "sagittal"], "axial")
    gui = ParameterGui()
    gui.connect(parameters, ui)
    ui.sliceAxisComboBox.select(2)  # the user picks sagittal
    assert parameters.value == "sagittal"

    gui.disconnect()  # exit(): e.g. a visit to the Segment Editor
    gui.connect(parameters, ui)  # enter()
    assert parameters.value == "sagittal" and ui.sliceAxisComboBox.currentIndex == 2
    gui.connect(parameters, ui)  # a new connection ends the previous one
    assert parameters.value == "sagittal"


def test_the_stand_in_reproduces_the_slicer_5_8_defect():
    ui = panel()
    parameters = SlicerChoiceWrapper(["axial", "coronal", "sagittal"], "sagittal")
    parameters.disconnectGui(parameters.connectGui(ui))
    parameters.connectGui(ui)
    assert parameters.value == "axial"
