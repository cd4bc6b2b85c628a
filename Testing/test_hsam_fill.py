"""HSAM fill (the Segment Editor effect's logic, ``HSAMLib.fill_logic``) on real MRML (slicer-core) with
real ``hsam`` worker processes: painted input checks, resampling like the Segment Editor, the first
preview being the flow propagation (a quick torch-free worker), an undoable apply that keeps the
slices painted at that moment, cancel, update continuing from the model, structures filled before
left alone, the shared preview slot, the 3D preview, and the fill's folder after a crash.

The Segment Editor's side (undo, "set" modification of a segment, the aligned source volume) is
played by Slicer's own C++ ``vtkSlicerSegmentEditorLogic`` from slicer-core, the port (Slicer 5.10) of
what ``qMRMLSegmentEditorWidget`` and ``qSlicerSegmentEditorAbstractEffect`` do in Slicer 5.8."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

from hsam.evaluation.baselines import flow_propagation  # noqa: E402
from hsam.models.bundle import read_bundle_metadata  # noqa: E402
from hsam.runtime.errors import HSAMError, InputError  # noqa: E402
from hsam.volumes.segmentation import read_labelmap  # noqa: E402
from HSAMLib import fill_logic, mrml  # noqa: E402
from HSAMLib.fill_logic import FillOptions, HSAMFillLogic  # noqa: E402
from HSAMLib.worker import JOB_FOLDER, WorkerJob, remove_orphaned_job_folders  # noqa: E402
from phantom import phantom_volume  # noqa: E402

SHAPE = (24, 40, 40)
PAINTED = [4, 11, 18]
WAIT_LIMIT_SECONDS = 600  # a guard against a hung worker only: the CPU may be shared
CANCEL_LIMIT_SECONDS = 2.0
# Two epochs at 224 px; previews only at step 0 (then the final one from the saved model).
QUICK = dict(epochs=2, imageSize=224, device="cpu", previewIntervalSeconds=1000.0, timeBudgetSeconds=600.0)


class SegmentEditor:
    """Slicer's Segment Editor logic on a segmentation and a source volume, with an undo history."""

    def __init__(self, scene, segmentationNode, volumeNode):
        self.segmentationNode = segmentationNode
        self.node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.node)
        self.logic.SetSegmentationNode(segmentationNode)
        self.logic.SetSourceVolumeNode(volumeNode)
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetSegmentation(segmentationNode.GetSegmentation())
        self.logic.SetSegmentationHistory(self.history)

    def alignedSourceVolume(self):
        assert self.logic.UpdateAlignedSourceVolume()
        return self.logic.GetAlignedSourceVolume()

    def saveStateForUndo(self) -> None:
        assert self.logic.SaveStateForUndo()

    def modify(self, segmentID: str, labelmap) -> None:
        """What the effect's ``modifySegmentByLabelmap(..., ModificationModeSet)`` does."""
        self.logic.ModifySegmentByLabelmap(self.segmentationNode, segmentID, labelmap, self.logic.ModificationModeSet,
                                           False, False)

    def paint(self, segmentID: str, mask: np.ndarray) -> None:
        """Paint ``mask`` (z, y, x on the segmentation's grid) into a segment, as the Paint effect adds."""
        geometry = fill_logic.reference_geometry(self.segmentationNode)
        image = mrml.oriented_image_from_array(mask.astype(np.uint8), geometry)
        self.logic.ModifySegmentByLabelmap(self.segmentationNode, segmentID, image, self.logic.ModificationModeAdd,
                                           False, False)


@pytest.fixture(scope="module")
def phantom():
    return phantom_volume(SHAPE, (1, 2, 3))


@pytest.fixture
def painted_scene(scene, phantom):
    """CT volume; a segmentation with ellipsoid and sphere painted on axial slices 4, 11, 18 and an
    unpainted box."""
    volume, labels, segments = phantom
    volume_node = mrml.node_from_volume(volume, scene, "CT")
    painting = np.zeros_like(labels)
    painting[PAINTED] = labels[PAINTED]
    painting[painting == 3] = 0
    segmentation = mrml.labels_to_segmentation(painting, segments, volume_node, name="Segmentation")
    return volume_node, segmentation, painting


