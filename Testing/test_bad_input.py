"""Bad input and faults: every case stops with one ``hsam: error:`` line (exit 2) and writes nothing,
or, for the warnings, says what was done. Real files, real processes, a real full disk (a small
tmpfs, where this user may mount one)."""

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.cli import main
from hsam.models.sam_weights import SAM_CHECKPOINTS, cached_sha256, sha256_file, sha256_record
from hsam.runtime.errors import HSAMWarning
from hsam.volumes.files import TEMPORARY_PREFIX, Outputs, write_atomic, write_bytes_atomic
from hsam.volumes.segmentation import read_labelmap, write_labelmap, write_segmentation
from hsam.volumes.volume import Volume, write_volume
from test_cli import _bundle, _write_image, assert_one_line_error
from test_io import LIVER, write_dicom_series

SHAPE = (6, 40, 48)
SPACING, ORIGIN = (0.8, 0.7, 2.0), (-20.0, -15.0, -7.0)
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("model") / "tiny.hsam")


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty folder for outputs: after a refusal it must still be empty (no output, no temporary)."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def noisy(shape=SHAPE, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1000, shape).astype(dtype)


def refused(argv: list, capsys, pattern: str, out: Path) -> None:
    code = main([str(a) for a in argv])
    assert_one_line_error(code, capsys.readouterr().err, pattern)
    assert sorted(os.listdir(out)) == []


def segment(volume: Path, model: Path, out: Path, *extra) -> list:
    return ["segment", volume, "-m", model, "-o", out / "labels.nrrd", "--device", "cpu", *extra]


# ------------------------------------------------------------------------------- broken inputs


@pytest.mark.parametrize("suffix", [*IMAGE_SUFFIXES, ".mhd"])
def test_truncated_volume_is_refused(tmp_path, model, out, capsys, suffix):
    path = _write_image(tmp_path / f"volume{suffix}", noisy())
    data_file = path.with_suffix(".raw") if suffix == ".mhd" else path
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) * 2 // 3])
    refused(segment(path, model, out), capsys, "", out)


