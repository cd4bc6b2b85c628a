"""HSAM fill: the Segment Editor effect's logic, without Qt (``SegmentEditorHSAM`` is its thin GUI).

The user paints a few slices of some segments; ``start`` (the effect's *Initialize*) reads the source
volume and those segments on the segmentation's own grid, checks them (``paintedInput``: which
segments are painted slice by slice, along which axis, on which slices; segments painted otherwise,
such as a structure filled before, are left alone), writes them into the fill's folder and starts two
worker processes one after the other: a quick one that writes the first preview without a model
(``first_preview_arguments``), then the fine-tuning of a guided model (``hsam finetune --guided
--preview``) whose previews replace it as training goes on. ``poll`` (from a QTimer) follows the
workers and fills a preview segmentation node, as Fill between slices shows its result. When training
ends, ``hsam segment --annotations`` with the saved model gives the final preview. ``update``
(*Update*, after painting more slices) continues from the model (``--base-model``); while training
runs it first asks the worker to end early and save the model (``--stop-file``). ``apply`` writes the
preview into the segments as one undoable step, every slice painted at that moment kept exactly as
painted; ``cancel`` drops the preview and ends the worker; ``saveModel`` keeps the ``.hsam`` bundle
for the HSAM Segment module.

The volume and segments are read the way the Segment Editor sees them (Slicer 5.8,
``qMRMLSegmentEditorWidget``): on the segmentation's reference image geometry, extended to contain
every segment, with the source volume resampled onto it (linear interpolation, through the
transforms between the two nodes) when its grid differs. So the preview lies on the grid the user
paints on, and the painted voxels come back unchanged. The main thread does little: each segment is
read within the box its voxels occupy, the painted segments are written as a crop of that grid, and
the volume is written uncompressed, once while it stays the same.
"""

from __future__ import annotations

import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import slicer
import vtk

from hsam.guidance.kinds import DEFAULT_PRIOR
from hsam.runtime.errors import HSAMError, InputError
from hsam.volumes.constants import SLICE_AXES
from hsam.volumes.segmentation import Segment, read_labelmap, write_segmentation
from hsam.volumes.volume import Volume, write_raw_nrrd

from . import models, mrml
from .training_logic import TINY_PRESET, base_model_arguments, move_into_folder
from .worker import FAILED, SUCCEEDED, WorkerJob, make_job_folder

AUTO = "auto"
# Anatomical slice directions -> the RAS axis they are perpendicular to.
ANATOMICAL_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}
AXIS_CHOICES = (AUTO, "axial", "coronal", "sagittal")
# The engine names the axes of its (z, y, x) arrays: axis 0 (K) "axial", 1 (J) "coronal", 2 (I) "sagittal".
ENGINE_AXIS_NAMES = {index: name for name, index in SLICE_AXES.items()}
FAST_BUDGET_SECONDS = 60.0  # the default: beats Fill between slices on the MNI152 demo (docs/performance.md)
BETTER_BUDGET_SECONDS = 240.0
PREVIEW_INTERVAL_SECONDS = 15.0
MIN_PAINTED_SLICES = 2
# Painted voxels lie in slices along an axis when, along it, each run of adjacent painted slices is at
# most this many slices thick, or at most a quarter as thick as the painting in it is wide.
MAX_SLICE_THICKNESS = 3
THICKNESS_RATIO = 4
# The Segment Editor's auto-complete effects build their preview's 3D surface without smoothing (fast).
PREVIEW_SMOOTHING_FACTOR = "-0.5"

FOLDER_NAME = "hsam-fill"  # the fill's folder: hsam-fill-job-<pid>-…, removed after a crash like job folders
VOLUME_FILE = "volume.nrrd"
ANNOTATIONS_FILE = "painted-{}.seg.nrrd"
FIRST_PREVIEW_FILE = "first-preview.seg.nrrd"
PREVIEW_FILE = "preview.seg.nrrd"
FINAL_FILE = "final.seg.nrrd"
MODEL_FILE = "model-{}.hsam"
STOP_FILE = "stop"

# What the logic is doing (``state``).
IDLE, PREVIEWING, TRAINING, STOPPING, SEGMENTING, DONE, FAILED_STATE = (
    "idle", "previewing", "training", "stopping", "segmenting", "done", "failed")
RUNNING_STATES = (PREVIEWING, TRAINING, STOPPING, SEGMENTING)


def first_preview_arguments(volume: Path, annotations: Path, output: Path, axis: str) -> list:
    """The worker command that writes the first preview within seconds, without a model or torch: the
    painted slices propagated through the volume along the optical flow (``hsam propagate``)."""
    return ["propagate", volume, annotations, "--axis", axis, "--output", output, "--overwrite", "--progress", "json"]


