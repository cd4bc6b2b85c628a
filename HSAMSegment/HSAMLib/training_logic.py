"""Few-shot fine-tuning from MRML nodes: one or more (volume, segmentation) pairs with a few annotated
slices each.

Training runs in a worker process (``hsam finetune``): ``prepare`` reads the scene (main thread),
``startFinetune`` writes each volume and its annotations into the job's folder, with a manifest of the
pairs and their annotated slices, and starts the worker,
``saveModel`` moves the finished bundle into the models folder. ``finetune()`` does all of it and
waits. This process never imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from hsam.models.bundle import atlas_bytes, read_bundle
from hsam.runtime.errors import InputError
from hsam.volumes.segmentation import Segment, write_segmentation
from hsam.volumes.volume import Volume, write_volume

from . import models, mrml
from .segment_logic import OnEvents
from .worker import WorkerJob

TINY_PRESET = "tiny"
SAM_PREFIX = "sam:"
VOLUME_FILE = "volume-{}.nrrd"
ANNOTATIONS_FILE = "annotations-{}.seg.nrrd"
MANIFEST_FILE = "cases.json"
MODEL_FILE = "model.hsam"


@dataclass
class TrainingData:
    """What fine-tuning needs, extracted from the scene."""

    volume: Volume
    labels: np.ndarray  # (z, y, x), label i+1 = segments[i]
    segments: list[Segment]
    annotated: mrml.AnnotatedSlices
    name: str = ""


def base_model_arguments(baseModel: str) -> list[str]:
    """``hsam finetune`` options for a base model: ``"tiny"`` (trained from scratch),
    ``"sam:<vit_b|vit_l|vit_h>"`` (official SAM weights, downloaded) or the path of an HSAM bundle."""
    if baseModel == TINY_PRESET:
        return ["--preset", TINY_PRESET]
    if baseModel.startswith(SAM_PREFIX):
        name = baseModel[len(SAM_PREFIX):]
        path = models.sam_weights_path(name)
        if name not in models.available_sam_weights():
            raise InputError(
                f"the official SAM {name} weights are not downloaded: download them in the HSAMSegment module "
                f"or copy {path.name} into {path.parent}"
            )
        return ["--preset", name, "--sam-checkpoint", str(path)]
    entry = models.read_model(baseModel)  # a readable bundle; the worker takes its preset
    return ["--base-model", str(entry.path.resolve())]


@dataclass
class TrainingOptions:
    """Fine-tuning options. Training stops after ``epochs`` or ``timeBudgetSeconds``, whichever comes
    first; options left at None (or 0) keep the engine's defaults."""

    baseModel: str = TINY_PRESET
    epochs: Optional[int] = None
    timeBudgetSeconds: Optional[float] = None
    learningRate: Optional[float] = None
    batchSize: int = 2
    device: str = "auto"
    sliceAxis: str = "axial"
    imageSize: Optional[int] = None  # network input; None: the preset's default
    guided: bool = True  # the annotations guide the model (``hsam finetune --guided``)
    atlas: bool = False  # guided: keep the training volumes as its atlas (``hsam finetune --atlas``)

    def arguments(self) -> list[str]:
        """The ``hsam finetune`` options."""
        if self.sliceAxis not in mrml.SLICE_AXES:
            raise InputError(f"unknown slice axis '{self.sliceAxis}'")
        arguments = base_model_arguments(self.baseModel)
        arguments += ["--batch-size", str(int(self.batchSize)), "--device", self.device]
        for option, value in (("--epochs", self.epochs), ("--time-budget", self.timeBudgetSeconds),
                              ("--lr", self.learningRate), ("--img-size", self.imageSize)):
            if value:
                arguments += [option, str(value)]
        guided = self.isGuided()
        if self.atlas and not guided:
            raise InputError("an atlas of the training volumes is kept for guided models only: this training is "
                             "prompt-free (a prompt-free base model stays prompt-free)")
        return arguments + (["--guided"] if guided else []) + (["--atlas"] if self.atlas else [])

    def isGuided(self) -> bool:
        """Guided training: asked for, and not continuing a prompt-free model (which stays prompt-free)."""
        if not self.guided or self.baseModel == TINY_PRESET or self.baseModel.startswith(SAM_PREFIX):
            return self.guided
        return bool(models.read_model(self.baseModel).metadata.get("guidance"))