@pytest.mark.parametrize("flavour", ["big-endian NIfTI-1", "NIfTI-2"])
def test_other_nifti_layouts_are_checked_too(tmp_path, flavour):
    nibabel = pytest.importorskip("nibabel")
    from hsam.runtime.errors import InputError
    from hsam.volumes.nifti import check_nifti

    make = nibabel.Nifti2Image if flavour == "NIfTI-2" else nibabel.Nifti1Image
    array = noisy((4, 5, 6)).astype(">f4" if flavour.startswith("big") else "<f4")
    nibabel.save(make(array, np.eye(4)), tmp_path / "good.nii")
    check_nifti(tmp_path / "good.nii")
    (tmp_path / "cut.nii").write_bytes((tmp_path / "good.nii").read_bytes()[:-40])
    with pytest.raises(InputError, match="truncated"):
        check_nifti(tmp_path / "cut.nii")
    array[1, 2, 3] = np.nan
    nibabel.save(make(array, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="1 NaN"):
        check_nifti(tmp_path / "nan.nii.gz")


def test_mhd_without_its_data_file_is_one_line(tmp_path, model, out, capfd):
    path = _write_image(tmp_path / "volume.mhd", noisy())
    path.with_suffix(".raw").unlink()
    code = main([str(a) for a in segment(path, model, out)])
    assert_one_line_error(code, capfd.readouterr().err, "cannot read volume.mhd")  # no MetaIO console text


def test_truncated_labelmap_and_segmentation_are_refused(tmp_path, out, capsys):
    reference = _write_image(tmp_path / "reference.nii.gz", np.random.default_rng(1).integers(0, 4, SHAPE).astype(np.uint8))
    volume = Volume(np.zeros(SHAPE, np.uint8), SPACING, ORIGIN)
    labels = np.random.default_rng(2).integers(0, 3, SHAPE).astype(np.uint8)
    write_segmentation(tmp_path / "cut.seg.nrrd", labels, volume, [])
    data = (tmp_path / "cut.seg.nrrd").read_bytes()
    (tmp_path / "cut.seg.nrrd").write_bytes(data[: len(data) // 2])
    refused(["evaluate", tmp_path / "cut.seg.nrrd", reference, "--json", out / "s.json"], capsys, "cut.seg.nrrd", out)
    data = reference.read_bytes()
    reference.write_bytes(data[: len(data) // 2])
    refused(["evaluate", tmp_path / "cut.seg.nrrd", reference, "--json", out / "s.json"], capsys, "reference.nii.gz", out)


def test_dicom_series_with_a_truncated_or_missing_slice_is_refused(tmp_path, model, out, capfd):
    write_dicom_series(tmp_path / "cut", Volume(noisy((6, 16, 16), np.int16), SPACING, ORIGIN))
    cut = tmp_path / "cut" / "slice005.dcm"
    cut.write_bytes(cut.read_bytes()[:-200])
    code = main([str(a) for a in segment(tmp_path / "cut", model, out)])
    assert_one_line_error(code, capfd.readouterr().err, "cannot be read")

    write_dicom_series(tmp_path / "gap", Volume(noisy((6, 16, 16), np.int16), SPACING, ORIGIN))
    (tmp_path / "gap" / "slice003.dcm").unlink()
    code = main([str(a) for a in segment(tmp_path / "gap", model, out)])
    assert_one_line_error(code, capfd.readouterr().err, "missing or unevenly spaced slices")
    assert os.listdir(out) == []


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES)
def test_nan_and_infinite_voxels_are_refused(tmp_path, model, out, capsys, suffix, value):
    array = noisy()
    array[3, 20, 20] = value
    path = _write_image(tmp_path / f"volume{suffix}", array)
    refused(segment(path, model, out), capsys, "1 NaN or infinite voxels", out)


@pytest.mark.parametrize("suffix", [".nii", ".nrrd", ".mha"])
def test_complex_voxels_are_refused(tmp_path, model, out, capsys, suffix):
    path = _write_image(tmp_path / f"complex{suffix}", (noisy() + 1j).astype(np.complex64))
    refused(segment(path, model, out), capsys, "complex" if suffix != ".mha" else "2 components", out)


@pytest.mark.parametrize("case", ["half spacing", "larger, labels outside", "shifted off the lattice"])
def test_labelmap_off_the_volume_lattice_is_refused_unless_resampling_is_asked(tmp_path, out, capsys, case):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 10:20, 10:20] = 1
    if case == "half spacing":
        other = _write_image(tmp_path / "labels.nrrd", labels, spacing=tuple(s / 2 for s in SPACING))
    elif case == "larger, labels outside":
        larger = np.pad(labels, 2)
        larger[0, 0, 0] = 2  # outside the volume
        origin = tuple(o - 2 * s for o, s in zip(ORIGIN, SPACING))
        other = _write_image(tmp_path / "labels.nrrd", larger, origin=origin)
    else:
        other = _write_image(tmp_path / "labels.nrrd", labels, origin=tuple(o + 0.3 for o in ORIGIN))
    argv = ["finetune", volume, other, "-o", out / "m.hsam", "--epochs", "1"]
    refused(argv, capsys, "outside the volume" if case.startswith("larger") else "voxel grid", out)
    dropped = r"dropped 1 labelled voxel \(Label_2: 1\)"
    with pytest.warns(HSAMWarning, match=dropped) if case.startswith("larger") else contextlib.nullcontext():
        assert read_labelmap(other, reference=Volume(noisy(), SPACING, ORIGIN), resample=True)[0].any()


def test_crop_of_the_same_lattice_is_accepted(tmp_path):
    crop = np.ones((2, 10, 12), np.uint8)
    origin = tuple(o + k * s for o, k, s in zip(ORIGIN, (5, 4, 3), SPACING))  # x, y, z offsets
    path = _write_image(tmp_path / "crop.nrrd", crop, origin=origin)
    labels, _ = read_labelmap(path, reference=Volume(noisy(), SPACING, ORIGIN))
    assert labels[3:5, 4:14, 5:17].all() and labels.sum() == crop.sum()


@pytest.mark.parametrize("margin", ["labels outside, --resample-labels", "empty"])
def test_labels_cropped_off_a_larger_labelmap_are_reported(tmp_path, out, margin):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    larger = np.zeros((10, 44, 52), np.uint8)  # two voxels on every side of the volume, on its lattice
    larger[4:6, 12:22, 12:22] = 1
    if margin == "empty":
        extra = []
    else:
        larger[0, 0, :5] = 2
        larger[-1, 20, 20] = 1
        extra = ["--resample-labels"]
    origin = tuple(o - 2 * s for o, s in zip(ORIGIN, SPACING))
    labels = _write_image(tmp_path / "labels.nrrd", larger, origin=origin)
    # training slice 0 holds no label: the command stops after reading the pair, before any training
    argv = ["finetune", volume, labels, "-o", out / "m.hsam", "--slices", "0", *extra]
    lines = _run_hsam(argv).stderr.decode().splitlines()
    warnings = [line for line in lines if line.startswith("hsam: warning:")]
    assert "has no voxel in the training slices" in lines[-2]
    if margin == "empty":
        assert warnings == []
    else:
        assert warnings == ["hsam: warning: labels.nrrd: dropped 6 labelled voxels (Label_1: 1, Label_2: 5) "
                            "outside the volume"]


def _segmentation_file(path: Path, **fields: str) -> Path:
    volume = Volume(np.zeros(SHAPE, np.uint8), SPACING, ORIGIN)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 5:9, 5:9] = 1
    from hsam.volumes.segmentation import Segment

    write_segmentation(path, labels, volume, [Segment("liver", 1, (0.5, 0.5, 0.5), LIVER)])
    image = sitk.ReadImage(str(path))
    for key, value in fields.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(path), True)
    return path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"Segment0_LabelValue": "one"}, "non-numeric LabelValue"),
        ({"Segment0_Color": "red green blue"}, "non-numeric Color"),
        ({"Segment0_Color": "0.5 0.5"}, "expected 3 number"),
        ({"Segment0_Layer": "x"}, "non-numeric Layer"),
        ({"Segment0_LabelValue": "4000000000"}, "too large"),
    ],
    ids=["label value", "colour", "short colour", "layer", "label 4e9"],
)
def test_crafted_segmentation_fields_are_one_line(tmp_path, out, capsys, fields, message):
    path = _segmentation_file(tmp_path / "crafted.seg.nrrd", **fields)
    reference = _write_image(tmp_path / "reference.nrrd", np.zeros(SHAPE, np.uint8))
    refused(["evaluate", path, reference, "--csv", out / "s.csv"], capsys, message, out)