@pytest.fixture(autouse=True)
def no_job_left_behind(monkeypatch):
    """Every worker a test starts is ended and its folder removed, also when the test fails."""
    started = []
    start = WorkerJob.start

    def tracked_start(job, arguments):
        started.append((job, [str(a) for a in arguments]))
        return start(job, arguments)

    monkeypatch.setattr(WorkerJob, "start", tracked_start)
    yield started
    for job, _ in started:
        job.cancel()


def segment_ids(segmentation) -> dict:
    return {name: segment_id for segment_id, name in
            ((segmentation.GetSegmentation().GetNthSegmentID(i), segmentation.GetSegmentation().GetNthSegment(i).GetName())
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments()))}


def masks_of(segmentation, geometry) -> dict:
    return {name: fill_logic.segment_mask(segmentation, segment_id, geometry)
            for name, segment_id in segment_ids(segmentation).items()}


def paint_slice(editor: "SegmentEditor", segmentID: str, index: int, mask: np.ndarray) -> None:
    editor.paint(segmentID, np.where(np.arange(SHAPE[0])[:, None, None] == index, mask, False))


def wait_for(logic: HSAMFillLogic, event: str) -> list:
    events = logic.wait(WAIT_LIMIT_SECONDS, until=lambda batch: any(e["event"] in (event, "failed") for e in batch))
    assert logic.error is None, logic.error
    assert any(e["event"] == event for e in events), events
    return events


# --- what was painted (no worker) ---------------------------------------------------------------


def test_two_painted_segments_on_one_axis_and_an_unpainted_one_left_alone(painted_scene):
    volume_node, segmentation, painting = painted_scene
    painted = HSAMFillLogic().paintedInput(volume_node, segmentation)

    assert painted.names == ["ellipsoid", "sphere"] and painted.leftAlone == ["box"]
    assert painted.anatomicalAxis == "axial" and painted.engineAxis == "axial" and painted.slices == PAINTED
    np.testing.assert_array_equal(painted.labels, painting)
    np.testing.assert_array_equal(painted.volume.array, mrml.volume_from_node(volume_node).array)
    assert "left alone (nothing painted): box" in painted.summary()
    assert HSAMFillLogic().paintedInput(volume_node, segmentation, axis="axial").slices == PAINTED


def test_mixed_input_gets_one_line_messages(scene, phantom):
    volume, labels, segments = phantom
    volume_node = mrml.node_from_volume(volume, scene, "CT")
    logic = HSAMFillLogic()

    def segmentation_with(painting):
        return mrml.labels_to_segmentation(painting, segments[:2], volume_node)

    one = np.zeros_like(labels)
    one[11] = np.where(labels[11] == 1, 1, 0)
    with pytest.raises(InputError, match=r"^HSAM fill needs at least 2 painted axial slices; only slice 11 is painted$"):
        logic.paintedInput(volume_node, segmentation_with(one))

    with pytest.raises(InputError, match="nothing is painted"):
        logic.paintedInput(volume_node, segmentation_with(np.zeros_like(labels)))

    crossing = np.zeros_like(labels)
    crossing[PAINTED] = np.where(labels[PAINTED] == 1, 1, 0)
    crossing[:, :, 20] = np.where(labels[:, :, 20] == 1, 1, 0)  # a stroke in the sagittal view as well
    with pytest.raises(InputError, match="more than one slice direction") as error:
        logic.paintedInput(volume_node, segmentation_with(crossing))
    assert "\n" not in str(error.value)

    coronal = np.zeros_like(labels)
    coronal[:, [12, 20, 28]] = np.where(labels[:, [12, 20, 28]] == 1, 1, 0)
    with pytest.raises(InputError, match="are coronal slices, not axial: choose coronal"):
        logic.paintedInput(volume_node, segmentation_with(coronal), axis="axial")
    painted = logic.paintedInput(volume_node, segmentation_with(coronal))
    assert painted.anatomicalAxis == "coronal" and painted.engineAxis == "coronal" and painted.slices == [12, 20, 28]


