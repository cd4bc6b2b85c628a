"""The ``hsam`` command line end to end on small files: every command, exit codes, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.cli import main
from hsam.evaluation.metrics import dice_score, hausdorff95
from hsam.models import sam_weights
from hsam.models.build import build_hsam
from hsam.models.bundle import BundleMetadata, read_bundle_metadata, save_bundle
from hsam.volumes.preprocess import IntensityPreprocessing
from phantom import phantom_arrays

SPACING, ORIGIN = (0.8, 0.7, 2.0), (-20.0, -15.0, -7.0)
CLASSES = (("ellipsoid", 1, (0.9, 0.3, 0.2)), ("sphere", 2, (0.2, 0.6, 0.9)))


def _write_image(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN) -> Path:
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def _bundle(path: Path, preset_in_metadata: str = "tiny") -> Path:
    torch.manual_seed(0)
    model = build_hsam("tiny", num_classes=2, img_size=224)
    metadata = BundleMetadata(
        preset=preset_in_metadata,
        img_size=224,
        num_classes=2,
        class_names=[name for name, _, _ in CLASSES],
        class_colors=[color for _, _, color in CLASSES],
        label_values=[value for _, value, _ in CLASSES],
        preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
    )
    return save_bundle(path, model, metadata)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A (z, y, x) = (6, 40, 48) phantom volume and its labels (values 1, 2), a tiny bundle (untrained)."""
    folder = tmp_path_factory.mktemp("cli")
    image, labels = phantom_arrays((6, 40, 48), label_values=(1, 2))
    return {
        "volume": _write_image(folder / "volume.nrrd", image * 1000),
        "labels": _write_image(folder / "labels.nrrd", labels),
        "model": _bundle(folder / "tiny.hsam"),
        "image": image * 1000,
        "label_array": labels,
        "folder": folder,
    }


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, pattern: str = "") -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hsam: error: "), err
    assert pattern.lower() in lines[0].lower(), lines[0]


# ------------------------------------------------------------------------------------- segment


def _engine_labels(files, **options) -> np.ndarray:
    from hsam.inference.segment import segment_volume
    from hsam.models.bundle import load_bundle
    from hsam.volumes.volume import read_volume

    model, metadata = load_bundle(files["model"])
    return segment_volume(model, read_volume(files["volume"]), metadata, device="cpu", precision="fp32", **options).labels


def test_segment_writes_a_slicer_segmentation(files, tmp_path, capsys):
    import slicerio

    output = tmp_path / "out.seg.nrrd"
    code, out, _ = run(["segment", files["volume"], "-m", files["model"], "-o", output, "--device", "cpu",
                        "--precision", "fp32"], capsys)
    assert code == 0 and out.strip() == str(output)
    segmentation = slicerio.read_segmentation(str(output))
    segments = sorted(segmentation["segments"], key=lambda s: s["labelValue"])
    assert [(s["name"], s["labelValue"]) for s in segments] == [(n, v) for n, v, _ in CLASSES]
    for segment, (_, _, color) in zip(segments, CLASSES):
        np.testing.assert_allclose(segment["color"], color, atol=1e-3)
    voxels = np.asarray(segmentation["voxels"]).transpose(2, 1, 0)  # slicerio: (i, j, k) = (x, y, z)
    expected = _engine_labels(files)
    for value in (1, 2):
        assert int((voxels == value).sum()) == int((expected == value).sum())
    np.testing.assert_allclose(np.diag(segmentation["ijkToLPS"])[:3], SPACING, atol=1e-5)


