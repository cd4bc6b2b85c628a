"""Which slices to annotate next, in the scene: the model's uncertainty as a coloured overlay, the
per-slice scores in a table, the slice views on the first suggestion. Usable without the GUI.

``suggest()`` does everything in one call. The GUI splits it: ``annotatedSlices`` and
``volume_from_node`` (MRML, main thread) → ``predict`` (background thread, no MRML) → ``show``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import slicer
import vtk

from hsam.errors import InputError
from hsam.io import Volume
from hsam.preprocess import SLICE_AXES

from . import mrml
from .segment_logic import HSAMSegmentLogic

Progress = Callable[[float, str], None]
COLOR_NODE_NAME = "HSAM uncertainty"
# Uncertainty 0 → blue, 0.5 → yellow, 1 → red; voxels below the threshold are not drawn.
COLOR_POINTS = ((0.0, (0.15, 0.25, 1.0)), (0.5, (1.0, 0.9, 0.1)), (1.0, (1.0, 0.05, 0.0)))
OVERLAY_OPACITY = 0.5
TABLE_COLUMNS = ("slice", "score", "suggestion")


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


class HSAMSuggestLogic:
    """Volume node + model bundle → suggested slices, uncertainty overlay and score table."""

    def __init__(self, segmentLogic: Optional[HSAMSegmentLogic] = None) -> None:
        self.segmentLogic = segmentLogic or HSAMSegmentLogic()  # shares its loaded model

    def annotatedSlices(self, segmentationNode, volumeNode, axis: str) -> list[int]:
        """Slices of ``segmentationNode`` carrying any segment (none: [])."""
        if segmentationNode is None or segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            return []
        return mrml.annotated_slices(segmentationNode, volumeNode, axis).slices

    def predict(
        self,
        volume: Volume,
        modelPath,
        signal: Optional[str] = None,
        device: str = "auto",
        batchSize: int = 4,
        progress: Optional[Progress] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Prediction:
        """Segment with uncertainty (no MRML; safe in a worker thread)."""
        from hsam.inference import segment_volume
        from hsam.uncertainty import DEFAULT_SIGNAL

        model, metadata = self.segmentLogic.loadModel(modelPath, device)
        result = segment_volume(model, volume, metadata, device=device, batch_size=batchSize, progress=progress,
                                cancel=cancel, uncertainty=signal or DEFAULT_SIGNAL)
        return Prediction(result.labels, result.uncertainty, result.slice_scores, metadata.slice_axis)

    @staticmethod
    def rank(prediction: Prediction, count: int, annotated: Sequence[int] = ()) -> list[int]:
        from hsam.suggest import suggest_slices

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
                device: str = "auto", progress: Optional[Progress] = None, cancel=None) -> Suggestions:
        """All steps in one call; slices annotated in ``segmentationNode`` are skipped."""
        volume = mrml.volume_from_node(volumeNode)
        prediction = self.predict(volume, modelPath, signal, device, progress=progress, cancel=cancel)
        annotated = self.annotatedSlices(segmentationNode, volumeNode, prediction.axis)
        return self.show(prediction, self.rank(prediction, count, annotated), volumeNode)

    # --- scene --------------------------------------------------------------------------------

    def showUncertainty(self, uncertainty: np.ndarray, volumeNode, previous=None):
        """A scalar volume on ``volumeNode``'s grid holding the map (replacing ``previous``), coloured
        blue→red above the region threshold, shown as the foreground of every slice view."""
        from hsam.uncertainty import OVERLAY_THRESHOLD

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
