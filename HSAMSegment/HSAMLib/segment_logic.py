"""Segment a volume node with an HSAM model bundle; export segmentations. Usable without the GUI.

The model runs in a worker process (``HSAMLib.worker``): ``startSegmentation`` writes the volume into
the job's folder and starts ``hsam segment``; when the job has succeeded, ``loadResult`` reads the
``.seg.nrrd`` it wrote and puts it into the scene on the calling (main) thread. ``segment()`` does
both and waits. This process never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hsam.models.bundle import BundleMetadata, read_bundle_metadata
from hsam.runtime.errors import InputError
from hsam.volumes.segmentation import Segment, read_labelmap, write_segmentation
from hsam.volumes.volume import write_volume

from . import mrml
from .worker import WorkerJob

# Called with each batch of progress events of the worker (``hsam.runtime.progress``).
OnEvents = Callable[[list], None]
INPUT_FILE = "input.nrrd"
ANNOTATIONS_FILE = "annotations.seg.nrrd"
RESULT_FILE = "result.seg.nrrd"
# Marks the segmentation nodes HSAM wrote, which are results, never annotations.
RESULT_ATTRIBUTE = "HSAM.Result"
# Said before a guided model segments a volume without its painted slices and without an atlas.
NEEDS_GUIDANCE = (
    "This guided model needs painted slices: paint a few slices of this volume and fine-tune the model on them in "
    "HSAM Training, or train it with 'Keep an atlas of the training volumes' so that it segments new volumes. "
    "Without either it may find nothing."
)


@dataclass(frozen=True)
class Prior:
    """What a model corrects when the panel segments a volume. ``description``: "prompt-free",
    "guided by '<segmentation>'" or "guided by its N training volumes registered onto this one" (its
    atlas); ``annotationsNode``: the painted segmentation it is guided by; ``problem``: said up front
    when a guided model has neither painted slices nor an atlas."""

    description: str
    annotationsNode: Any = None
    problem: Optional[str] = None

    def summary(self) -> str:
        """The panel's line under the model."""
        return self.problem or f"{self.description[0].upper()}{self.description[1:]}."


def job_with_volume(python: Optional[str], name: str, volumeNode) -> WorkerJob:
    """A new worker job whose folder holds ``volumeNode`` (read here, on the main thread) as ``INPUT_FILE``."""
    volume = mrml.volume_from_node(volumeNode)
    job = WorkerJob(python, name)
    try:
        write_volume(job.folder / INPUT_FILE, volume)
    except BaseException:
        job.cleanup()
        raise
    return job