def test_segments_not_painted_slice_by_slice_are_left_alone_and_named(scene, phantom):
    """A structure filled in 3D before (or thresholded, imported) stays visible and is left alone."""
    volume, labels, segments = phantom
    volume_node = mrml.node_from_volume(volume, scene, "CT")
    painting = np.where(labels == 1, 1, 0)  # the ellipsoid: filled in 3D
    sphere = [9, 12, 15]
    painting[sphere] = np.where(labels[sphere] == 2, 2, painting[sphere])  # the sphere: painted slices
    segmentation = mrml.labels_to_segmentation(painting, segments, volume_node)
    painted = HSAMFillLogic().paintedInput(volume_node, segmentation)
    assert painted.names == ["sphere"] and painted.notSliceWise == ["ellipsoid"] and painted.leftAlone == ["box"]
    assert painted.slices == sphere and (painted.labels == np.where(painting == 2, 1, 0)).all()
    assert painted.summary().endswith("; left alone (nothing painted): box; left alone (not painted in axial slices): "
                                      "ellipsoid")


def test_slices_follow_the_anatomy_of_the_grid(scene, phantom):
    """A volume acquired sagitally: its K axis runs left-right, so axial slices are along J or I."""
    volume, labels, segments = phantom
    volume_node = mrml.node_from_volume(volume, scene, "CT")
    matrix = vtk.vtkMatrix4x4()
    for r, c, v in ((0, 2, -2.0), (1, 0, 0.8), (2, 1, 0.8), (0, 3, 10.0)):
        matrix.SetElement(r, c, v)
    for r in range(3):
        matrix.SetElement(r, r, [0.0, 0.0, 0.0][r])
    volume_node.SetIJKToRASMatrix(matrix)  # I → A, J → S, K → R
    painting = np.zeros_like(labels)
    painting[:, [10, 20, 30]] = np.where(labels[:, [10, 20, 30]] == 1, 1, 0)  # J slices: axial
    segmentation = mrml.labels_to_segmentation(painting, segments[:1], volume_node)
    painted = HSAMFillLogic().paintedInput(volume_node, segmentation, axis="axial")
    assert painted.axis == 1 and painted.engineAxis == "coronal" and painted.anatomicalAxis == "axial"


def test_a_source_volume_on_another_grid_is_resampled_as_the_segment_editor_does(scene, phantom):
    volume, labels, segments = phantom
    volume_node = mrml.node_from_volume(volume, scene, "CT")
    painting = np.zeros_like(labels)
    painting[PAINTED] = np.where(labels[PAINTED] == 1, 1, 0)
    segmentation = mrml.labels_to_segmentation(painting, segments[:1], volume_node)

    other = mrml.node_from_volume(volume, scene, "MR")  # same voxels, rotated and shifted, under a transform
    matrix = vtk.vtkMatrix4x4()
    other.GetIJKToRASMatrix(matrix)
    matrix.SetElement(0, 3, matrix.GetElement(0, 3) + 3.3)
    matrix.SetElement(0, 1, 0.2)
    other.SetIJKToRASMatrix(matrix)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(2, 3, -1.7)
    transform.SetMatrixTransformToParent(shift)
    other.SetAndObserveTransformNodeID(transform.GetID())

    editor = SegmentEditor(scene, segmentation, other)
    expected = editor.alignedSourceVolume()
    aligned = fill_logic.aligned_source_image(other, segmentation)
    assert aligned.GetExtent() == expected.GetExtent()
    np.testing.assert_allclose(mrml.oriented_image_to_ras(aligned), mrml.oriented_image_to_ras(expected))
    np.testing.assert_array_equal(mrml.oriented_image_array(aligned), mrml.oriented_image_array(expected))
    assert not np.array_equal(mrml.oriented_image_array(aligned), volume.array.astype(mrml.oriented_image_array(aligned).dtype))

    painted = HSAMFillLogic().paintedInput(other, segmentation)
    np.testing.assert_array_equal(painted.volume.array, mrml.oriented_image_array(expected))
    np.testing.assert_array_equal(painted.labels, painting)  # the painting stays on its own grid
    reference = mrml.volume_from_node(volume_node)
    np.testing.assert_allclose(painted.volume.origin, reference.origin, atol=1e-6)
    np.testing.assert_allclose(painted.volume.spacing, reference.spacing, atol=1e-6)