@dataclass
class FillOptions:
    """What to train: ``baseModel`` ``"tiny"`` or ``"sam:vit_b"`` (see ``training_logic.base_model_arguments``),
    for ``timeBudgetSeconds`` (the effect's default, or ``BETTER_BUDGET_SECONDS`` for "Better");
    ``axis`` an anatomical direction or ``"auto"`` (the one direction the painted slices lie along)."""

    axis: str = AUTO
    baseModel: str = TINY_PRESET
    timeBudgetSeconds: float = FAST_BUDGET_SECONDS
    epochs: Optional[int] = None
    device: str = "auto"
    prior: str = DEFAULT_PRIOR  # the flow propagation, as the first preview
    imageSize: Optional[int] = None
    previewIntervalSeconds: float = PREVIEW_INTERVAL_SECONDS

    def finetuneArguments(self) -> list[str]:
        arguments = ["--time-budget", str(float(self.timeBudgetSeconds)), "--device", self.device,
                     "--preview-interval", str(float(self.previewIntervalSeconds))]
        if self.epochs:
            arguments += ["--epochs", str(int(self.epochs))]
        if self.imageSize:
            arguments += ["--img-size", str(int(self.imageSize))]
        return arguments


@dataclass
class PaintedInput:
    """The painted segments on the segmentation's grid, checked (``HSAMFillLogic.paintedInput``)."""

    segmentIDs: list[str]  # painted segments; segment i has label i + 1 in ``labels``
    segments: list[Segment]
    leftAlone: list[str]  # names of the selected segments with nothing painted
    notSliceWise: list[str]  # names of the selected segments not painted slice by slice along ``axis``
    axis: int  # axis of the (z, y, x) arrays the slices are taken along
    anatomicalAxis: str
    slices: list[int]  # painted slices along ``axis``
    box: tuple  # VTK extent (on ``geometry``'s grid) holding every painted voxel
    boxLabels: np.ndarray  # (z, y, x) labels within ``box``, uint8/uint16
    geometry: object = field(repr=False)  # vtkOrientedImageData: the grid and extent (no voxels needed)
    source: object = field(repr=False)  # vtkOrientedImageData: the source volume on that grid

    @property
    def engineAxis(self) -> str:
        return ENGINE_AXIS_NAMES[self.axis]

    @property
    def names(self) -> list[str]:
        return [segment.name for segment in self.segments]

    @property
    def volume(self) -> Volume:
        """The source volume on the grid (a copy of its voxels)."""
        return mrml.volume_from_oriented_image(self.source)

    @property
    def labels(self) -> np.ndarray:
        """The painted labels on the whole grid (z, y, x)."""
        labels = np.zeros(mrml.extent_shape(self.geometry.GetExtent()), dtype=self.boxLabels.dtype)
        labels[box_index(self.box, self.geometry.GetExtent())] = self.boxLabels
        return labels

    def summary(self) -> str:
        """One line for the effect's status."""
        line = f"{len(self.slices)} painted {self.anatomicalAxis} slices of {', '.join(self.names)}"
        if self.leftAlone:
            line += f"; left alone (nothing painted): {', '.join(self.leftAlone)}"
        if self.notSliceWise:
            line += f"; left alone (not painted in {self.anatomicalAxis} slices): {', '.join(self.notSliceWise)}"
        return line


# --- the Segment Editor's view of the nodes ---------------------------------------------------------


def reference_geometry(segmentationNode, sourceVolumeNode=None):
    """The segmentation's reference image geometry as the Segment Editor uses it (an oriented image
    without voxels): the reference-geometry conversion parameter extended to contain every segment;
    else the common geometry of its labelmaps; else the source volume's geometry, which then becomes
    the segmentation's reference (as the Segment Editor does when a source volume is selected)."""
    segmentation = segmentationNode.GetSegmentation()
    geometry = slicer.vtkOrientedImageData()
    serialized = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if serialized:
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, geometry, False)
        extent = [0, -1, 0, -1, 0, -1]
        segmentation.DetermineCommonLabelmapExtent(extent, geometry, vtk.vtkStringArray())  # all segments
        if extent[0] <= extent[1] and extent[2] <= extent[3] and extent[4] <= extent[5]:
            own = list(geometry.GetExtent())
            geometry.SetExtent([min(extent[i], own[i]) if i % 2 == 0 else max(extent[i], own[i]) for i in range(6)])
        return geometry
    labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() and segmentation.ContainsRepresentation(labelmapName):
        serialized = segmentation.DetermineCommonLabelmapGeometry(slicer.vtkSegmentation.EXTENT_UNION_OF_SEGMENTS,
                                                                  vtk.vtkStringArray())
        if serialized:
            slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, geometry, False)
            return geometry
    if sourceVolumeNode is None:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' has no reference geometry: select a source volume")
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(sourceVolumeNode)
    return reference_geometry(segmentationNode)


def aligned_source_image(sourceVolumeNode, segmentationNode, geometry=None):
    """The source volume on the segmentation's reference geometry, as the Segment Editor resamples it
    (``updateAlignedSourceVolume``: linear interpolation, no padding, through the transform from the
    volume's parent transform to the segmentation's, the volume's background value outside it)."""
    if sourceVolumeNode is None or sourceVolumeNode.GetImageData() is None:
        raise InputError("select a source volume with image data")
    geometry = geometry or reference_geometry(segmentationNode, sourceVolumeNode)
    source = slicer.vtkOrientedImageData()
    imageData = sourceVolumeNode.GetImageData()
    if imageData.GetNumberOfScalarComponents() != 1:
        extract = vtk.vtkImageExtractComponents()
        extract.SetInputData(imageData)
        extract.SetComponents(0)
        extract.Update()
        imageData = extract.GetOutput()
    vtk.vtkImageData.ShallowCopy(source, imageData)
    matrix = vtk.vtkMatrix4x4()
    sourceVolumeNode.GetIJKToRASMatrix(matrix)
    source.SetGeometryFromImageToWorldMatrix(matrix)
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        sourceVolumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode(), transform)
    aligned = slicer.vtkOrientedImageData()
    background = sourceVolumeNode.GetImageBackgroundScalarComponentAsDouble(0)
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        source, geometry, aligned, True, False, transform, background)
    return aligned