def test_segment_writes_a_labelmap_with_the_volume_geometry(files, tmp_path, capsys):
    output = tmp_path / "labels.nii.gz"
    probabilities = tmp_path / "probabilities.npy"
    code, _, _ = run(["segment", files["volume"], "-m", files["model"], "-o", output, "--device", "cpu",
                      "--precision", "fp32", "--slices", "1:4", "--largest-component",
                      "--probabilities", probabilities], capsys)
    assert code == 0
    image = sitk.ReadImage(str(output))
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-4)
    labels = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(labels, _engine_labels(files, slice_range=(1, 4), largest_component=True))
    assert not labels[0].any() and not labels[5].any()
    stored = np.load(probabilities)
    assert stored.shape == (3, *files["image"].shape) and stored.dtype == np.float16


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
    output = tmp_path / "out.nrrd"
    output.write_bytes(b"keep me")
    code, _, err = run(["segment", files["volume"], "-m", files["model"], "-o", output, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "--overwrite")
    assert output.read_bytes() == b"keep me"
    code, _, _ = run(["segment", files["volume"], "-m", files["model"], "-o", output, "--device", "cpu",
                      "--overwrite"], capsys)
    assert code == 0 and sitk.ReadImage(str(output)).GetSize() == (48, 40, 6)


def test_output_folder_missing_or_not_writable(files, tmp_path, capsys):
    code, _, err = run(["segment", files["volume"], "-m", files["model"], "-o", tmp_path / "no" / "out.nrrd"], capsys)
    assert_one_line_error(code, err, "does not exist")

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not os.access(locked, os.W_OK):  # a folder the user may not write into (root may write anywhere)
        code, _, err = run(["segment", files["volume"], "-m", files["model"], "-o", locked / "out.nrrd"], capsys)
        assert_one_line_error(code, err, "not writable")
    elif os.path.isdir("/proc/self") and not os.access("/proc/self", os.W_OK):
        code, _, err = run(["segment", files["volume"], "-m", files["model"], "-o", "/proc/self/out.nrrd"], capsys)
        assert_one_line_error(code, err, "not writable")
    else:
        pytest.skip("no folder here that the current user cannot write into")
    locked.chmod(0o700)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((40, 48), np.float32), "3D"),
        (np.zeros((2, 6, 40, 48), np.float32), "3D"),
        ("nan", "NaN"),
    ],
    ids=["2d", "4d", "nan"],
)
def test_bad_volumes_are_refused(files, tmp_path, capsys, array, message):
    if isinstance(array, str):
        array = files["image"].astype(np.float32)
        array[2, 20, 20] = np.nan
    volume = _write_image(tmp_path / "bad.nrrd", array)
    output = tmp_path / "out.nrrd"
    code, _, err = run(["segment", volume, "-m", files["model"], "-o", output, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, message)
    assert not output.exists()


def test_truncated_and_wrong_preset_bundles_are_refused(files, tmp_path, capsys):
    truncated = tmp_path / "truncated.hsam"
    truncated.write_bytes(files["model"].read_bytes()[: files["model"].stat().st_size // 2])
    code, _, err = run(["segment", files["volume"], "-m", truncated, "-o", tmp_path / "a.nrrd"], capsys)
    assert_one_line_error(code, err, "truncated")

    wrong = _bundle(tmp_path / "says_vit_b.hsam", preset_in_metadata="vit_b")  # tiny weights, vit_b metadata
    code, _, err = run(["segment", files["volume"], "-m", wrong, "-o", tmp_path / "b.nrrd", "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "vit_b")
    assert not (tmp_path / "a.nrrd").exists() and not (tmp_path / "b.nrrd").exists()


def test_ctrl_c_exits_130_and_writes_nothing(files, tmp_path):
    image, _ = phantom_arrays((400, 40, 48), label_values=(1,))
    volume = _write_image(tmp_path / "long.nrrd", image)
    output = tmp_path / "out.seg.nrrd"
    process = subprocess.Popen(
        [sys.executable, "-m", "hsam", "segment", str(volume), "-m", str(files["model"]), "-o", str(output),
         "--device", "cpu", "--precision", "fp32", "--batch-size", "1"],
        stderr=subprocess.PIPE,
        # a shell's background job starts with SIGINT ignored, and Python then keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = bytearray()
    reader = threading.Thread(target=lambda: [seen.extend(byte) for byte in iter(lambda: process.stderr.read(1), b"")],
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while b"slice " not in seen and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    reader.join(timeout=5)
    assert b"hsam: interrupted" in seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.nrrd"]


# -------------------------------------------------------------------------------------- finetune


def test_finetune_saves_a_bundle_that_segments(files, tmp_path, capsys):
    output = tmp_path / "model.hsam"
    code, out, _ = run(["finetune", files["volume"], files["labels"], "-o", output, "--epochs", "1",
                        "--img-size", "224", "--device", "cpu", "--class-names", "ellipsoid,sphere"], capsys)
    assert code == 0 and str(output) in out
    metadata = read_bundle_metadata(output)
    assert (metadata.preset, metadata.img_size, metadata.label_values) == ("tiny", 224, [1, 2])
    assert metadata.class_names == ["ellipsoid", "sphere"]
    code, _, _ = run(["segment", files["volume"], "-m", output, "-o", tmp_path / "seg.nrrd", "--device", "cpu"], capsys)
    assert code == 0


def test_finetune_refuses_bad_labelmaps(files, tmp_path, capsys):
    output = tmp_path / "model.hsam"
    far_origin = tuple(o + 500.0 for o in ORIGIN)  # a labelmap of another region
    other_grid = _write_image(tmp_path / "other_grid.nrrd", files["label_array"], origin=far_origin)
    code, _, err = run(["finetune", files["volume"], other_grid, "-o", output, "--epochs", "1"], capsys)
    assert_one_line_error(code, err, "not on the volume's voxel grid")
    code, _, err = run(["finetune", files["volume"], other_grid, "-o", output, "--epochs", "1", "--resample-labels"],
                       capsys)
    assert_one_line_error(code, err, "does not overlap")

    empty = _write_image(tmp_path / "empty.nrrd", np.zeros_like(files["label_array"]))
    code, _, err = run(["finetune", files["volume"], empty, "-o", output, "--epochs", "1"], capsys)
    assert_one_line_error(code, err, "label")

    three = files["label_array"].copy()
    three[:, :5, :5] = 3
    three_classes = _write_image(tmp_path / "three.nrrd", three)
    code, _, err = run(["finetune", files["volume"], three_classes, "-o", output, "--epochs", "1",
                        "--base-model", files["model"]], capsys)
    assert_one_line_error(code, err, "classes")
    assert not output.exists()


def test_finetune_refuses_a_base_model_of_another_preset(files, tmp_path, capsys):
    wrong = _bundle(tmp_path / "says_vit_b.hsam", preset_in_metadata="vit_b")
    code, _, err = run(["finetune", files["volume"], files["labels"], "-o", tmp_path / "m.hsam", "--preset", "tiny",
                        "--base-model", wrong], capsys)
    assert_one_line_error(code, err, "vit_b")


# ---------------------------------------------------------------------------- evaluate, info, download


def test_evaluate_prints_and_writes_scores(files, tmp_path, capsys):
    shifted = np.roll(files["label_array"], 2, axis=2)
    prediction = _write_image(tmp_path / "prediction.nrrd", shifted)
    scores = tmp_path / "scores.json"
    table = tmp_path / "scores.csv"
    code, out, _ = run(["evaluate", prediction, files["labels"], "--json", scores, "--csv", table], capsys)
    assert code == 0
    rows = json.loads(scores.read_text(encoding="utf-8"))["cases"]
    assert len(rows) == 2
    for row in rows:
        truth, predicted = files["label_array"] == row["label"], shifted == row["label"]
        assert row["dice"] == pytest.approx(dice_score(predicted, truth)) and 0.5 < row["dice"] < 1.0
        assert row["hd95_mm"] == pytest.approx(hausdorff95(predicted, truth, SPACING))
        assert 0.0 < row["hd95_mm"] <= 2 * SPACING[0] + 1e-6  # shifted by two voxels along x
    assert table.read_text(encoding="utf-8").count("\n") == 3
    assert "Dice" in out

    code, _, _ = run(["evaluate", files["labels"], files["labels"], "--json", tmp_path / "same.json"], capsys)
    assert code == 0
    assert all(row["dice"] == 1.0 for row in json.loads((tmp_path / "same.json").read_text(encoding="utf-8"))["cases"])


def test_info_describes_a_bundle(files, capsys):
    code, out, _ = run(["info", files["model"]], capsys)
    assert code == 0
    assert "tiny" in out and "224" in out
    for name, value, color in CLASSES:
        rgb = "#" + "".join(f"{round(255 * c):02x}" for c in color)
        assert any(name in line and str(value) in line and rgb in line for line in out.splitlines())
    state = build_hsam("tiny", 2, 224).state_dict()
    assert f"{sum(t.numel() for t in state.values()):,} values in {len(state)} tensors" in out


def test_info_checks_sam_weights(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not really SAM")
    code, out, _ = run(["info", weights], capsys)
    assert code == 0 and "not an official SAM checkpoint" in out

    monkeypatch.setitem(
        sam_weights.SAM_CHECKPOINTS, "vit_b",
        sam_weights.SamCheckpointInfo(weights.name, sam_weights.sha256_file(weights), weights.stat().st_size),
    )
    code, out, _ = run(["info", weights], capsys)
    assert code == 0 and "vit_b" in out and "sha256 matches" in out

    corrupt = tmp_path / "sam_vit_l_0b3195.pth"
    corrupt.write_bytes(b"truncated")
    code, _, err = run(["info", corrupt], capsys)
    assert_one_line_error(code, err, "does not match")


def test_download_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(sam_weights, "SAM_URL", f"http://127.0.0.1:{port}/")
    code, _, err = run(["download", "vit_b", "--cache-dir", tmp_path], capsys)
    assert_one_line_error(code, err, "cannot reach")
    assert "--sam-checkpoint" in err and str(tmp_path) in err


def test_module_entry_point_and_help():
    result = subprocess.run([sys.executable, "-m", "hsam", "--help"], capture_output=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0
    for command in ("segment", "finetune", "evaluate", "info", "download", "demo"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "hsam", "segment", "--help"], capture_output=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0 and ".seg.nrrd" in result.stdout
    result = subprocess.run([sys.executable, "-m", "hsam", "segment"], capture_output=True, encoding="utf-8", timeout=60)
    assert result.returncode == 2 and "required" in result.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("nilearn")
    code, out, _ = run(["demo", "--out", tmp_path / "demo", "--epochs", "1", "--img-size", "224", "--device", "cpu"],
                       capsys)
    assert code == 0
    assert "H-SAM tiny" in out and "nearest-slice copy" in out and "Fill between slices" in out
    assert (tmp_path / "demo" / "demo.hsam").is_file() and (tmp_path / "demo" / "segmentation.seg.nrrd").is_file()
