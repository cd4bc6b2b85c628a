"""Flow propagation, the flow prior, `hsam propagate` and the per-class choice of guided models
(real OpenCV flows, real tiny models, real files, real processes)."""

import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import hsam.guidance.flow as flow
from hsam.evaluation.baselines import flow_propagation, nearest_slice_copy
from hsam.evaluation.metrics import dice_score
from hsam.guidance.flow import FlowPropagation, SliceFlows, flow_images, looks_like_ct
from hsam.guidance.kinds import CHOICE_SOURCES
from hsam.guidance.priors import SlicePrior
from hsam.inference.segment import combine_sources, segment_volume
from hsam.models.build import build_hsam
from hsam.models.bundle import BundleMetadata
from hsam.training.selection import _class_dice, choose_sources, select_sources
from hsam.volumes.preprocess import IntensityPreprocessing
from hsam.volumes.volume import Volume
from phantom import phantom_volume

SLICES, SIZE, RADIUS, STEP = 21, 72, 9, 1.6


def moving_disc() -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) (z, y, x): a bright disc on a textured background, moving 1.6 px a slice diagonally."""
    rng = np.random.default_rng(1)
    texture = rng.normal(0, 1, (SIZE // 4, SIZE // 4)).repeat(4, 0).repeat(4, 1) * 60 + 300
    y, x = np.mgrid[:SIZE, :SIZE]
    image = np.empty((SLICES, SIZE, SIZE), dtype=np.float32)
    labels = np.zeros((SLICES, SIZE, SIZE), dtype=np.uint8)
    for z in range(SLICES):
        centre = 20 + STEP * z
        disc = (y - centre) ** 2 + (x - centre) ** 2 <= RADIUS**2
        image[z] = np.where(disc, 900.0, texture)
        labels[z][disc] = 1
    return image, labels


def mean_dice(predicted: np.ndarray, labels: np.ndarray, slices: list[int]) -> float:
    return float(np.mean([dice_score(predicted[z] == 1, labels[z] == 1) for z in slices]))


@pytest.fixture
def fresh_flows(monkeypatch):
    """An empty flow cache, so that each test computes its own flows."""
    monkeypatch.setattr(flow, "_CACHE", OrderedDict())


def test_flow_propagation_follows_a_moving_shape_the_copy_misses(fresh_flows, monkeypatch):
    image, labels = moving_disc()
    annotated, between = [0, SLICES - 1], list(range(1, SLICES - 1))
    copy = mean_dice(nearest_slice_copy(labels, annotated), labels, between)
    carried = mean_dice(flow_propagation(image, labels, annotated, modality="mr"), labels, between)
    assert carried > 0.9 and carried > copy + 0.2, (carried, copy)

    zero = FlowPropagation(flow_images(image, "mr"), labels, annotated, 1, lambda a, b: np.zeros((*a.shape, 2)))
    still = mean_dice(zero.volume(), labels, between)
    assert still < copy + 0.05  # without the flow it is only the copy: the figure above is the flow's


def test_annotated_slices_are_kept_and_the_ends_carried_on(fresh_flows):
    image, labels = moving_disc()
    annotated = [5, 10, 15]
    carried = flow_propagation(image, labels * 3, annotated, modality="mr")  # label value 3
    np.testing.assert_array_equal(carried[annotated], labels[annotated] * 3)
    assert set(np.unique(carried)) == {0, 3}
    assert mean_dice(carried // 3, labels, [0, 1, 2, 18, 19, 20]) > 0.8  # beyond the ends: still on the disc


def test_flows_are_computed_once_per_volume(fresh_flows, monkeypatch):
    image, labels = moving_disc()
    computed = []
    original = SliceFlows._compute
    monkeypatch.setattr(SliceFlows, "_compute", lambda self, pair: computed.append(pair) or original(self, pair))
    images = flow_images(image, "mr")
    first = FlowPropagation(images, labels, [0, 10, 20], 1)
    first.volume()
    count = len(computed)
    assert count == 2 * (SLICES - 1) - 2 * 2  # both directions between neighbours, none into annotated slices
    second = SlicePrior(labels, [0, 10, 20], 1, "flow", images.copy())  # the same volume again: no new flow
    [second.logits(z) for z in range(SLICES)]
    [second.leave_one_out(z) for z in (0, 10, 20)]
    assert len(computed) == count + 4  # only the flows into slice 10 and the ends, for leave-one-out


def test_a_leave_one_out_flow_prior_is_carried_across_the_doubled_gap(fresh_flows):
    image, labels = moving_disc()
    prior = SlicePrior(labels, [0, 10, 20], 1, "flow", flow_images(image, "mr"))
    assert dice_score(prior.leave_one_out(10).argmax(0) == 1, labels[10] == 1) > 0.85


def test_modality_is_told_from_the_intensities():
    image, _ = moving_disc()
    assert not looks_like_ct(image)
    assert looks_like_ct(image - 1300.0)  # the texture becomes air in Hounsfield units
    with pytest.raises(flow.InputError, match="modality"):
        flow_images(image, "pet")


# ------------------------------------------------------------------------------ the guided model


def untrained_flow_model(img_size: int = 224):
    torch.manual_seed(0)
    model = build_hsam("tiny", 1, img_size, guided=True)
    metadata = BundleMetadata(
        preset="tiny", img_size=img_size, num_classes=1, class_names=["disc"], class_colors=[(0.9, 0.3, 0.2)],
        label_values=[1], preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
        guidance={"prior": "flow", "prompt_dropout": 0.2},
    )
    return model, metadata


def disc_volume() -> tuple[Volume, np.ndarray]:
    image, labels = moving_disc()
    return Volume(image, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)), labels


def sparse(labels: np.ndarray, annotated: list[int]) -> np.ndarray:
    out = np.zeros_like(labels)
    out[annotated] = labels[annotated]
    return out


def test_an_untrained_guided_model_returns_its_flow_prior(fresh_flows):
    volume, labels = disc_volume()
    model, metadata = untrained_flow_model()
    annotated = [0, 10, 20]
    result = segment_volume(model, volume, metadata, device="cpu", annotations=sparse(labels, annotated))
    np.testing.assert_array_equal(result.labels, flow_propagation(volume.array, labels, annotated))


def test_segmentation_applies_the_choice_per_class(fresh_flows):
    volume, labels = disc_volume()
    model, metadata = untrained_flow_model()
    with torch.no_grad():
        model.guidance.stage2_gate.fill_(1.0)  # a model that changes its prior everywhere
    drawn = sparse(labels, [0, 10, 20])
    guided = segment_volume(model, volume, metadata, device="cpu", annotations=drawn).labels
    metadata.guidance["choice"] = ["prior"]
    kept = segment_volume(model, volume, metadata, device="cpu", annotations=drawn).labels
    propagated = flow_propagation(volume.array, labels, [0, 10, 20])
    assert not np.array_equal(guided, propagated)
    np.testing.assert_array_equal(kept, propagated)
    metadata.guidance["choice"] = ["prompt-free"]
    prompt_free = segment_volume(model, volume, metadata, device="cpu", annotations=drawn).labels
    free = segment_volume(model, volume, metadata, device="cpu").labels
    unannotated = [z for z in range(SLICES) if z not in (0, 10, 20)]
    np.testing.assert_array_equal(prompt_free[unannotated], free[unannotated])


def test_combined_sources_take_each_class_where_its_source_puts_it():
    torch.manual_seed(0)
    sources = {name: torch.randn(2, 4, 8, 8) * 3 for name in CHOICE_SOURCES}
    for name in CHOICE_SOURCES:
        assert torch.equal(combine_sources(sources, [name] * 3), sources[name])
    choice = ["prior", "guided", "prompt-free"]
    combined = combine_sources(sources, choice).argmax(1)
    claims = torch.stack([sources[name].argmax(1) == k for k, name in enumerate(choice, start=1)])
    for k in range(1, 4):
        alone = claims[k - 1] & (claims.sum(0) == 1)  # only class k's source puts a class there
        assert torch.equal(combined[alone], torch.full_like(combined[alone], k))
    assert (combined[claims.sum(0) == 0] == 0).all()  # no source puts its class there: background
    several = claims.sum(0) > 1
    assert several.any() and all(bool(claims[c - 1][several.nonzero()[i].unbind()]) for i, c in
                                 enumerate(combined[several].tolist()))  # a class whose source put it there
    larger_scale = {**sources, "prompt-free": sources["prompt-free"] * 100}  # scales do not matter
    assert torch.equal(combine_sources(larger_scale, choice).argmax(1)[~several], combined[~several])


def test_the_choice_never_keeps_an_output_below_the_prior():
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        targets = torch.randint(0, 4, (2, 16, 16), generator=generator)
        truth = torch.nn.functional.one_hot(targets, 4).permute(0, 3, 1, 2).float() * 4
        logits = {name: truth * float(torch.rand(1, generator=generator)) + torch.randn(2, 4, 16, 16, generator=generator) * 2
                  for name in CHOICE_SOURCES}
        choice = choose_sources(logits, targets)
        alone = {name: _class_dice(logits[name].argmax(1), targets, 3) for name in CHOICE_SOURCES}
        for k, source in enumerate(choice):
            assert (alone[source][k] or 1.0) >= (alone["prior"][k] or 1.0), (choice, alone)
            if source == "prior":  # the guided output was no better there
                assert (alone["guided"][k] or 1.0) <= (alone["prior"][k] or 1.0) or set(choice) == {"prompt-free"}
        assert len(set(choice) & {"prompt-free"}) == 0 or set(choice) == {"prompt-free"}  # never mixed in
    same = {name: logits["prior"] for name in CHOICE_SOURCES}
    assert choose_sources(same, targets) == ["prior"] * 3  # nothing gained: the prior stays


def test_the_choice_on_held_out_slices_of_a_real_model(fresh_flows):
    volume, labels, _ = phantom_volume((24, 48, 48), (1, 2))
    model = build_hsam("tiny", 2, 224, guided=True)
    with torch.no_grad():
        model.guidance.stage1_gate.fill_(1.0)  # random corrections: worse than the prior on some class
        model.guidance.stage2_gate.fill_(1.0)
    annotated = [2, 6, 10, 14, 18, 22]
    prior = SlicePrior(labels, annotated, 2, "flow", flow_images(volume.array, "mr"))
    held = [6, 14]
    images = torch.from_numpy(np.stack([volume.array[z] / 1000.0 for z in held]).astype(np.float32))
    images = torch.nn.functional.interpolate(images[:, None], size=(224, 224), mode="bilinear")[:, 0]
    priors = torch.from_numpy(np.stack([prior.leave_one_out(z) for z in held]))
    priors = torch.nn.functional.interpolate(priors, size=(224, 224), mode="bilinear")
    targets = torch.nn.functional.interpolate(torch.from_numpy(labels[held]).float()[:, None], size=(224, 224),
                                              mode="nearest")[:, 0].long()
    selection = select_sources(model, images, targets, priors, torch.device("cpu"), 2)
    dice = selection["dice"]
    for k, source in enumerate(selection["choice"]):
        assert (dice[source][k] or 1.0) >= (dice["prior"][k] or 1.0)
    assert set(dice) == {*CHOICE_SOURCES, "chosen"}


# ---------------------------------------------------------------------------------------- the CLI


def _hsam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsam", *args], capture_output=True, encoding="utf-8", timeout=300)


def _write(path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_cli_propagate_writes_the_propagation(tmp_path):
    image, labels = moving_disc()
    volume = _write(tmp_path / "volume.nrrd", image)
    drawn = _write(tmp_path / "drawn.nrrd", sparse(labels * 4, [0, 10, 20]))
    result = _hsam("propagate", str(volume), str(drawn), "-o", str(tmp_path / "out.seg.nrrd"))
    assert result.returncode == 0, result.stderr
    assert "3 annotated axial slices propagated" in result.stderr and "(mr)" in result.stderr
    from hsam.volumes.segmentation import read_labelmap

    written, segments = read_labelmap(tmp_path / "out.seg.nrrd")
    np.testing.assert_array_equal(written, flow_propagation(image, labels * 4, [0, 10, 20]))
    assert [s.label_value for s in segments] == [4]


def test_cli_propagate_refuses_bad_input_in_one_line(tmp_path):
    image, labels = moving_disc()
    volume = _write(tmp_path / "volume.nrrd", image)
    cases = {
        "has no annotated slice": _write(tmp_path / "empty.nrrd", np.zeros_like(labels)),
        "grid": _write(tmp_path / "other.nrrd", sparse(labels, [0, 10]), spacing=(2.0, 1.0, 2.0)),
        "not found": tmp_path / "missing.nrrd",
    }
    for message, annotations in cases.items():
        result = _hsam("propagate", str(volume), str(annotations), "-o", str(tmp_path / "out.nrrd"))
        assert result.returncode == 2, (message, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hsam: error:") and message in lines[0], lines
        assert not (tmp_path / "out.nrrd").exists()
