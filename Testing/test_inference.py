"""Whole-volume inference: geometry and label values, batching, slice ranges, cancel, OOM back-off,
largest component, probabilities, device and precision selection. Tiny model, CPU."""

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam.inference.segment import segment_volume
from hsam.models.build import build_hsam
from hsam.models.bundle import BundleMetadata
from hsam.runtime.cpu import cpu_capability, cpu_supports_bf16, onednn_computes
from hsam.runtime.devices import describe_device, resolve_precision, select_device
from hsam.runtime.errors import Cancelled, HSAMError, InputError
from hsam.volumes.constants import SLICE_AXES
from hsam.volumes.preprocess import IntensityPreprocessing, logits_to_grid, slices_to_model_input
from hsam.volumes.volume import Volume
from phantom import phantom_volume

LABEL_VALUES = [3, 7]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_hsam("tiny", num_classes=2, img_size=224).eval()


def _metadata(slice_axis: str = "axial") -> BundleMetadata:
    return BundleMetadata(
        preset="tiny",
        img_size=224,
        num_classes=2,
        class_names=["ellipsoid", "sphere"],
        class_colors=[(0.9, 0.3, 0.2), (0.2, 0.6, 0.9)],
        label_values=LABEL_VALUES,
        preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
        slice_axis=slice_axis,
    )


@pytest.fixture(scope="module")
def volume() -> Volume:
    """(z, y, x) = (7, 40, 56): non-square slices in every direction."""
    return phantom_volume(shape=(7, 40, 56), label_values=(1, 2))[0]


def _by_hand(model, volume: Volume, metadata: BundleMetadata) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits (C+1, z, y, x)) computed one slice at a time along the metadata's axis."""
    axis = SLICE_AXES[metadata.slice_axis]
    image = IntensityPreprocessing.from_dict(metadata.preprocessing).apply(volume.array)
    logits = np.zeros((metadata.num_classes + 1, *volume.array.shape), dtype=np.float32)
    with torch.inference_mode():
        for i in range(volume.array.shape[axis]):
            slice_ = torch.from_numpy(np.ascontiguousarray(np.take(image, i, axis=axis), dtype=np.float32))[None]
            masks = model(slices_to_model_input(slice_, model.img_size)).masks
            grid = logits_to_grid(masks, tuple(slice_.shape[-2:]))[0].numpy()
            index = [slice(None)] * 4
            index[axis + 1] = i
            logits[tuple(index)] = grid
    values = np.array([0, *metadata.label_values])
    return values[logits.argmax(0)], logits


def _decisive(logits: np.ndarray, margin: float = 1e-3) -> np.ndarray:
    """Voxels whose best class beats the second by ``margin``: there the argmax cannot flip by rounding."""
    top2 = np.sort(logits, axis=0)[-2:]
    return top2[1] - top2[0] > margin


def test_labels_have_the_volume_grid_and_the_model_label_values(model, volume):
    result = segment_volume(model, volume, _metadata(), device="cpu", precision="fp32")
    assert result.labels.shape == volume.array.shape
    assert result.labels.dtype == np.uint8
    assert result.probabilities is None
    values = set(np.unique(result.labels).tolist())
    assert values <= {0, *LABEL_VALUES} and len(values) > 1


def test_large_label_values_get_a_wide_dtype(model, volume):
    metadata = _metadata()
    metadata.label_values = [3, 300]
    labels = segment_volume(model, volume, metadata, device="cpu", precision="fp32").labels
    assert labels.dtype == np.uint16
    assert set(np.unique(labels).tolist()) <= {0, 3, 300}


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_batched_equals_slice_by_slice(model, volume, axis):
    metadata = _metadata(axis)
    expected, logits = _by_hand(model, volume, metadata)
    result = segment_volume(model, volume, metadata, device="cpu", batch_size=3, precision="fp32")
    decisive = _decisive(logits)
    assert decisive.mean() > 0.99
    np.testing.assert_array_equal(result.labels[decisive], expected[decisive])


def test_slice_range_leaves_the_other_slices_background(model, volume):
    full = segment_volume(model, volume, _metadata(), device="cpu", precision="fp32").labels
    part = segment_volume(model, volume, _metadata(), device="cpu", precision="fp32", slice_range=(2, 4)).labels
    np.testing.assert_array_equal(part[2:5], full[2:5])
    assert not part[:2].any() and not part[5:].any()
    with pytest.raises(InputError, match="slice range"):
        segment_volume(model, volume, _metadata(), device="cpu", slice_range=(3, 7))


def test_progress_reaches_one_and_cancel_stops_between_batches(model, volume):
    fractions = []
    segment_volume(model, volume, _metadata(), device="cpu", batch_size=2, progress=lambda f, m: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 4  # 7 slices, batches of 2

    cancel = threading.Event()
    calls = []

    def cancel_after_first_batch(fraction: float, message: str) -> None:
        calls.append(fraction)
        cancel.set()

    with pytest.raises(Cancelled):
        segment_volume(model, volume, _metadata(), device="cpu", batch_size=2, progress=cancel_after_first_batch, cancel=cancel)
    assert len(calls) == 1


class _OutOfMemoryAbove(torch.nn.Module):
    """The real model behind an allocator that fails for batches larger than ``max_batch``."""

    def __init__(self, model, max_batch: int, error: Exception) -> None:
        super().__init__()
        self.model = model
        self.max_batch = max_batch
        self.error = error
        self.batches: list[int] = []

    img_size = property(lambda self: self.model.img_size)
    num_classes = property(lambda self: self.model.num_classes)

    def forward(self, images):
        self.batches.append(images.shape[0])
        if images.shape[0] > self.max_batch:
            raise self.error
        return self.model(images)


OUT_OF_MEMORY_ERRORS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"),
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY_ERRORS, ids=["cuda", "cpu"])
def test_out_of_memory_halves_the_batch_and_gives_the_same_labels(model, volume, error):
    expected = segment_volume(model, volume, _metadata(), device="cpu", batch_size=1, precision="fp32").labels
    failing = _OutOfMemoryAbove(model, max_batch=2, error=error)
    labels = segment_volume(failing, volume, _metadata(), device="cpu", batch_size=8, precision="fp32").labels
    assert failing.batches[:3] == [7, 4, 2]  # 8 slices asked, 7 left in the volume; then halved twice
    assert max(failing.batches[3:]) == 2
    np.testing.assert_array_equal(labels, expected)


