"""Guided mode from Slicer's side: training on painted slices and segmenting guided by them, or by the
training volumes' atlas on a volume nobody painted, on real MRML (slicer-core) and real worker processes."""

import copy
import re
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from hsam.runtime.errors import Cancelled, InputError  # noqa: E402
from hsam.volumes.segmentation import Segment  # noqa: E402
from HSAMLib import models, mrml  # noqa: E402
from HSAMLib.segment_logic import NEEDS_GUIDANCE, RESULT_ATTRIBUTE, HSAMSegmentLogic, Prior  # noqa: E402
from HSAMLib.training_logic import HSAMTrainingLogic  # noqa: E402
from HSAMLib.worker import CANCELLED  # noqa: E402
from phantom import phantom_arrays  # noqa: E402
from test_slicer_logic import add_volume  # noqa: E402

PAINTED = [4, 9, 14, 19]
SEGMENTS = [Segment("ellipsoid", 1, (0.9, 0.3, 0.2)), Segment("sphere", 2, (0.2, 0.6, 0.9))]
# Patients for the atlas: a grid coarse enough to register on the 3 mm atlas grid, in RAS and in LPS.
PATIENT_SHAPE, PATIENT_SPACING = (16, 48, 48), (2.5, 2.5, 4.0)
PATIENT_IJK_TO_RAS = np.diag([*PATIENT_SPACING, 1.0])
PATIENT_LPS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
ATLAS_SLICES = [3, 7, 11]
NO_SPHERE = "the model found no sphere, which every training volume has: kept the atlas prior for it"


@pytest.fixture
def painted(scene):
    """(volume node, segmentation node with 4 painted axial slices, the full labels)."""
    image, labels = phantom_arrays((24, 40, 40), label_values=(1, 2))
    ijk_to_ras = np.diag([0.8, 0.8, 2.0, 1.0])
    volume = add_volume(scene, (image * 1000).astype(np.int16), ijk_to_ras, name="Phantom")
    drawn = np.zeros_like(labels)
    drawn[PAINTED] = labels[PAINTED]
    return volume, mrml.labels_to_segmentation(drawn, SEGMENTS, volume, name="Painted"), labels


def test_a_guided_model_segments_its_volume_from_the_painted_slices(scene, painted, tmp_path):
    volume, painting, _ = painted
    trainer = HSAMTrainingLogic()
    config = trainer.makeConfig("tiny", epochs=1, batchSize=2, device="cpu", imageSize=224)
    assert "--guided" in config.arguments()
    bundle = trainer.finetune(volume, painting, "guided", config, modelsFolder=tmp_path)
    assert models.read_model(bundle).metadata["guidance"]["prior"] == "flow"

    assert trainer.atlasSummary(bundle) == ""
    segmenter = HSAMSegmentLogic()
    assert segmenter.defaultAnnotations(volume, bundle) is painting
    assert segmenter.prior(volume, bundle) == Prior("guided by 'Painted'", painting)
    result = segmenter.segment(volume, bundle, device="cpu", annotationsNode=painting)
    assert result.GetAttribute(RESULT_ATTRIBUTE) == "1"
    assert segmenter.defaultAnnotations(volume, bundle) is painting  # never the result
    labels, segments = mrml.labels_from_segmentation(result, volume)
    painted_labels, _ = mrml.labels_from_segmentation(painting, volume)
    np.testing.assert_array_equal(labels[PAINTED], painted_labels[PAINTED])

    other = add_volume(scene, np.zeros((24, 40, 40), np.int16), np.eye(4), name="Another volume")
    assert segmenter.defaultAnnotations(other, bundle) is None  # not the volume the model learned
    assert segmenter.prior(other, bundle) == Prior("prompt-free", problem=NEEDS_GUIDANCE)  # and no atlas
    assert segmenter.prior(other, bundle).summary() == NEEDS_GUIDANCE


def test_training_with_an_atlas_keeps_the_volume_in_the_model(scene, painted, tmp_path):
    volume, painting, _ = painted
    trainer = HSAMTrainingLogic()
    config = trainer.makeConfig("tiny", epochs=1, batchSize=2, device="cpu", imageSize=224, atlas=True)
    assert config.arguments()[-2:] == ["--guided", "--atlas"]
    bundle = trainer.finetune(volume, painting, "atlas", config, modelsFolder=tmp_path)
    assert models.read_model(bundle).metadata["guidance"]["atlas"]["volumes"] == 1
    assert re.fullmatch(r"It keeps an atlas of its 1 training volume \(\d+\.\d MB\): HSAM Segment segments new "
                        r"volumes with it, without painting\.", trainer.atlasSummary(bundle))
    other = add_volume(scene, np.zeros((24, 40, 40), np.int16), np.eye(4), name="Another volume")
    assert HSAMSegmentLogic().prior(other, bundle) == Prior("guided by its 1 training volume registered onto this one")


def test_guided_training_needs_two_painted_slices(scene, painted):
    volume, _, labels = painted
    one = np.zeros_like(labels)
    one[9] = labels[9]
    node = mrml.labels_to_segmentation(one, SEGMENTS, volume)
    trainer = HSAMTrainingLogic()
    with pytest.raises(InputError, match="at least 2 axial slices"):
        trainer.prepare(volume, node, "axial", guided=True)
    with pytest.raises(InputError, match="at least 2 axial slices"):
        trainer.prepareCohort([(volume, node)], "axial", guided=True)
    assert trainer.prepare(volume, node, "axial", guided=False).annotated.slices == [9]


