"""Volume and segmentation files: geometry kept, bad input rejected, Slicer-compatible .seg.nrrd."""

import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.runtime.errors import HSAMWarning, InputError
from hsam.volumes.segmentation import Segment, read_labelmap, write_labelmap, write_output, write_segmentation
from hsam.volumes.volume import Volume, read_volume, write_raw_nrrd, write_volume

SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-12.5, 40.25, 101.0)
ANGLE = math.radians(30)
ROTATION_Z = (math.cos(ANGLE), -math.sin(ANGLE), 0.0, math.sin(ANGLE), math.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)
LIVER = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)


def make_volume(shape=(6, 7, 8), dtype=np.int16) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=shape).astype(dtype)
    return Volume(array, SPACING, ORIGIN, ROTATION_Z)


def make_labels(shape=(6, 7, 8)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:4, 2:5, 3:7] = 3
    labels[4, 5, 6] = 7
    return labels


def assert_same_geometry(volume: Volume, expected: Volume, atol: float) -> None:
    assert volume.array.shape == expected.array.shape
    np.testing.assert_allclose(volume.spacing, expected.spacing, atol=atol)
    np.testing.assert_allclose(volume.origin, expected.origin, atol=atol)
    np.testing.assert_allclose(volume.direction, expected.direction, atol=atol)


# ------------------------------------------------------------------------------------ volumes


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_volume_round_trip_keeps_geometry_and_voxels(tmp_path, suffix, dtype):
    volume = make_volume(dtype=dtype)
    path = tmp_path / f"ct{suffix}"
    write_volume(path, volume)
    read = read_volume(path)
    assert read.array.dtype == dtype
    np.testing.assert_array_equal(read.array, volume.array)
    assert_same_geometry(read, volume, atol=1e-5)
    assert read.same_geometry(volume)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_raw_nrrd_round_trip_keeps_geometry_and_voxels(tmp_path, dtype):
    volume = make_volume(dtype=dtype)
    path = tmp_path / "volume.nrrd"
    write_raw_nrrd(path, volume)
    read = read_volume(path)
    assert read.array.dtype == dtype and b"encoding: raw" in path.read_bytes()[:400]
    np.testing.assert_array_equal(read.array, volume.array)
    assert_same_geometry(read, volume, atol=1e-6)
    with pytest.raises(InputError, match="exists"):
        write_raw_nrrd(path, volume)


def test_float64_volume_is_read_as_float32(tmp_path):
    image = sitk.GetImageFromArray(np.linspace(0, 1, 60).reshape(3, 4, 5))
    sitk.WriteImage(image, str(tmp_path / "f.nrrd"))
    assert read_volume(tmp_path / "f.nrrd").array.dtype == np.float32


def write_dicom_series(folder, volume: Volume) -> None:
    """One CT file per slice, with the tags a scanner writes and GDCM uses to rebuild the 3D geometry."""
    folder.mkdir()
    direction = np.asarray(volume.direction).reshape(3, 3)
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1]))
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.array.shape[0]):
        position = np.asarray(volume.origin) + direction[:, 2] * volume.spacing[2] * k
        # GDCM writes Image Position/Orientation and Pixel Spacing from the image geometry.
        image = Volume(volume.array[k : k + 1], volume.spacing, tuple(position), volume.direction).to_sitk()
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10g}" for v in position),
            "0020|0037": orientation,
            "0028|0030": f"{volume.spacing[1]:.10g}\\{volume.spacing[0]:.10g}",
            "0018|0050": f"{volume.spacing[2]:.10g}",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


def test_dicom_series_geometry(tmp_path):
    volume = make_volume()
    write_dicom_series(tmp_path / "series", volume)
    read = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(read.array, volume.array)
    assert_same_geometry(read, volume, atol=1e-4)


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path / "empty")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "nothing.nrrd")
    (tmp_path / "garbage.nrrd").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read garbage.nrrd"):
        read_volume(tmp_path / "garbage.nrrd")


def test_2d_4d_vector_and_nan_are_rejected(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    with pytest.raises(InputError, match="2D image"):
        read_volume(tmp_path / "slice.nrrd")

    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(tmp_path / "series.nii.gz"))
    with pytest.raises(InputError, match="4D image"):
        read_volume(tmp_path / "series.nii.gz")

    rgb = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match="3 components"):
        read_volume(tmp_path / "rgb.mha")

    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="2 NaN or infinite"):
        read_volume(tmp_path / "nan.nrrd")


# ------------------------------------------------------------------------------------ labelmaps


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_labelmap_round_trip(tmp_path, suffix):
    volume, labels = make_volume(), make_labels()
    path = tmp_path / f"labels{suffix}"
    write_labelmap(path, labels, volume)
    read, segments = read_labelmap(path, reference=volume, resample=False)
    np.testing.assert_array_equal(read, labels)
    assert read.dtype == np.uint8
    assert [(s.name, s.label_value) for s in segments] == [("Label_3", 3), ("Label_7", 7)]
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt8