def segment_mask(segmentationNode, segmentID: str, geometry) -> np.ndarray:
    """A segment's voxels (bool, (z, y, x)) on ``geometry``'s grid and extent."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentID)
    merged = slicer.vtkOrientedImageData()
    generated = segmentationNode.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, ids)
    if not generated:  # an empty segment
        return np.zeros(mrml.extent_shape(geometry.GetExtent()), dtype=bool)
    return mrml.oriented_image_array(merged, geometry.GetExtent()) != 0


def box_index(box: Sequence[int], extent: Sequence[int]) -> tuple:
    """Index of the (z, y, x) array over ``extent`` that selects the sub-extent ``box``."""
    return tuple(slice(box[2 * a] - extent[2 * a], box[2 * a + 1] - extent[2 * a] + 1) for a in (2, 1, 0))


def crop_geometry(geometry, box: Sequence[int]):
    """``geometry``'s grid restricted to the extent ``box`` (no voxels)."""
    cropped = slicer.vtkOrientedImageData()
    cropped.SetSpacing(geometry.GetSpacing())
    cropped.SetOrigin(geometry.GetOrigin())
    cropped.CopyDirections(geometry)
    cropped.SetExtent(list(box))
    return cropped


def merged_crop(segmentationNode, segmentIDs: Sequence[str], geometry) -> tuple[np.ndarray, Optional[list[int]]]:
    """The segments merged as the Segment Editor merges them (segment i: label i + 1, later over
    earlier) within the box of their labelmaps' non-zero voxels on ``geometry``'s grid, and that box
    (``None``, with an empty array, when nothing is painted)."""
    ids = vtk.vtkStringArray()
    for segmentID in segmentIDs:
        ids.InsertNextValue(segmentID)
    box = [0, -1, 0, -1, 0, -1]
    segmentationNode.GetSegmentation().DetermineCommonLabelmapExtent(box, geometry, ids, True)
    own = geometry.GetExtent()
    box = [max(box[i], own[i]) if i % 2 == 0 else min(box[i], own[i]) for i in range(6)]
    if min(mrml.extent_shape(box)) == 0:
        return np.zeros((0, 0, 0), dtype=np.uint8), None
    merged = slicer.vtkOrientedImageData()
    segmentationNode.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, crop_geometry(geometry, box), ids)
    return mrml.oriented_image_array(merged, box), box


