"""Few-shot fine-tuning on a synthetic phantom with real tiny H-SAM models on the CPU."""

import threading
import time

import numpy as np
import pytest
import torch

from hsam.guidance.priors import annotated_slices
from hsam.inference.segment import segment_volume
from hsam.models.bundle import save_bundle
from hsam.runtime.cpu import cpu_capability, onednn_computes
from hsam.runtime.errors import Cancelled, InputError
from hsam.training.augment import RandomAugmentation, crop_and_zoom, elastic, gaussian_blur, rotate
from hsam.training.config import FinetuneConfig, reference_learning_rate, warmup_iterations
from hsam.training.distributed import is_main_process
from hsam.training.finetune import finetune
from phantom import every_nth_annotated, phantom_volume

# Every run here uses the tiny preset on the CPU; the few-shot run must fit this budget.
CPU_BUDGET_SECONDS = 90
LABEL_VALUES = (2, 5, 7)


@pytest.fixture(scope="module")
def phantom():
    return phantom_volume((40, 64, 64), LABEL_VALUES)


def quick_config(**kwargs) -> FinetuneConfig:
    defaults = dict(epochs=2, img_size=224, device="cpu", seed=11)
    defaults.update(kwargs)
    return FinetuneConfig(**defaults)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * np.logical_and(prediction, truth).sum() / (prediction.sum() + truth.sum())


@pytest.mark.slow
def test_few_shot_finetuning_segments_the_unannotated_slices(phantom):
    volume, labels, segments = phantom
    annotated = every_nth_annotated(labels, 10)
    assert len(annotated) == 4  # 10 % of the 40 slices

    started = time.monotonic()
    result = finetune(
        volume, labels, segments, FinetuneConfig(slices=annotated, epochs=300, time_budget=CPU_BUDGET_SECONDS, device="cpu")
    )
    seconds = time.monotonic() - started
    assert seconds < CPU_BUDGET_SECONDS + 30  # the budget plus data preparation and the last step

    meta = result.metadata
    assert meta.label_values == list(LABEL_VALUES)
    assert meta.class_names == ["ellipsoid", "sphere", "box"]
    case = meta.training["cases"][0]
    assert case["slices"] == annotated and case["validation_slices"] == []

    losses = [record["loss"] for record in result.history]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])

    predicted = segment_volume(result.model, volume, meta, device="cpu").labels
    unannotated = [z for z in annotated_slices(labels, 0) if z not in annotated]
    scores = {
        value: dice(predicted[unannotated] == value, labels[unannotated] == value) for value in LABEL_VALUES
    }
    print(f"few-shot phantom: {seconds:.1f} s, Dice on unannotated slices {scores}")
    assert np.mean(list(scores.values())) >= 0.9
    assert min(scores.values()) >= 0.85


def test_cancel_raises_and_writes_nothing(phantom, tmp_path, monkeypatch):
    volume, labels, segments = phantom
    monkeypatch.chdir(tmp_path)
    cancel = threading.Event()
    steps = []

    def progress(p):
        steps.append(p.step)
        if p.step == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        finetune(volume, labels, segments, quick_config(epochs=50), progress=progress, cancel=cancel)
    assert steps == [1, 2, 3]
    assert list(tmp_path.iterdir()) == []


def test_a_seed_makes_training_reproducible(phantom):
    volume, labels, segments = phantom
    first = finetune(volume, labels, segments, quick_config(seed=5)).model.state_dict()
    second = finetune(volume, labels, segments, quick_config(seed=5)).model.state_dict()
    other = finetune(volume, labels, segments, quick_config(seed=6)).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_checkpointing_keeps_the_losses(phantom):
    volume, labels, segments = phantom
    annotated = every_nth_annotated(labels, 10)
    losses = {}
    for checkpointing in (False, True):
        result = finetune(volume, labels, segments,
                          quick_config(slices=annotated, epochs=3, gradient_checkpointing=checkpointing))
        assert result.model.image_encoder.gradient_checkpointing is checkpointing
        losses[checkpointing] = [r["loss"] for r in result.history]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