def test_absurd_label_value_in_a_labelmap_is_one_line(tmp_path, out, capsys):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    labels = np.zeros(SHAPE, np.uint32)
    labels[2, 3, 4] = 4_000_000_000
    refused(["finetune", volume, _write_image(tmp_path / "l.nrrd", labels), "-o", out / "m.hsam"], capsys, "too large", out)


def test_overlapping_layers_are_named_in_a_warning(tmp_path, capsys):
    nrrd = pytest.importorskip("nrrd")
    layers = np.zeros((2, 8, 7, 6), np.uint8)
    layers[0, 1:5, 1:5, 1:5] = 1
    layers[1, 3:6, 3:6, 3:6] = 1
    header = {"kinds": ["list", "domain", "domain", "domain"], "space": "left-posterior-superior",
              "space directions": np.vstack(([np.nan] * 3, np.eye(3))), "space origin": np.zeros(3)}
    for index, name in enumerate(("kidney", "tumour")):
        header.update({f"Segment{index}_Name": name, f"Segment{index}_LabelValue": "1", f"Segment{index}_Layer": str(index)})
    nrrd.write(str(tmp_path / "layers.seg.nrrd"), layers, header)
    assert main(["evaluate", str(tmp_path / "layers.seg.nrrd"), str(tmp_path / "layers.seg.nrrd")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hsam: warning:")]
    assert len(warnings) == 2 and "'kidney' and 'tumour' overlap in 8 voxels" in warnings[0]


def test_several_dicom_series_are_named_and_can_be_chosen(tmp_path, model, out, capfd):
    folder = tmp_path / "study"
    write_dicom_series(folder, Volume(noisy((6, 16, 16), np.int16), SPACING, ORIGIN))
    second = tmp_path / "second"
    write_dicom_series(second, Volume(noisy((4, 16, 16), np.int16), SPACING, ORIGIN))
    for index, file in enumerate(sorted(second.iterdir())):  # another Series Instance UID
        image = sitk.ReadImage(str(file))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.2")
        image.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.2.{index + 1}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"b{file.name}"))
        writer.Execute(image)
    code = main([str(a) for a in segment(folder, model, out, "--series", "1.2.3")])
    assert_one_line_error(code, capfd.readouterr().err, "no DICOM series 1.2.3")
    from hsam.volumes.volume import read_volume

    with pytest.warns(HSAMWarning, match=r"holds 2 DICOM series; read 1\.2\.826\.0\.1\.3680043\.2\.1125\.1\.1 \(6 files\)"):
        assert read_volume(folder).array.shape[0] == 6
    assert read_volume(folder, series="1.2.826.0.1.3680043.2.1125.2").array.shape[0] == 4


