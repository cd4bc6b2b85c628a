"""Across patients: guided models trained with atlases (leave-one-volume-out priors), carried in the
bundle, segmenting a volume nobody painted; never an empty result without a word. Real tiny models,
real registration, real files and processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.evaluation.metrics import dice_score
from hsam.guidance.priors import annotated_slices
from hsam.inference.segment import NOTHING_FOUND, segment_volume
from hsam.models.build import build_hsam
from hsam.models.bundle import BundleMetadata, read_atlases, read_bundle_metadata, save_bundle
from hsam.training.config import FinetuneConfig, TrainingCase
from hsam.training.data import leave_one_out_atlas_priors, training_atlases
from hsam.training.finetune import finetune_cohort
from hsam.volumes.preprocess import IntensityPreprocessing
from hsam.volumes.segmentation import Segment
from test_atlas import ATLAS_POSES, NEW_POSE, patient

SEGMENTS = [Segment("organ a", 1, (0.9, 0.3, 0.2)), Segment("organ b", 2, (0.2, 0.6, 0.9))]
MARKER = (slice(None), slice(2, 10), slice(2, 10))  # a corner only the first patient's labels claim


def training_case(index: int, marker: bool = False, every: int = 4) -> TrainingCase:
    volume, labels = patient(*ATLAS_POSES[index], seed=index)
    if marker:
        labels[MARKER] = np.where(labels[MARKER] == 0, 1, labels[MARKER])
    annotated = annotated_slices(labels, 0)[::every]
    drawn = np.zeros_like(labels)
    drawn[annotated] = labels[annotated]
    return TrainingCase(volume, drawn, SEGMENTS, annotated, f"patient {index}")


def test_leave_one_out_atlas_priors_never_use_the_volume_s_own_labels() -> None:
    """Guards the leave-one-volume-out rule: the first patient's labels claim a corner no other patient
    has; its own prior is background there, while another patient's prior, built with it, is not."""
    cases = [training_case(0, marker=True), training_case(1), training_case(2)]
    atlases = training_atlases(cases, [c.labels for c in cases], [c.slices for c in cases], 0, 2, lambda m: None)
    priors = leave_one_out_atlas_priors(cases, atlases, 2, 0, lambda m: None)
    corner = lambda prior: np.stack([prior.slice_probabilities(i)[1][MARKER[1:]] for i in cases[0].slices])
    assert corner(priors[0]).max() < 0.05
    assert corner(priors[1]).max() > 0.2


