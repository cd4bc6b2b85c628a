"""Guided mode: annotated slices propagated into a prior that H-SAM corrects (real tiny models, real files)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.evaluation.baselines import flow_propagation, nearest_slice_copy
from hsam.guidance.augment import dilate, perturb_prior, shift
from hsam.guidance.fill import fill_between_slices
from hsam.guidance.flow import flow_images
from hsam.guidance.priors import PRIOR_LOGIT, SlicePrior, annotated_slices
from hsam.inference.segment import segment_volume
from hsam.models.build import build_hsam
from hsam.models.bundle import BundleMetadata, load_bundle, save_bundle
from hsam.runtime.errors import InputError
from hsam.training.config import FinetuneConfig
from hsam.training.data import leave_one_out_priors, volume_prior
from hsam.training.finetune import finetune
from hsam.volumes.preprocess import IntensityPreprocessing
from phantom import phantom_volume

LABEL_VALUES = (2, 5)


@pytest.fixture(scope="module")
def phantom():
    return phantom_volume((30, 48, 48), LABEL_VALUES)


def class_indices(labels: np.ndarray) -> np.ndarray:
    out = np.zeros_like(labels)
    for k, value in enumerate(LABEL_VALUES, start=1):
        out[labels == value] = k
    return out


def sparse(labels: np.ndarray, annotated: list[int]) -> np.ndarray:
    out = np.zeros_like(labels)
    out[annotated] = labels[annotated]
    return out


def untrained_guided(img_size: int = 224, kind: str = "linear"):
    torch.manual_seed(0)
    model = build_hsam("tiny", len(LABEL_VALUES), img_size, guided=True)
    metadata = BundleMetadata(
        preset="tiny", img_size=img_size, num_classes=len(LABEL_VALUES), class_names=["ellipsoid", "sphere"],
        class_colors=[(0.9, 0.3, 0.2), (0.2, 0.6, 0.9)], label_values=list(LABEL_VALUES),
        preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
        guidance={"prior": kind, "prompt_dropout": 0.2},
    )
    return model, metadata


# ------------------------------------------------------------------------------------------- priors


def test_linear_and_nearest_priors_are_the_nearest_slice_copy(phantom):
    _, labels, _ = phantom
    classes = class_indices(labels)
    annotated = [3, 10, 17, 24]
    copy = nearest_slice_copy(classes, annotated)
    for kind in ("linear", "nearest"):
        prior = SlicePrior(classes, annotated, 2, kind)
        predicted = np.stack([prior.logits(z).argmax(0) for z in range(len(classes))])
        # ties (equidistant slices) may go either way for the blend; all other slices are the copy's
        far = [z for z in range(len(classes)) if z not in (6, 13, 20)] if kind == "linear" else range(len(classes))
        np.testing.assert_array_equal(predicted[list(far)], copy[list(far)])


def test_fill_prior_is_fill_between_slices(phantom):
    pytest.importorskip("slicer")
    _, labels, _ = phantom
    classes = class_indices(labels)
    annotated = [3, 10, 17, 24]
    filled = fill_between_slices(classes, annotated)
    prior = SlicePrior(classes, annotated, 2, "fill")
    for z in range(3, 25):
        np.testing.assert_array_equal(prior.logits(z).argmax(0), filled[z])


def test_distance_prior_shrinks_a_structure_annotated_on_one_side():
    labels = np.zeros((11, 32, 32), dtype=np.uint8)
    labels[0, 8:24, 8:24] = 1
    prior = SlicePrior(labels, [0, 10], 1, "distance")
    areas = [int((prior.logits(z).argmax(0) == 1).sum()) for z in range(11)]
    assert areas[0] == 256 and areas[10] == 0
    assert all(a >= b for a, b in zip(areas, areas[1:])) and areas[6] == 0


def test_a_leave_one_out_prior_never_sees_its_own_slice(phantom):
    volume, labels, _ = phantom
    classes = class_indices(labels)
    images = flow_images(volume.array, "mr")
    annotated = [3, 10, 17, 24]
    for kind in ("flow", "linear", "nearest", "distance"):
        before = SlicePrior(classes, annotated, 2, kind, images).leave_one_out(10)
        changed = classes.copy()
        changed[10] = 0
        changed[10, 5:40, 5:40] = 2  # a different drawing of slice 10
        after = SlicePrior(changed, annotated, 2, kind, images).leave_one_out(10)
        np.testing.assert_array_equal(before, after)
        assert not np.array_equal(after, SlicePrior(changed, annotated, 2, kind, images).logits(10))


def test_training_priors_are_leave_one_out(phantom):
    volume, labels, _ = phantom
    classes = class_indices(labels)
    annotated = [3, 10, 17, 24]
    priors = leave_one_out_priors(volume_prior(classes, 0, annotated, 2, "nearest", volume.array), annotated, 48)
    copy = nearest_slice_copy(classes, [3, 17, 24])  # slice 10 from its neighbours only
    np.testing.assert_array_equal(priors[1].argmax(0).numpy(), copy[10])


def test_guided_mode_needs_two_annotated_slices(phantom):
    _, labels, _ = phantom
    with pytest.raises(InputError, match="at least 2 annotated slices"):
        SlicePrior(class_indices(labels), [10], 2)


def test_prior_augmentation_moves_grows_and_drops():
    prior = torch.full((2, 32, 32), -PRIOR_LOGIT)
    prior[0] = 0
    prior[1, 10:20, 10:20] = PRIOR_LOGIT
    moved = shift(prior, 2, -3)
    assert torch.equal(moved[1, 12:22, 7:17], prior[1, 10:20, 10:20])
    assert int((dilate(prior[1], 1) > 0).sum()) == 144 and int((dilate(prior[1], -1) > 0).sum()) == 64
    generator = torch.Generator().manual_seed(0)
    perturbed = [perturb_prior(prior, generator) for _ in range(50)]
    assert any(not torch.equal(p, prior) for p in perturbed)
    assert all(torch.equal(p[0], prior[0]) for p in perturbed)  # the background stays at 0


# --------------------------------------------------------------------------------------- the model


def test_an_untrained_guided_model_returns_its_prior():
    model, _ = untrained_guided()
    images = torch.rand(2, 3, 224, 224)
    prior = torch.randn(2, 3, 224, 224) * 3
    with torch.no_grad():
        output = model.eval()(images, prior=prior)
    assert torch.equal(output.masks, prior)
    assert torch.count_nonzero(output.correction) == 0


def test_at_step_0_guided_segmentation_is_the_interpolation(phantom):
    volume, labels, _ = phantom
    model, metadata = untrained_guided()
    annotated = [3, 10, 17, 24]
    result = segment_volume(model, volume, metadata, device="cpu", annotations=sparse(labels, annotated))
    copy = nearest_slice_copy(labels, annotated)
    np.testing.assert_array_equal(result.labels[[0, 1, 4, 5, 8, 9, 11, 12, 15, 16]],
                                  copy[[0, 1, 4, 5, 8, 9, 11, 12, 15, 16]])


def test_annotated_slices_come_out_exactly_as_drawn(phantom):
    volume, labels, _ = phantom
    model, metadata = untrained_guided()
    with torch.no_grad():
        model.guidance.stage2_gate.fill_(1.0)  # a model that changes its prior everywhere
    drawn = sparse(labels, [3, 10, 17, 24])
    drawn[10, :4, :4] = 5  # a stroke the image does not support
    result = segment_volume(model, volume, metadata, device="cpu", annotations=drawn)
    np.testing.assert_array_equal(result.labels[[3, 10, 17, 24]], drawn[[3, 10, 17, 24]])
    unannotated = [z for z in range(30) if z not in (3, 10, 17, 24)]
    assert not np.array_equal(result.labels[unannotated], nearest_slice_copy(drawn, [3, 10, 17, 24])[unannotated])


def test_a_guided_model_without_annotations_runs_prompt_free(phantom):
    volume, labels, _ = phantom
    model, metadata = untrained_guided()
    with torch.no_grad():
        model.guidance.stage2_gate.fill_(1.0)
    guided = segment_volume(model, volume, metadata, device="cpu", annotations=sparse(labels, [3, 10, 17, 24])).labels
    prompt_free = segment_volume(model, volume, metadata, device="cpu").labels
    model.guidance = None  # the same network without its guidance: exactly the prompt-free path
    np.testing.assert_array_equal(prompt_free, segment_volume(model, volume, metadata, device="cpu").labels)
    assert not np.array_equal(guided, prompt_free)


def test_bad_annotations_are_refused(phantom):
    volume, labels, _ = phantom
    model, metadata = untrained_guided()
    with pytest.raises(InputError, match="grid"):
        segment_volume(model, volume, metadata, annotations=sparse(labels, [3, 10])[:, :40])
    with pytest.raises(InputError, match="label value 9"):
        segment_volume(model, volume, metadata, annotations=np.where(sparse(labels, [3, 10]) == 2, 9, 0))
    with pytest.raises(InputError, match="at least 2 annotated slices"):
        segment_volume(model, volume, metadata, annotations=sparse(labels, [10]))
    metadata.guidance = None
    with pytest.raises(InputError, match="prompt-free"):
        segment_volume(model, volume, metadata, annotations=sparse(labels, [3, 10]))


# ------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def guided_bundle(phantom, tmp_path_factory):
    volume, labels, segments = phantom
    annotated = [2, 6, 10, 14, 18, 22, 26]
    config = FinetuneConfig(epochs=3, img_size=224, device="cpu", seed=3, slices=annotated, guidance="linear")
    result = finetune(volume, labels, segments, config)
    path = tmp_path_factory.mktemp("guided") / "guided.hsam"
    save_bundle(path, result.model, result.metadata)
    return path, result, annotated


def test_guided_training_starts_from_the_prior_and_is_recorded(guided_bundle):
    path, result, _ = guided_bundle
    guidance = result.metadata.guidance
    assert guidance["prior"] == "linear" and guidance["prompt_dropout"] == 0.2
    model, metadata = load_bundle(path)
    assert model.guided and metadata.guidance["prior"] == "linear"
    # validation scored the prior alone before the first step: the kept weights never score below it
    training = result.metadata.training
    assert training["prior_val_dice"] is not None and training["best_val_dice"] >= training["prior_val_dice"]


def _write(path: Path, array: np.ndarray, volume, spacing=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing or volume.spacing)
    image.SetOrigin(volume.origin)
    sitk.WriteImage(image, str(path))
    return path


def _hsam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsam", *args], capture_output=True, encoding="utf-8", timeout=300)


def test_cli_segments_guided_and_prompt_free(phantom, guided_bundle, tmp_path):
    volume, labels, _ = phantom
    path, _, annotated = guided_bundle
    image = _write(tmp_path / "volume.nrrd", volume.array.astype(np.float32), volume)
    drawn = _write(tmp_path / "drawn.nrrd", sparse(labels, annotated), volume)
    guided = _hsam("segment", str(image), "-m", str(path), "-o", str(tmp_path / "guided.nrrd"), "--annotations", str(drawn))
    assert guided.returncode == 0, guided.stderr
    assert "guided by the annotations" in guided.stderr
    output = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "guided.nrrd")))
    np.testing.assert_array_equal(output[annotated], labels[annotated])
    free = _hsam("segment", str(image), "-m", str(path), "-o", str(tmp_path / "free.nrrd"))
    assert free.returncode == 0 and "prompt-free" in free.stderr
    info = _hsam("info", str(path))
    assert "guided (prior: linear" in info.stdout
    choice = load_bundle(path)[1].guidance["choice"]
    assert f"ellipsoid                #e64c33  keeps {choice[0]} (Dice on 1 held-out slice: prior " in info.stdout


def test_cli_refuses_bad_annotations_in_one_line(phantom, guided_bundle, tmp_path):
    volume, labels, _ = phantom
    path, _, annotated = guided_bundle
    image = _write(tmp_path / "volume.nrrd", volume.array.astype(np.float32), volume)
    cases = {
        "other grid": _write(tmp_path / "other.nrrd", sparse(labels, annotated), volume, spacing=(1.0, 1.0, 2.0)),
        "unknown class": _write(tmp_path / "unknown.nrrd", np.where(sparse(labels, annotated) == 2, 9, 0).astype(np.uint8),
                                volume),
        "nothing annotated": _write(tmp_path / "empty.nrrd", np.zeros_like(labels), volume),
    }
    for what, annotations in cases.items():
        result = _hsam("segment", str(image), "-m", str(path), "-o", str(tmp_path / "out.nrrd"),
                       "--annotations", str(annotations))
        assert result.returncode == 2, what
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("hsam: error:"), (what, result.stderr)
        assert not (tmp_path / "out.nrrd").exists()


def _events(stdout: str) -> list[dict]:
    import json

    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_cli_finetune_previews_the_flow_propagation_first(phantom, tmp_path):
    volume, labels, _ = phantom
    annotated = [3, 10, 17, 24]
    image = _write(tmp_path / "volume.nrrd", volume.array.astype(np.float32), volume)
    drawn = _write(tmp_path / "drawn.nrrd", sparse(labels, annotated), volume)
    common = ["finetune", str(image), str(drawn), "--guided", "--epochs", "2", "--img-size", "224", "--progress", "json"]
    first = _hsam(*common, "-o", str(tmp_path / "a.hsam"), "--preview", str(tmp_path / "first.nrrd"),
                  "--preview-interval", "1000")
    assert first.returncode == 0, first.stderr
    assert [e["event"] for e in _events(first.stdout)].count("preview") == 1
    preview = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "first.nrrd")))
    np.testing.assert_array_equal(preview, flow_propagation(volume.array, labels, annotated))

    every_epoch = _hsam(*common, "-o", str(tmp_path / "b.hsam"), "--preview", str(tmp_path / "each.nrrd"),
                        "--preview-interval", "0.001")
    assert [e["event"] for e in _events(every_epoch.stdout)].count("preview") == 3  # step 0 and 2 epochs


def test_progress_in_a_log_is_a_few_lines(phantom, guided_bundle, tmp_path):
    volume, labels, _ = phantom
    path, _, annotated = guided_bundle
    image = _write(tmp_path / "volume.nrrd", volume.array.astype(np.float32), volume)
    drawn = _write(tmp_path / "drawn.nrrd", sparse(labels, annotated), volume)
    result = _hsam("finetune", str(image), str(drawn), "--guided", "--epochs", "3", "--img-size", "224",
                   "-o", str(tmp_path / "m.hsam"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert 2 <= len(lines) <= 6 and "\r" not in result.stderr, result.stderr


def test_cli_finetune_stops_early_on_the_stop_file_and_saves(phantom, tmp_path):
    """``--stop-file``: training ends after the step during which the file appeared, the model is saved."""
    import json
    import time

    volume, labels, _ = phantom
    image = _write(tmp_path / "volume.nrrd", volume.array.astype(np.float32), volume)
    drawn = _write(tmp_path / "drawn.nrrd", sparse(labels, [3, 10, 17, 24]), volume)
    stop, model = tmp_path / "stop", tmp_path / "m.hsam"
    process = subprocess.Popen(
        [sys.executable, "-m", "hsam", "finetune", str(image), str(drawn), "--guided", "--epochs", "1000",
         "--img-size", "224", "--device", "cpu", "-o", str(model), "--stop-file", str(stop), "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
    try:
        for line in process.stdout:
            if json.loads(line).get("step", 0) >= 2:
                break
        stop.touch()
        started = time.monotonic()
        _, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()
    from hsam.models.bundle import read_bundle_metadata

    recorded = read_bundle_metadata(model).training
    assert 2 <= recorded["steps"] and recorded["epochs"] < 1000


def test_some_training_priors_come_from_the_slices_own_labels(phantom):
    from hsam.guidance.augment import mix_own_priors, own_label_prior

    _, labels, _ = phantom
    classes = class_indices(labels)
    prior = SlicePrior(classes, [3, 10], 2, "nearest")
    for dtype in (torch.long, torch.uint8):  # one implementation: ``one_hot_logits``
        own = own_label_prior(torch.from_numpy(classes[3]).to(dtype), 2)
        assert own.dtype == torch.float32 and np.array_equal(own.numpy(), prior.logits(3))
    targets = torch.from_numpy(classes[[10] * 40]).long()
    far = torch.from_numpy(np.stack([prior.leave_one_out(10)] * 40))
    mixed = mix_own_priors(far, targets, torch.Generator().manual_seed(0))
    own = [torch.equal(m, own_label_prior(targets[0], 2)) for m in mixed]
    assert 5 < sum(own) < 35 and all(o or torch.equal(m, far[0]) for o, m in zip(own, mixed))
