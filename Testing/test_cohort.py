"""Cohorts: fine-tuning on several volumes (pairs or a manifest; different grids; classes matched by
name, then label value) and evaluating many cases, on real files through the command line."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hsam.cli import main
from hsam.evaluation.metrics import dice_score
from hsam.models.bundle import read_bundle_metadata
from hsam.training.config import FinetuneConfig, TrainingCase
from hsam.training.finetune import finetune_cohort
from hsam.volumes.segmentation import Segment, write_labelmap, write_segmentation
from hsam.volumes.volume import Volume, write_volume
from phantom import every_nth_annotated, phantom_arrays

OBLIQUE = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated 90° about z
QUICK = ["--epochs", "1", "--img-size", "224", "--device", "cpu"]


def _volume(shape, spacing, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), seed=0, label_values=(1, 2)):
    image, labels = phantom_arrays(shape, label_values=label_values, seed=seed)
    return Volume(image * 1000.0, spacing, (-20.0, -10.0, 5.0), tuple(float(d) for d in direction)), labels


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Three volumes on different grids:
    a: .seg.nrrd with segments "Ellipsoid" (1) and "Sphere" (2);
    b: .seg.nrrd naming them " ellipsoid" (2) and "SPHERE" (1), the other way round, plus "Box" (3);
    c: a plain labelmap (Segment_1, Segment_2: matched by value), the sphere absent."""
    folder = tmp_path_factory.mktemp("cohort")
    a, a_labels = _volume((12, 40, 48), (0.8, 0.7, 2.0))
    b, b_labels = _volume((10, 36, 36), (1.0, 1.0, 2.5), OBLIQUE, seed=1, label_values=(2, 1, 3))
    c, c_labels = _volume((14, 44, 40), (0.9, 0.9, 1.5), seed=2)
    c_labels[c_labels == 2] = 0
    files = {}
    for name, volume in (("a", a), ("b", b), ("c", c)):
        files[name] = folder / f"{name}.nrrd"
        write_volume(files[name], volume)
    write_segmentation(folder / "a.seg.nrrd", a_labels, a,
                       [Segment("Ellipsoid", 1, (0.9, 0.3, 0.2)), Segment("Sphere", 2, (0.2, 0.6, 0.9))])
    write_segmentation(folder / "b.seg.nrrd", b_labels, b,
                       [Segment(" ellipsoid", 2, (0.1, 0.1, 0.1)), Segment("SPHERE", 1, (0.1, 0.1, 0.1)),
                        Segment("Box", 3, (0.9, 0.8, 0.2))])
    write_labelmap(folder / "c-labels.nrrd", c_labels, c)
    return {"folder": folder, **files, "labels": {"a": a_labels, "b": b_labels, "c": c_labels}}


def test_finetune_on_pairs_and_a_manifest_matches_classes_across_volumes(cohort, tmp_path, capsys):
    folder = cohort["folder"]
    manifest = tmp_path / "more.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels", "slices"])
        writer.writerow([folder / "c.nrrd", folder / "c-labels.nrrd", "3 6;9"])
    output = tmp_path / "cohort.hsam"
    code, out, err = run(["finetune", folder / "a.nrrd", folder / "a.seg.nrrd", folder / "b.nrrd",
                          folder / "b.seg.nrrd", "--manifest", manifest, "-o", output, *QUICK], capsys)
    assert code == 0, err
    meta = read_bundle_metadata(output)
    assert meta.class_names == ["Ellipsoid", "Sphere", "Box"]  # names and colours of the first volume
    assert meta.label_values == [1, 2, 3]
    assert meta.class_colors[0] == pytest.approx((0.9, 0.3, 0.2))
    cases = meta.training["cases"]
    assert [c["shape"] for c in cases] == [[12, 40, 48], [10, 36, 36], [14, 44, 40]]
    assert cases[2]["slices"] == [3, 6, 9]
    b_voxels = cases[1]["labelled_voxels"]  # b's value 2 is the ellipsoid, its value 1 the sphere
    assert b_voxels["Ellipsoid"] == int((cohort["labels"]["b"] == 2).sum())
    assert b_voxels["Sphere"] == int((cohort["labels"]["b"] == 1).sum())
    assert cases[2]["labelled_voxels"] == {"Ellipsoid": int((cohort["labels"]["c"] == 1).sum()), "Sphere": 0, "Box": 0}


