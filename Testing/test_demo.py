"""The MNI152 demo end to end on a reduced setting (a couple of epochs of the tiny preset)."""

import csv
import struct
import zlib

import numpy as np
import pytest

from hsam.demo import TITLE_HEIGHT, run_demo
from hsam.evaluation.baselines import nearest_slice_copy
from hsam.evaluation.mni import brain_labels, template_path
from hsam.guidance.priors import annotated_slices
from hsam.volumes.segmentation import read_labelmap
from hsam.volumes.volume import read_volume

pytest.importorskip("nilearn")


def read_png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    raw = zlib.decompress(data[41 : 41 + length])
    assert len(raw) == height * (1 + 3 * width)
    return width, height


@pytest.fixture(scope="module")
def template_labels():
    return brain_labels(read_volume(template_path("gm")).array, read_volume(template_path("wm")).array)


def test_template_labels_and_the_copy_baseline(template_labels):
    labels = template_labels
    assert labels.shape == (189, 233, 197)
    assert (labels == 1).sum() == pytest.approx(1.08e6, rel=0.05)
    assert (labels == 2).sum() == pytest.approx(0.63e6, rel=0.05)
    labelled = annotated_slices(labels, 0)
    annotated = labelled[5::10]
    baseline = nearest_slice_copy(labels, annotated)
    assert np.array_equal(baseline[annotated], labels[annotated])
    held_out = [z for z in labelled if z not in annotated]
    for value in (1, 2):
        p, t = baseline[held_out] == value, labels[held_out] == value
        assert 0.7 < 2 * (p & t).sum() / (p.sum() + t.sum()) < 0.9


@pytest.mark.slow
def test_demo_writes_every_file(tmp_path):
    slicerio = pytest.importorskip("slicerio")
    messages = []
    result = run_demo(tmp_path / "demo", epochs=2, img_size=224, device="cpu", progress=lambda f, m: messages.append((f, m)))
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert names == {"demo.hsam", "mni152_t1.nrrd", "segmentation.seg.nrrd", "labels.nrrd", "overlay.png", "dice.csv", "README.txt"}
    assert messages[-1][0] == 1.0 and all(a[0] <= b[0] for a, b in zip(messages, messages[1:]))

    segmentation = slicerio.read_segmentation(str(result.files["segmentation"]))
    assert [s["name"] for s in segmentation["segments"]] == ["Grey matter", "White matter"]
    assert segmentation["voxels"].shape[-3:] in {(197, 233, 189), (189, 233, 197)}

    image = read_volume(result.files["image"])
    assert image.array.shape == (189, 233, 197)
    labels = read_volume(result.files["labels"]).array
    assert (labels == 1).sum() == pytest.approx(1.08e6, rel=0.05)

    with open(result.files["scores"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["class"] for r in rows} == {"Grey matter", "White matter"}
    assert {r["method"] for r in rows} == {"H-SAM tiny guided", "H-SAM tiny prompt-free", "flow propagation",
                                           "nearest-slice copy", "Fill between slices"}
    assert all(0 <= float(r["dice"]) <= 1 for r in rows)
    dice = {(r["class"], r["method"]): float(r["dice"]) for r in rows}
    for name in ("Grey matter", "White matter"):  # both baselines near 0.8, not the same segmentation
        assert 0.7 < dice[name, "Fill between slices"] < 0.9
        assert dice[name, "Fill between slices"] != dice[name, "nearest-slice copy"]
        assert dice[name, "flow propagation"] > dice[name, "nearest-slice copy"] + 0.05  # flow: ~0.91 on MNI
    assert len(result.annotated_slices) == 15 and len(result.evaluated_slices) == 152 - 15

    width, height = read_png_size(result.files["overlay"])
    assert height == 3 * (233 + TITLE_HEIGHT) and width == 4 * 197 + 3 * 2  # reference, guided, prompt-free
    guided, _ = read_labelmap(result.files["segmentation"], reference=image)
    np.testing.assert_array_equal(guided[result.annotated_slices], labels[result.annotated_slices])
    readme = result.files["readme"].read_text(encoding="utf-8")
    assert "Fonov" in readme and "Fill between slices" in readme
    assert "Dice" in result.table() and "Fill between slices" in result.table()
