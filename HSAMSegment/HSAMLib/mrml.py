"""MRML nodes ⇄ engine data: volumes, labelmaps and segments.

Slicer stores geometry as an IJK→RAS matrix; the engine uses SimpleITK's LPS convention (spacing,
origin and a row-major direction matrix). Conversions happen here and nowhere else. Only MRML, vtk
and numpy are used, so everything runs against a bare ``vtkMRMLScene``.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from hsam.runtime.errors import InputError
from hsam.volumes.constants import SLICE_AXES
from hsam.volumes.files import write_atomic
from hsam.volumes.segmentation import Segment
from hsam.volumes.volume import Volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# Label value a segment had in the engine's labelmap; kept so that exported labelmaps reuse it.
LABEL_VALUE_TAG = "HSAM.LabelValue"


def ijk_to_ras(volumeNode) -> np.ndarray:
    """The volume's 4×4 IJK→RAS matrix."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras_from_volume(volume: Volume) -> np.ndarray:
    """The IJK→RAS matrix Slicer uses for an engine ``Volume`` (LPS geometry)."""
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = RAS_TO_LPS @ direction @ np.diag(volume.spacing)
    matrix[:3, 3] = RAS_TO_LPS @ np.asarray(volume.origin, dtype=float)
    return matrix


def _volume_array(volumeNode) -> np.ndarray:
    """Voxels (z, y, x) of a scalar volume node, copied."""
    name = volumeNode.GetName()
    image = volumeNode.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{name}' has no image data")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(f"volume '{name}' has {components} components per voxel; HSAM needs a grey-level volume")
    dims = image.GetDimensions()
    if sum(d > 1 for d in dims) < 2:
        raise InputError(f"volume '{name}' has dimensions {dims}; HSAM needs an image or a 3D volume")
    return _image_array(image)


def volume_from_node(volumeNode) -> Volume:
    """Engine ``Volume`` (array (z, y, x), LPS geometry) of a scalar volume node.

    The node's parent transform is ignored: HSAM segments the voxels on their own grid and the
    result is placed on that same grid.
    """
    if volumeNode is None:
        raise InputError("no input volume selected")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{volumeNode.GetName()}' is a {volumeNode.GetClassName()}; HSAM needs a scalar volume")
    return _volume_on_grid(_volume_array(volumeNode), ijk_to_ras(volumeNode))


def _volume_on_grid(array: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> Volume:
    """Engine ``Volume`` of voxels (z, y, x) whose first voxel is IJK (0, 0, 0) of the 4×4 IJK→RAS matrix."""
    ijk_to_lps = RAS_TO_LPS @ ijk_to_ras_matrix[:3]
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    return Volume(
        array,
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in ijk_to_lps[:3, 3]),
        tuple(float(d) for d in direction.ravel()),
    )


# --- oriented images (the Segment Editor's labelmaps and aligned source volume) ---------------------