def move_into_folder(source: Path, target: Path) -> Path:
    """Copy ``source`` beside ``target`` under a temporary name, then rename it: the models folder never
    holds a partial bundle, even when the job folder is on another file system."""
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
    return target


class TrainingPairs:
    """The (volume, segmentation) pairs a model trains on besides the panel's current one, kept as node
    IDs so that a pair whose node was deleted drops out."""

    def __init__(self) -> None:
        self.ids: list[tuple[str, str]] = []

    def add(self, volumeNode, segmentationNode) -> None:
        """Add a pair (a pair already listed is not added twice)."""
        if volumeNode is None or segmentationNode is None:
            raise InputError("select a volume and its segmentation to add them as a training pair")
        pair = (volumeNode.GetID(), segmentationNode.GetID())
        if pair not in self.ids:
            self.ids.append(pair)

    def remove(self, index: int) -> None:
        if 0 <= index < len(self.ids):
            del self.ids[index]

    def nodes(self, scene) -> list[tuple]:
        """The listed pairs still in ``scene``, as (volume node, segmentation node)."""
        pairs = [(scene.GetNodeByID(v), scene.GetNodeByID(s)) for v, s in self.ids]
        return [(v, s) for v, s in pairs if v is not None and s is not None]

    def cohort(self, scene, volumeNode, segmentationNode) -> list[tuple]:
        """The current pair first, then the listed ones (without repeating the current pair)."""
        current = (volumeNode, segmentationNode)
        return [current] + [pair for pair in self.nodes(scene) if pair != current]

    def names(self, scene) -> list[str]:
        return [f"{v.GetName()} — {s.GetName()}" for v, s in self.nodes(scene)]