def test_folder_without_dicom_is_one_line(tmp_path, model, out, capfd):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    code = main([str(a) for a in segment(tmp_path / "notes", model, out)])
    assert_one_line_error(code, capfd.readouterr().err, "no DICOM series")  # no GDCM warning before it


# ------------------------------------------------------------------------------- crafted models


def _with_metadata(source: Path, target: Path, metadata: str) -> Path:
    """``source`` with its HSAM metadata replaced (tensors unchanged)."""
    data = source.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["hsam"] = metadata
    encoded = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    return target


def _edited(model: Path, **changes) -> str:
    length = struct.unpack("<Q", model.read_bytes()[:8])[0]
    metadata = json.loads(json.loads(model.read_bytes()[8 : 8 + length])["__metadata__"]["hsam"])
    metadata.update(changes)
    return json.dumps(metadata)


CRAFTED = {
    "null": lambda m: "null",
    "list": lambda m: "[1, 2]",
    "not json": lambda m: "{preset: tiny",
    "deeply nested": lambda m: "[" * 100000 + "]" * 100000,
    "20000 classes": lambda m: _edited(m, num_classes=20000, class_names=["c"] * 20000,
                                       class_colors=[[0, 0, 0]] * 20000, label_values=list(range(1, 20001))),
    "negative classes": lambda m: _edited(m, num_classes=-2),
    "odd size": lambda m: _edited(m, img_size=300),
    "bogus cmattn": lambda m: _edited(m, cmattn="evil"),
    "string labels": lambda m: _edited(m, label_values=["1", "2"]),
    "unknown preset": lambda m: _edited(m, preset="vit_x"),
    "colour out of range": lambda m: _edited(m, class_colors=[[0, 0, 7], [0, 0, 0]]),
    "missing field": lambda m: json.dumps({k: v for k, v in json.loads(_edited(m)).items() if k != "label_values"}),
    "bad preprocessing": lambda m: _edited(m, preprocessing={"mode": "ct", "window": [300, -100]}),
    "newer format": lambda m: _edited(m, format_version=99),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_metadata_is_refused_at_once(tmp_path, model, out, capsys, case):
    crafted = _with_metadata(model, tmp_path / "crafted.hsam", CRAFTED[case](model))
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    started = time.monotonic()
    refused(segment(volume, model=crafted, out=out), capsys, "crafted.hsam", out)
    refused(["info", crafted], capsys, "crafted.hsam", out)
    assert time.monotonic() - started < 2.0


def test_weights_that_do_not_fit_the_metadata_are_refused(tmp_path, model, out, capsys):
    three = _edited(model, num_classes=3, class_names=["a", "b", "c"], class_colors=[[0, 0, 0]] * 3,
                    label_values=[1, 2, 3], terminology=[None] * 3)
    crafted = _with_metadata(model, tmp_path / "three.hsam", three)
    refused(segment(_write_image(tmp_path / "v.nrrd", noisy()), crafted, out), capsys, "do not fit", out)


@pytest.mark.parametrize("cut", ["header", "tensors", "one byte"])
def test_truncated_model_files_are_refused(tmp_path, model, out, capsys, cut):
    data = model.read_bytes()
    keep = {"header": 100, "tensors": len(data) // 2, "one byte": len(data) - 1}[cut]
    (tmp_path / "cut.hsam").write_bytes(data[:keep])
    refused(["info", tmp_path / "cut.hsam"], capsys, "cut.hsam", out)


def test_a_model_is_never_saved_with_metadata_it_could_not_be_read_with(tmp_path):
    from hsam.models.build import build_hsam
    from hsam.models.bundle import read_bundle_metadata, save_bundle
    from hsam.runtime.errors import InputError

    metadata = read_bundle_metadata(_bundle(tmp_path / "valid.hsam"))
    metadata.class_names = ["x" * 2000, "sphere"]
    with pytest.raises(InputError, match="class_names"):
        save_bundle(tmp_path / "long.hsam", build_hsam("tiny", 2, 224), metadata)
    assert sorted(os.listdir(tmp_path)) == ["valid.hsam"]


def test_more_classes_than_a_model_holds_are_refused_before_training():
    from hsam.runtime.errors import InputError
    from hsam.training.config import FinetuneConfig
    from hsam.training.finetune import finetune

    labels = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 300
    with pytest.raises(InputError, match="at most 255 classes"):
        finetune(Volume(noisy(), SPACING, ORIGIN), labels.astype(np.uint16), [], FinetuneConfig(epochs=1, device="cpu"))


def test_control_characters_from_files_are_escaped(tmp_path, model, capsys):
    crafted = _with_metadata(model, tmp_path / "names.hsam", _edited(model, class_names=["liver\x1b[2J", "\u202espleen"]))
    assert main(["info", str(crafted)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\u202e" not in printed
    assert "liver\\x1b[2J" in printed and "\\u202espleen" in printed


def test_sam_weights_are_hashed_once_and_the_result_remembered(tmp_path, hsam_home):
    weights = tmp_path / "sam_vit_b_01ec64.pth"
    weights.write_bytes(os.urandom(1 << 16))
    assert cached_sha256(weights) == sha256_file(weights)
    record = sha256_record(weights)
    assert record.is_relative_to(hsam_home) and os.listdir(tmp_path) == [weights.name]
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "a" * 64}))
    assert cached_sha256(weights) == "a" * 64  # read from the record, not hashed again
    copy = tmp_path / "copy.pth"
    copy.write_bytes(weights.read_bytes())
    os.utime(copy, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns))
    assert cached_sha256(copy) == sha256_file(weights)  # same size and time, another path: its own record
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: hashed again
    assert cached_sha256(weights) == sha256_file(weights)


