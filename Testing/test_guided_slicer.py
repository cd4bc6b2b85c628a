"""Guided mode from Slicer's side: training on painted slices and segmenting guided by them, on real
MRML (slicer-core) and real worker processes."""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from hsam.errors import InputError  # noqa: E402
from hsam.io import Segment  # noqa: E402
from HSAMLib import models, mrml  # noqa: E402
from HSAMLib.segment_logic import RESULT_ATTRIBUTE, HSAMSegmentLogic  # noqa: E402
from HSAMLib.training_logic import HSAMTrainingLogic  # noqa: E402
from phantom import phantom_arrays  # noqa: E402
from test_slicer_logic import add_volume  # noqa: E402

PAINTED = [4, 9, 14, 19]
SEGMENTS = [Segment("ellipsoid", 1, (0.9, 0.3, 0.2)), Segment("sphere", 2, (0.2, 0.6, 0.9))]


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

    segmenter = HSAMSegmentLogic()
    assert segmenter.defaultAnnotations(volume, bundle) is painting
    result = segmenter.segment(volume, bundle, device="cpu", annotationsNode=painting)
    assert result.GetAttribute(RESULT_ATTRIBUTE) == "1"
    assert segmenter.defaultAnnotations(volume, bundle) is painting  # never the result
    labels, segments = mrml.labels_from_segmentation(result, volume)
    painted_labels, _ = mrml.labels_from_segmentation(painting, volume)
    np.testing.assert_array_equal(labels[PAINTED], painted_labels[PAINTED])

    other = add_volume(scene, np.zeros((24, 40, 40), np.int16), np.eye(4), name="Another volume")
    assert segmenter.defaultAnnotations(other, bundle) is None  # not the volume the model learned


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
    from hsam.build import build_hsam
    from hsam.bundle import BundleMetadata, save_bundle
    from hsam.preprocess import IntensityPreprocessing

    torch.manual_seed(0)
    metadata = BundleMetadata(preset="tiny", img_size=224, num_classes=2, class_names=["a", "b"],
                              class_colors=[(1, 0, 0), (0, 1, 0)], label_values=[1, 2],
                              preprocessing=IntensityPreprocessing(mode="percentile").to_dict())
    path = save_bundle(tmp_path / "free.hsam", build_hsam("tiny", 2, 224), metadata)
    config = HSAMTrainingLogic().makeConfig(str(path), epochs=1)
    assert not config.isGuided() and "--guided" not in config.arguments()
    assert HSAMTrainingLogic().makeConfig("tiny", epochs=1, guided=False).arguments().count("--guided") == 0
