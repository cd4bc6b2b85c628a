"""The correction loop in the engine and the CLI: uncertainty maps, suggested slices, continued fine-tuning.

Real tiny H-SAM models, real files on disk, the ``hsam`` command line.
"""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.cli import main
from hsam.inference.segment import segment_volume
from hsam.inference.suggest import SpreadRule, suggest_slices, uniform_slices
from hsam.inference.uncertainty import DEFAULT_SIGNAL, SIGNALS, scores_csv_path, slice_scores, voxel_uncertainty
from hsam.models.build import build_hsam
from hsam.models.bundle import BundleMetadata, load_bundle, read_bundle_metadata, save_bundle
from hsam.runtime.errors import InputError
from hsam.training.config import FinetuneConfig
from hsam.training.finetune import finetune
from hsam.volumes.preprocess import IntensityPreprocessing
from hsam.volumes.segmentation import Segment, write_segmentation
from hsam.volumes.volume import Volume, read_volume
from phantom import phantom_arrays

SPACING, ORIGIN = (0.8, 0.7, 2.0), (-20.0, -15.0, -7.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated in-plane: the grid must be copied, not assumed
CLASSES = (("Liver", 3, (0.8, 0.3, 0.2), "liver-term"), ("Kidney", 7, (0.1, 0.6, 0.9), None))


def tiny_bundle(path, classes=CLASSES, seed=0):
    torch.manual_seed(seed)
    model = build_hsam("tiny", num_classes=len(classes), img_size=224)
    metadata = BundleMetadata(
        preset="tiny", img_size=224, num_classes=len(classes),
        class_names=[c[0] for c in classes], class_colors=[c[2] for c in classes],
        label_values=[c[1] for c in classes], terminology=[c[3] for c in classes],
        preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
    )
    return save_bundle(path, model, metadata)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A (12, 40, 48) phantom (labels 1, 2) written as NRRD with a rotated grid, and a tiny bundle."""
    folder = tmp_path_factory.mktemp("loop")
    image, labels = phantom_arrays((12, 40, 48), label_values=(1, 2))
    volume = Volume(image * 1000, SPACING, ORIGIN, DIRECTION)
    sitk_image = volume.to_sitk()
    sitk.WriteImage(sitk_image, str(folder / "volume.nrrd"))
    return {"folder": folder, "volume": volume, "labels": labels, "model": tiny_bundle(folder / "tiny.hsam")}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- uncertainty ---------------------------------------------------------------------------------


def test_signals_on_known_probabilities():
    k = 3
    confident = torch.tensor([8.0, -8.0, -8.0]).view(1, k, 1, 1)
    flat = torch.zeros(1, k, 1, 1)
    other = torch.tensor([-8.0, 8.0, -8.0]).view(1, k, 1, 1)
    assert voxel_uncertainty(confident, confident, "disagreement").item() == pytest.approx(0, abs=1e-4)
    assert voxel_uncertainty(confident, other, "disagreement").item() == pytest.approx(1, abs=1e-3)
    assert voxel_uncertainty(flat, flat, "entropy").item() == pytest.approx(1, abs=1e-5)
    assert voxel_uncertainty(confident, confident, "entropy").item() == pytest.approx(0, abs=1e-3)
    # two confident stages that disagree: the mean is split between two classes, entropy log 2 / log 3
    assert voxel_uncertainty(confident, other, "entropy").item() == pytest.approx(math.log(2) / math.log(3), abs=1e-3)
    combined = voxel_uncertainty(confident, other, "combined").item()
    assert combined == pytest.approx((1 + math.log(2) / math.log(3)) / 2, abs=1e-3)


def test_slice_score_is_the_mean_over_the_slice():
    u = np.zeros((3, 4, 5), np.float32)
    u[0, :2, :2] = 0.5
    u[2] = 0.25
    np.testing.assert_allclose(slice_scores(u, axis=0), [4 * 0.5 / 20, 0.0, 0.25])
    np.testing.assert_allclose(slice_scores(u, axis=2)[:2], [(2 * 0.5 + 4 * 0.25) / 12] * 2)


@pytest.mark.parametrize("signal", SIGNALS)
def test_segment_volume_returns_a_map_on_the_input_grid(data, signal):
    model, metadata = load_bundle(data["model"])
    result = segment_volume(model, data["volume"], metadata, device="cpu", uncertainty=signal, slice_range=(2, 9))
    u = result.uncertainty
    assert u.shape == data["volume"].array.shape and u.dtype == np.float32
    assert 0 <= u.min() and u.max() <= 1 and u[2:10].max() > 0
    assert not u[:2].any() and not u[10:].any()  # outside the segmented range
    assert result.slice_scores.shape == (12,)
    assert np.isnan(result.slice_scores[:2]).all() and np.isnan(result.slice_scores[10:]).all()
    np.testing.assert_allclose(result.slice_scores[2:10], slice_scores(u)[2:10])
    plain = segment_volume(model, data["volume"], metadata, device="cpu", slice_range=(2, 9))
    np.testing.assert_array_equal(plain.labels, result.labels)  # the labels do not change
    assert plain.uncertainty is None and plain.slice_scores is None


def test_unknown_signal_is_refused(data):
    model, metadata = load_bundle(data["model"])
    with pytest.raises(InputError, match="uncertainty signal"):
        segment_volume(model, data["volume"], metadata, device="cpu", uncertainty="variance")


# --- suggestions ---------------------------------------------------------------------------------


def test_suggestions_skip_annotated_slices_and_are_spread():
    scores = np.full(60, 0.1)
    scores[20:26] = 0.9  # a block of six uncertain neighbours
    scores[50] = 0.5
    picks = suggest_slices(scores, 3, annotated=[10, 40], rule=SpreadRule(min_distance=5))
    assert 10 not in picks and 40 not in picks
    assert picks[0] in range(20, 26)  # the most uncertain first
    gaps = [abs(a - b) for i, a in enumerate(picks) for b in picks[i + 1:] + [10, 40]]
    assert min(gaps) >= 5  # not all from the uncertain block
    assert 50 in picks


def test_suggestions_never_pick_unscored_slices_and_stop_when_none_is_left():
    scores = np.array([np.nan, 0.2, 0.8, np.nan, 0.4])
    picks = suggest_slices(scores, 10, annotated=[1])
    assert sorted(picks) == [2, 4]
    with pytest.raises(InputError, match="outside"):
        suggest_slices(scores, 1, annotated=[7])


def test_uniform_baseline_fills_the_largest_gaps():
    eligible = np.zeros(50, bool)
    eligible[5:46] = True
    assert uniform_slices(eligible, 2, annotated=[5, 25, 45]) in ([15, 35], [35, 15])


# --- command line --------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_segment_writes_the_uncertainty_map_and_csv(data, capsys):
    folder = data["folder"]
    out, u_path = folder / "seg.nrrd", folder / "uncertainty.nii.gz"
    code, _, err = run(["segment", folder / "volume.nrrd", "-m", data["model"], "-o", out, "--device", "cpu",
                        "--uncertainty", u_path, "--uncertainty-signal", "disagreement"], capsys)
    assert code == 0, err
    written = sitk.ReadImage(str(u_path))
    reference = sitk.ReadImage(str(folder / "volume.nrrd"))
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
    model, metadata = load_bundle(data["model"])
    expected = segment_volume(model, read_volume(folder / "volume.nrrd"), metadata, device="cpu", uncertainty="disagreement")
    np.testing.assert_allclose(sitk.GetArrayFromImage(written), expected.uncertainty, atol=1e-6)

    csv_path = scores_csv_path(u_path)
    assert csv_path == folder / "uncertainty.csv"
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "axis,slice,score" and len(rows) == 13
    np.testing.assert_allclose([float(r.split(",")[2]) for r in rows[1:]], expected.slice_scores, atol=1e-6)

    # existing outputs are refused before any work
    code, _, err = run(["segment", folder / "volume.nrrd", "-m", data["model"], "-o", folder / "seg2.nrrd",
                        "--uncertainty", u_path], capsys)
    assert code == 2 and "exists" in err and not (folder / "seg2.nrrd").exists()


@pytest.mark.slow
def test_cli_suggest_skips_annotated_slices(data, capsys):
    folder = data["folder"]
    annotated = np.zeros_like(data["labels"])
    annotated[[3, 8]] = data["labels"][[3, 8]]
    segments = [Segment("a", 1, (1.0, 0.0, 0.0)), Segment("b", 2, (0.0, 1.0, 0.0))]
    write_segmentation(folder / "annotated.seg.nrrd", annotated, data["volume"], segments)

    code, out, err = run(["suggest", folder / "volume.nrrd", "-m", data["model"], "-n", "4", "--device", "cpu",
                          "--annotated", folder / "annotated.seg.nrrd", "--csv", folder / "suggest.csv"], capsys)
    assert code == 0, err
    picks = [int(p) for p in out.strip().split(",")]
    assert len(picks) == 4 and not {3, 8} & set(picks)
    model, metadata = load_bundle(data["model"])
    volume = read_volume(folder / "volume.nrrd")
    scores = segment_volume(model, volume, metadata, device="cpu", uncertainty=DEFAULT_SIGNAL).slice_scores
    assert picks == suggest_slices(scores, 4, [3, 8])
    assert (folder / "suggest.csv").read_text().splitlines()[1].startswith(f"1,axial,{picks[0]},")

    code, out, _ = run(["suggest", folder / "volume.nrrd", "-m", data["model"], "-n", "2", "--device", "cpu",
                        "--annotated", "0,1,2,3,4,5,6,7,8,9"], capsys)
    assert code == 0 and sorted(int(p) for p in out.strip().split(",")) == [10, 11]


# --- continued fine-tuning -----------------------------------------------------------------------


def quick(**kwargs) -> FinetuneConfig:
    return FinetuneConfig(epochs=1, img_size=224, device="cpu", seed=3, validation=False, **kwargs)


@pytest.mark.slow
def test_continued_finetuning_keeps_the_base_model_classes(data, tmp_path):
    base = data["model"]
    labels = np.zeros_like(data["labels"])
    labels[[2, 6]] = data["labels"][[2, 6]]
    # the new annotations number the segments 1, 2 (as Slicer does) and spell a name differently
    segments = [Segment("kidney ", 2, (0.0, 1.0, 0.0)), Segment("Liver", 1, (1.0, 1.0, 0.0))]
    result = finetune(data["volume"], labels, segments, quick(base_bundle=base))

    meta, base_meta = result.metadata, read_bundle_metadata(base)
    assert meta.class_names == base_meta.class_names == ["Liver", "Kidney"]
    assert meta.class_colors == base_meta.class_colors
    assert meta.label_values == [3, 7] and meta.terminology == ["liver-term", None]
    assert meta.training["base_bundle"] == base.name
    # the model learnt Liver from label 1 and Kidney from label 2: its predictions use 3 and 7
    predicted = segment_volume(result.model, data["volume"], meta, device="cpu").labels
    assert set(np.unique(predicted)) <= {0, 3, 7}


@pytest.mark.slow
def test_continued_finetuning_from_a_plain_labelmap_matches_label_values(data):
    labels = np.zeros_like(data["labels"])
    labels[4][data["labels"][4] == 1] = 7
    result = finetune(data["volume"], labels, [], quick(base_bundle=data["model"]))
    assert result.metadata.class_names == ["Liver", "Kidney"] and result.metadata.label_values == [3, 7]


def test_a_model_for_other_classes_is_refused(data, tmp_path, capsys):
    labels = np.zeros_like(data["labels"])
    labels[[2, 6]] = data["labels"][[2, 6]]
    segments = [Segment("Liver", 1, (1.0, 0.0, 0.0)), Segment("Spleen", 2, (0.0, 1.0, 0.0))]
    with pytest.raises(InputError, match=r"tiny.hsam segments Liver \(3\), Kidney \(7\); segment 'Spleen'"):
        finetune(data["volume"], labels, segments, quick(base_bundle=data["model"]))
    with pytest.raises(InputError, match="segment 'Label_1'"):  # a plain labelmap: values 1, 2 are not 3, 7
        finetune(data["volume"], labels, [], quick(base_bundle=data["model"]))

    folder = data["folder"]
    write_segmentation(tmp_path / "other.seg.nrrd", labels, data["volume"], segments)
    out = tmp_path / "continued.hsam"
    code, _, err = run(["finetune", folder / "volume.nrrd", tmp_path / "other.seg.nrrd", "-o", out,
                        "--base-model", data["model"], "--epochs", "1", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "'Spleen'" in err and not out.exists()


@pytest.mark.parametrize("rule", [SpreadRule(min_distance=0), SpreadRule(sigma=1e-3, min_distance=4)])
def test_each_spread_rule_alone_keeps_suggestions_apart(rule):
    scores = np.full(40, 0.05)
    scores[10:20] = np.linspace(0.8, 0.9, 10)  # uncertain neighbours, rising towards 19
    picks = suggest_slices(scores, 3, annotated=[0, 39], rule=rule)
    assert picks[0] == 19
    assert min(abs(a - b) for i, a in enumerate(picks) for b in picks[i + 1:]) >= 3