@pytest.fixture(params=["writable", "read-only"])
def weights_folder(request, tmp_path) -> Iterator[Path]:
    """A user's folder of weights: ``weights.pth`` (not SAM) and ``sam_vit_b_01ec64.pth`` of the official
    size but not its sha256 (sparse); read-only by its mode and, for root (whom modes do not stop),
    by a read-only bind mount where one can be made."""
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "weights.pth").write_bytes(os.urandom(1 << 16))
    with open(folder / "sam_vit_b_01ec64.pth", "wb") as f:
        f.truncate(SAM_CHECKPOINTS["vit_b"].size)
    if request.param == "writable":
        yield folder
        return
    folder.chmod(0o555)
    as_root = os.geteuid() == 0 and sys.platform == "linux"
    mounted = as_root and subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
    if mounted:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], capture_output=True)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", folder], check=True)
        folder.chmod(0o755)


def _hsam_refuses(args: list, pattern: str) -> None:
    """``hsam ARGS`` in a new process ends with one error line containing ``pattern``, before torch is loaded."""
    result = _run_hsam(args)
    *lines, torch = result.stderr.decode().splitlines()
    assert torch == "torch not loaded"
    assert_one_line_error(result.returncode, "\n".join(lines), pattern)


def test_info_leaves_the_weights_folder_alone_and_reuses_the_cache(weights_folder):
    weights, official_name = weights_folder / "weights.pth", weights_folder / "sam_vit_b_01ec64.pth"
    before = sorted(os.listdir(weights_folder))
    first = _run_hsam(["info", weights])
    assert first.returncode == 0 and f"sha256 {sha256_file(weights)}" in first.stdout.decode()
    _hsam_refuses(["info", official_name], "does not match")
    assert sorted(os.listdir(weights_folder)) == before

    record = sha256_record(weights)
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "a" * 64}))
    second = _run_hsam(["info", weights])
    assert second.returncode == 0 and f"sha256 {'a' * 64}" in second.stdout.decode()  # from the cache
    _hsam_refuses(["info", official_name], "does not match")  # remembered, still refused
    assert sorted(os.listdir(weights_folder)) == before