def empty_guided(atlas: bool) -> tuple[torch.nn.Module, BundleMetadata]:
    """A guided model whose weights are all zero: its own output ties every class, i.e. background
    everywhere, and guided it returns its prior. Its training volumes all had both classes."""
    model = build_hsam("tiny", 2, 224, guided=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    guidance = {"prior": "flow", "prompt_dropout": 0.2}
    if atlas:
        guidance["atlas"] = {"volumes": 3, "registration": "deformable", "choice": ["prompt-free"] * 2}
    metadata = BundleMetadata(
        preset="tiny", img_size=224, num_classes=2, class_names=[s.name for s in SEGMENTS],
        class_colors=[s.color for s in SEGMENTS], label_values=[1, 2],
        preprocessing=IntensityPreprocessing(mode="ct").to_dict(), guidance=guidance,
        training={"cases": [{"name": f"p{i}", "labelled_voxels": {"organ a": 10, "organ b": 10}} for i in range(3)]},
    )
    return model.eval(), metadata


def test_a_guided_model_without_annotations_or_atlas_that_finds_nothing_says_so(tmp_path) -> None:
    """Guards the message: no empty result without a word. The API notes it; `hsam segment` stops with
    it in one line and writes no file."""
    model, metadata = empty_guided(atlas=False)
    volume, _ = patient(*NEW_POSE, seed=9)
    result = segment_volume(model, volume, metadata, device="cpu")
    assert not result.labels.any() and result.notes == [NOTHING_FOUND]
    save_bundle(tmp_path / "empty.hsam", model, metadata)
    image = tmp_path / "new.nrrd"
    sitk.WriteImage(volume.to_sitk(), str(image))
    run = _hsam("segment", str(image), "-m", str(tmp_path / "empty.hsam"), "-o", str(tmp_path / "out.nrrd"))
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == f"hsam: error: {NOTHING_FOUND}"
    assert "paint a few slices" in NOTHING_FOUND and "--atlas" in NOTHING_FOUND
    assert not (tmp_path / "out.nrrd").exists()


def test_classes_the_model_misses_are_named_and_taken_from_the_atlas_prior() -> None:
    """Guards the fallback: a model that keeps its (empty) prompt-free output for both classes still
    gives both organs, from the atlas prior, and says so."""
    model, metadata = empty_guided(atlas=True)
    cases = [training_case(i) for i in range(3)]
    atlases = training_atlases(cases, [c.labels for c in cases], [c.slices for c in cases], 0, 2, lambda m: None)
    volume, labels = patient(*NEW_POSE, seed=9)
    result = segment_volume(model, volume, metadata, device="cpu", atlases=atlases)
    assert result.prior == "atlas"
    assert result.notes and "organ a, organ b" in result.notes[0] and "atlas prior" in result.notes[0]
    assert min(dice_score(result.labels == k, labels == k) for k in (1, 2)) > 0.7


@pytest.fixture(scope="module")
def atlas_bundle(tmp_path_factory) -> tuple[Path, object]:
    cases = [training_case(i, every=2) for i in range(3)]  # enough slices to hold some out
    config = FinetuneConfig(epochs=1, img_size=224, device="cpu", seed=3, guidance="flow", atlas=True,
                            preprocessing=IntensityPreprocessing(mode="ct"))
    result = finetune_cohort(cases, config)
    path = tmp_path_factory.mktemp("atlas") / "atlas.hsam"
    save_bundle(path, result.model, result.metadata, atlases=result.atlases)
    return path, result


def test_training_with_atlases_learns_from_them_and_keeps_them(atlas_bundle) -> None:
    """Guards ``--atlas`` in training: every volume gets a leave-one-out atlas prior, the sources kept
    with it are chosen on held-out slices, and the atlases travel in the bundle unchanged."""
    path, result = atlas_bundle
    atlas = read_bundle_metadata(path).guidance["atlas"]
    assert atlas["volumes"] == 3 and len(atlas["choice"]) == 2 and atlas["selection"]["slices"] > 0
    stored = read_atlases(path)
    assert [a.name for a in stored] == [f"patient {i}" for i in range(3)]
    for kept, original in zip(stored, result.atlases):
        for a, b in zip(kept.arrays, original.arrays):
            np.testing.assert_array_equal(a, b)
        assert kept.image.GetSpacing() == original.image.GetSpacing()


def _hsam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsam", *args], capture_output=True, encoding="utf-8", timeout=300)


def test_cli_segments_a_new_patient_with_the_atlas(atlas_bundle, tmp_path) -> None:
    """Guards the product path: `hsam segment` without annotations registers the bundle's atlases onto
    a new patient, says so, and finds its organs; `hsam info` describes the atlas."""
    path, _ = atlas_bundle
    volume, labels = patient(*NEW_POSE, seed=9)
    image = tmp_path / "new.nrrd"
    sitk.WriteImage(volume.to_sitk(), str(image))
    run = _hsam("segment", str(image), "-m", str(path), "-o", str(tmp_path / "out.nrrd"))
    assert run.returncode == 0, run.stderr
    assert "guided by its 3 training volumes registered onto this one" in run.stderr
    output = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nrrd")))
    assert min(dice_score(output == k, labels == k) for k in (1, 2)) > 0.6
    info = _hsam("info", str(path))
    assert "atlas:        3 training volumes" in info.stdout and "with the atlas" in info.stdout


def test_cli_refuses_atlas_without_guided(tmp_path) -> None:
    volume, labels = patient(*NEW_POSE, seed=9)
    image, drawn = tmp_path / "v.nrrd", tmp_path / "l.nrrd"
    sitk.WriteImage(volume.to_sitk(), str(image))
    sitk.WriteImage(volume.to_sitk(labels), str(drawn))
    run = _hsam("finetune", str(image), str(drawn), "-o", str(tmp_path / "m.hsam"), "--atlas", "--epochs", "1")
    assert run.returncode != 0 and "--atlas" in run.stderr and "--guided" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.hsam").exists()