def test_out_of_memory_at_batch_one_is_a_clear_error(model, volume):
    failing = _OutOfMemoryAbove(model, max_batch=0, error=OUT_OF_MEMORY_ERRORS[0])
    with pytest.raises(HSAMError, match="out of memory .*single slice.*--device cpu"):
        segment_volume(failing, volume, _metadata(), device="cpu", batch_size=4)
    assert failing.batches == [4, 2, 1]


def test_other_runtime_errors_are_not_retried(model, volume):
    failing = _OutOfMemoryAbove(model, max_batch=0, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        segment_volume(failing, volume, _metadata(), device="cpu", batch_size=4)
    assert failing.batches == [4]


def _component_sizes(mask: np.ndarray) -> list[int]:
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    labels = sitk.GetArrayFromImage(components)
    return [int((labels == k).sum()) for k in range(1, int(labels.max()) + 1)]


def test_largest_component_keeps_one_component_per_class(model, volume):
    raw = segment_volume(model, volume, _metadata(), device="cpu", precision="fp32").labels
    kept = segment_volume(model, volume, _metadata(), device="cpu", precision="fp32", largest_component=True).labels
    assert any(len(_component_sizes(raw == v)) > 1 for v in LABEL_VALUES)  # otherwise this test proves nothing
    for value in LABEL_VALUES:
        sizes = _component_sizes(raw == value)
        if not sizes:
            continue
        assert _component_sizes(kept == value) == [max(sizes)]
        assert np.all(raw[kept == value] == value)
    assert np.all((kept == raw) | (kept == 0))


def test_probabilities_sum_to_one_and_agree_with_the_labels(model, volume):
    result = segment_volume(
        model, volume, _metadata(), device="cpu", precision="fp32", return_probabilities=True, slice_range=(1, 5)
    )
    probabilities = result.probabilities
    assert probabilities.shape == (3, *volume.array.shape) and probabilities.dtype == np.float16
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=2e-3)
    assert np.all(probabilities[0, 0] == 1) and np.all(probabilities[0, 6] == 1)  # outside the range
    inside = probabilities[:, 1:6].astype(np.float32)
    decisive = np.sort(inside, axis=0)[-1] - np.sort(inside, axis=0)[-2] > 2e-3
    values = np.array([0, *LABEL_VALUES])
    np.testing.assert_array_equal(values[inside.argmax(0)][decisive], result.labels[1:6][decisive])


@pytest.mark.skipif(
    not onednn_computes(torch.bfloat16),
    reason=f"this CPU ({cpu_capability()}) has no native bfloat16 kernels, so bf16 is refused "
    "(tested in test_cpu_precision.py)",
)
def test_bf16_autocast_agrees_with_fp32_on_most_voxels(model, volume):
    fp32 = segment_volume(model, volume, _metadata(), device="cpu", precision="fp32").labels
    bf16 = segment_volume(model, volume, _metadata(), device="cpu", precision="bf16").labels
    assert bf16.dtype == fp32.dtype
    assert (bf16 == fp32).mean() > 0.9


def test_bad_inputs_are_refused(model, volume):
    with pytest.raises(InputError, match="3D"):
        segment_volume(model, Volume(volume.array[0], volume.spacing, volume.origin, volume.direction), _metadata())
    with_nan = volume.array.copy()
    with_nan[3, 10, 10] = np.nan
    with pytest.raises(InputError, match="NaN"):
        segment_volume(model, Volume(with_nan, volume.spacing, volume.origin, volume.direction), _metadata())
    other = _metadata()
    other.img_size = 256
    with pytest.raises(InputError, match="does not match"):
        segment_volume(model, volume, other)
    with pytest.raises(InputError, match="batch size"):
        segment_volume(model, volume, _metadata(), batch_size=0)
    with pytest.raises(InputError, match="precision"):
        segment_volume(model, volume, _metadata(), device="cpu", precision="fp8")


def test_device_selection_and_description():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            select_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        select_device("tpu0")
    assert describe_device(torch.device("cpu")).startswith("CPU")


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if onednn_computes(dtype):
            assert resolve_precision(name, cpu) is dtype
        else:
            with pytest.raises(InputError, match=f"no native {name}"):
                resolve_precision(name, cpu)
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if cpu_supports_bf16() else None)
    assert resolve_precision("auto", torch.device("mps")) is None


@pytest.mark.parametrize("channels", [2, 9, 300])
def test_class_indices_equal_argmax_first_on_ties(channels):
    from hsam.inference.segment import class_indices

    generator = torch.Generator().manual_seed(channels)
    logits = torch.randn(2, channels, 5, 7, generator=generator).round(decimals=1)  # rounding makes ties
    logits[:, :, 0, 0] = 1.0  # a tie across every class: the first wins
    indices = class_indices(logits)
    assert indices.dtype == (torch.uint8 if channels <= 256 else torch.int32)
    torch.testing.assert_close(indices.long(), logits.argmax(dim=1), rtol=0, atol=0)