def test_continuing_a_prompt_free_model_stays_prompt_free(tmp_path):
    import torch
    from hsam.models.build import build_hsam
    from hsam.models.bundle import BundleMetadata, save_bundle
    from hsam.volumes.preprocess import IntensityPreprocessing

    torch.manual_seed(0)
    metadata = BundleMetadata(preset="tiny", img_size=224, num_classes=2, class_names=["a", "b"],
                              class_colors=[(1, 0, 0), (0, 1, 0)], label_values=[1, 2],
                              preprocessing=IntensityPreprocessing(mode="percentile").to_dict())
    path = save_bundle(tmp_path / "free.hsam", build_hsam("tiny", 2, 224), metadata)
    config = HSAMTrainingLogic().makeConfig(str(path), epochs=1)
    assert not config.isGuided() and "--guided" not in config.arguments()
    assert HSAMTrainingLogic().makeConfig("tiny", epochs=1, guided=False).arguments().count("--guided") == 0
    for base, guided in ((str(path), True), ("tiny", False)):
        with pytest.raises(InputError, match="atlas of the training volumes is kept for guided models only"):
            HSAMTrainingLogic().makeConfig(base, epochs=1, guided=guided, atlas=True)
    assert HSAMSegmentLogic().prior(None, path) == Prior("prompt-free")


def patient(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image int16, labels) of a phantom patient on ``PATIENT_SHAPE``."""
    image, labels = phantom_arrays(PATIENT_SHAPE, label_values=(1, 2), seed=seed)
    return (image * 1000).astype(np.int16), labels


@pytest.fixture(scope="module")
def atlas_bundles(tmp_path_factory):
    """(with an atlas, without one): a guided model fine-tuned for one epoch on two patients painted on 3
    slices each, in this process. Its atlas lacks the sphere and it keeps the atlas prior for every
    class, so that its result lacks the sphere whatever the model learned."""
    from hsam.guidance.atlas import atlas_from_arrays
    from hsam.models.bundle import save_bundle
    from hsam.training.config import FinetuneConfig, TrainingCase
    from hsam.training.finetune import finetune_cohort
    from hsam.volumes.volume import Volume

    cases = []
    for seed in (1, 2):
        image, labels = patient(seed)
        drawn = np.zeros_like(labels)
        drawn[ATLAS_SLICES] = labels[ATLAS_SLICES]
        volume = Volume(image.astype(np.float32), PATIENT_SPACING, (0.0, 0.0, 0.0), PATIENT_LPS_DIRECTION)
        cases.append(TrainingCase(volume, drawn, SEGMENTS, name=f"patient {seed}"))
    config = FinetuneConfig(epochs=1, img_size=224, guidance="linear", atlas=True, device="cpu")
    result = finetune_cohort(cases, config)
    without = copy.deepcopy(result.metadata)
    del without.guidance["atlas"]
    result.metadata.guidance["atlas"]["choice"] = ["prior", "prior"]
    atlases = []
    for atlas in result.atlases:
        image, labels = atlas.arrays
        grid = atlas.image
        atlases.append(atlas_from_arrays(image, np.where(labels == 2, 0, labels), grid.GetSpacing(), grid.GetOrigin(),
                                         grid.GetDirection(), atlas.name))
    folder = tmp_path_factory.mktemp("atlas")
    return (save_bundle(folder / "atlas.hsam", result.model, result.metadata, atlases=atlases),
            save_bundle(folder / "no-atlas.hsam", result.model, without))


def test_a_model_with_an_atlas_segments_a_patient_nobody_painted(scene, atlas_bundles, caplog):
    """The panel's description, the worker's registration progress and its warning for an empty class."""
    bundle, without = atlas_bundles
    volume = add_volume(scene, patient(3)[0], PATIENT_IJK_TO_RAS, name="New patient")
    segmenter = HSAMSegmentLogic()
    prior = segmenter.prior(volume, bundle)
    assert prior == Prior("guided by its 2 training volumes registered onto this one")
    assert prior.summary() == "Guided by its 2 training volumes registered onto this one."
    assert segmenter.prior(volume, without).problem == NEEDS_GUIDANCE

    job = segmenter.startSegmentation(volume, bundle, device="cpu")
    events = []
    job.wait(on_events=events.extend)
    node = segmenter.loadResult(job, volume)
    messages = [event["message"] for event in events]
    first_slice = next(i for i, message in enumerate(messages) if message.startswith("slice "))
    assert [m for m in messages[:first_slice] if m.startswith("registered")] == [
        "registered atlas 1/2 patient 1", "registered atlas 2/2 patient 2"]
    assert job.warnings == [NO_SPHERE]
    assert f"HSAM: {NO_SPHERE}" in caplog.messages
    assert segmenter.finishedMessage(prior.description, node, job.warnings) == (
        "Done (guided by its 2 training volumes registered onto this one): 2 segment(s) in 'New patient HSAM'.\n"
        f"Warning: {NO_SPHERE}")
    labels, _ = mrml.labels_from_segmentation(node, volume)
    assert (labels == 1).any() and not (labels == 2).any()


def test_cancel_ends_the_atlas_registration(scene, atlas_bundles):
    volume = add_volume(scene, patient(3)[0], PATIENT_IJK_TO_RAS, name="New patient")
    job = HSAMSegmentLogic().startSegmentation(volume, atlas_bundles[0], device="cpu")
    deadline = time.monotonic() + 120
    while job.running and time.monotonic() < deadline:
        if any(event["message"].startswith("registered atlas 1/2") for event in job.poll()):
            break
        time.sleep(0.01)
    job.cancel()  # while the second atlas is registered
    assert job.state == CANCELLED and not job.folder.exists()
    with pytest.raises(Cancelled):
        job.check()
