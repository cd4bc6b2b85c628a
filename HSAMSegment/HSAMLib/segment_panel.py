"""What the HSAM Segment panel decides, without Qt: its list of models, the line under the model, which
controls are enabled, the segmentation and download jobs it starts and what it says when they end, and
its exports. ``HSAMSegment.py`` only shows these in widgets.

``parameters`` is the panel's parameter node (``HSAMSegmentParameterNode``), or anything with its
fields: ``inputVolume``, ``outputSegmentation``, ``modelPath``, ``device``, ``batchSize``,
``useSliceRange``, ``firstSlice``, ``lastSlice``, ``show3D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from . import models, mrml
from .segment_logic import HSAMSegmentLogic
from .worker import CANCELLED, SUCCEEDED, WorkerJob

# The file each export writes: its suffix.
EXPORT_SUFFIXES = {"segmentation": ".seg.nrrd", "labelmap": ".nrrd"}


@dataclass(frozen=True)
class Controls:
    """The panel's state for its parameters while a segmentation runs (``busy``) or not."""

    segment: bool  # the Segment button (Cancel while busy) is enabled
    segmentText: str
    segmentToolTip: str
    inputs: bool  # the inputs, advanced and outputs sections
    export: bool
    sliceRange: bool


@dataclass(frozen=True)
class Ended:
    """What the panel says once a job has ended: ``status`` (None: the status line is kept), the title of
    an error dialog with the job's error (``failure``), the volume to show under a new result."""

    status: Optional[str]
    failure: Optional[str] = None
    volumeNode: Any = None


@dataclass(frozen=True)
class _Run:
    """The segmentation that runs: its volume, that volume's scene, the prior's description."""

    volumeNode: Any
    scene: Any
    description: str


class SegmentPanelLogic:
    """The HSAM Segment panel's decisions and jobs; ``segmenter`` segments and exports."""

    def __init__(self, python: Optional[str] = None):
        self.python = python  # the worker's interpreter (default: PythonSlicer in Slicer)
        self.segmenter = HSAMSegmentLogic(python)
        self._run: Optional[_Run] = None

    @staticmethod
    def applyDefaults(parameters, scene, devices: Sequence[str]) -> None:
        """A device this computer does not offer becomes "auto" (a scene saved on a Mac with "mps"); no
        input volume becomes the scene's first scalar volume."""
        if parameters.device not in devices:
            parameters.device = "auto"
        if not parameters.inputVolume:
            parameters.inputVolume = scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    @staticmethod
    def modelChoices(selected: str = "", folder: Optional[Path] = None) -> tuple[list[tuple[str, str]], int]:
        """(name, path) of the bundles in the models folder, then ``selected`` if it is a file elsewhere (the
        model of a saved scene); and the index to select: ``selected``'s, else 0, or -1 when there is none."""
        choices = [(path.stem, str(path)) for path in models.bundle_paths(folder)]
        paths = [path for _, path in choices]
        if selected and selected not in paths and Path(selected).is_file():
            choices.append((Path(selected).stem, selected))
            paths.append(selected)
        if not choices:
            return choices, -1
        return choices, paths.index(selected) if selected in paths else 0

    def modelLine(self, parameters) -> str:
        """The line under the model: what it corrects on the input volume (``Prior.summary``), or why the
        model cannot be read (the Segment button then reports it properly)."""
        if not (parameters and parameters.modelPath):
            return ""
        try:
            return self.segmenter.prior(parameters.inputVolume, parameters.modelPath).summary()
        except Exception as e:  # any file may be chosen; the line must not fail
            return f"Cannot read the model: {e}"

    @staticmethod
    def controls(parameters, busy: bool) -> Controls:
        p = parameters
        ready = bool(p and p.inputVolume and p.modelPath)
        return Controls(
            segment=busy or ready,
            segmentText="Cancel" if busy else "Segment",
            segmentToolTip="" if ready else "Select an input volume and a model.",
            inputs=not busy,
            export=bool(p and p.outputSegmentation and p.inputVolume) and not busy,
            sliceRange=bool(p and p.useSliceRange),
        )

    @staticmethod
    def importModel(path: str) -> tuple[str, str]:
        """Copy the bundle at ``path`` into the models folder: the copy's path and the status line."""
        entry = models.import_model_file(path)
        return str(entry.path), f"Imported {entry.describe()}"

    def startDownload(self, name: str) -> WorkerJob:
        """Download the official SAM weights ``name`` in a worker (``hsam download``, resumed if cut)."""
        return WorkerJob(self.python, "hsam-download").start(["download", name, "--progress", "json"])

    @staticmethod
    def downloadEnded(job: WorkerJob) -> Ended:
        job.cleanup()
        if job.state == CANCELLED:
            return Ended("Download cancelled; the next download resumes it.")
        if job.state != SUCCEEDED:
            return Ended(None, failure="Downloading the SAM weights failed.")
        return Ended(f"SAM weights saved to {job.result['output']}")

    def startSegmentation(self, parameters) -> WorkerJob:
        """Segment the input volume with the model, on its slice range if asked, guided by what the model
        corrects there (``HSAMSegmentLogic.prior``); the volume and the prior are kept for ``segmentationEnded``."""
        p = parameters
        sliceRange = (p.firstSlice, p.lastSlice) if p.useSliceRange else None
        prior = self.segmenter.prior(p.inputVolume, p.modelPath)
        job = self.segmenter.startSegmentation(p.inputVolume, p.modelPath, p.device, p.batchSize, sliceRange,
                                               prior.annotationsNode)
        self._run = _Run(p.inputVolume, p.inputVolume.GetScene(), prior.description)
        return job

    def segmentationEnded(self, job: WorkerJob, parameters) -> Ended:
        """Put a succeeded job's result into the output segmentation (a new one if none is chosen; its 3D
        surface built when ``show3D``) unless the input volume has left the scene; removes the job's folder.
        Raises if the result cannot be read."""
        run, self._run = self._run, None
        if job.state == CANCELLED:
            return Ended("Cancelled; the scene was not changed.")
        if job.state != SUCCEEDED:
            job.cleanup()
            return Ended("Failed.", failure="Segmentation failed.")
        if not run.scene.IsNodePresent(run.volumeNode):
            job.cleanup()
            return Ended("The input volume was removed; the result was discarded.")
        node = self.segmenter.loadResult(job, run.volumeNode, parameters.outputSegmentation)
        parameters.outputSegmentation = node
        if parameters.show3D:
            node.CreateClosedSurfaceRepresentation()
        return Ended(self.segmenter.finishedMessage(run.description, node, job.warnings), volumeNode=run.volumeNode)

    @staticmethod
    def exportStart(parameters, kind: str, folder: str) -> str:
        """The file the export dialog proposes: ``folder/<output segmentation's name><suffix of kind>``."""
        stem = mrml.safe_file_stem(parameters.outputSegmentation.GetName())
        return str(Path(folder) / f"{stem}{EXPORT_SUFFIXES[kind]}")

    def export(self, parameters, kind: str, path: str) -> str:
        """Write the output segmentation as ``kind`` ("segmentation" or "labelmap" on the input volume's
        grid) to ``path``, its suffix added if missing; the status line."""
        suffix = EXPORT_SUFFIXES[kind]
        path = path if path.endswith(suffix) else path + suffix
        if kind == "segmentation":
            self.segmenter.exportSegmentation(parameters.outputSegmentation, path)
        else:
            self.segmenter.exportLabelmap(parameters.outputSegmentation, parameters.inputVolume, path)
        return f"Saved {path}"