# --- through the worker -------------------------------------------------------------------------


def test_initialize_previews_the_propagation_then_applies_as_one_undoable_step(scene, painted_scene):
    volume_node, segmentation, painting = painted_scene
    editor = SegmentEditor(scene, segmentation, volume_node)
    editor.node.SetOverwriteMode(editor.node.OverwriteNone)  # segments may overlap: the painted overlap stays
    overlap = np.zeros(SHAPE, dtype=bool)
    overlap[11, 18:24, 18:24] = True
    assert (painting[overlap] == 1).all()
    editor.paint(segment_ids(segmentation)["sphere"], overlap)
    painting = np.where(overlap, 2, painting)  # what the engine learns: the later segment over the earlier
    geometry = fill_logic.reference_geometry(segmentation)
    before = masks_of(segmentation, geometry)
    assert (before["ellipsoid"] & before["sphere"]).sum() == overlap.sum()
    logic = HSAMFillLogic()
    try:
        painted = logic.start(volume_node, segmentation, options=FillOptions(**QUICK))
        assert logic.running and painted.leftAlone == ["box"]

        first = [e for e in wait_for(logic, "preview") if e["event"] == "preview"]
        assert first == [{"event": "preview", "final": False}]  # during training, before the first step
        assert logic.firstPreviewSeconds is not None and logic.hasPreview
        assert logic.previewNode.GetScene() is scene
        propagated = flow_propagation(mrml.volume_from_node(volume_node).array, painting, PAINTED, 0)
        np.testing.assert_array_equal(logic.previewLabels(), propagated)  # the first preview: the propagation

        events = logic.wait(WAIT_LIMIT_SECONDS)
        assert logic.error is None, logic.error
        assert [e["event"] for e in events][-2:] == ["preview", "finished"] and logic.state == fill_logic.DONE
        preview = logic.previewLabels()
        np.testing.assert_array_equal(preview[PAINTED], painting[PAINTED])
        assert read_bundle_metadata(logic.modelPath).guidance["prior"] == "flow"  # as the first preview

        states = editor.history.GetNumberOfStates()
        written = logic.apply(editor.saveStateForUndo, editor.modify)
        assert editor.history.GetNumberOfStates() == states + 1 and not logic.hasPreview
        ids = segment_ids(segmentation)
        assert written == [ids["ellipsoid"], ids["sphere"]]
        after = masks_of(segmentation, geometry)
        for value, name in ((1, "ellipsoid"), (2, "sphere")):
            np.testing.assert_array_equal(after[name][PAINTED], before[name][PAINTED])  # painted slices kept exactly
            others = [z for z in range(SHAPE[0]) if z not in PAINTED]
            np.testing.assert_array_equal(after[name][others], preview[others] == value)
        assert not after["box"].any()  # unpainted: left alone

        editor.logic.Undo()  # one undo restores the painting
        for name, mask in masks_of(segmentation, geometry).items():
            np.testing.assert_array_equal(mask, before[name])
    finally:
        logic.cleanup()


