"""Segment a volume node with an HSAM model bundle; export segmentations. Usable without the GUI.

``segment()`` does everything in one call. The GUI splits it so that only ``predict()`` runs in a
background thread and MRML is touched on the main thread: ``volume_from_node`` → ``predict`` →
``write_result``.
"""

import threading
from pathlib import Path
from typing import Callable, Optional

from hsam.errors import InputError
from hsam.io import Segment, Volume

from . import mrml

Progress = Callable[[float, str], None]


def segments_from_metadata(metadata) -> list[Segment]:
    """One ``Segment`` per class of a bundle (names, colours, label values, terminology)."""
    terminology = metadata.terminology or [None] * metadata.num_classes
    return [
        Segment(name, int(value), tuple(color), term)
        for name, value, color, term in zip(
            metadata.class_names, metadata.label_values, metadata.class_colors, terminology
        )
    ]


class HSAMSegmentLogic:
    """Volume node + model bundle → segmentation node. Keeps the last loaded model in memory."""

    def __init__(self):
        self._loaded: Optional[tuple[tuple, object, object]] = None  # (key, model, metadata)

    def loadModel(self, modelPath, device: str = "auto"):
        """(model, metadata) of a bundle on ``device``; reused while the file is unchanged."""
        from hsam.bundle import load_bundle
        from hsam.inference import select_device

        path = Path(modelPath)
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        torch_device = select_device(device)
        key = (str(path.resolve()), path.stat().st_mtime_ns, str(torch_device))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous model before loading the next one
            model, metadata = load_bundle(path, map_location=torch_device)
            self._loaded = (key, model, metadata)
        return self._loaded[1], self._loaded[2]

    def predict(
        self,
        volume: Volume,
        modelPath,
        device: str = "auto",
        batchSize: int = 4,
        sliceRange: Optional[tuple[int, int]] = None,
        progress: Optional[Progress] = None,
        cancel: Optional[threading.Event] = None,
    ):
        """Run the model on an engine volume (no MRML; safe in a worker thread).

        Returns ``(labels (z, y, x), metadata)``; raises ``hsam.Cancelled`` when cancelled.
        """
        from hsam.inference import segment_volume

        model, metadata = self.loadModel(modelPath, device)
        result = segment_volume(
            model,
            volume,
            metadata,
            device=device,
            batch_size=batchSize,
            slice_range=sliceRange,
            progress=progress,
            cancel=cancel,
        )
        return result.labels, metadata

    def writeResult(self, labels, metadata, volumeNode, segmentationNode=None):
        """Put predicted labels into a (new or overwritten) segmentation node, on the main thread."""
        name = f"{volumeNode.GetName()} HSAM"
        return mrml.labels_to_segmentation(labels, segments_from_metadata(metadata), volumeNode, segmentationNode, name)

    def segment(
        self,
        volumeNode,
        modelPath,
        segmentationNode=None,
        device: str = "auto",
        batchSize: int = 4,
        sliceRange: Optional[tuple[int, int]] = None,
        progress: Optional[Progress] = None,
        cancel: Optional[threading.Event] = None,
    ):
        """Segment ``volumeNode`` with the bundle at ``modelPath``; returns the segmentation node.

        ``segmentationNode`` is overwritten if given, else a new node is added. When cancelled,
        ``hsam.Cancelled`` is raised and the scene is left unchanged.
        """
        volume = mrml.volume_from_node(volumeNode)
        labels, metadata = self.predict(volume, modelPath, device, batchSize, sliceRange, progress, cancel)
        return self.writeResult(labels, metadata, volumeNode, segmentationNode)

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