@pytest.mark.skipif(
    not onednn_computes(torch.bfloat16),
    reason=f"this CPU ({cpu_capability()}) has no native bfloat16 kernels, so bf16 training is refused "
    "(tested in test_cpu_precision.py)",
)
def test_bf16_trains_with_float32_weights(phantom):
    volume, labels, segments = phantom
    annotated = every_nth_annotated(labels, 10)
    fp32 = finetune(volume, labels, segments, quick_config(slices=annotated, epochs=3))
    bf16 = finetune(volume, labels, segments, quick_config(slices=annotated, epochs=3, precision="bf16"))
    bf16_losses = [r["loss"] for r in bf16.history]
    assert np.isfinite(bf16_losses).all() and bf16_losses != [r["loss"] for r in fp32.history]
    assert all(v.dtype == torch.float32 for v in bf16.model.state_dict().values() if v.is_floating_point())


def test_resume_continues_the_saved_run(phantom, tmp_path):
    volume, labels, segments = phantom
    annotated = every_nth_annotated(labels, 10)
    first = finetune(volume, labels, segments, quick_config(slices=annotated, epochs=30))
    path = first.save_training_state(tmp_path / "run.state")

    resumed = finetune(volume, labels, segments, quick_config(slices=annotated, epochs=40, resume=path))
    assert [r["epoch"] for r in resumed.history] == list(range(40))
    assert resumed.history[:30] == first.history
    assert resumed.history[30]["steps"] == first.history[-1]["steps"] + 2
    assert resumed.metadata.training["epochs"] == 40
    assert resumed.metadata.training["resumed_from"] == "run.state"
    # It goes on from the trained weights, not from a fresh model.
    assert resumed.history[30]["loss"] < 0.9 * first.history[0]["loss"]
    changed = [k for k, v in resumed.model.state_dict().items() if not torch.equal(v, first.model.state_dict()[k])]
    assert changed

    with pytest.raises(InputError, match="already did 30 epochs"):
        finetune(volume, labels, segments, quick_config(slices=annotated, epochs=30, resume=path))


def test_continue_from_a_bundle(phantom, tmp_path):
    volume, labels, segments = phantom
    first = finetune(volume, labels, segments, quick_config(epochs=1))
    path = save_bundle(tmp_path / "first.hsam", first.model, first.metadata)
    second = finetune(volume, labels, segments, FinetuneConfig(base_bundle=path, epochs=1, device="cpu"))
    assert second.metadata.training["base_bundle"] == "first.hsam"
    assert second.metadata.img_size == 224 and second.metadata.preset == "tiny"
    # new annotations of some of the model's classes: the model keeps all three
    subset = finetune(volume, np.where(labels == 7, 0, labels), segments[:2], quick_config(base_bundle=path, epochs=1))
    assert subset.metadata.label_values == list(LABEL_VALUES) and subset.metadata.num_classes == 3
    with pytest.raises(InputError, match="segment 'Label_9'"):
        finetune(volume, np.where(labels == 7, 9, labels), [], FinetuneConfig(base_bundle=path, epochs=1))


def test_validation_keeps_the_best_weights(phantom):
    volume, labels, segments = phantom
    slices = annotated_slices(labels, 0)[::4]
    result = finetune(volume, labels, segments, quick_config(slices=slices, epochs=3))
    case = result.metadata.training["cases"][0]
    held_out = case["validation_slices"]
    assert len(held_out) == max(1, round(0.15 * len(slices)))
    assert not set(held_out) & set(case["slices"])
    dices = [r["val_dice"] for r in result.history]
    assert result.metadata.training["best_val_dice"] == max(dices)


def test_time_budget_stops_the_run(phantom):
    volume, labels, segments = phantom
    started = time.monotonic()
    result = finetune(volume, labels, segments, quick_config(epochs=None, time_budget=2.0))
    assert time.monotonic() - started < 15
    assert 1 <= result.metadata.training["epochs"] < 300


def test_progress_reports_each_step(phantom):
    volume, labels, segments = phantom
    reports = []
    finetune(volume, labels, segments, quick_config(epochs=2), progress=reports.append)
    steps = [r.step for r in reports if "loss" in r.message]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert reports[-1].fraction == 1.0
    assert all(0 <= r.fraction <= 1 for r in reports)