def test_large_label_values_are_written_as_uint16(tmp_path):
    volume, labels = make_volume(), make_labels().astype(np.int32)
    labels[0, 0, 0] = 300
    write_labelmap(tmp_path / "labels.nrrd", labels, volume)
    assert sitk.ReadImage(str(tmp_path / "labels.nrrd")).GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(read_labelmap(tmp_path / "labels.nrrd")[0], labels)


def test_labelmap_with_other_grid_is_resampled_onto_the_volume_only_when_asked(tmp_path):
    """A coarser labelmap (2× spacing, shifted by half a fine voxel) covering part of the volume
    lands on the fine voxels whose centres fall inside its voxel; without ``resample`` it is refused."""
    volume = Volume(np.zeros((12, 12, 14), np.int16), (1.0, 1.0, 2.0), (5.0, -3.0, 7.0), ROTATION_Z)
    coarse = np.zeros((3, 4, 5), np.uint8)
    coarse[1, 2, 3] = 4  # (z, y, x)
    direction = np.asarray(ROTATION_Z).reshape(3, 3)
    start = np.array([2.5, 4.5, 6.5])  # (x, y, z) fine index of the coarse grid's first voxel centre
    origin = np.asarray(volume.origin) + direction @ (start * np.asarray(volume.spacing))
    small = Volume(coarse, (2.0, 2.0, 4.0), tuple(origin), ROTATION_Z)
    write_labelmap(tmp_path / "coarse.nrrd", coarse, small)

    labels, segments = read_labelmap(tmp_path / "coarse.nrrd", reference=volume, resample=True)
    # fine x maps to coarse (x − 2.5)/2, which rounds to 3 for x in {8, 9}; y → 2 and z → 1 likewise.
    expected = np.zeros(volume.array.shape, np.uint8)
    expected[8:10, 8:10, 8:10] = 4
    np.testing.assert_array_equal(labels, expected)
    assert [s.label_value for s in segments] == [4]

    with pytest.raises(InputError, match="not on the volume's voxel grid .*spacing"):
        read_labelmap(tmp_path / "coarse.nrrd", reference=volume)


def test_cropped_labelmap_on_the_same_lattice_is_pasted_exactly(tmp_path):
    volume = make_volume()
    labels = make_labels()
    crop = labels[1:5, 2:6, 3:8]
    direction = np.asarray(ROTATION_Z).reshape(3, 3)
    origin = np.asarray(ORIGIN) + direction @ (np.array([3, 2, 1]) * np.asarray(SPACING))
    write_labelmap(tmp_path / "crop.nrrd", crop, Volume(crop, SPACING, tuple(origin), ROTATION_Z))
    read, _ = read_labelmap(tmp_path / "crop.nrrd", reference=volume, resample=False)
    np.testing.assert_array_equal(read, labels)


def test_non_integer_and_negative_labelmaps_are_rejected(tmp_path):
    volume = make_volume()
    sitk.WriteImage(volume.to_sitk(np.full(volume.array.shape, 0.5, np.float32)), str(tmp_path / "half.nrrd"))
    with pytest.raises(InputError, match="non-integer"):
        read_labelmap(tmp_path / "half.nrrd")
    with pytest.raises(InputError, match="negative"):
        write_labelmap(tmp_path / "neg.nrrd", -make_labels().astype(np.int16), volume)
    with pytest.raises(InputError, match="do not match"):
        write_labelmap(tmp_path / "small.nrrd", np.zeros((2, 2, 2), np.uint8), volume)


# ------------------------------------------------------------------------------------ .seg.nrrd

SEGMENTS = [
    Segment("liver", 3, (0.8, 0.4, 0.2), LIVER),
    Segment("lesion", 7, (0.1, 0.9, 0.3)),
]


def test_segmentation_is_read_by_slicerio(tmp_path):
    slicerio = pytest.importorskip("slicerio")
    volume, labels = make_volume(), make_labels()
    path = tmp_path / "out.seg.nrrd"
    write_segmentation(path, labels, volume, SEGMENTS)

    segmentation = slicerio.read_segmentation(str(path))
    read = {s["name"]: s for s in segmentation["segments"]}
    assert set(read) == {"liver", "lesion"}
    for segment in SEGMENTS:
        assert read[segment.name]["labelValue"] == segment.label_value
        np.testing.assert_allclose(read[segment.name]["color"], segment.color)
    assert slicerio.segmentation.terminology_entry_to_string(read["liver"]["terminology"]) == LIVER
    assert "terminology" not in read["lesion"]
    np.testing.assert_array_equal(segmentation["voxels"].transpose(2, 1, 0), labels)  # pynrrd: (x, y, z)
    np.testing.assert_allclose(segmentation["ijkToLPS"], volume.index_to_physical, atol=1e-6)


