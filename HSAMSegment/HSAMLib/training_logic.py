"""Few-shot fine-tuning from MRML nodes: a volume and a segmentation with a few annotated slices.

``finetune()`` does everything in one call. The GUI splits it: ``prepare`` (MRML, main thread) →
``train`` (background thread, no MRML) → the saved bundle's path.
"""

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from hsam.errors import InputError
from hsam.io import Segment, Volume

from . import models, mrml


@dataclass
class TrainingData:
    """What fine-tuning needs, extracted from the scene."""

    volume: Volume
    labels: np.ndarray  # (z, y, x), label i+1 = segments[i]
    segments: list[Segment]
    annotated: mrml.AnnotatedSlices


TINY_PRESET = "tiny"
SAM_PREFIX = "sam:"


def base_model_options(baseModel: str) -> dict:
    """``FinetuneConfig`` fields for a base model: ``"tiny"`` (trained from scratch),
    ``"sam:<vit_b|vit_l|vit_h>"`` (official SAM weights, downloaded) or the path of an HSAM bundle."""
    if baseModel == TINY_PRESET:
        return {"preset": TINY_PRESET}
    if baseModel.startswith(SAM_PREFIX):
        name = baseModel[len(SAM_PREFIX):]
        path = models.sam_weights_path(name)
        if name not in models.available_sam_weights():
            raise InputError(
                f"the official SAM {name} weights are not downloaded: download them in the HSAMSegment module "
                f"or copy {path.name} into {path.parent}"
            )
        return {"preset": name, "sam_checkpoint": path}
    entry = models.read_model(baseModel)
    return {"preset": entry.metadata.preset, "base_bundle": entry.path}


class HSAMTrainingLogic:
    """Segmentation node with a few annotated slices → fine-tuned HSAM bundle in the models folder."""

    def makeConfig(
        self,
        baseModel: str = TINY_PRESET,
        epochs: Optional[int] = None,
        timeBudgetSeconds: Optional[float] = None,
        learningRate: Optional[float] = None,
        batchSize: int = 2,
        device: str = "auto",
        sliceAxis: str = "axial",
    ):
        """An ``hsam.training.FinetuneConfig``. Training stops after ``epochs`` or ``timeBudgetSeconds``,
        whichever comes first; options left at None (or 0) keep the engine's defaults."""
        from hsam.training import FinetuneConfig

        if sliceAxis not in mrml.SLICE_AXES:
            raise InputError(f"unknown slice axis '{sliceAxis}'")
        return FinetuneConfig(
            **base_model_options(baseModel),
            epochs=epochs,
            time_budget=timeBudgetSeconds or None,
            learning_rate=learningRate or None,
            batch_size=batchSize,
            device=device,
            slice_axis=sliceAxis,
        )

    def annotatedSlices(self, volumeNode, segmentationNode, axis: str = "axial") -> mrml.AnnotatedSlices:
        """Annotated slices of the segmentation on the volume's grid, with per-segment counts."""
        return mrml.annotated_slices(segmentationNode, volumeNode, axis)

    def prepare(self, volumeNode, segmentationNode, axis: str = "axial") -> TrainingData:
        """Read the volume and labels out of the scene (main thread); checks that training can start."""
        volume = mrml.volume_from_node(volumeNode)
        labels, segments = mrml.labels_from_segmentation(segmentationNode, volumeNode)
        annotated = mrml.count_annotated_slices(labels, segments, axis)
        if not annotated.slices:
            raise InputError(f"segmentation '{segmentationNode.GetName()}' has no annotated {axis} slice")
        if annotated.missing:
            raise InputError(f"segments without any annotated slice: {', '.join(annotated.missing)}")
        return TrainingData(volume, labels, segments, annotated)

    def train(
        self,
        data: TrainingData,
        outputName: str,
        config,
        progress: Optional[Callable] = None,
        cancel: Optional[threading.Event] = None,
        modelsFolder: Optional[Path] = None,
    ) -> Path:
        """Fine-tune on ``data`` and save the bundle (no MRML; safe in a worker thread).

        ``config`` is an ``hsam.training.FinetuneConfig``; its slices default to the annotated ones
        and its axis to the one ``data`` was counted along. Returns the bundle's path: a new
        file in the models folder, named after ``outputName`` (made unique). Nothing is written
        when cancelled (``hsam.Cancelled``).
        """
        from hsam.bundle import save_bundle
        from hsam.training import finetune

        config = replace(
            config,
            slices=config.slices if config.slices is not None else data.annotated.slices,
            slice_axis=data.annotated.axis,
        )
        result = finetune(data.volume, data.labels, data.segments, config, progress=progress, cancel=cancel)
        return save_bundle(models.unique_model_path(outputName, modelsFolder), result.model, result.metadata)

    def finetune(
        self,
        volumeNode,
        segmentationNode,
        outputName: str,
        config,
        progress: Optional[Callable] = None,
        cancel: Optional[threading.Event] = None,
        modelsFolder: Optional[Path] = None,
    ) -> Path:
        """Fine-tune a model on the annotated slices of ``segmentationNode``; returns the bundle path."""
        data = self.prepare(volumeNode, segmentationNode, config.slice_axis)
        return self.train(data, outputName, config, progress, cancel, modelsFolder)
