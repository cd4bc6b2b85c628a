"""What the HSAM Segment panel decides (``HSAMLib.segment_panel``), on a real MRML scene and real worker
processes: the widget in ``HSAMSegment.py`` only shows it (Qt cannot run here)."""

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from hsam.volumes.segmentation import Segment  # noqa: E402
from hsam.volumes.volume import Volume  # noqa: E402
from HSAMLib import mrml  # noqa: E402
from HSAMLib.models import SAM_WEIGHTS  # noqa: E402
from HSAMLib.segment_panel import Controls, Ended, SegmentPanelLogic  # noqa: E402
from HSAMLib.worker import CANCELLED  # noqa: E402
from phantom import phantom_arrays  # noqa: E402
from test_cli import _bundle  # noqa: E402

WAIT_LIMIT_SECONDS = 600  # only a guard against a hung worker


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """An untrained prompt-free tiny model for "ellipsoid" and "sphere"."""
    return _bundle(tmp_path_factory.mktemp("model") / "tiny.hsam")


@pytest.fixture
def models_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("HSAM_MODELS_DIR", str(folder))
    return folder


@pytest.fixture
def volume(scene):
    image, _ = phantom_arrays((6, 40, 48), label_values=(1, 2))
    return mrml.node_from_volume(Volume((image * 1000).astype(np.int16), (0.8, 0.7, 2.0), (0.0, 0.0, 0.0)), scene, "CT")


def parameters(**fields) -> SimpleNamespace:
    """The parameter node's fields (``HSAMSegmentParameterNode``) with its defaults."""
    defaults = dict(inputVolume=None, outputSegmentation=None, modelPath="", device="cpu", batchSize=4,
                    useSliceRange=False, firstSlice=0, lastSlice=0, show3D=False)
    return SimpleNamespace(**{**defaults, **fields})


def run(panel: SegmentPanelLogic, p: SimpleNamespace):
    job = panel.startSegmentation(p)
    assert job.wait(timeout=WAIT_LIMIT_SECONDS)
    return job


def test_a_scene_from_another_computer_gets_a_device_and_an_input_volume(scene, volume):
    p = parameters(device="mps")
    SegmentPanelLogic.applyDefaults(p, scene, ("auto", "cuda", "cpu"))
    assert p.device == "auto" and p.inputVolume is volume
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MR")
    p = parameters(device="cuda", inputVolume=other)
    SegmentPanelLogic.applyDefaults(p, scene, ("auto", "cuda", "cpu"))
    assert p.device == "cuda" and p.inputVolume is other


def test_the_model_list_is_the_models_folder_and_a_chosen_file_elsewhere(models_folder, tmp_path):
    assert SegmentPanelLogic.modelChoices("") == ([], -1)
    elsewhere = tmp_path / "saved with the scene.hsam"
    elsewhere.write_bytes(b"")
    assert SegmentPanelLogic.modelChoices(str(elsewhere)) == ([("saved with the scene", str(elsewhere))], 0)
    for name in ("b", "A"):
        (models_folder / f"{name}.hsam").write_bytes(b"")
    listed = [("A", str(models_folder / "A.hsam")), ("b", str(models_folder / "b.hsam"))]
    assert SegmentPanelLogic.modelChoices(str(models_folder / "b.hsam")) == (listed, 1)
    assert SegmentPanelLogic.modelChoices(str(tmp_path / "deleted.hsam")) == (listed, 0)
    assert SegmentPanelLogic.modelChoices(str(elsewhere)) == (listed + [("saved with the scene", str(elsewhere))], 2)


def test_the_line_under_the_model_and_the_controls(volume, bundle, tmp_path):
    panel = SegmentPanelLogic()
    broken = tmp_path / "broken.hsam"
    broken.write_bytes(b"not a model")
    assert panel.modelLine(None) == "" and panel.modelLine(parameters(inputVolume=volume)) == ""
    assert panel.modelLine(parameters(inputVolume=volume, modelPath=str(bundle))) == "Prompt-free."
    assert panel.modelLine(parameters(inputVolume=volume, modelPath=str(broken))).startswith("Cannot read the model: ")

    assert panel.controls(None, busy=False) == Controls(False, "Segment", "Select an input volume and a model.",
                                                        True, False, False)
    ready = parameters(inputVolume=volume, modelPath=str(bundle), useSliceRange=True)
    assert panel.controls(ready, busy=False) == Controls(True, "Segment", "", True, False, True)
    ready.outputSegmentation = volume.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert panel.controls(ready, busy=False).export and not panel.controls(ready, busy=True).export
    assert panel.controls(ready, busy=True) == Controls(True, "Cancel", "", False, False, True)