def test_refused_sam_checkpoint_leaves_the_weights_folder_alone(weights_folder, tmp_path, out):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    labels = _write_image(tmp_path / "labels.nrrd", (noisy() > 500).astype(np.uint8))
    weights = weights_folder / "sam_vit_b_01ec64.pth"
    before = sorted(os.listdir(weights_folder))
    argv = ["finetune", volume, labels, "-o", out / "m.hsam", "--preset", "vit_b", "--sam-checkpoint", weights]
    _hsam_refuses(argv, "is not the official SAM vit_b file")
    assert sha256_record(weights).is_file()
    _hsam_refuses(argv, "is not the official SAM vit_b file")  # remembered, still refused
    assert sorted(os.listdir(weights_folder)) == before and os.listdir(out) == []


# ------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize(
    "outputs, message",
    [
        (lambda t: ["-o", t / "volume.nrrd", "--overwrite"], "is the input"),
        (lambda t: ["-o", t / "link.nrrd", "--overwrite"], "is the input"),
        (lambda t: ["-o", t / "hard.nrrd", "--overwrite"], "is the input"),
        (lambda t: ["-o", t / "out" / "a.nrrd", "--probabilities", t / "out" / "a.nrrd"], "two outputs"),
        (lambda t: ["-o", t / "out" / "a.nrrd", "--probabilities", t / "out" / ".." / "out" / "a.nrrd"], "two outputs"),
        (lambda t: ["-o", t / "tiny.hsam.nrrd", "--probabilities", t / "out" / "p.npy", "--overwrite"], "is the input"),
    ],
    ids=["same path", "symbolic link", "hard link", "labels = probabilities", "same file by another path", "model"],
)
def test_outputs_never_replace_inputs_or_each_other(tmp_path, model, out, capsys, outputs, message):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    (tmp_path / "link.nrrd").symlink_to(volume)
    os.link(volume, tmp_path / "hard.nrrd")
    os.link(model, tmp_path / "tiny.hsam.nrrd")
    before = volume.read_bytes()
    argv = ["segment", volume, "-m", tmp_path / "tiny.hsam.nrrd", "--device", "cpu", *outputs(tmp_path)]
    refused(argv, capsys, message, out)
    assert volume.read_bytes() == before


def test_a_broken_link_as_output_is_refused_before_the_work_and_replaced_with_overwrite(tmp_path, model):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    link, target = tmp_path / "labels.nrrd", tmp_path / "gone.nrrd"
    link.symlink_to(target)
    argv = ["segment", volume, "-m", model, "-o", link, "--device", "cpu"]
    result = _run_hsam(argv)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2 and lines[-1] == "torch not loaded", lines  # refused before loading the model
    assert lines[:-1] == [f"hsam: error: {link} is a broken symbolic link (to {target}); pass --overwrite to "
                          "replace the link"]
    assert link.is_symlink()
    assert _run_hsam([*argv, "--overwrite"]).returncode == 0
    assert not link.is_symlink() and not target.exists()  # the link is replaced, not followed
    assert sitk.ReadImage(str(link)).GetSize() == SHAPE[::-1]
    assert sorted(os.listdir(tmp_path)) == ["labels.nrrd", "volume.nrrd"]


def test_score_files_must_differ(tmp_path, out, capsys):
    labels = _write_image(tmp_path / "labels.nrrd", np.ones(SHAPE, np.uint8))
    refused(["evaluate", labels, labels, "--json", out / "s.txt.json", "--csv", out / "s.txt.json"], capsys, "", out)
    refused(["evaluate", labels, labels, "--json", labels.with_suffix(".json"), "--csv", labels], capsys, "", out)


def test_output_inside_a_dicom_folder_is_refused(tmp_path, model, out, capsys):
    write_dicom_series(tmp_path / "series", Volume(noisy((4, 16, 16), np.int16), SPACING, ORIGIN))
    argv = ["segment", tmp_path / "series", "-m", model, "-o", tmp_path / "series" / "labels.nrrd"]
    refused(argv, capsys, "inside the input folder", out)
    assert len(os.listdir(tmp_path / "series")) == 4


@pytest.mark.parametrize("suffix", [".nrrd", ".NII.GZ", ".seg.nrrd", ".mha"])
def test_long_and_upper_case_output_names_work(tmp_path, suffix):
    from hsam.volumes.segmentation import write_output

    output = tmp_path / ("x" * (255 - len(suffix)) + suffix)  # the longest name the file system allows
    labels = np.random.default_rng(4).integers(0, 3, SHAPE).astype(np.uint8)
    write_output(output, labels, Volume(noisy(), SPACING, ORIGIN))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(output))), labels)
    assert os.listdir(tmp_path) == [output.name]