class HSAMSegmentLogic:
    """Volume node + model bundle → segmentation node, through an ``hsam segment`` worker process."""

    def __init__(self, python: Optional[str] = None):
        self.python = python  # default: PythonSlicer in Slicer, else this interpreter

    def startSegmentation(
        self,
        volumeNode,
        modelPath,
        device: str = "auto",
        batchSize: int = 4,
        sliceRange: Optional[tuple[int, int]] = None,
        annotationsNode=None,
    ) -> WorkerJob:
        """Start segmenting ``volumeNode`` (read from the scene here, on the main thread); a guided
        model corrects the flow propagation of ``annotationsNode``'s annotated slices when given."""
        modelPath = Path(modelPath)
        if not modelPath.is_file():
            raise InputError(f"model file not found: {modelPath}")
        job = job_with_volume(self.python, "hsam-segment", volumeNode)
        arguments = [
            "segment", job.folder / INPUT_FILE, "--model", modelPath.resolve(), "--output", job.folder / RESULT_FILE,
            "--device", device, "--batch-size", int(batchSize), "--progress", "json",
        ]
        if sliceRange is not None:
            arguments += ["--slices", f"{int(sliceRange[0])}:{int(sliceRange[1])}"]
        if annotationsNode is not None:
            try:
                labels, segments = mrml.labels_from_segmentation(annotationsNode, volumeNode)
                write_segmentation(job.folder / ANNOTATIONS_FILE, labels, mrml.volume_from_node(volumeNode), segments)
            except BaseException:
                job.cleanup()
                raise
            arguments += ["--annotations", job.folder / ANNOTATIONS_FILE]
        return job.start(arguments)

    def prior(self, volumeNode, modelPath) -> Prior:
        """What the model at ``modelPath`` corrects when the panel segments ``volumeNode`` (None: any
        volume): its painted slices (``defaultAnnotations``), else a guided model's atlas, else nothing.
        Reads the bundle's metadata only (no torch)."""
        metadata = read_bundle_metadata(modelPath)
        annotations = None if volumeNode is None else self._defaultAnnotations(volumeNode, metadata)
        if annotations is not None:
            return Prior(f"guided by '{annotations.GetName()}'", annotations)
        if not metadata.guided:
            return Prior("prompt-free")
        volumes = (metadata.guidance.get("atlas") or {}).get("volumes")
        if volumes:
            return Prior(f"guided by its {volumes} training volume{'s' if volumes > 1 else ''} registered onto this one")
        return Prior("prompt-free", problem=NEEDS_GUIDANCE)

    def defaultAnnotations(self, volumeNode, modelPath):
        """The segmentation to guide a guided model with by default: for the volume the model was
        fine-tuned on, a segmentation of that volume that HSAM did not write (None otherwise)."""
        return self._defaultAnnotations(volumeNode, read_bundle_metadata(modelPath))

    @staticmethod
    def _defaultAnnotations(volumeNode, metadata: BundleMetadata):
        cases = metadata.training.get("cases") or []
        if not metadata.guided or volumeNode.GetName() not in [case.get("name") for case in cases]:
            return None
        scene = volumeNode.GetScene()
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
            node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
            reference = node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole())
            if reference == volumeNode.GetID() and not node.GetAttribute(RESULT_ATTRIBUTE):
                return node
        return None

    def loadResult(self, job: WorkerJob, volumeNode, segmentationNode=None):
        """Put a finished job's segments (names, colours, terminology, label values) into a new or the
        given segmentation node (the worker's warnings go to the log), then remove the job's folder.
        Raises if the job did not succeed."""
        try:
            job.check()
            for warning in job.warnings:
                logging.warning("HSAM: %s", warning)
            labels, segments = read_labelmap(job.folder / RESULT_FILE)
            return self.writeResult(labels, segments, volumeNode, segmentationNode)
        finally:
            job.cleanup()

    @staticmethod
    def finishedMessage(description: str, segmentationNode, warnings: Sequence[str] = ()) -> str:
        """The panel's status once the result is in the scene: the prior's ``description``, the segments,
        and the worker's warnings (``WorkerJob.warnings``), one line each."""
        count = segmentationNode.GetSegmentation().GetNumberOfSegments()
        message = f"Done ({description}): {count} segment(s) in '{segmentationNode.GetName()}'."
        return "\n".join([message] + [f"Warning: {warning}" for warning in warnings])

    def writeResult(self, labels, segments: list[Segment], volumeNode, segmentationNode=None):
        """Put labels (z, y, x) on the volume's grid into a (new or overwritten) segmentation node."""
        name = f"{volumeNode.GetName()} HSAM"
        node = mrml.labels_to_segmentation(labels, segments, volumeNode, segmentationNode, name)
        node.SetAttribute(RESULT_ATTRIBUTE, "1")
        return node

    def segment(
        self,
        volumeNode,
        modelPath,
        segmentationNode=None,
        device: str = "auto",
        batchSize: int = 4,
        sliceRange: Optional[tuple[int, int]] = None,
        onEvents: Optional[OnEvents] = None,
        annotationsNode=None,
    ):
        """Segment ``volumeNode`` with the bundle at ``modelPath`` and wait; returns the segmentation node.

        ``segmentationNode`` is overwritten if given, else a new node is added. A failed run raises
        ``HSAMError`` with the worker's message and leaves the scene unchanged. ``annotationsNode``:
        as in ``startSegmentation``.
        """
        job = self.startSegmentation(volumeNode, modelPath, device, batchSize, sliceRange, annotationsNode)
        job.wait(on_events=onEvents)
        return self.loadResult(job, volumeNode, segmentationNode)

    def exportSegmentation(self, segmentationNode, path) -> Path:
        """Write ``path`` (``.seg.nrrd``: segment names, colours, terminology)."""
        return mrml.export_segmentation(segmentationNode, path)

    def exportLabelmap(self, segmentationNode, referenceVolumeNode, path) -> Path:
        """Write a labelmap ``.nrrd`` on the reference volume's grid, with the model's label values."""
        return mrml.export_labelmap(segmentationNode, referenceVolumeNode, path)

    def export(self, segmentationNode, referenceVolumeNode, folder) -> tuple[Path, Path]:
        """Write ``<name>.seg.nrrd`` and a labelmap ``<name>-label.nrrd`` into ``folder``."""
        folder = Path(folder)
        if segmentationNode is None:
            raise InputError("no segmentation to export")
        stem = mrml.safe_file_stem(segmentationNode.GetName())
        segmentation_path = self.exportSegmentation(segmentationNode, folder / f"{stem}.seg.nrrd")
        labelmap_path = self.exportLabelmap(segmentationNode, referenceVolumeNode, folder / f"{stem}-label.nrrd")
        return segmentation_path, labelmap_path