def test_bad_input_is_refused(phantom):
    volume, labels, segments = phantom
    with pytest.raises(InputError, match="no annotated slice"):
        finetune(volume, np.zeros_like(labels), segments, quick_config())
    with pytest.raises(InputError, match="grid"):
        finetune(volume, labels[:, :32], segments, quick_config())
    with pytest.raises(InputError, match="value 7"):
        finetune(volume, labels, segments[:2], quick_config())
    with pytest.raises(InputError, match="outside the volume"):
        finetune(volume, labels, segments, quick_config(slices=[3, 400]))
    with pytest.raises(InputError, match="no voxel"):
        finetune(volume, labels, segments, quick_config(slices=[2]))  # a slice holding only the ellipsoid
    with pytest.raises(InputError, match="slice axis"):
        finetune(volume, labels, segments, quick_config(slice_axis="oblique"))


def test_classes_without_segments_come_from_the_labelmap(phantom):
    volume, labels, _ = phantom
    result = finetune(volume, labels, [], quick_config(epochs=1))
    assert result.metadata.label_values == list(LABEL_VALUES)
    assert result.metadata.num_classes == 3


def test_learning_rate_schedule_follows_the_reference():
    base, warmup, total = 0.01, 20, 200
    rates = [reference_learning_rate(i, base, warmup, total) for i in range(total)]
    assert rates[0] == rates[1] == pytest.approx(base / warmup)  # set after each step, as the authors'
    assert rates[warmup] == pytest.approx(base)
    assert all(a < b for a, b in zip(rates[1:warmup], rates[2 : warmup + 1]))
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1 :]))
    assert rates[warmup + 1] == pytest.approx(base)
    assert rates[-1] == pytest.approx(base * (1 - (total - 2 - warmup) / total) ** 0.9)
    assert warmup_iterations(10_000) == 250 and warmup_iterations(600) == 60


def test_annotated_slices_along_each_axis():
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[1, 2, 3] = 1
    labels[3, 4, 5] = 2
    assert annotated_slices(labels, 0) == [1, 3]
    assert annotated_slices(labels, "coronal") == [2, 4]
    assert annotated_slices(labels, "sagittal") == [3, 5]
    assert is_main_process()


def two_shapes() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.full((48, 48), 0.1)
    label = torch.zeros((48, 48), dtype=torch.long)
    image[10:30, 8:40], label[10:30, 8:40] = 0.6, 1
    image[32:44, 30:42], label[32:44, 30:42] = 0.9, 4
    return image, label


def test_rotation_by_a_right_angle_is_exact():
    image, label = two_shapes()
    rotated_image, rotated_label = rotate(image, label, 90.0)
    assert torch.equal(rotated_label, torch.rot90(label, -1))
    assert torch.equal(rotated_image, torch.rot90(image, -1))


def test_full_crop_is_the_identity_and_labels_stay_labels():
    image, label = two_shapes()
    same_image, same_label = crop_and_zoom(image, label, 0, 0, 48, 48)
    assert torch.allclose(same_image, image) and torch.equal(same_label, label)
    zoomed_image, zoomed_label = crop_and_zoom(image, label, 8, 6, 24, 24)
    assert zoomed_label.shape == label.shape
    assert set(zoomed_label.unique().tolist()) <= {0, 1, 4}


def test_elastic_warps_labels_by_nearest_neighbour():
    image, label = two_shapes()
    warped_image, warped_label = elastic(image, label, torch.Generator().manual_seed(3))
    assert not torch.equal(warped_label, label)
    assert set(warped_label.unique().tolist()) == {0, 1, 4}  # no interpolated classes in between
    assert (warped_label == 1).sum() == pytest.approx(int((label == 1).sum()), rel=0.3)
    assert gaussian_blur(torch.ones(1, 1, 20, 20), 3.0).allclose(torch.ones(1, 1, 20, 20))


def test_augmentation_is_seeded_and_varied():
    image, label = two_shapes()
    images, labels = image.expand(16, -1, -1), label.expand(16, -1, -1)
    a, b, c = RandomAugmentation(1), RandomAugmentation(1), RandomAugmentation(2)
    out_a, out_b, out_c = a(images, labels), b(images, labels), c(images, labels)
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    assert not torch.equal(out_a[1], out_c[1])
    assert out_a[0].shape == images.shape and out_a[1].dtype == torch.long
    changed = [not torch.equal(out_a[1][i], label) for i in range(16)]
    assert sum(changed) >= 12  # about 2 % of slices stay unchanged