def test_cancel_ends_the_worker_and_drops_the_preview(scene, painted_scene, no_job_left_behind):
    volume_node, segmentation, _ = painted_scene
    geometry = fill_logic.reference_geometry(segmentation)
    before = masks_of(segmentation, geometry)
    nodes = scene.GetNumberOfNodes()
    logic = HSAMFillLogic()
    try:
        logic.start(volume_node, segmentation, options=FillOptions(**dict(QUICK, epochs=1000)))
        wait_for(logic, "preview")
        logic.wait(WAIT_LIMIT_SECONDS, until=lambda batch: any(e.get("step", 0) >= 1 for e in batch))
        job = logic.job
        started = time.monotonic()
        logic.cancel()
        assert time.monotonic() - started < CANCEL_LIMIT_SECONDS
        assert job.process.poll() is not None and not job.folder.exists()
        if sys.platform != "win32":
            with pytest.raises(ProcessLookupError):
                os.killpg(job.process.pid, 0)
        assert not logic.running and not logic.hasPreview and scene.GetNumberOfNodes() == nodes
        for name, mask in masks_of(segmentation, geometry).items():
            np.testing.assert_array_equal(mask, before[name])
        with pytest.raises(InputError, match="nothing to apply"):
            logic.apply()
    finally:
        logic.cleanup()


def test_update_continues_from_the_model_also_while_training(scene, painted_scene, phantom, no_job_left_behind, tmp_path):
    volume_node, segmentation, _ = painted_scene
    _, labels, _ = phantom
    editor = SegmentEditor(scene, segmentation, volume_node)
    ids = segment_ids(segmentation)
    logic = HSAMFillLogic()
    try:
        logic.start(volume_node, segmentation, options=FillOptions(**dict(QUICK, epochs=1000)))
        logic.wait(WAIT_LIMIT_SECONDS, until=lambda batch: any(e.get("step", 0) >= 2 for e in batch))
        assert logic.state == fill_logic.TRAINING

        editor.paint(ids["ellipsoid"], np.where(np.arange(SHAPE[0])[:, None, None] == 8, labels == 1, False))
        painted = logic.update(volume_node, segmentation, options=FillOptions(**QUICK))
        assert painted.slices == [4, 8, 11, 18] and logic.state == fill_logic.STOPPING
        events = logic.wait(WAIT_LIMIT_SECONDS)
        assert logic.error is None, logic.error and events
        first, second = [arguments for _, arguments in no_job_left_behind if arguments[0] == "finetune"]
        assert "--base-model" not in first and first[first.index("--preset") + 1] == "tiny"
        assert second[second.index("--base-model") + 1] == first[first.index("--output") + 1]
        training = read_bundle_metadata(logic.modelPath).training
        assert training["base_bundle"] == "model-1.hsam" and training["cases"][0]["slices"] == [4, 8, 11, 18]
        assert read_bundle_metadata(first[first.index("--output") + 1]).training["epochs"] < 1000  # ended early
        np.testing.assert_array_equal(logic.previewLabels()[8], np.where(labels[8] == 1, 1, 0))

        # after training: Update continues from the saved model too
        editor.paint(ids["sphere"], np.where(np.arange(SHAPE[0])[:, None, None] == 15, labels == 2, False))
        logic.update(volume_node, segmentation, options=FillOptions(**QUICK))
        logic.wait(WAIT_LIMIT_SECONDS)
        third = [arguments for _, arguments in no_job_left_behind if arguments[0] == "finetune"][2]
        assert third[third.index("--base-model") + 1] == second[second.index("--output") + 1]

        saved = logic.saveModel("my fill", tmp_path)
        assert saved == tmp_path / "my_fill.hsam"
        metadata = read_bundle_metadata(saved)
        assert metadata.class_names == ["ellipsoid", "sphere"] and metadata.guided
    finally:
        logic.cleanup()


