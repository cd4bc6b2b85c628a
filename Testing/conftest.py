"""Shared fixtures: the Slicer-side code (HSAMLib) on sys.path and a real MRML scene."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEGMENT_MODULE_DIR = ROOT / "HSAMSegment"
if str(SEGMENT_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(SEGMENT_MODULE_DIR))


@pytest.fixture(autouse=True)
def hsam_home(tmp_path_factory, monkeypatch) -> Path:
    """HSAM's user cache (SAM weights, remembered sha256) in a new folder: tests never touch the real one."""
    home = tmp_path_factory.mktemp("hsam-home")
    monkeypatch.setenv("HSAM_HOME", str(home))
    return home


@pytest.fixture
def scene():
    """A ``vtkMRMLScene`` with the Segmentations logic registered, also set as ``slicer.mrmlScene``
    (some ``slicer.util`` helpers use it)."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    yield scene
    slicer.mrmlScene = previous
    scene.Clear(True)