def test_a_manifest_naming_a_missing_file_is_a_one_line_error(cohort, tmp_path, capsys):
    manifest = tmp_path / "cases.json"
    manifest.write_text(json.dumps([{"image": str(cohort["a"]), "labels": "missing-labels.nrrd"}]), encoding="utf-8")
    output = tmp_path / "never.hsam"
    code, _, err = run(["finetune", "--manifest", manifest, "-o", output, *QUICK], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "file not found" in lines[0] and "missing-labels.nrrd" in lines[0]
    assert not output.exists()
    code, _, err = run(["finetune", cohort["a"], "-o", output, *QUICK], capsys)
    assert code == 2 and "pairs" in err


def test_a_class_in_no_training_slice_of_any_volume_is_refused(cohort):
    volume, labels = _volume((12, 40, 48), (0.8, 0.7, 2.0))
    segments = [Segment("Ellipsoid", 1, (1, 0, 0)), Segment("Sphere", 2, (0, 1, 0))]
    no_sphere = labels.copy()
    no_sphere[no_sphere == 2] = 0
    cases = [TrainingCase(volume, no_sphere, segments), TrainingCase(volume, no_sphere, segments[:1])]
    with pytest.raises(Exception, match="'Sphere' has no voxel in the training slices"):
        finetune_cohort(cases, FinetuneConfig(epochs=1, img_size=224, device="cpu"))


def test_whole_volumes_held_out_for_validation_report_each_class(cohort):
    first, first_labels = _volume((20, 40, 48), (0.8, 0.7, 2.0))
    second, second_labels = _volume((16, 36, 40), (1.0, 1.0, 2.0), seed=3)
    cases = [TrainingCase(first, first_labels, slices=every_nth_annotated(first_labels, 3)),
             TrainingCase(second, second_labels, name="held-out")]
    result = finetune_cohort(cases, FinetuneConfig(epochs=2, img_size=224, device="cpu", validation_volumes=1))
    held = result.metadata.training["cases"][1]
    assert held["slices"] == [] and held["validation_slices"] == [i for i in range(16) if second_labels[i].any()]
    assert result.metadata.training["cases"][0]["validation_slices"] == []
    record = result.history[-1]
    assert set(record["val_dice_per_class"]) == {"Segment_1", "Segment_2"}
    scores = [d for d in record["val_dice_per_class"].values() if d is not None]
    assert record["val_dice"] == pytest.approx(np.mean(scores))


def test_evaluate_scores_every_case_and_summarises_each_class(cohort, tmp_path, capsys):
    folder, labels = cohort["folder"], cohort["labels"]
    a_shifted = np.roll(labels["a"], 3, axis=2)
    c_shifted = np.roll(labels["c"], 1, axis=1)
    write_labelmap(tmp_path / "a-pred.nrrd", a_shifted, _grid(cohort["a"]))
    write_labelmap(tmp_path / "c-pred.nrrd", c_shifted, _grid(cohort["c"]))
    manifest = tmp_path / "eval.csv"
    manifest.write_text("prediction,reference,name\nc-pred.nrrd,c-ref.nrrd,patient c\n", encoding="utf-8")
    write_labelmap(tmp_path / "c-ref.nrrd", labels["c"], _grid(cohort["c"]))
    write_labelmap(tmp_path / "a-ref.nrrd", labels["a"], _grid(cohort["a"]))
    scores, table = tmp_path / "scores.json", tmp_path / "scores.csv"
    code, out, err = run(["evaluate", tmp_path / "a-pred.nrrd", tmp_path / "a-ref.nrrd", "--manifest", manifest,
                          "--json", scores, "--csv", table], capsys)
    assert code == 0, err
    report = json.loads(scores.read_text(encoding="utf-8"))
    assert [(r["case"], r["label"]) for r in report["cases"]] == [("a-pred.nrrd", 1), ("a-pred.nrrd", 2), ("patient c", 1)]
    dice_a1 = dice_score(a_shifted == 1, labels["a"] == 1)
    dice_c1 = dice_score(c_shifted == 1, labels["c"] == 1)
    assert report["cases"][0]["dice"] == pytest.approx(dice_a1)
    first = report["summary"][0]
    assert first["cases"] == 2 and first["dice_mean"] == pytest.approx((dice_a1 + dice_c1) / 2)
    assert first["dice_sd"] == pytest.approx(np.std([dice_a1, dice_c1], ddof=1))
    assert len(table.read_text(encoding="utf-8").splitlines()) == 4
    assert "±" in out and "patient c" in out


def _grid(path: Path) -> Volume:
    from hsam.volumes.volume import read_volume

    return read_volume(path)