def oriented_image_to_ras(image) -> np.ndarray:
    """4×4 matrix from the voxel at the start of ``image``'s extent (array index 0) to RAS."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    result = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = image.GetExtent()
    result[:3, 3] += result[:3, :3] @ np.array([extent[0], extent[2], extent[4]], dtype=float)
    return result


def extent_shape(extent: Sequence[int]) -> tuple[int, int, int]:
    """(z, y, x) size of a VTK extent (0 where it is empty)."""
    return tuple(max(0, extent[2 * a + 1] - extent[2 * a] + 1) for a in (2, 1, 0))


def oriented_image_array(image, extent: Optional[Sequence[int]] = None) -> np.ndarray:
    """Voxels (z, y, x) of an oriented image over ``extent`` (default: its own), zero where the image
    has none (outside its extent, or no scalars at all: an empty segment)."""
    extent = list(image.GetExtent() if extent is None else extent)
    out_shape = extent_shape(extent)
    scalars = image.GetPointData().GetScalars() if image.GetPointData() is not None else None
    own = image.GetExtent()
    if scalars is None or min(extent_shape(own)) == 0:
        return np.zeros(out_shape, dtype=np.uint8)
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(extent_shape(own))
    if list(own) == extent:
        return voxels.copy()
    out = np.zeros(out_shape, dtype=voxels.dtype)
    source, target = [], []
    for a in (2, 1, 0):  # z, y, x
        low, high = max(own[2 * a], extent[2 * a]), min(own[2 * a + 1], extent[2 * a + 1])
        if low > high:
            return out
        source.append(slice(low - own[2 * a], high - own[2 * a] + 1))
        target.append(slice(low - extent[2 * a], high - extent[2 * a] + 1))
    out[tuple(target)] = voxels[tuple(source)]
    return out


def volume_from_oriented_image(image) -> Volume:
    """Engine ``Volume`` of an oriented image (e.g. the Segment Editor's aligned source volume)."""
    view = volume_view(image)
    return Volume(view.array.copy(), view.spacing, view.origin, view.direction)


def volume_view(image) -> Volume:
    """``volume_from_oriented_image`` without copying: the voxels are a view of the image's, to read
    (e.g. write to a file) while the image lives and stays unchanged."""
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError("the source volume has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError("the source volume has several components per voxel; HSAM needs a grey-level volume")
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(extent_shape(image.GetExtent()))
    return _volume_on_grid(voxels, oriented_image_to_ras(image))


def oriented_image_from_array(array: np.ndarray, geometry):
    """A ``vtkOrientedImageData`` holding ``array`` (z, y, x) on the grid and extent of ``geometry``."""
    extent = geometry.GetExtent()
    if array.shape != extent_shape(extent):
        raise InputError(f"array of shape {array.shape} does not fit the extent {tuple(extent)}")
    image = slicer.vtkOrientedImageData()
    image.SetExtent(extent)
    image.SetSpacing(geometry.GetSpacing())
    image.SetOrigin(geometry.GetOrigin())
    image.CopyDirections(geometry)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    return image


def _set_image(volumeNode, array: np.ndarray) -> None:
    """Replace the node's voxels with ``array`` (z, y, x)."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    volumeNode.SetAndObserveImageData(image)


def _set_ijk_to_ras(volumeNode, matrix: np.ndarray) -> None:
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, float(matrix[r, c]))
    volumeNode.SetIJKToRASMatrix(vtk_matrix)


def node_from_volume(volume: Volume, scene, name: str = "Volume", labelmap: bool = False):
    """Add a scalar (or labelmap) volume node holding an engine ``Volume``."""
    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    _set_image(node, np.asarray(volume.array))
    _set_ijk_to_ras(node, ijk_to_ras_from_volume(volume))
    node.CreateDefaultDisplayNodes()
    return node


def _grid_shape(volumeNode) -> tuple[int, int, int]:
    return tuple(volumeNode.GetImageData().GetDimensions()[::-1])


class _TemporaryLabelmap:
    """A labelmap node added to the scene for one conversion and always removed afterwards; it sits
    under the same parent transform as ``referenceVolumeNode``."""

    def __init__(self, referenceVolumeNode):
        self.scene = referenceVolumeNode.GetScene()
        self.transformNodeID = referenceVolumeNode.GetTransformNodeID()
        self.node = None

    def __enter__(self):
        self.node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__HSAM_temporary_labelmap")
        self.node.SetAndObserveTransformNodeID(self.transformNodeID)
        return self.node

    def __exit__(self, *exc) -> None:
        self.scene.RemoveNode(self.node)


def _string_array(values: Sequence[str]) -> vtk.vtkStringArray:
    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def labels_to_segmentation(
    labels: np.ndarray, segments: Sequence[Segment], referenceVolumeNode, segmentationNode=None, name: str = "HSAM"
):
    """Write a labelmap (z, y, x) on the reference volume's grid into a segmentation node.

    One segment per entry of ``segments`` (name, colour, terminology; voxels where ``labels`` equals
    its ``label_value``). A given ``segmentationNode`` has all its segments replaced; otherwise a
    new node is added. Returns the segmentation node.
    """
    shape = _grid_shape(referenceVolumeNode)
    if labels.shape != shape:
        raise InputError(f"labelmap shape {labels.shape} does not match volume '{referenceVolumeNode.GetName()}' {shape}")
    if not segments:
        raise InputError("no segments to write")
    ordinal = np.zeros(labels.shape, dtype=np.uint8 if len(segments) < 256 else np.uint16)
    for index, segment in enumerate(segments, start=1):
        ordinal[labels == segment.label_value] = index

    scene = referenceVolumeNode.GetScene()
    if segmentationNode is None:
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    segmentationNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
    segmentation = segmentationNode.GetSegmentation()
    terminology_tag = slicer.vtkSegment.GetTerminologyEntryTagName()

    with _TemporaryLabelmap(referenceVolumeNode) as labelmapNode:
        _set_image(labelmapNode, ordinal)
        _set_ijk_to_ras(labelmapNode, ijk_to_ras(referenceVolumeNode))
        wasModifying = segmentationNode.StartModify()
        try:
            segmentation.RemoveAllSegments()
            ids = []
            for segment in segments:
                segment_id = segmentation.AddEmptySegment("", segment.name, list(segment.color))
                added = segmentation.GetSegment(segment_id)
                added.SetTag(LABEL_VALUE_TAG, str(int(segment.label_value)))
                if segment.terminology:
                    added.SetTag(terminology_tag, segment.terminology)
                ids.append(segment_id)
            imported = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmapNode, segmentationNode, _string_array(ids)
            )
            if not imported:
                raise InputError(f"could not import the labelmap into '{segmentationNode.GetName()}'")
        finally:
            segmentationNode.EndModify(wasModifying)
    return segmentationNode


def _segment_label_value(segment, default: int) -> int:
    value = _tag(segment, LABEL_VALUE_TAG)
    return int(value) if value and value.isdigit() else default


def _tag(segment, name: str) -> Optional[str]:
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) and str(value) else None


def segments_of(segmentationNode) -> list[tuple[str, Segment]]:
    """(segment id, ``Segment``) for each segment, label values 1..N in segment order."""
    segmentation = segmentationNode.GetSegmentation()
    terminology_tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    result = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        color = tuple(float(c) for c in segment.GetColor())
        result.append(
            (segmentation.GetNthSegmentID(index), Segment(segment.GetName(), index + 1, color, _tag(segment, terminology_tag)))
        )
    return result


def labels_from_segmentation(segmentationNode, referenceVolumeNode) -> tuple[np.ndarray, list[Segment]]:
    """Labelmap (z, y, x) of every segment on the reference volume's grid, and the segments.

    Segment ``i`` (0-based, in the node's order) gets label ``i + 1``. Works for segments stored in
    separate or shared layers and for segmentations with another geometry than the volume (they
    are resampled onto the volume's grid). Where segments overlap, the later one wins.
    """
    if segmentationNode is None:
        raise InputError("no segmentation selected")
    if referenceVolumeNode is None:
        raise InputError("no reference volume selected")
    entries = segments_of(segmentationNode)
    if not entries:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' has no segments")
    image = merged_labelmap(segmentationNode, [segment_id for segment_id, _ in entries], referenceVolumeNode)
    if image.GetExtent() != referenceVolumeNode.GetImageData().GetExtent():
        raise InputError(f"segmentation '{segmentationNode.GetName()}' could not be resampled onto the volume grid")
    return _image_array(image), [segment for _, segment in entries]


def merged_labelmap(segmentationNode, segmentIds: Sequence[str], referenceVolumeNode):
    """The given segments as one ``vtkOrientedImageData`` on the reference volume's grid (whole extent),
    segment ``i`` with label ``i + 1``, the later one winning where they overlap.

    No node is added to the scene: ``ExportSegmentsToLabelmapNode`` would add a display node and a
    colour table (``…_ColorTable``) for the output labelmap, which outlive it.
    """
    segmentation = segmentationNode.GetSegmentation()
    if not segmentation.CreateRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()):
        raise InputError(f"segmentation '{segmentationNode.GetName()}' cannot be converted to a labelmap")
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentationNode, referenceVolumeNode, _string_array(segmentIds), slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, image
    )
    return image


def _image_array(image) -> np.ndarray:
    """Voxels (z, y, x) of a ``vtkImageData`` over its extent, copied."""
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


@dataclass
class AnnotatedSlices:
    """Which slices along ``axis`` carry annotations, per segment."""

    axis: str
    slices: list[int]  # slices with any segment, ascending
    counts: dict[str, dict[int, int]]  # segment name -> {slice index: voxel count}, annotated slices only

    @property
    def missing(self) -> list[str]:
        """Segments without any annotated slice."""
        return [name for name, per_slice in self.counts.items() if not per_slice]

    def summary(self) -> str:
        lines = [f"{len(self.slices)} annotated {self.axis} slice(s)"]
        for name, per_slice in self.counts.items():
            lines.append(f"{name}: {len(per_slice)} slice(s)" if per_slice else f"{name}: no annotated slice")
        return "\n".join(lines)


def count_annotated_slices(labels: np.ndarray, segments: Sequence[Segment], axis: str = "axial") -> AnnotatedSlices:
    """Per-segment voxel counts of each slice along ``axis`` of a labelmap (z, y, x)."""
    if axis not in SLICE_AXES:
        raise InputError(f"unknown slice axis '{axis}' (choose from {', '.join(SLICE_AXES)})")
    moved = np.moveaxis(labels, SLICE_AXES[axis], 0).reshape(labels.shape[SLICE_AXES[axis]], -1)
    counts = {}
    for segment in segments:
        per_slice = np.count_nonzero(moved == segment.label_value, axis=1)
        counts[segment.name] = {int(i): int(per_slice[i]) for i in np.flatnonzero(per_slice)}
    slices = sorted({i for per_slice in counts.values() for i in per_slice})
    return AnnotatedSlices(axis, slices, counts)


def annotation_change_events() -> tuple[int, ...]:
    """``vtkSegmentation`` events that mean the annotations changed: painting (the Segment Editor
    modifies a segment's labelmap), adding, removing or renaming a segment."""
    segmentation = slicer.vtkSegmentation
    return (segmentation.RepresentationModified, segmentation.SegmentAdded, segmentation.SegmentRemoved,
            segmentation.SegmentModified)


def annotated_slices(segmentationNode, referenceVolumeNode, axis: str = "axial") -> AnnotatedSlices:
    """Annotated slices of a segmentation on the volume's grid."""
    labels, segments = labels_from_segmentation(segmentationNode, referenceVolumeNode)
    return count_annotated_slices(labels, segments, axis)


def safe_file_stem(name: str) -> str:
    """A node name made safe to use as a file name."""
    cleaned = re.sub(r"[^A-Za-z0-9._ -]+", "_", name).strip(" ._")
    return cleaned or "segmentation"


def _write_atomically(storageNode, node, path: Path) -> Path:
    """Write ``node`` with ``storageNode`` through ``hsam.volumes.files.write_atomic`` (complete or nothing,
    the umask's mode, a recognisable temporary), replacing an existing file."""

    def write(temporary: Path) -> None:
        storageNode.SetFileName(str(temporary))
        if not storageNode.WriteData(node):
            raise OSError("the storage node could not write it")

    write_atomic(path, write, overwrite=True)
    return path


def export_segmentation(segmentationNode, path) -> Path:
    """Write the segmentation as ``.seg.nrrd`` (names, colours, terminology kept)."""
    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise InputError(f"{path.name}: a segmentation file must end with .seg.nrrd")
    storageNode = segmentationNode.CreateDefaultStorageNode()
    return _write_atomically(storageNode, segmentationNode, path)


def export_labelmap(segmentationNode, referenceVolumeNode, path) -> Path:
    """Write the segmentation as a labelmap ``.nrrd`` on the reference volume's grid.

    Each segment keeps the label value the model gave it (``LABEL_VALUE_TAG``), else its position
    1..N in the segmentation.
    """
    path = Path(path)
    if path.suffix != ".nrrd" or path.name.endswith(".seg.nrrd"):
        raise InputError(f"{path.name}: a labelmap file must end with .nrrd (not .seg.nrrd)")
    labels, segments = labels_from_segmentation(segmentationNode, referenceVolumeNode)
    segmentation = segmentationNode.GetSegmentation()
    values = [_segment_label_value(segmentation.GetNthSegment(i), i + 1) for i in range(len(segments))]
    output = np.zeros(labels.shape, dtype=np.uint8 if max(values) < 256 else np.uint16)
    for segment, value in zip(segments, values):
        output[labels == segment.label_value] = value
    with _TemporaryLabelmap(referenceVolumeNode) as labelmapNode:
        _set_image(labelmapNode, output)
        _set_ijk_to_ras(labelmapNode, ijk_to_ras(referenceVolumeNode))
        storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storageNode.SetUseCompression(True)
        return _write_atomically(storageNode, labelmapNode, path)