def test_a_segmentation_goes_into_the_output_with_its_surface_and_the_status_says_so(scene, volume, bundle):
    panel = SegmentPanelLogic()
    p = parameters(inputVolume=volume, modelPath=str(bundle), show3D=True, useSliceRange=True, firstSlice=1,
                   lastSlice=3)
    job = run(panel, p)
    ended = panel.segmentationEnded(job, p)
    assert ended == Ended("Done (prompt-free): 2 segment(s) in 'CT HSAM'.", volumeNode=volume)
    assert not job.folder.exists()
    node = p.outputSegmentation
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    labels, _ = mrml.labels_from_segmentation(node, volume)
    assert not labels[[0, 4, 5]].any()  # outside the slice range
    nodes = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    p.show3D = False
    assert panel.segmentationEnded(run(panel, p), p).volumeNode is volume
    assert p.outputSegmentation is node and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodes


def test_a_result_for_a_removed_volume_is_discarded(scene, volume, bundle):
    panel = SegmentPanelLogic()
    p = parameters(inputVolume=volume, modelPath=str(bundle))
    job = run(panel, p)
    scene.RemoveNode(volume)
    assert panel.segmentationEnded(job, p) == Ended("The input volume was removed; the result was discarded.")
    assert p.outputSegmentation is None and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not job.folder.exists()


def test_a_failed_and_a_cancelled_segmentation_leave_the_scene_alone(scene, volume, bundle, tmp_path):
    panel = SegmentPanelLogic()
    p = parameters(inputVolume=volume, modelPath=str(bundle), batchSize=0)  # refused by the worker
    job = run(panel, p)
    assert panel.segmentationEnded(job, p) == Ended("Failed.", failure="Segmentation failed.")
    assert "batch" in job.error and not job.folder.exists()
    job = panel.startSegmentation(parameters(inputVolume=volume, modelPath=str(bundle)))
    job.cancel()
    assert job.state == CANCELLED
    assert panel.segmentationEnded(job, p) == Ended("Cancelled; the scene was not changed.")
    assert p.outputSegmentation is None and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_downloads_say_how_they_ended(hsam_home):
    panel = SegmentPanelLogic()
    name, (file_name, size) = "vit_b", SAM_WEIGHTS["vit_b"]
    weights = hsam_home / "checkpoints" / file_name
    weights.parent.mkdir()
    with open(weights, "wb") as f:  # as if downloaded before: complete files are not fetched again
        f.truncate(size)
    job = panel.startDownload(name)
    assert job.wait(timeout=WAIT_LIMIT_SECONDS)
    assert panel.downloadEnded(job) == Ended(f"SAM weights saved to {weights}") and not job.folder.exists()
    job = panel.startDownload("vit_x")
    assert job.wait(timeout=WAIT_LIMIT_SECONDS)
    assert panel.downloadEnded(job) == Ended(None, failure="Downloading the SAM weights failed.")
    assert "invalid choice: 'vit_x'" in job.error
    os.remove(weights)
    job = panel.startDownload(name)
    job.cancel()
    assert panel.downloadEnded(job) == Ended("Download cancelled; the next download resumes it.")


def test_import_and_export(scene, volume, bundle, models_folder, tmp_path):
    panel = SegmentPanelLogic()
    path, status = panel.importModel(str(bundle))
    assert path == str(models_folder / "tiny.hsam") and status == "Imported tiny (tiny, 2 classes: ellipsoid, sphere)"

    labels = np.zeros((6, 40, 48), np.uint8)
    labels[2, 10:20, 10:30] = 1
    segments = [Segment("ellipsoid", 1, (0.9, 0.3, 0.2))]
    p = parameters(inputVolume=volume, outputSegmentation=mrml.labels_to_segmentation(labels, segments, volume,
                                                                                      name="CT: result/1"))
    start = panel.exportStart(p, "segmentation", str(tmp_path))
    assert start == str(tmp_path / "CT_ result_1.seg.nrrd")
    assert panel.export(p, "segmentation", str(tmp_path / "picked")) == f"Saved {tmp_path / 'picked.seg.nrrd'}"
    assert panel.export(p, "labelmap", str(tmp_path / "picked.nrrd")) == f"Saved {tmp_path / 'picked.nrrd'}"
    assert sorted(os.listdir(tmp_path)) == ["models", "picked.nrrd", "picked.seg.nrrd"]
