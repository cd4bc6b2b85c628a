"""Which slices to annotate next, in the scene. Usable without the GUI.

Without a model (``suggestGaps``): the gaps between the annotated slices where flow propagation from
below and from above disagree most, the middle slice of each (``hsam suggest`` without ``-m`` in a
worker: ``startGapRanking``, then ``loadGaps``); ``showGaps`` puts them into a table and the slice
views on the first one.

With a model (``suggest``): the model's uncertainty as a coloured overlay, the per-slice scores in a
table, the slice views on the first suggestion. The model runs in a worker process (``hsam segment
--uncertainty``): ``startPrediction`` writes the volume into the job's folder and starts it;
``loadPrediction`` reads the labels, the map and the per-slice scores it wrote; ``rank`` and ``show``
(main thread) pick the slices and fill the scene.

``jumpToSlice`` centres the slice views on a suggestion. This process never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import slicer
import vtk

from hsam.runtime.errors import InputError
from hsam.volumes.constants import SLICE_AXES
from hsam.volumes.segmentation import read_labelmap, write_segmentation
from hsam.volumes.volume import Volume, read_volume

from . import mrml
from .segment_logic import ANNOTATIONS_FILE, INPUT_FILE, OnEvents, job_with_volume
from .worker import WorkerJob

LABELS_FILE = "labels.nrrd"
UNCERTAINTY_FILE = "uncertainty.nrrd"
COLOR_NODE_NAME = "HSAM uncertainty"
# Uncertainty 0 → blue, 0.5 → yellow, 1 → red; voxels below the threshold are not drawn.
COLOR_POINTS = ((0.0, (0.15, 0.25, 1.0)), (0.5, (1.0, 0.9, 0.1)), (1.0, (1.0, 0.05, 0.0)))
OVERLAY_OPACITY = 0.5
TABLE_COLUMNS = ("slice", "score", "suggestion")
GAP_TABLE_COLUMNS = ("suggestion", "slice", "gap from", "gap to", "disagreement")


@dataclass
class Prediction:
    """What the model says about a volume (no MRML): labels, uncertainty, per-slice scores."""

    labels: np.ndarray  # (z, y, x)
    uncertainty: np.ndarray  # (z, y, x) float32 in [0, 1]
    scores: np.ndarray  # (slices along axis,), NaN where not computed
    axis: str


@dataclass
class Suggestions:
    slices: list[int]  # most useful first
    uncertaintyNode: object  # vtkMRMLScalarVolumeNode
    tableNode: object  # vtkMRMLTableNode


@dataclass
class GapSuggestion:
    """The slice to paint in the gap between annotated slices ``low`` and ``high`` (no MRML)."""

    slice: int
    low: int
    high: int
    score: float  # disagreement of the two propagation directions, in slices' worth of each structure

    def describe(self, axis: str) -> str:
        """The line the suggestion list shows."""
        return f"{axis} slice {self.slice} (between {self.low} and {self.high}; disagreement {self.score:.2f})"


class HSAMSuggestLogic:
    """Volume node + model bundle → suggested slices, uncertainty overlay and score table."""

    def __init__(self, python: Optional[str] = None) -> None:
        self.python = python  # default: PythonSlicer in Slicer, else this interpreter

    def annotatedSlices(self, segmentationNode, volumeNode, axis: str) -> list[int]:
        """Slices of ``segmentationNode`` carrying any segment (none: [])."""
        if segmentationNode is None or segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            return []
        return mrml.annotated_slices(segmentationNode, volumeNode, axis).slices

    def startPrediction(self, volumeNode, modelPath, signal: Optional[str] = None, device: str = "auto",
                        batchSize: int = 4) -> WorkerJob:
        """Start ``hsam segment --uncertainty`` on ``volumeNode`` (read here, on the main thread) in a worker."""
        job = job_with_volume(self.python, "hsam-suggest", volumeNode)
        arguments = [
            "segment", job.folder / INPUT_FILE, "--model", Path(modelPath).resolve(), "--output", job.folder / LABELS_FILE,
            "--uncertainty", job.folder / UNCERTAINTY_FILE, "--device", device, "--batch-size", int(batchSize),
            "--progress", "json",
        ]
        if signal is not None:
            arguments += ["--uncertainty-signal", signal]
        return job.start(arguments)

    @staticmethod
    def loadPrediction(job: WorkerJob, axis: str) -> Prediction:
        """What a finished ``startPrediction`` job wrote (then its folder is removed); raises if it failed."""
        from hsam.inference.uncertainty import scores_csv_path

        try:
            job.check()
            labels, _ = read_labelmap(job.folder / LABELS_FILE)
            uncertainty = read_volume(job.folder / UNCERTAINTY_FILE).array.astype(np.float32)
            rows = scores_csv_path(job.folder / UNCERTAINTY_FILE).read_text(encoding="utf-8").splitlines()[1:]
            scores = np.array([float(row.split(",")[2] or "nan") for row in rows])
            return Prediction(labels, uncertainty, scores, axis)
        finally:
            job.cleanup()

    @staticmethod
    def rank(prediction: Prediction, count: int, annotated: Sequence[int] = ()) -> list[int]:
        from hsam.inference.suggest import suggest_slices

        return suggest_slices(prediction.scores, count, annotated)

    def show(self, prediction: Prediction, picks: list[int], volumeNode, uncertaintyNode=None, tableNode=None) -> Suggestions:
        """Put the map and the table into the scene (main thread) and jump the slice views to the first pick."""
        uncertaintyNode = self.showUncertainty(prediction.uncertainty, volumeNode, uncertaintyNode)
        name = f"{volumeNode.GetName()} slice uncertainty"
        tableNode = self.scoresTable(volumeNode.GetScene(), prediction.scores, picks, prediction.axis, tableNode, name)
        if picks:
            self.jumpToSlice(volumeNode, prediction.axis, picks[0])
        return Suggestions(picks, uncertaintyNode, tableNode)

    def suggest(self, volumeNode, modelPath, count: int = 5, segmentationNode=None, signal: Optional[str] = None,
                device: str = "auto", onEvents: Optional[OnEvents] = None) -> Suggestions:
        """All steps in one call, waiting for the worker; slices annotated in ``segmentationNode`` are skipped."""
        from hsam.models.bundle import read_bundle_metadata

        axis = read_bundle_metadata(modelPath).slice_axis
        job = self.startPrediction(volumeNode, modelPath, signal, device)
        job.wait(on_events=onEvents)
        prediction = self.loadPrediction(job, axis)
        annotated = self.annotatedSlices(segmentationNode, volumeNode, axis)
        return self.show(prediction, self.rank(prediction, count, annotated), volumeNode)

    # --- without a model: the gaps where flow propagation disagrees ---------------------------

    def startGapRanking(self, volumeNode, segmentationNode, axis: str, count: int) -> WorkerJob:
        """Start ``hsam suggest`` without a model on ``volumeNode`` and the annotations of
        ``segmentationNode`` (both read here, on the main thread) in a worker."""
        labels, segments = mrml.labels_from_segmentation(segmentationNode, volumeNode)
        job = job_with_volume(self.python, "hsam-suggest", volumeNode)
        try:
            write_segmentation(job.folder / ANNOTATIONS_FILE, labels, mrml.volume_from_node(volumeNode), segments)
        except BaseException:
            job.cleanup()
            raise
        return job.start([
            "suggest", job.folder / INPUT_FILE, "--annotated", job.folder / ANNOTATIONS_FILE, "--axis", axis,
            "-n", int(count), "--progress", "json",
        ])

    @staticmethod
    def loadGaps(job: WorkerJob) -> list[GapSuggestion]:
        """The suggestions of a finished ``startGapRanking`` job, best first (then its folder is
        removed); raises if it failed."""
        try:
            job.check()
            return [GapSuggestion(int(row["slice"]), int(row["gap"][0]), int(row["gap"][1]), float(row["score"]))
                    for row in job.result["suggestions"]]
        finally:
            job.cleanup()

    def suggestGaps(self, volumeNode, segmentationNode, axis: str = "axial", count: int = 5,
                    onEvents: Optional[OnEvents] = None, tableNode=None) -> tuple[list[GapSuggestion], object]:
        """All steps in one call, waiting for the worker: (suggestions, table node); the slice views
        land on the first suggestion."""
        job = self.startGapRanking(volumeNode, segmentationNode, axis, count)
        job.wait(on_events=onEvents)
        gaps = self.loadGaps(job)
        return gaps, self.showGaps(gaps, volumeNode, axis, tableNode)

    def showGaps(self, gaps: Sequence[GapSuggestion], volumeNode, axis: str, tableNode=None):
        """The suggestions as a table (refilling ``tableNode`` if given), the slice views on the first."""
        scene = volumeNode.GetScene()
        if tableNode is None or not scene.IsNodePresent(tableNode):
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(
                f"{volumeNode.GetName()} slices to paint"))
        columns = (vtk.vtkIntArray(), vtk.vtkIntArray(), vtk.vtkIntArray(), vtk.vtkIntArray(), vtk.vtkDoubleArray())
        for column, title in zip(columns, GAP_TABLE_COLUMNS):
            column.SetName(f"{axis} {title}" if title == "slice" else title)
        for rank, gap in enumerate(gaps, start=1):
            for column, value in zip(columns, (rank, gap.slice, gap.low, gap.high, gap.score)):
                column.InsertNextValue(value)
        table = vtk.vtkTable()
        for column in columns:
            table.AddColumn(column)
        tableNode.SetAndObserveTable(table)
        if gaps:
            self.jumpToSlice(volumeNode, axis, gaps[0].slice)
        return tableNode

    # --- scene --------------------------------------------------------------------------------

    def showUncertainty(self, uncertainty: np.ndarray, volumeNode, previous=None):
        """A scalar volume on ``volumeNode``'s grid holding the map (replacing ``previous``), coloured
        blue→red above the region threshold, shown as the foreground of every slice view."""
        from hsam.inference.uncertainty import OVERLAY_THRESHOLD

        scene = volumeNode.GetScene()
        if tuple(uncertainty.shape) != tuple(volumeNode.GetImageData().GetDimensions()[::-1]):
            raise InputError(f"the uncertainty map {uncertainty.shape} is not on volume '{volumeNode.GetName()}''s grid")
        grid = mrml.volume_from_node(volumeNode)
        mapVolume = Volume(uncertainty.astype(np.float32), grid.spacing, grid.origin, grid.direction)
        if previous is not None and scene.IsNodePresent(previous):
            scene.RemoveNode(previous)
        node = mrml.node_from_volume(mapVolume, scene, f"{volumeNode.GetName()} uncertainty")
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.colorNode(scene).GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(True)
        display.SetAutoThreshold(False)
        display.SetLowerThreshold(OVERLAY_THRESHOLD)
        display.SetUpperThreshold(1.0)
        for composite in _nodes(scene, "vtkMRMLSliceCompositeNode"):
            composite.SetForegroundVolumeID(node.GetID())
            composite.SetForegroundOpacity(OVERLAY_OPACITY)
        return node

    @staticmethod
    def colorNode(scene):
        """The uncertainty colour map (created once per scene)."""
        existing = scene.GetFirstNodeByName(COLOR_NODE_NAME)
        if existing is not None and existing.IsA("vtkMRMLProceduralColorNode"):
            return existing
        node = scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", COLOR_NODE_NAME)
        function = node.GetColorTransferFunction()
        for value, rgb in COLOR_POINTS:
            function.AddRGBPoint(value, *rgb)
        return node

    @staticmethod
    def scoresTable(scene, scores: np.ndarray, picks: list[int], axis: str, tableNode=None, name: str = "HSAM slice uncertainty"):
        """A table with one row per scored slice: index, score, suggestion rank (1 = first, 0 = not
        suggested); ``tableNode`` is refilled if given."""
        if tableNode is None or not scene.IsNodePresent(tableNode):
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
        rank = {index: r for r, index in enumerate(picks, start=1)}
        scored = [i for i in range(len(scores)) if np.isfinite(scores[i])]
        columns = (vtk.vtkIntArray(), vtk.vtkDoubleArray(), vtk.vtkIntArray())
        for column, title in zip(columns, TABLE_COLUMNS):
            column.SetName(f"{axis} {title}" if title == "slice" else title)
        for index in scored:
            columns[0].InsertNextValue(index)
            columns[1].InsertNextValue(float(scores[index]))
            columns[2].InsertNextValue(rank.get(index, 0))
        table = vtk.vtkTable()
        for column in columns:
            table.AddColumn(column)
        tableNode.SetAndObserveTable(table)
        return tableNode

    @staticmethod
    def sliceCenterRAS(volumeNode, axis: str, index: int) -> np.ndarray:
        """RAS of the centre of slice ``index`` along ``axis`` of the volume."""
        dims = volumeNode.GetImageData().GetDimensions()  # (i, j, k)
        ijk = np.array([(d - 1) / 2 for d in dims] + [1.0])
        ijk[2 - SLICE_AXES[axis]] = index  # numpy (z, y, x) axis 0 is k
        return (mrml.ijk_to_ras(volumeNode) @ ijk)[:3]

    def jumpToSlice(self, volumeNode, axis: str, index: int) -> np.ndarray:
        """Centre every slice view on slice ``index`` (the views showing that axis land on it)."""
        ras = self.sliceCenterRAS(volumeNode, axis, index)
        slicer.vtkMRMLSliceNode.JumpAllSlices(volumeNode.GetScene(), *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return ras


def _nodes(scene, className: str) -> list:
    return [scene.GetNthNodeByClass(i, className) for i in range(scene.GetNumberOfNodesByClass(className))]