def test_apply_keeps_the_painting_of_the_moment_refuses_another_segmentation_and_paint_b_after_a(
        scene, painted_scene, phantom):
    """Strokes and erasing after Initialize are kept on their slices; Apply into the segmentation the user
    switched to is refused; a structure applied before is left alone by the next Initialize."""
    volume_node, segmentation, _ = painted_scene
    _, labels, segments = phantom
    editor = SegmentEditor(scene, segmentation, volume_node)
    ids = segment_ids(segmentation)
    geometry = fill_logic.reference_geometry(segmentation)
    logic = HSAMFillLogic()
    try:
        logic.start(volume_node, segmentation, options=FillOptions(**QUICK))
        wait_for(logic, "preview")
        paint_slice(editor, ids["ellipsoid"], 8, labels == 1)  # a new slice
        erased = np.zeros(SHAPE, dtype=bool)
        erased[11, :, :20] = True
        editor.logic.ModifySegmentByLabelmap(segmentation, ids["ellipsoid"], mrml.oriented_image_from_array(
            erased.astype(np.uint8), geometry), editor.logic.ModificationModeRemove, False, False)
        now = masks_of(segmentation, geometry)

        other = mrml.labels_to_segmentation(np.zeros_like(labels), segments[:1], volume_node, name="Other")
        with pytest.raises(InputError, match="^the preview belongs to segmentation 'Segmentation': select it"):
            logic.apply(editor.saveStateForUndo, editor.modify, other)
        assert logic.hasPreview and masks_of(segmentation, geometry)["ellipsoid"].sum() == now["ellipsoid"].sum()

        preview = logic.previewLabels()
        logic.apply(editor.saveStateForUndo, editor.modify, segmentation)
        after = masks_of(segmentation, geometry)
        kept = sorted([*PAINTED, 8])
        for value, name in ((1, "ellipsoid"), (2, "sphere")):
            np.testing.assert_array_equal(after[name][kept], now[name][kept])
            others = [z for z in range(SHAPE[0]) if z not in kept]
            np.testing.assert_array_equal(after[name][others], preview[others] == value)

        for z in (4, 16):  # then paint the box, and Initialize again with everything visible
            paint_slice(editor, ids["box"], z, labels == 3)
        painted = logic.start(volume_node, segmentation, options=FillOptions(**QUICK))
        assert painted.names == ["box"] and painted.notSliceWise == ["ellipsoid", "sphere"]
        wait_for(logic, "preview")
    finally:
        logic.cleanup()


def test_the_first_preview_comes_from_a_quick_worker_without_torch_then_training_starts(
        scene, painted_scene, no_job_left_behind):
    volume_node, segmentation, _ = painted_scene
    logic = HSAMFillLogic()
    try:
        painted = logic.start(volume_node, segmentation, options=FillOptions(**QUICK))
        assert logic.running and logic.state == fill_logic.PREVIEWING  # Cancel has something to stop at once
        (first, arguments), = no_job_left_behind
        assert arguments == [str(a) for a in fill_logic.first_preview_arguments(
            logic.folder / fill_logic.VOLUME_FILE, logic.folder / fill_logic.ANNOTATIONS_FILE.format(1),
            logic.folder / fill_logic.FIRST_PREVIEW_FILE, "axial")]
        code = ("import sys\nfrom hsam.cli import main\n"
                f"main({arguments + ['--output', str(logic.folder / 'again.seg.nrrd')]!r})\n"
                "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n")
        torch_free = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120)
        assert torch_free.returncode == 0 and torch_free.stdout.strip().endswith("[]"), torch_free.stderr

        wait_for(logic, "preview")
        assert logic.state == fill_logic.TRAINING and first.state == "succeeded"
        assert [a[0] for _, a in no_job_left_behind] == ["propagate", "finetune"]
        again, _ = read_labelmap(logic.folder / "again.seg.nrrd")
        np.testing.assert_array_equal(logic.previewLabels(), again)
        assert painted.slices == PAINTED

        started = time.monotonic()
        logic.cancel()
        assert time.monotonic() - started < CANCEL_LIMIT_SECONDS and not logic.running and not logic.hasPreview
    finally:
        logic.cleanup()


