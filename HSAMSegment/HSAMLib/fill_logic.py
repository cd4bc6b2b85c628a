"""HSAM fill: the Segment Editor effect's logic, without Qt (``SegmentEditorHSAM`` is its thin GUI).

The user paints a few slices of some segments; ``start`` (the effect's *Initialize*) reads the source
volume and those segments on the segmentation's own grid, checks them (``paintedInput``: which
segments are painted, along which axis, on which slices), and fine-tunes a guided model in a worker
process (``hsam finetune --guided --preview``). ``poll`` (from a QTimer) follows the worker: each
preview it writes (the first one, before any step, is the interpolation of the painted slices: an
untrained guided model returns its prior) goes into a preview segmentation node, as Fill between
slices shows its result. When training ends, ``hsam segment --annotations`` with the saved model
gives the final preview. ``update`` (*Update*, after painting more slices) continues from the model
(``--base-model``); while training runs it first asks the worker to end early and save the model
(``--stop-file``). ``apply`` writes the preview into the segments as one undoable step, the painted
slices kept exactly; ``cancel`` drops the preview and ends the worker; ``saveModel`` keeps the
``.hsam`` bundle for the HSAM Segment module.

The volume and segments are read the way the Segment Editor sees them (Slicer 5.8,
``qMRMLSegmentEditorWidget``): on the segmentation's reference image geometry, extended to contain
every segment, with the source volume resampled onto it (linear interpolation, through the
transforms between the two nodes) when its grid differs. So the preview lies on the grid the user
paints on, and the painted voxels come back unchanged.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import slicer
import vtk

from hsam.errors import InputError
from hsam.io import Segment, read_labelmap, write_segmentation, write_volume
from hsam.presets import SLICE_AXES

from . import models, mrml
from .training_logic import TINY_PRESET, base_model_arguments, move_into_folder
from .worker import FAILED, SUCCEEDED, WorkerJob

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
# A group of painted voxels lies in slices along an axis when it is at most this many voxels thick
# along it, or at most a quarter of its extent along the other two axes (a few adjacent slices).
MAX_SLICE_THICKNESS = 3
THICKNESS_RATIO = 4

VOLUME_FILE = "volume.nrrd"
ANNOTATIONS_FILE = "painted-{}.seg.nrrd"
PREVIEW_FILE = "preview.seg.nrrd"
FINAL_FILE = "final.seg.nrrd"
MODEL_FILE = "model-{}.hsam"
STOP_FILE = "stop"

# What the logic is doing (``state``).
IDLE, TRAINING, STOPPING, SEGMENTING, DONE, FAILED_STATE = "idle", "training", "stopping", "segmenting", "done", "failed"


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
    prior: str = "linear"
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
    axis: int  # axis of the (z, y, x) arrays the slices are taken along
    anatomicalAxis: str
    slices: list[int]  # painted slices along ``axis``
    labels: np.ndarray  # (z, y, x) uint8/uint16
    masks: list[np.ndarray]  # each painted segment's own voxels (segments may overlap)
    geometry: object = field(repr=False)  # vtkOrientedImageData: the grid and extent (no voxels needed)
    volume: object = field(repr=False)  # hsam.io.Volume: the source volume on that grid

    @property
    def engineAxis(self) -> str:
        return ENGINE_AXIS_NAMES[self.axis]

    @property
    def names(self) -> list[str]:
        return [segment.name for segment in self.segments]

    def summary(self) -> str:
        """One line for the effect's status."""
        line = (f"{len(self.slices)} painted {self.anatomicalAxis} slices of {', '.join(self.names)}")
        if self.leftAlone:
            line += f"; left alone (nothing painted): {', '.join(self.leftAlone)}"
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


# --- which slices are painted ---------------------------------------------------------------------


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