def test_segmentation_round_trip(tmp_path):
    volume, labels = make_volume(), make_labels()
    path = tmp_path / "out.seg.nrrd"
    write_output(path, labels, volume, SEGMENTS[:1])  # value 7 has no segment: a default one is added
    read, segments = read_labelmap(path, reference=volume, resample=False)
    np.testing.assert_array_equal(read, labels)
    assert segments[0] == SEGMENTS[0]
    assert (segments[1].name, segments[1].label_value, segments[1].terminology) == ("Label_7", 7, None)


def test_segmentation_with_slicer(tmp_path, scene):
    """3D Slicer's own storage node reads our file; the file it writes back (cropped to the
    segments' extent) is placed on the volume grid again."""
    pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    volume, labels = make_volume(), make_labels()
    write_segmentation(tmp_path / "ours.seg.nrrd", labels, volume, SEGMENTS)

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "ours.seg.nrrd"))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    read = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        terminology = vtk.mutable("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), terminology)
        read[segment.GetName()] = (segment.GetLabelValue(), tuple(segment.GetColor()), str(terminology))
    assert read["liver"][:2] == (3, SEGMENTS[0].color)
    assert read["liver"][2] == LIVER
    assert read["lesion"][:2] == (7, SEGMENTS[1].color)

    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node)
    assert sitk.ReadImage(str(tmp_path / "slicer.seg.nrrd")).GetSize() != volume.array.shape[::-1]  # cropped
    placed, segments = read_labelmap(tmp_path / "slicer.seg.nrrd", reference=volume, resample=False)
    np.testing.assert_array_equal(placed, labels)
    assert [(s.name, s.label_value, s.color) for s in segments] == [(s.name, s.label_value, s.color) for s in SEGMENTS]


def test_multi_layer_segmentation_is_merged(tmp_path):
    """A 4D .seg.nrrd (overlapping segments in two layers): later layers are drawn over earlier ones,
    with a warning naming the overlap, and segments sharing a label value across layers are renumbered."""
    nrrd = pytest.importorskip("nrrd")
    layers = np.zeros((2, 8, 7, 6), np.uint8)  # pynrrd order: (layer, x, y, z)
    layers[0, 1:5, 1:5, 1:5] = 1  # "big"
    layers[1, 3:6, 3:6, 3:6] = 1  # "small", overlapping "big"
    header = {
        "kinds": ["list", "domain", "domain", "domain"],
        "space": "left-posterior-superior",
        "space directions": np.vstack(([np.nan] * 3, np.diag(SPACING))),
        "space origin": np.array(ORIGIN),
    }
    for index, (name, color) in enumerate((("big", "1 0 0"), ("small", "0 0 1"))):
        header.update({
            f"Segment{index}_ID": name, f"Segment{index}_Name": name, f"Segment{index}_Color": color,
            f"Segment{index}_LabelValue": "1", f"Segment{index}_Layer": str(index),
        })
    nrrd.write(str(tmp_path / "layers.seg.nrrd"), layers, header)

    with pytest.warns(HSAMWarning, match="'big' and 'small' overlap in 8 voxels"):
        labels, segments = read_labelmap(tmp_path / "layers.seg.nrrd")
    assert [(s.name, s.label_value, s.color) for s in segments] == [
        ("big", 1, (1.0, 0.0, 0.0)), ("small", 2, (0.0, 0.0, 1.0))
    ]
    expected = np.zeros((6, 7, 8), np.uint8)
    expected[1:5, 1:5, 1:5] = 1
    expected[3:6, 3:6, 3:6] = 2
    np.testing.assert_array_equal(labels, expected)


# ------------------------------------------------------------------------------------ writing safely


def test_existing_file_needs_overwrite(tmp_path):
    volume, labels = make_volume(), make_labels()
    path = tmp_path / "labels.nrrd"
    write_labelmap(path, labels, volume)
    with pytest.raises(InputError, match="already exists"):
        write_labelmap(path, np.zeros_like(labels), volume)
    segmentation = tmp_path / "labels.seg.nrrd"
    write_segmentation(segmentation, labels, volume, SEGMENTS)
    with pytest.raises(InputError, match="already exists"):
        write_segmentation(segmentation, np.zeros_like(labels), volume, SEGMENTS)
    np.testing.assert_array_equal(read_labelmap(path)[0], labels)  # untouched

    write_labelmap(path, np.zeros_like(labels), volume, overwrite=True)
    assert not read_labelmap(path)[0].any()
    assert sorted(os.listdir(tmp_path)) == ["labels.nrrd", "labels.seg.nrrd"]  # no temporary file left


def test_missing_or_unwritable_folder(tmp_path):
    volume, labels = make_volume(), make_labels()
    with pytest.raises(InputError, match="does not exist"):
        write_labelmap(tmp_path / "missing" / "labels.nrrd", labels, volume)
    with pytest.raises(InputError, match="does not exist"):
        write_segmentation(tmp_path / "missing" / "labels.seg.nrrd", labels, volume, SEGMENTS)
    with pytest.raises(InputError, match="must end with"):
        write_labelmap(tmp_path / "labels.png", labels, volume)

    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot write"):
            write_labelmap(locked / "labels.nrrd", labels, volume)
    finally:
        locked.chmod(0o700)