def test_update_writes_the_volume_once_uncompressed_and_the_painting_as_a_crop(scene, painted_scene, phantom):
    volume_node, segmentation, _ = painted_scene
    _, labels, _ = phantom
    editor = SegmentEditor(scene, segmentation, volume_node)
    logic = HSAMFillLogic()
    try:
        logic.start(volume_node, segmentation, options=FillOptions(**QUICK))
        volume_file = logic.folder / fill_logic.VOLUME_FILE
        written = volume_file.stat()
        assert b"encoding: raw" in volume_file.read_bytes()[:2000]
        paint_slice(editor, segment_ids(segmentation)["ellipsoid"], 8, labels == 1)
        painted = logic.update(volume_node, segmentation, options=FillOptions(**QUICK))
        assert painted.slices == [4, 8, 11, 18]
        assert volume_file.stat().st_mtime_ns == written.st_mtime_ns and volume_file.stat().st_ino == written.st_ino
        crop, _ = read_labelmap(logic.folder / fill_logic.ANNOTATIONS_FILE.format(2))
        assert crop.shape[0] == 18 - 4 + 1 and crop.size < np.prod(SHAPE)  # the painted box only
        np.testing.assert_array_equal(crop, painted.boxLabels)
    finally:
        logic.cleanup()


def test_a_worker_that_cannot_start_leaves_the_fill_idle_with_one_line(painted_scene, tmp_path):
    volume_node, segmentation, _ = painted_scene
    logic = HSAMFillLogic(python=str(tmp_path / "no-such-python"))
    try:
        with pytest.raises(HSAMError, match="^could not start the HSAM worker process: ") as error:
            logic.start(volume_node, segmentation, options=FillOptions(**QUICK))
        assert "\n" not in str(error.value)
        assert not logic.running and logic.state == fill_logic.IDLE and not logic.hasPreview
    finally:
        logic.cleanup()


def test_another_effect_removing_the_preview_ends_the_fill(scene, painted_scene, no_job_left_behind):
    """Fill between slices or Grow from seeds starting their preview remove the node in the shared slot."""
    volume_node, segmentation, _ = painted_scene
    logic = HSAMFillLogic()
    try:
        logic.start(volume_node, segmentation, options=FillOptions(**dict(QUICK, epochs=1000)))
        wait_for(logic, "preview")
        nodes = scene.GetNumberOfNodes()
        fill_logic.remove_node(logic.previewNode)
        assert [e["event"] for e in logic.poll()] == ["stopped"]
        job = no_job_left_behind[-1][0]
        assert not logic.running and not logic.hasPreview and job.process.poll() is not None
        assert logic.poll() == [] and scene.GetNumberOfNodes() == nodes - 2
    finally:
        logic.cleanup()


def test_show_3d_follows_each_preview(scene, painted_scene):
    volume_node, segmentation, _ = painted_scene
    geometry = fill_logic.reference_geometry(segmentation)
    ids = segment_ids(segmentation)
    previewNode = fill_logic.new_preview_node(segmentation)
    smoothing = slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule.GetSmoothingFactorParameterName()
    assert previewNode.GetSegmentation().GetConversionParameter(smoothing) == "-0.5"
    segment = fill_logic.Segment("ellipsoid", 1, (1.0, 0.0, 0.0))

    def show(size: int) -> list:
        labels = np.zeros(SHAPE, dtype=np.uint8)
        labels[8:16, 10:10 + size, 10:10 + size] = 1
        image = mrml.oriented_image_from_array(labels, geometry)
        fill_logic.set_preview(previewNode, image, segmentation.GetSegmentation(), [ids["ellipsoid"]], [segment], True)
        surface = vtk.vtkPolyData()
        previewNode.GetClosedSurfaceRepresentation(ids["ellipsoid"], surface)
        return surface.GetBounds()

    small, large = show(5), show(20)
    assert large[1] - large[0] > small[1] - small[0] + 10


def test_the_fill_folder_goes_when_its_slicer_is_gone(painted_scene):
    volume_node, segmentation, _ = painted_scene
    logic = HSAMFillLogic()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = Path(tempfile.mkdtemp(prefix=f"{fill_logic.FOLDER_NAME}-job-{gone.pid}-"))
    try:
        logic.start(volume_node, segmentation, options=FillOptions(**QUICK))
        assert JOB_FOLDER.match(logic.folder.name).group(1) == str(os.getpid())
        remove_orphaned_job_folders()
        assert not left.exists() and logic.folder.is_dir()
    finally:
        logic.cleanup()