# --- which slices are painted ---------------------------------------------------------------------


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers in sorted ``indices``: (first, last) each."""
    runs = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def _occupied(mask: np.ndarray, axis: int) -> np.ndarray:
    """Indices of the slices along ``axis`` that hold a voxel of ``mask``."""
    return np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))


def slice_wise_axes(mask: np.ndarray, occupied: Sequence[np.ndarray]) -> list[int]:
    """The array axes along which the voxels of ``mask`` lie in slices (``occupied``: its slices along
    each axis): each run of adjacent painted slices is thin (``MAX_SLICE_THICKNESS``) or thin against
    the painting's width in it (``THICKNESS_RATIO``). One axis for a painting on parallel slices, none
    for strokes in two views, a 3D brush or a structure filled in 3D."""
    axes = []
    for axis in range(3):
        thin = True
        for first, last in _runs(occupied[axis].tolist()):
            thickness = last - first + 1
            if thickness <= MAX_SLICE_THICKNESS:
                continue
            run = mask[(slice(None),) * axis + (slice(first, last + 1),)]
            width = min(np.ptp(_occupied(run, other)) + 1 for other in range(3) if other != axis)
            if thickness * THICKNESS_RATIO > width:
                thin = False
                break
        if thin:
            axes.append(axis)
    return axes


def anatomical_axis_of(geometry, axis: int) -> str:
    """The anatomical direction whose slices are (closest to) the slices along array axis ``axis``."""
    matrix = mrml.oriented_image_to_ras(geometry)[:3, :3]
    column = matrix[:, 2 - axis]  # array axes (z, y, x) are IJK axes (2, 1, 0)
    ras = int(np.argmax(np.abs(column)))
    return next(name for name, index in ANATOMICAL_AXES.items() if index == ras)


def grid_axis_of(geometry, anatomical: str) -> int:
    """The array axis whose slices are closest to the anatomical direction ``anatomical``."""
    matrix = mrml.oriented_image_to_ras(geometry)[:3, :3]
    alignment = [abs(matrix[ANATOMICAL_AXES[anatomical], 2 - axis]) / np.linalg.norm(matrix[:, 2 - axis])
                 for axis in range(3)]
    return int(np.argmax(alignment))


def choose_axis(sliceWise: dict[str, list[int]], painted: dict[str, list[int]], geometry, requested: str) -> int:
    """The array axis of the fill: ``requested``'s, or (auto) the one most painted segments lie in slices
    along (then the fewest painted slices). ``sliceWise``: each painted segment's slice-wise axes;
    ``painted``: its painted slices per axis. Raises ``InputError`` with one line when no segment is
    painted slice by slice along it."""
    if requested not in AXIS_CHOICES:
        raise InputError(f"unknown slice direction '{requested}' (choose from {', '.join(AXIS_CHOICES)})")
    candidates = sorted({axis for axes in sliceWise.values() for axis in axes})
    if not candidates:
        raise InputError("the painting lies on more than one slice direction (strokes in two views, a 3D brush, "
                         "or segments filled in 3D): paint whole slices in one view only")
    if requested != AUTO:
        axis = grid_axis_of(geometry, requested)
        if axis not in candidates:
            found = anatomical_axis_of(geometry, candidates[0])
            raise InputError(f"the painted slices are {found} slices, not {requested}: choose {found} (or auto)")
        return axis

    def rank(axis: int) -> tuple:
        along = [s for s, axes in sliceWise.items() if axis in axes]
        slices = set().union(*(painted[s][axis] for s in along))
        return (-len(along), len(slices), -axis)

    return min(candidates, key=rank)


# --- the preview node ---------------------------------------------------------------------------------


def new_preview_node(segmentationNode):
    """An empty preview segmentation as the auto-complete effects make it (``preview()``): no 2D
    outline, under the segmentation's transform, 3D surface without smoothing, shown in 3D when the
    segmentation is."""
    previewNode = segmentationNode.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                                 f"{segmentationNode.GetName()} preview")
    previewNode.CreateDefaultDisplayNodes()
    previewNode.GetDisplayNode().SetVisibility2DOutline(False)
    previewNode.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
    previewNode.GetSegmentation().SetConversionParameter(
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule.GetSmoothingFactorParameterName(), PREVIEW_SMOOTHING_FACTOR)
    return previewNode


def set_preview(previewNode, image, sourceSegmentation, segmentIDs: Sequence[str], segments: Sequence[Segment],
                show3D: bool) -> None:
    """Segment i of ``segmentIDs`` (same ID, name and colour as in ``sourceSegmentation``) becomes label
    i + 1 of ``image``, all segments sharing it; other segments go. The 3D surface is dropped first and
    rebuilt when ``show3D``, so that *Show 3D* shows this preview, not the last one."""
    closedSurface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    previewNode.RemoveClosedSurfaceRepresentation()
    preview = previewNode.GetSegmentation()
    for index in reversed(range(preview.GetNumberOfSegments())):
        if preview.GetNthSegmentID(index) not in segmentIDs:
            preview.RemoveSegment(preview.GetNthSegmentID(index))
    wasModifying = previewNode.StartModify()
    try:
        for value, (segmentID, described) in enumerate(zip(segmentIDs, segments), start=1):
            segment = preview.GetSegment(segmentID)
            if segment is None:
                segment = slicer.vtkSegment()
                original = sourceSegmentation.GetSegment(segmentID)
                segment.SetName(original.GetName() if original else described.name)
                segment.SetColor(original.GetColor() if original else described.color)
                preview.AddSegment(segment, segmentID)
            segment.AddRepresentation(labelmapName, image)
            segment.SetLabelValue(value)
    finally:
        previewNode.EndModify(wasModifying)
    previewNode.Modified()
    if show3D and not preview.ContainsRepresentation(closedSurface):
        previewNode.CreateClosedSurfaceRepresentation()


def remove_node(node) -> None:
    """Remove a segmentation node and its display nodes from its scene."""
    scene = node.GetScene()
    if scene is None:
        return
    displayNodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for displayNode in displayNodes:
        if displayNode is not None and displayNode.GetScene() is not None:
            scene.RemoveNode(displayNode)


def volume_key(volume: Volume) -> tuple:
    """What tells two volumes apart: grid, voxel type and a checksum of the voxels (no copy)."""
    array = np.ascontiguousarray(volume.array)
    return array.dtype.str, array.shape, volume.spacing, volume.origin, volume.direction, zlib.crc32(array)


# --- the logic --------------------------------------------------------------------------------------


class HSAMFillLogic:
    """Volume + segmentation node → a preview of every slice, learned from the painted ones, through
    ``hsam`` worker processes; see the module's description. One fill at a time: ``start`` it, call
    ``poll()`` until ``running`` is False (``update`` meanwhile or after), then ``apply`` or ``cancel``.
    ``cleanup()`` removes the files, the model included (``saveModel`` keeps it)."""

    def __init__(self, python: Optional[str] = None):
        self.python = python  # default: PythonSlicer in Slicer, else this interpreter
        self.folder: Optional[Path] = None
        self.state = IDLE
        self.error: Optional[str] = None
        self.message = ""
        self.fraction = 0.0
        self.job: Optional[WorkerJob] = None
        self.input: Optional[PaintedInput] = None  # what the running (or last) training learns from
        self.modelPath: Optional[Path] = None  # the last saved model
        self.previewNode = None
        self.segmentationNode = None
        self.sourceVolumeNode = None
        self.startedAt: Optional[float] = None
        self.firstPreviewSeconds: Optional[float] = None  # from start() to the first preview in the scene
        self._pending: Optional[tuple[PaintedInput, FillOptions]] = None  # an update waiting for the model
        self._options = FillOptions()
        self._writtenVolume: Optional[tuple] = None  # volume_key of what VOLUME_FILE holds
        self._trained = False  # the running training has taken a step
        self._round = 0
        self._finetuneRound = 0

    # --- reading the scene ----------------------------------------------------------------------

    def paintedInput(self, sourceVolumeNode, segmentationNode, segmentIDs: Optional[Sequence[str]] = None,
                     axis: str = AUTO, alignedSourceImage=None) -> PaintedInput:
        """The segments among ``segmentIDs`` (default: the visible ones) painted slice by slice, and their
        slices, on the segmentation's grid, with the source volume resampled onto it
        (``alignedSourceImage``: the Segment Editor's own, else computed the same way). Segments with
        nothing painted, or not painted in slices along the fill's axis (filled in 3D, thresholded,
        imported), are left alone. Raises ``InputError`` with one line when nothing usable is painted."""
        if segmentationNode is None:
            raise InputError("select a segmentation")
        segmentation = segmentationNode.GetSegmentation()
        segmentIDs = [s for s in (self._visibleSegmentIDs(segmentationNode) if segmentIDs is None else segmentIDs)
                      if segmentation.GetSegment(s) is not None]
        if not segmentIDs:
            raise InputError("no visible segment: add segments and paint a few slices of each")
        geometry = reference_geometry(segmentationNode, sourceVolumeNode)
        aligned = alignedSourceImage if alignedSourceImage is not None else aligned_source_image(
            sourceVolumeNode, segmentationNode, geometry)
        if list(aligned.GetExtent()) != list(geometry.GetExtent()):
            geometry = slicer.vtkOrientedImageData()
            geometry.ShallowCopy(aligned)  # the Segment Editor's aligned volume defines the grid

        merged, box = merged_crop(segmentationNode, segmentIDs, geometry)
        masks = {s: merged == value for value, s in enumerate(segmentIDs, start=1)}
        occupied = {s: [_occupied(masks[s], a) for a in range(3)] for s in segmentIDs}
        name = {s: segmentation.GetSegment(s).GetName() for s in segmentIDs}
        painted = [s for s in segmentIDs if occupied[s][0].size]
        if not painted:
            raise InputError("nothing is painted in the visible segments: paint a few slices of each structure")
        offset = [box[2 * (2 - a)] - geometry.GetExtent()[2 * (2 - a)] for a in range(3)]  # box in the grid
        sliceWise = {s: slice_wise_axes(masks[s], occupied[s]) for s in painted}
        paintedSlices = {s: {a: (occupied[s][a] + offset[a]).tolist() for a in sliceWise[s]} for s in painted}
        chosen = choose_axis(sliceWise, paintedSlices, geometry, axis)
        used = [s for s in painted if chosen in sliceWise[s]]
        repeated = sorted({name[s] for s in used if [name[u] for u in used].count(name[s]) > 1})
        if repeated:
            raise InputError(f"two painted segments are named '{repeated[0]}': rename one")
        anatomical = anatomical_axis_of(geometry, chosen)
        slices = sorted(set().union(*(paintedSlices[s][chosen] for s in used)))
        if len(slices) < MIN_PAINTED_SLICES:
            raise InputError(f"HSAM fill needs at least {MIN_PAINTED_SLICES} painted {anatomical} slices; "
                             f"only slice {slices[0]} is painted")
        usedBox, boxLabels = self._boxLabels(merged, box, [segmentIDs.index(s) + 1 for s in used],
                                             [occupied[s] for s in used])
        segments = [Segment(name[s], value, tuple(float(c) for c in segmentation.GetSegment(s).GetColor()))
                    for value, s in enumerate(used, start=1)]
        return PaintedInput(
            used, segments, [name[s] for s in segmentIDs if s not in painted],
            [name[s] for s in painted if s not in used], chosen, anatomical, slices, usedBox, boxLabels,
            geometry, aligned,
        )

    @staticmethod
    def _visibleSegmentIDs(segmentationNode) -> list[str]:
        ids = vtk.vtkStringArray()
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None:
            displayNode.GetVisibleSegmentIDs(ids)
        else:
            segmentationNode.GetSegmentation().GetSegmentIDs(ids)
        return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]

    @staticmethod
    def _boxLabels(merged: np.ndarray, box: Sequence[int], values: list[int], occupied: list[list[np.ndarray]]):
        """The box (VTK extent) holding the merged labels ``values`` (whose slices along each array axis are
        ``occupied``), and the labels in it renumbered 1, 2, … in that order, the others cleared."""
        first = [min(int(o[a][0]) for o in occupied) for a in range(3)]
        last = [max(int(o[a][-1]) for o in occupied) for a in range(3)]
        index = tuple(slice(first[a], last[a] + 1) for a in range(3))
        lookup = np.zeros(int(merged.max()) + 1, dtype=np.uint8 if len(values) < 255 else np.uint16)
        lookup[values] = np.arange(1, len(values) + 1)
        usedBox = tuple(box[2 * i] + first[2 - i] if j == 0 else box[2 * i] + last[2 - i] for i in range(3) for j in (0, 1))
        return usedBox, lookup[merged[index]]

    # --- starting -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def hasPreview(self) -> bool:
        return self.previewNode is not None

    def start(self, sourceVolumeNode, segmentationNode, segmentIDs: Optional[Sequence[str]] = None,
              options: Optional[FillOptions] = None, alignedSourceImage=None) -> PaintedInput:
        """*Initialize*: check the painting, write the first preview (a quick worker), then fine-tune a
        new guided model (a second worker). Returns what it learns from (``summary()`` names the
        segments left alone)."""
        started = time.monotonic()
        options = options or FillOptions()
        painted = self.paintedInput(sourceVolumeNode, segmentationNode, segmentIDs, options.axis, alignedSourceImage)
        self._begin(painted, options, sourceVolumeNode, segmentationNode)
        self.startedAt = started
        return painted

    def _begin(self, painted: PaintedInput, options: FillOptions, sourceVolumeNode, segmentationNode) -> None:
        """A new fill: the first preview's worker, the fine-tuning of a new model after it."""
        self.cancel()
        self.modelPath, self.firstPreviewSeconds, self.startedAt = None, None, time.monotonic()
        self.segmentationNode, self.sourceVolumeNode = segmentationNode, sourceVolumeNode
        annotations = self._writeInputs(painted)
        self._startJob(PREVIEWING, first_preview_arguments(
            self.folder / VOLUME_FILE, annotations, self.folder / FIRST_PREVIEW_FILE, painted.engineAxis))
        self.input, self._options = painted, options
        self.message = f"first preview of {painted.summary()}"

    def update(self, sourceVolumeNode, segmentationNode, segmentIDs: Optional[Sequence[str]] = None,
               options: Optional[FillOptions] = None, alignedSourceImage=None) -> PaintedInput:
        """*Update* after painting more: continue from the current model (a new fill when the painted
        segments, the segmentation or the source volume changed). While training runs, the worker is
        asked to end early and save the model first; the new training starts as soon as it has."""
        options = options or FillOptions()
        painted = self.paintedInput(sourceVolumeNode, segmentationNode, segmentIDs, options.axis, alignedSourceImage)
        if not self._continues(painted, sourceVolumeNode, segmentationNode):
            self._begin(painted, options, sourceVolumeNode, segmentationNode)
            return painted
        if self.state in (TRAINING, STOPPING):
            self._pending = (painted, options)
            if self.state == TRAINING:
                (self.folder / STOP_FILE).touch()
                self.state = STOPPING
            self.message = "ending the current training to continue with the new slices"
            return painted
        self._stopJob()
        self._startFinetune(painted, options, baseModel=self.modelPath)
        return painted

    def _continues(self, painted: PaintedInput, sourceVolumeNode, segmentationNode) -> bool:
        """Whether an update continues the current fill: same nodes, same painted segments, and a model
        saved or being trained."""
        return (self.input is not None and self.folder is not None and segmentationNode is self.segmentationNode
                and sourceVolumeNode is self.sourceVolumeNode and sorted(painted.names) == sorted(self.input.names)
                and (self.modelPath is not None or self.state in (TRAINING, STOPPING)))

    def _writeInputs(self, painted: PaintedInput) -> Path:
        """The volume (uncompressed, only when it changed) and the painted labels (uncompressed, a crop of
        its grid) into the fill's folder; returns the labels' file."""
        if self.folder is None:
            self.folder = make_job_folder(FOLDER_NAME)
        volume = mrml.volume_view(painted.source)
        key = volume_key(volume)
        if key != self._writtenVolume:
            self._writtenVolume = None
            write_raw_nrrd(self.folder / VOLUME_FILE, volume, overwrite=True)
            self._writtenVolume = key
        self._round += 1
        annotations = self.folder / ANNOTATIONS_FILE.format(self._round)
        image = mrml.oriented_image_from_array(painted.boxLabels, crop_geometry(painted.geometry, painted.box))
        write_segmentation(annotations, painted.boxLabels, mrml.volume_view(image), painted.segments,
                           overwrite=True, compress=False)
        return annotations

    def _startJob(self, state: str, arguments: list) -> None:
        """Start a worker; the state changes only once it runs (a worker that cannot start changes nothing)."""
        try:
            job = WorkerJob(self.python, FOLDER_NAME).start(arguments)
        except OSError as error:
            raise HSAMError(f"could not start the HSAM worker process: {error.strerror or error}") from error
        self.job, self.state, self.error = job, state, None

    def _startFinetune(self, painted: PaintedInput, options: FillOptions, baseModel: Optional[Path],
                       annotations: Optional[Path] = None) -> None:
        (self.folder / STOP_FILE).unlink(missing_ok=True)
        annotations = annotations or self._writeInputs(painted)
        model = self.folder / MODEL_FILE.format(self._round)
        arguments = ["finetune", self.folder / VOLUME_FILE, annotations, "--guided", options.prior,
                     "--axis", painted.engineAxis, "--output", model, "--overwrite",
                     "--preview", self.folder / PREVIEW_FILE, "--stop-file", self.folder / STOP_FILE,
                     *options.finetuneArguments(), "--progress", "json"]
        arguments += ["--base-model", Path(baseModel)] if baseModel is not None else base_model_arguments(options.baseModel)
        self._startJob(TRAINING, arguments)
        self.input, self._options, self._finetuneRound, self.fraction = painted, options, self._round, 0.0
        self._trained = baseModel is not None  # a new model's first preview is the prior, shown already
        self.message = ("continuing from the model" if baseModel is not None else "fine-tuning a new model") + \
            f" on {painted.summary()}"

    def _startFinalSegmentation(self) -> None:
        annotations = self.folder / ANNOTATIONS_FILE.format(self._finetuneRound)
        self._startJob(SEGMENTING, [
            "segment", self.folder / VOLUME_FILE, "--model", self.modelPath, "--annotations", annotations,
            "--output", self.folder / FINAL_FILE, "--overwrite", "--device", self._options.device, "--progress", "json",
        ])
        self.message = "final preview with the trained model"

    # --- following the worker -------------------------------------------------------------------

    def poll(self) -> list[dict]:
        """Follow the worker (never blocks); returns what happened since the last call, oldest first:
        ``{"event": "progress", "fraction", "message"[, "epoch", "step", "loss"]}``, ``{"event": "preview",
        "final": bool}`` (the preview node was updated), ``{"event": "finished"}``, ``{"event": "failed",
        "message"}`` or ``{"event": "stopped", "message"}`` (the preview node was removed from the scene,
        by another effect taking the preview's place: the fill ends)."""
        if self.previewNode is not None and self.previewNode.GetScene() is None:
            self.cancel()
            self.message = "stopped: the preview was removed (another effect's preview took its place)"
            return [{"event": "stopped", "message": self.message}]
        if self.job is None:
            return []
        happened, previewed = [], False
        for event in self.job.poll():
            if event.get("event") == "progress":
                happened.append(self._progress(event))
            elif event.get("event") == "preview" and self.state in (TRAINING, STOPPING):
                previewed = previewed or self._trained
        if previewed and self.job.state != FAILED:
            self._loadPreview(self.folder / PREVIEW_FILE)
            happened.append({"event": "preview", "final": False})
        if self.job.running:
            return happened
        job, self.job = self.job, None
        if job.state == SUCCEEDED:
            happened += self._onJobSucceeded()
        elif job.state == FAILED:
            self.state, self.error = FAILED_STATE, job.error
            self.message = f"HSAM fill failed: {job.error}"
            happened.append({"event": "failed", "message": job.error, "details": job.stderr_lines[-50:]})
        job.cleanup()
        return happened

    def _progress(self, event: dict) -> dict:
        fraction = float(event.get("fraction", 0.0))
        if self.state in (TRAINING, STOPPING):
            self.fraction = 0.9 * fraction
            self._trained = self._trained or int(event.get("step", 0)) >= 1
        elif self.state == SEGMENTING:
            self.fraction = 0.9 + 0.1 * fraction
        return {"event": "progress", "fraction": self.fraction, "message": event.get("message", ""),
                **{key: event[key] for key in ("epoch", "step", "loss") if key in event}}

    def _onJobSucceeded(self) -> list[dict]:
        if self.state == PREVIEWING:
            self._loadPreview(self.folder / FIRST_PREVIEW_FILE)
            self._startFinetune(self.input, self._options, baseModel=None,
                                annotations=self.folder / ANNOTATIONS_FILE.format(self._round))
            return [{"event": "preview", "final": False}, {"event": "progress", "fraction": 0.0, "message": self.message}]
        if self.state in (TRAINING, STOPPING):
            self.modelPath = self.folder / MODEL_FILE.format(self._finetuneRound)
            if self._pending is not None:
                painted, options = self._pending
                self._pending = None
                self._startFinetune(painted, options, baseModel=self.modelPath)
                return [{"event": "progress", "fraction": 0.0, "message": self.message}]
            self._startFinalSegmentation()
            return [{"event": "progress", "fraction": self.fraction, "message": self.message}]
        self._loadPreview(self.folder / FINAL_FILE)
        self.state, self.fraction = DONE, 1.0
        self.message = f"preview ready: {self.input.summary()}"
        return [{"event": "preview", "final": True}, {"event": "finished"}]

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05,
             until: Optional[Callable[[list[dict]], bool]] = None) -> list[dict]:
        """Poll until the work ends (or ``until(events)`` is true, or ``timeout`` seconds); all events.
        For scripts and tests: the effect polls from a QTimer instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = []
        while True:
            events = self.poll()
            seen += events
            if not self.running or (until is not None and events and until(events)):
                return seen
            if deadline is not None and time.monotonic() > deadline:
                return seen
            time.sleep(interval)

    # --- the preview ----------------------------------------------------------------------------

    def previewLabels(self) -> Optional[np.ndarray]:
        """The preview (z, y, x) on the painted input's grid, label i + 1 for painted segment i."""
        if self.previewNode is None:
            return None
        labels = np.zeros(mrml.extent_shape(self.input.geometry.GetExtent()), dtype=self.input.boxLabels.dtype)
        for value, segmentID in enumerate(self.input.segmentIDs, start=1):
            labels[segment_mask(self.previewNode, segmentID, self.input.geometry)] = value
        return labels

    def _loadPreview(self, path: Path) -> None:
        """Put a preview file (the engine's labels on the painted input's grid) into the preview node."""
        labels, segments = read_labelmap(path)
        painted = self.input
        ordinal = np.zeros(labels.shape, dtype=painted.boxLabels.dtype)
        by_name = {s.name.strip().casefold(): s.label_value for s in segments}
        for value, segment in enumerate(painted.segments, start=1):
            engine_value = by_name.get(segment.name.strip().casefold())
            if engine_value is not None:
                ordinal[labels == engine_value] = value
        image = mrml.oriented_image_from_array(ordinal, painted.geometry)
        closedSurface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
        if self.previewNode is None or self.previewNode.GetScene() is None:
            self.previewNode = new_preview_node(self.segmentationNode)
            show3D = self.segmentationNode.GetSegmentation().ContainsRepresentation(closedSurface)
        else:
            show3D = self.previewNode.GetSegmentation().ContainsRepresentation(closedSurface)
        set_preview(self.previewNode, image, self.segmentationNode.GetSegmentation(), painted.segmentIDs,
                    painted.segments, show3D)
        if self.firstPreviewSeconds is None and self.startedAt is not None:
            self.firstPreviewSeconds = time.monotonic() - self.startedAt

    def _removePreview(self) -> None:
        if self.previewNode is not None:
            remove_node(self.previewNode)
        self.previewNode = None

    # --- finishing ------------------------------------------------------------------------------

    def apply(self, saveStateForUndo: Optional[Callable[[], object]] = None,
              modifySegment: Optional[Callable[[str, object], object]] = None,
              segmentationNode=None) -> list[str]:
        """Write the preview into the painted segments as one undoable step: ``saveStateForUndo()`` once
        (the Segment Editor's ``saveStateForUndo``), then ``modifySegment(segmentID, labelmap)`` per
        segment (the effect passes ``modifySegmentByLabelmap`` in "set" mode; default: replace the
        segment's voxels). Every slice painted now (in any of these segments, along the fill's axis)
        keeps exactly what is painted on it now, strokes and erasing since Initialize included; the
        other slices get the preview. ``segmentationNode``: the segmentation the caller writes into,
        refused unless it is the preview's. Ends any training (the last saved model stays for
        ``saveModel``); returns the IDs written."""
        if self.previewNode is None or self.input is None:
            raise InputError("nothing to apply: click Initialize first")
        if segmentationNode is not None and segmentationNode is not self.segmentationNode:
            raise InputError(f"the preview belongs to segmentation '{self.segmentationNode.GetName()}': "
                             "select it to apply the preview, or cancel")
        painted, preview = self.input, self.previewLabels()
        segmentation = self.segmentationNode.GetSegmentation()
        present = [(value, s) for value, s in enumerate(painted.segmentIDs, start=1) if segmentation.GetSegment(s)]
        current = {s: segment_mask(self.segmentationNode, s, painted.geometry) for _, s in present}
        onSlices = np.zeros(preview.shape, dtype=bool)
        index = [slice(None)] * 3
        index[painted.axis] = sorted(set().union(*(_occupied(mask, painted.axis).tolist() for mask in current.values())))
        onSlices[tuple(index)] = True
        images = {s: mrml.oriented_image_from_array(np.where(onSlices, current[s], preview == value).astype(np.uint8),
                                                    painted.geometry) for value, s in present}
        self._stopJob()
        if saveStateForUndo is not None:
            saveStateForUndo()
        modify = modifySegment or self._replaceSegment
        for segmentID, image in images.items():
            modify(segmentID, image)
        self._removePreview()
        self.state, self.message = IDLE, f"applied to {', '.join(segmentation.GetSegment(s).GetName() for s in images)}"
        return list(images)

    def _replaceSegment(self, segmentID: str, image) -> None:
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                image, self.segmentationNode, segmentID, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            raise InputError(f"could not write segment '{segmentID}'")

    def cancel(self) -> None:
        """*Cancel*: end the worker, drop the preview (the last saved model stays for ``saveModel``)."""
        self._stopJob()
        self._removePreview()
        if self.state != IDLE:
            self.state, self.message = IDLE, "cancelled"

    def _stopJob(self) -> None:
        self._pending = None
        if self.job is not None:
            self.job.cancel()
            self.job = None
        if self.running:
            self.state = IDLE

    def saveModel(self, name: str, modelsFolder: Optional[Path] = None) -> Path:
        """Copy the last saved model into the models folder (the HSAM Segment module lists it), named
        after ``name`` (made unique). It segments other volumes prompt-free, and guided with annotations."""
        if self.modelPath is None or not self.modelPath.is_file():
            raise InputError("no model yet: the first training has not finished")
        return move_into_folder(self.modelPath, models.unique_model_path(name, modelsFolder))

    def cleanup(self) -> None:
        """End everything and remove the files (call when the effect goes away)."""
        self.cancel()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder, self.modelPath, self.input, self._writtenVolume = None, None, None, None