class HSAMTrainingLogic:
    """Segmentation node with a few annotated slices → fine-tuned HSAM bundle in the models folder."""

    def __init__(self, python: Optional[str] = None):
        self.python = python  # default: PythonSlicer in Slicer, else this interpreter

    def makeConfig(self, baseModel: str = TINY_PRESET, **options) -> TrainingOptions:
        """``TrainingOptions`` (checked now, so that mistakes surface before any work)."""
        config = TrainingOptions(baseModel, **options)
        config.arguments()
        return config

    def annotatedSlices(self, volumeNode, segmentationNode, axis: str = "axial") -> mrml.AnnotatedSlices:
        """Annotated slices of the segmentation on the volume's grid, with per-segment counts."""
        return mrml.annotated_slices(segmentationNode, volumeNode, axis)

    def prepare(self, volumeNode, segmentationNode, axis: str = "axial", guided: bool = False) -> TrainingData:
        """Read the volume and labels out of the scene (main thread); checks that training can start
        (``guided``: at least two annotated slices)."""
        volume = mrml.volume_from_node(volumeNode)
        labels, segments = mrml.labels_from_segmentation(segmentationNode, volumeNode)
        annotated = mrml.count_annotated_slices(labels, segments, axis)
        if not annotated.slices:
            raise InputError(f"segmentation '{segmentationNode.GetName()}' has no annotated {axis} slice")
        if annotated.missing:
            raise InputError(f"segments without any annotated slice: {', '.join(annotated.missing)}")
        if guided and len(annotated.slices) < 2:
            raise InputError(f"annotate at least 2 {axis} slices: the model learns each from the others")
        return TrainingData(volume, labels, segments, annotated, volumeNode.GetName())

    def prepareCohort(self, pairs: Sequence[tuple], axis: str = "axial", guided: bool = False) -> list[TrainingData]:
        """``prepare`` for several (volume node, segmentation node) pairs. Each pair needs an annotated
        slice (two when ``guided``); a segment may be missing from some pairs (classes are matched by
        name across pairs) but not from all."""
        if not pairs:
            raise InputError("add at least one (volume, segmentation) pair to train on")
        cohort = []
        for volumeNode, segmentationNode in pairs:
            volume = mrml.volume_from_node(volumeNode)
            labels, segments = mrml.labels_from_segmentation(segmentationNode, volumeNode)
            annotated = mrml.count_annotated_slices(labels, segments, axis)
            if not annotated.slices:
                raise InputError(f"segmentation '{segmentationNode.GetName()}' has no annotated {axis} slice")
            if guided and len(annotated.slices) < 2:
                raise InputError(f"annotate at least 2 {axis} slices of '{volumeNode.GetName()}': the model learns "
                                 "each from the others")
            cohort.append(TrainingData(volume, labels, segments, annotated, volumeNode.GetName()))
        annotatedSomewhere = {s.name.strip().casefold() for d in cohort for s in d.segments if s.name not in d.annotated.missing}
        missing = sorted({s.name for d in cohort for s in d.segments if s.name.strip().casefold() not in annotatedSomewhere})
        if missing:
            raise InputError(f"segments without any annotated slice: {', '.join(missing)}")
        return cohort

    def startFinetune(self, data: Union[TrainingData, Sequence[TrainingData]], config: TrainingOptions) -> WorkerJob:
        """Start fine-tuning on the annotated slices of ``data`` (one pair or a cohort) in a worker process."""
        cohort = [data] if isinstance(data, TrainingData) else list(data)
        arguments = config.arguments()
        job = WorkerJob(self.python, "hsam-finetune")
        try:
            manifest = [self._writeCase(job.folder, index, case) for index, case in enumerate(cohort)]
            (job.folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        except BaseException:
            job.cleanup()
            raise
        return job.start([
            "finetune", "--manifest", job.folder / MANIFEST_FILE, "--output", job.folder / MODEL_FILE,
            *arguments, "--axis", cohort[0].annotated.axis, "--progress", "json",
        ])

    @staticmethod
    def _writeCase(folder: Path, index: int, case: TrainingData) -> dict:
        """Write one pair into the job's folder; its manifest entry."""
        volumeFile, annotationsFile = VOLUME_FILE.format(index), ANNOTATIONS_FILE.format(index)
        write_volume(folder / volumeFile, case.volume)
        write_segmentation(folder / annotationsFile, case.labels, case.volume, case.segments)
        return {"image": volumeFile, "labels": annotationsFile, "slices": case.annotated.slices,
                "name": case.name or volumeFile}

    @staticmethod
    def atlasSummary(modelPath) -> str:
        """A sentence on the atlas a bundle keeps (its volumes and size), "" without one; no torch."""
        header, metadata = read_bundle(modelPath)
        volumes = ((metadata.guidance or {}).get("atlas") or {}).get("volumes")
        if not volumes:
            return ""
        return (f"It keeps an atlas of its {volumes} training volume{'s' if volumes > 1 else ''} "
                f"({atlas_bytes(header) / 2**20:.1f} MB): HSAM Segment segments new volumes with it, without painting.")

    def saveModel(self, job: WorkerJob, outputName: str, modelsFolder: Optional[Path] = None) -> Path:
        """Move a finished job's bundle into the models folder, named after ``outputName`` (made unique);
        then remove the job's folder. Raises if the job did not succeed."""
        try:
            job.check()
            return move_into_folder(job.folder / MODEL_FILE, models.unique_model_path(outputName, modelsFolder))
        finally:
            job.cleanup()

    def finetune(
        self,
        volumeNode,
        segmentationNode,
        outputName: str,
        config: TrainingOptions,
        onEvents: Optional[OnEvents] = None,
        modelsFolder: Optional[Path] = None,
    ) -> Path:
        """Fine-tune a model on the annotated slices of ``segmentationNode`` and wait; returns the bundle path."""
        data = self.prepare(volumeNode, segmentationNode, config.sliceAxis, config.isGuided())
        job = self.startFinetune(data, config)
        job.wait(on_events=onEvents)
        return self.saveModel(job, outputName, modelsFolder)

    def finetuneCohort(
        self,
        pairs: Sequence[tuple],
        outputName: str,
        config: TrainingOptions,
        onEvents: Optional[OnEvents] = None,
        modelsFolder: Optional[Path] = None,
    ) -> Path:
        """Fine-tune one model on the annotated slices of several (volume node, segmentation node) pairs
        and wait; returns the bundle path."""
        job = self.startFinetune(self.prepareCohort(pairs, config.sliceAxis, config.isGuided()), config)
        job.wait(on_events=onEvents)
        return self.saveModel(job, outputName, modelsFolder)
