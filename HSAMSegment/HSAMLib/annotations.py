"""The annotated-slice summary, kept up to date while the user paints, at the cost of what changed.

``AnnotationTracker`` observes a segmentation. A Segment Editor stroke fires ``RepresentationModified``
with the painted segment's ID; the next ``summary()`` counts again only the labelmap layer holding
that segment, over that layer's stored extent (Slicer shrinks it to the painted voxels after each
stroke), straight from the layer's voxels when the segmentation lies on the volume's grid (the
Segment Editor's default), else resampled onto it. No node is added to the scene.

Each segment is counted on its own, so a voxel painted in two overlapping segments (separate
layers) counts for both; fine-tuning itself reads the segments with ``mrml.labels_from_segmentation``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

from hsam.runtime.errors import InputError
from hsam.volumes.constants import SLICE_AXES

from . import mrml

SliceCounts = dict  # {slice index: voxel count}, annotated slices only


class AnnotationTracker:
    """Per-slice voxel counts of each segment of a segmentation on a volume's grid.

    ``follow()`` chooses what to track and starts observing; each change then calls ``onChanged()``
    (the panel restarts its timer) and ``summary()`` recounts what changed since the last call.
    ``stop()`` removes the observers (the panel is left).
    """

    def __init__(self, onChanged: Callable[[], None]):
        self._onChanged = onChanged
        self._target: Optional[tuple] = None  # (segmentation node, vtkSegmentation, volume node, axis)
        self._observed = None
        self._tags: list[int] = []
        self._counts: dict[str, SliceCounts] = {}  # segment ID -> counts
        self._stale: Optional[set] = None  # segment IDs to count again; None: all

    def follow(self, segmentationNode, volumeNode, axis: str) -> bool:
        """Track ``segmentationNode`` on ``volumeNode``'s grid along ``axis``. True when this changes
        what is tracked, or resumes after ``stop()``: everything is counted at the next ``summary()``."""
        segmentation = segmentationNode.GetSegmentation() if segmentationNode else None
        target = (segmentationNode, segmentation, volumeNode, axis)
        if self._observed is not None and self._sameTarget(target):
            return False
        self.stop()
        self._target, self._counts, self._stale = target, {}, None
        if segmentation is not None and volumeNode is not None:
            self._observed = segmentation
            self._tags = [segmentation.AddObserver(event, self._onEvent) for event in mrml.annotation_change_events()]
        return True

    def _sameTarget(self, target: tuple) -> bool:
        return all(a is b for a, b in zip(target[:3], self._target[:3])) and target[3] == self._target[3]

    def stop(self) -> None:
        """Stop observing (``follow()`` resumes and counts everything again)."""
        if self._observed is not None:
            for tag in self._tags:
                self._observed.RemoveObserver(tag)
        self._observed, self._tags = None, []

    @vtk.calldata_type(vtk.VTK_STRING)
    def _onEvent(self, caller, event, segmentId: Optional[str] = None) -> None:
        if segmentId is None:
            self._stale = None
        elif self._stale is not None:
            self._stale.add(segmentId)
        self._onChanged()

    def summary(self) -> Optional[mrml.AnnotatedSlices]:
        """Annotated slices per segment, counting again the layers changed since the last call;
        None when no segmentation or volume is tracked."""
        segmentationNode, segmentation, volumeNode, axis = self._target or (None, None, None, None)
        if segmentation is None or volumeNode is None:
            return None
        if volumeNode.GetImageData() is None:
            raise InputError(f"volume '{volumeNode.GetName()}' has no image data")
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        stale = [i for i in ids if self._stale is None or i in self._stale or i not in self._counts]
        for layer in sorted({segmentation.GetLayerIndex(i) for i in stale}):
            self._counts.update(self._countLayer(layer))
        self._stale = set()
        counts = {segmentation.GetSegment(i).GetName(): self._counts.get(i, {}) for i in ids}
        return mrml.AnnotatedSlices(axis, sorted({s for c in counts.values() for s in c}), counts)

    def _countLayer(self, layer: int) -> dict[str, SliceCounts]:
        """Counts of every segment in one layer of the source representation."""
        segmentationNode, segmentation, volumeNode, axis = self._target
        ids = list(segmentation.GetSegmentIDsForLayer(layer))
        image = segmentation.GetLayerDataObject(layer)
        if on_grid(image, segmentationNode, volumeNode):
            values = [segmentation.GetSegment(i).GetLabelValue() for i in ids]
        else:  # another grid, a transform between them or no labelmap source: resample onto the volume
            image, values = mrml.merged_labelmap(segmentationNode, ids, volumeNode), range(1, len(ids) + 1)
        return dict(zip(ids, slice_counts(image, values, volumeNode.GetImageData().GetExtent(), axis)))


def on_grid(image, segmentationNode, volumeNode) -> bool:
    """True when ``image`` is a labelmap on the volume's voxel lattice, in the same coordinate frame."""
    if image is None or not image.IsA("vtkOrientedImageData"):
        return False
    if segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        return False
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    imageToWorld = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return bool(np.allclose(imageToWorld, mrml.ijk_to_ras(volumeNode), atol=1e-6))


def slice_counts(image, labelValues: Sequence[int], gridExtent: Sequence[int], axis: str) -> list[SliceCounts]:
    """Voxels per slice along ``axis`` for each label value of a labelmap on the grid's lattice, over
    the part of its extent inside the grid (extents are VTK's: i, j, k ranges)."""
    extent = image.GetExtent()
    low = [max(extent[2 * d], gridExtent[2 * d]) for d in range(3)]
    high = [min(extent[2 * d + 1], gridExtent[2 * d + 1]) for d in range(3)]
    scalars = image.GetPointData().GetScalars()
    if scalars is None or any(lo > hi for lo, hi in zip(low, high)):
        return [{} for _ in labelValues]
    array = numpy_support.vtk_to_numpy(scalars).reshape(image.GetDimensions()[::-1])  # (k, j, i)
    inside = array[tuple(slice(low[d] - extent[2 * d], high[d] - extent[2 * d] + 1) for d in (2, 1, 0))]
    dimension = 2 - SLICE_AXES[axis]  # VTK index (i, j, k) of the slice axis
    first = low[dimension] - gridExtent[2 * dimension]
    rows = np.moveaxis(inside, SLICE_AXES[axis], 0).reshape(inside.shape[SLICE_AXES[axis]], -1)
    slices, columns = np.nonzero(rows)
    values = rows[slices, columns]
    counts = []
    for value in labelValues:
        perSlice = np.bincount(slices[values == value], minlength=rows.shape[0])
        counts.append({first + int(i): int(perSlice[i]) for i in np.flatnonzero(perSlice)})
    return counts