def slice_axes_of_painting(painted: np.ndarray) -> list[int]:
    """The array axes along which every group (6-connected component) of painted voxels lies in a
    few slices: one axis for a painting on parallel slices, none for strokes in two views or a 3D brush."""
    import SimpleITK as sitk

    components = sitk.ConnectedComponent(sitk.GetImageFromArray(painted.astype(np.uint8)), False)
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(components)
    axes = [0, 1, 2]
    for label in statistics.GetLabels():
        box = statistics.GetBoundingBox(label)  # x, y, z start then x, y, z size
        size = box[3:][::-1]  # (z, y, x)
        axes = [a for a in axes
                if size[a] <= MAX_SLICE_THICKNESS or size[a] * THICKNESS_RATIO <= min(size[b] for b in range(3) if b != a)]
    return axes


def painted_slices(painted: np.ndarray, axis: int) -> list[int]:
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(painted.any(axis=other)).tolist()


def choose_axis(painted: np.ndarray, geometry, requested: str) -> int:
    """The array axis the painted slices lie along, checked against the requested direction; raises
    ``InputError`` with one line for a painting on more than one axis or along another direction."""
    if requested not in AXIS_CHOICES:
        raise InputError(f"unknown slice direction '{requested}' (choose from {', '.join(AXIS_CHOICES)})")
    candidates = slice_axes_of_painting(painted)
    if not candidates:
        raise InputError("the painting lies on more than one slice direction (strokes in two views, or a 3D brush): "
                         "paint whole slices in one view only")
    if requested == AUTO:
        return min(candidates, key=lambda a: (len(painted_slices(painted, a)), -a))
    axis = grid_axis_of(geometry, requested)
    if axis not in candidates:
        found = anatomical_axis_of(geometry, candidates[0])
        raise InputError(f"the painted slices are {found} slices, not {requested}: choose {found} (or auto)")
    return axis


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
        self.startedAt: Optional[float] = None
        self.firstPreviewSeconds: Optional[float] = None  # from start() to the first preview in the scene
        self._pending: Optional[tuple[PaintedInput, FillOptions]] = None  # an update waiting for the model
        self._options = FillOptions()
        self._round = 0
        self._finetuneRound = 0

    # --- reading the scene ----------------------------------------------------------------------

    def paintedInput(self, sourceVolumeNode, segmentationNode, segmentIDs: Optional[Sequence[str]] = None,
                     axis: str = AUTO, alignedSourceImage=None) -> PaintedInput:
        """The painted segments among ``segmentIDs`` (default: the visible ones) and their slices, on the
        segmentation's grid, with the source volume resampled onto it (``alignedSourceImage``: the
        Segment Editor's own, else computed the same way). Raises ``InputError`` with one line when
        nothing usable is painted."""
        if segmentationNode is None:
            raise InputError("select a segmentation")
        segmentation = segmentationNode.GetSegmentation()
        if segmentIDs is None:
            ids = vtk.vtkStringArray()
            displayNode = segmentationNode.GetDisplayNode()
            if displayNode is not None:
                displayNode.GetVisibleSegmentIDs(ids)
            else:
                segmentation.GetSegmentIDs(ids)
            segmentIDs = [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]
        segmentIDs = [s for s in segmentIDs if segmentation.GetSegment(s) is not None]
        if not segmentIDs:
            raise InputError("no visible segment: add segments and paint a few slices of each")
        geometry = reference_geometry(segmentationNode, sourceVolumeNode)
        aligned = alignedSourceImage if alignedSourceImage is not None else aligned_source_image(
            sourceVolumeNode, segmentationNode, geometry)
        if list(aligned.GetExtent()) != list(geometry.GetExtent()):
            aligned_geometry = slicer.vtkOrientedImageData()
            aligned_geometry.ShallowCopy(aligned)
            geometry = aligned_geometry  # the Segment Editor's aligned volume defines the grid

        names = [segmentation.GetSegment(s).GetName() for s in segmentIDs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(f"two visible segments are named '{repeated[0]}': rename one")
        masks = {s: segment_mask(segmentationNode, s, geometry) for s in segmentIDs}
        painted_ids = [s for s in segmentIDs if masks[s].any()]
        left_alone = [segmentation.GetSegment(s).GetName() for s in segmentIDs if s not in painted_ids]
        if not painted_ids:
            raise InputError("nothing is painted in the visible segments: paint a few slices of each structure")
        painted = np.zeros(mrml.extent_shape(geometry.GetExtent()), dtype=bool)
        for s in painted_ids:
            painted |= masks[s]
        chosen = choose_axis(painted, geometry, axis)
        anatomical = anatomical_axis_of(geometry, chosen)
        slices = painted_slices(painted, chosen)
        if len(slices) < MIN_PAINTED_SLICES:
            raise InputError(f"HSAM fill needs at least {MIN_PAINTED_SLICES} painted {anatomical} slices; "
                             f"only slice {slices[0]} is painted")

        labels = np.zeros(painted.shape, dtype=np.uint8 if len(painted_ids) < 255 else np.uint16)
        segments = []
        for value, s in enumerate(painted_ids, start=1):
            labels[masks[s]] = value
            segment = segmentation.GetSegment(s)
            segments.append(Segment(segment.GetName(), value, tuple(float(c) for c in segment.GetColor())))
        return PaintedInput(
            painted_ids, segments, left_alone, chosen, anatomical, slices, labels, [masks[s] for s in painted_ids],
            geometry, mrml.volume_from_oriented_image(aligned),
        )

    # --- training -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state in (TRAINING, STOPPING, SEGMENTING)

    @property
    def hasPreview(self) -> bool:
        return self.previewNode is not None

    def start(self, sourceVolumeNode, segmentationNode, segmentIDs: Optional[Sequence[str]] = None,
              options: Optional[FillOptions] = None, alignedSourceImage=None) -> PaintedInput:
        """*Initialize*: check the painting, then fine-tune a new guided model in a worker process.
        Returns what it learns from (``summary()`` names the segments left alone)."""
        started = time.monotonic()
        options = options or FillOptions()
        painted = self.paintedInput(sourceVolumeNode, segmentationNode, segmentIDs, options.axis, alignedSourceImage)
        self.cancel()
        self.modelPath = None
        self.startedAt, self.firstPreviewSeconds = started, None
        self.segmentationNode = segmentationNode
        self._startFinetune(painted, options, baseModel=None)
        return painted

    def update(self, sourceVolumeNode, segmentationNode, segmentIDs: Optional[Sequence[str]] = None,
               options: Optional[FillOptions] = None, alignedSourceImage=None) -> PaintedInput:
        """*Update* after painting more: continue from the current model (a new one when the painted
        segments changed). While training runs, the worker is asked to end early and save the model
        first; the new training starts as soon as it has."""
        options = options or FillOptions()
        if self.input is None or self.folder is None:
            return self.start(sourceVolumeNode, segmentationNode, segmentIDs, options, alignedSourceImage)
        painted = self.paintedInput(sourceVolumeNode, segmentationNode, segmentIDs, options.axis, alignedSourceImage)
        self.segmentationNode = segmentationNode
        if self._sameClasses(painted) and self.state in (TRAINING, STOPPING):
            self._pending = (painted, options)
            if self.state == TRAINING:
                (self.folder / STOP_FILE).touch()
                self.state = STOPPING
            self.message = "ending the current training to continue with the new slices"
            return painted
        if self.job is not None:
            self.job.cancel()
            self.job = None
        if self._sameClasses(painted) and self.modelPath is not None:
            self._startFinetune(painted, options, baseModel=self.modelPath)
        else:
            self._startFinetune(painted, options, baseModel=None)
        return painted

    def _sameClasses(self, painted: PaintedInput) -> bool:
        return self.input is not None and sorted(painted.names) == sorted(self.input.names)

    def _startFinetune(self, painted: PaintedInput, options: FillOptions, baseModel: Optional[Path]) -> None:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="hsam-fill-"))
        (self.folder / STOP_FILE).unlink(missing_ok=True)
        self._round += 1
        annotations = self.folder / ANNOTATIONS_FILE.format(self._round)
        write_volume(self.folder / VOLUME_FILE, painted.volume, overwrite=True)
        write_segmentation(annotations, painted.labels, painted.volume, painted.segments, overwrite=True)
        model = self.folder / MODEL_FILE.format(self._round)
        arguments = ["finetune", self.folder / VOLUME_FILE, annotations, "--guided", options.prior,
                     "--axis", painted.engineAxis, "--output", model, "--overwrite",
                     "--preview", self.folder / PREVIEW_FILE, "--stop-file", self.folder / STOP_FILE,
                     *options.finetuneArguments(), "--progress", "json"]
        if baseModel is not None:
            arguments += ["--base-model", Path(baseModel)]
        else:
            arguments += base_model_arguments(options.baseModel)
        self.input, self._options, self._finetuneRound = painted, options, self._round
        self.state, self.error, self.fraction = TRAINING, None, 0.0
        self.message = ("continuing from the model" if baseModel is not None else "fine-tuning a new model") + \
            f" on {painted.summary()}"
        self.job = WorkerJob(self.python, "hsam-fill").start(arguments)

    def _startFinalSegmentation(self) -> None:
        annotations = self.folder / ANNOTATIONS_FILE.format(self._finetuneRound)
        self.state, self.message = SEGMENTING, "final preview with the trained model"
        self.job = WorkerJob(self.python, "hsam-fill").start([
            "segment", self.folder / VOLUME_FILE, "--model", self.modelPath, "--annotations", annotations,
            "--output", self.folder / FINAL_FILE, "--overwrite", "--device", self._options.device, "--progress", "json",
        ])

    # --- following the worker -------------------------------------------------------------------

    def poll(self) -> list[dict]:
        """Follow the worker (never blocks); returns what happened since the last call, oldest first:
        ``{"event": "progress", "fraction", "message"[, "epoch", "step", "loss"]}``, ``{"event": "preview",
        "final": bool}`` (the preview node was updated), ``{"event": "finished"}`` or ``{"event": "failed",
        "message"}``."""
        if self.job is None:
            return []
        happened = []
        events = self.job.poll()
        previews = [e for e in events if e.get("event") == "preview"]
        for event in events:
            if event.get("event") == "progress":
                if self.state in (TRAINING, STOPPING):
                    self.fraction = 0.9 * float(event.get("fraction", 0.0))
                else:
                    self.fraction = 0.9 + 0.1 * float(event.get("fraction", 0.0))
                happened.append({"event": "progress", "fraction": self.fraction, "message": event.get("message", ""),
                                 **{key: event[key] for key in ("epoch", "step", "loss") if key in event}})
        if previews and self.job.state != FAILED:
            self._loadPreview(self.folder / PREVIEW_FILE)
            happened.append({"event": "preview", "final": False})
        if self.job.running:
            return happened
        job, self.job = self.job, None
        if job.state == SUCCEEDED:
            happened += self._onJobSucceeded(job)
        elif job.state == FAILED:
            self.state, self.error = FAILED_STATE, job.error
            self.message = f"HSAM fill failed: {job.error}"
            happened.append({"event": "failed", "message": job.error, "details": job.stderr_lines[-50:]})
        job.cleanup()
        return happened

    def _onJobSucceeded(self, job: WorkerJob) -> list[dict]:
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
        labels = np.zeros(self.input.labels.shape, dtype=self.input.labels.dtype)
        for value, segmentID in enumerate(self.input.segmentIDs, start=1):
            labels[segment_mask(self.previewNode, segmentID, self.input.geometry)] = value
        return labels

    def _loadPreview(self, path: Path) -> None:
        """Put a preview file (the engine's labels on the painted input's grid) into the preview node."""
        labels, segments = read_labelmap(path)
        painted = self.input
        ordinal = np.zeros(labels.shape, dtype=np.uint8 if len(painted.segments) < 255 else np.uint16)
        by_name = {s.name.strip().casefold(): s.label_value for s in segments}
        for value, segment in enumerate(painted.segments, start=1):
            engine_value = by_name.get(segment.name.strip().casefold())
            if engine_value is not None:
                ordinal[labels == engine_value] = value
        image = mrml.oriented_image_from_array(ordinal, painted.geometry)
        self._showPreview(image)
        if self.firstPreviewSeconds is None and self.startedAt is not None:
            self.firstPreviewSeconds = time.monotonic() - self.startedAt

    def _showPreview(self, image) -> None:
        """The preview node: one segment per painted segment (same ID, name and colour), all in one
        shared labelmap, as the Segment Editor's auto-complete effects show their result."""
        scene = self.segmentationNode.GetScene()
        if self.previewNode is None or self.previewNode.GetScene() is None:
            self.previewNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                       f"{self.segmentationNode.GetName()} preview")
            self.previewNode.CreateDefaultDisplayNodes()
            self.previewNode.GetDisplayNode().SetVisibility2DOutline(False)
            self.previewNode.SetAndObserveTransformNodeID(self.segmentationNode.GetTransformNodeID())
        labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        preview = self.previewNode.GetSegmentation()
        source = self.segmentationNode.GetSegmentation()
        wanted = list(self.input.segmentIDs)
        for index in reversed(range(preview.GetNumberOfSegments())):
            if preview.GetNthSegmentID(index) not in wanted:
                preview.RemoveSegment(preview.GetNthSegmentID(index))
        wasModifying = self.previewNode.StartModify()
        try:
            for value, segmentID in enumerate(wanted, start=1):
                segment = preview.GetSegment(segmentID)
                if segment is None:
                    segment = slicer.vtkSegment()
                    original = source.GetSegment(segmentID)
                    segment.SetName(original.GetName() if original else self.input.names[value - 1])
                    segment.SetColor(original.GetColor() if original else self.input.segments[value - 1].color)
                    preview.AddSegment(segment, segmentID)
                segment.AddRepresentation(labelmapName, image)
                segment.SetLabelValue(value)
        finally:
            self.previewNode.EndModify(wasModifying)
        self.previewNode.Modified()

    def _removePreview(self) -> None:
        if self.previewNode is not None and self.previewNode.GetScene() is not None:
            scene = self.previewNode.GetScene()
            displayNodes = [self.previewNode.GetNthDisplayNode(i) for i in range(self.previewNode.GetNumberOfDisplayNodes())]
            scene.RemoveNode(self.previewNode)
            for displayNode in displayNodes:
                if displayNode is not None and displayNode.GetScene() is not None:
                    scene.RemoveNode(displayNode)
        self.previewNode = None

    # --- finishing ------------------------------------------------------------------------------

    def apply(self, saveStateForUndo: Optional[Callable[[], object]] = None,
              modifySegment: Optional[Callable[[str, object], object]] = None) -> list[str]:
        """Write the preview into the painted segments as one undoable step: ``saveStateForUndo()`` once
        (the Segment Editor's ``saveStateForUndo``), then ``modifySegment(segmentID, labelmap)`` per
        segment (the effect passes ``modifySegmentByLabelmap`` in "set" mode; default: replace the
        segment's voxels). On the painted slices each segment keeps exactly its painted voxels. Ends
        any training (the last saved model stays for ``saveModel``); returns the IDs written."""
        if self.previewNode is None or self.input is None:
            raise InputError("nothing to apply: click Initialize first")
        painted, preview = self.input, self.previewLabels()
        self._stopJob()
        on_slices = np.zeros(preview.shape, dtype=bool)
        index = [slice(None)] * 3
        index[painted.axis] = painted.slices
        on_slices[tuple(index)] = True
        images = {}
        for value, (segmentID, mask) in enumerate(zip(painted.segmentIDs, painted.masks), start=1):
            result = np.where(on_slices, mask, preview == value).astype(np.uint8)
            images[segmentID] = mrml.oriented_image_from_array(result, painted.geometry)
        if saveStateForUndo is not None:
            saveStateForUndo()
        modify = modifySegment or self._replaceSegment
        for segmentID, image in images.items():
            modify(segmentID, image)
        self._removePreview()
        self.state, self.message = IDLE, f"applied to {', '.join(painted.names)}"
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
        self.folder, self.modelPath, self.input = None, None, None