def test_upper_case_suffix_is_written_by_the_command_line(tmp_path, model, capsys):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    output = tmp_path / "LABELS.NII.GZ"
    assert main([str(a) for a in ["segment", volume, "-m", model, "-o", output, "--device", "cpu"]]) == 0
    assert sitk.ReadImage(str(output)).GetSize() == SHAPE[::-1]
    assert sorted(os.listdir(tmp_path)) == ["LABELS.NII.GZ", "volume.nrrd"]


def _write(kind: str, folder: Path) -> None:
    """One output of ``kind`` written into ``folder`` as ``out.<kind>``."""
    labels = np.random.default_rng(3).integers(0, 5, SHAPE).astype(np.uint8)
    grid = Volume(np.zeros(SHAPE, np.uint8), SPACING, ORIGIN)
    if kind == "nrrd":
        write_labelmap(folder / "out.nrrd", labels, grid)
    elif kind == "nii.gz":
        write_volume(folder / "out.nii.gz", Volume(noisy(), SPACING, ORIGIN))
    elif kind == "seg.nrrd":
        write_segmentation(folder / "out.seg.nrrd", labels, grid, [])
    else:
        labelmap = _write_image(folder / "labels.nrrd", labels)
        assert main(["evaluate", str(labelmap), str(labelmap), f"--{kind}", str(folder / f"out.{kind}")]) == 0


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
@pytest.mark.parametrize("kind", ["nrrd", "nii.gz", "seg.nrrd", "json", "csv"])
def test_outputs_get_the_mode_the_umask_asks_for(tmp_path, umask, kind):
    previous = os.umask(umask)
    try:
        _write(kind, tmp_path)
    finally:
        os.umask(previous)
    assert (tmp_path / f"out.{kind}").stat().st_mode & 0o777 == 0o666 & ~umask


def _no_hard_links(*_) -> None:
    raise PermissionError(1, "Operation not permitted")


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard links", "no hard links"])
@pytest.mark.parametrize("theirs", ["file", "broken link"])
def test_a_file_created_meanwhile_by_another_writer_is_kept_and_nothing_published(tmp_path, monkeypatch, hard_links,
                                                                                   theirs):
    from hsam.runtime.errors import InputError

    with Outputs() as outputs:
        write_bytes_atomic(tmp_path / "scores.json", b"{}", outputs=outputs)
        write_bytes_atomic(tmp_path / "scores.csv", b"ours", outputs=outputs)
        if theirs == "file":
            (tmp_path / "scores.csv").write_bytes(b"theirs")
        else:
            (tmp_path / "scores.csv").symlink_to(tmp_path / "gone.csv")
        if not hard_links:  # as on FAT or some network shares
            monkeypatch.setattr(os, "link", _no_hard_links)
        with pytest.raises(InputError, match="created by someone else"):
            outputs.publish()
    assert os.listdir(tmp_path) == ["scores.csv"]
    if theirs == "file":
        assert (tmp_path / "scores.csv").read_bytes() == b"theirs"
    else:
        assert os.readlink(tmp_path / "scores.csv") == str(tmp_path / "gone.csv")


# ----------------------------------------------------------------------------- faults: disk, kill


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: room for a little, not for a volume (root with mount rights only)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or sys.platform != "linux":
        pytest.skip("mounting a small tmpfs needs root on Linux")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".seg.nrrd"])
def test_full_disk_leaves_nothing_and_says_so(full_disk, suffix):
    volume = Volume(noisy((40, 80, 96)), SPACING, ORIGIN)  # 1.2 MB of floats, 300 KB of labels
    from hsam.runtime.errors import InputError

    with pytest.raises(InputError, match="cannot write"):
        if suffix == ".seg.nrrd":
            write_segmentation(full_disk / f"out{suffix}", (volume.array / 4).astype(np.uint8), volume, [])
        else:
            write_volume(full_disk / f"out{suffix}", volume)
    assert os.listdir(full_disk) == []


def test_full_disk_for_the_probabilities_publishes_neither_file(full_disk, tmp_path, model, capsys):
    volume = _write_image(tmp_path / "volume.nrrd", noisy((12, 80, 96)))
    argv = ["segment", volume, "-m", model, "-o", full_disk / "labels.nrrd", "--probabilities", full_disk / "p.npy",
            "--device", "cpu"]
    code, err = main([str(a) for a in argv]), capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("hsam:")]  # after the progress bar
    assert code == 2 and len(messages) == 1 and messages[0].startswith("hsam: error: cannot write")
    assert os.listdir(full_disk) == []


KILLED_WRITER = """
import sys, time
from pathlib import Path
from hsam.volumes.files import write_atomic

def write(temporary):
    with open(temporary, "wb") as f:
        f.write(b"half of it")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)

write_atomic(Path(sys.argv[1]), write)
"""


def test_sigkill_during_a_write_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    output = tmp_path / "labels.nrrd"
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(output)], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"writing\n"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(TEMPORARY_PREFIX) and f"-{process.pid}-" in left[0]
    write_atomic(output, lambda temporary: temporary.write_bytes(b"complete"))
    assert os.listdir(tmp_path) == [output.name] and output.read_bytes() == b"complete"


CLAIMING_WRITER = """
import sys, time
from hsam.volumes.files import Outputs

with Outputs() as outputs:
    outputs.claim([sys.argv[1]])
    print("claimed", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_of_the_same_output_is_refused_before_its_work(tmp_path, model, capsys):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    output = tmp_path / "labels.nrrd"
    argv = [str(a) for a in ["segment", volume, "-m", model, "-o", output, "--device", "cpu", "--overwrite"]]
    writer = subprocess.Popen([sys.executable, "-c", CLAIMING_WRITER, str(output)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"claimed\n"
        assert_one_line_error(main(argv), capsys.readouterr().err, "another hsam process is writing")
        assert not output.exists()
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert main(argv) == 0 and output.is_file()  # the killed writer's claim is stale: removed
    assert sorted(os.listdir(tmp_path)) == ["labels.nrrd", "volume.nrrd"]


# ------------------------------------------------------------------------------- fast and clean


def _run_hsam(args: list, **options) -> subprocess.CompletedProcess:
    code = "import sys; from hsam.cli import main; status = main(sys.argv[1:]); " \
           "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr); sys.exit(status)"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=60, **options)


@pytest.mark.parametrize("case", ["missing volume", "bad output suffix", "output exists", "info", "bad model"])
def test_checks_answer_before_torch_is_loaded(tmp_path, model, case):
    volume = _write_image(tmp_path / "volume.nrrd", noisy())
    (tmp_path / "exists.nrrd").write_bytes(b"keep")
    (tmp_path / "bad.hsam").write_bytes(b"\x00" * 64)
    args = {
        "missing volume": ["segment", tmp_path / "none.nrrd", "-m", model, "-o", tmp_path / "o.nrrd"],
        "bad output suffix": ["segment", volume, "-m", model, "-o", tmp_path / "o.png"],
        "output exists": ["segment", volume, "-m", model, "-o", tmp_path / "exists.nrrd"],
        "info": ["info", model],
        "bad model": ["segment", volume, "-m", tmp_path / "bad.hsam", "-o", tmp_path / "o.nrrd"],
    }[case]
    started = time.monotonic()
    result = _run_hsam(args)
    assert time.monotonic() - started < 5.0  # a Python start and numpy/SimpleITK at most
    assert result.stderr.decode().splitlines()[-1] == "torch not loaded"
    assert result.returncode == (0 if case == "info" else 2)


def test_closed_pipe_is_quiet(model):
    read_end, write_end = os.pipe()
    os.close(read_end)
    code = "import sys; from hsam.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "info", str(model)], stdout=write_end, stderr=subprocess.PIPE,
                            timeout=60)
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == b""


def test_internal_error_is_one_line_with_a_hint(tmp_path, model, monkeypatch, capsys):
    import hsam.models.bundle

    monkeypatch.setattr(hsam.models.bundle, "read_bundle", lambda path: {}["a bug"])
    assert main(["info", str(model)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsam: internal error: KeyError") and "--debug" in lines[0]
    with pytest.raises(KeyError):
        main(["--debug", "info", str(model)])


def test_pickled_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    import torch

    from hsam.models.checkpoint import read_state_dict
    from hsam.runtime.errors import CheckpointError

    torch.save({"weight": torch.zeros(2), "code": print}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as refusal:
        read_state_dict(tmp_path / "evil.pth")
    assert "\n" not in str(refusal.value) and "pickled" in str(refusal.value)
