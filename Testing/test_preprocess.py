"""Intensity normalisation and resizing between voxels and the network."""

import numpy as np
import pytest
import torch

from hsam.runtime.errors import InputError
from hsam.volumes.preprocess import IntensityPreprocessing, logits_to_grid, slices_to_model_input


def test_ct_window_by_hand():
    ct = IntensityPreprocessing(mode="ct")
    values = np.array([-1000, -125, 75, 275, 3000], dtype=np.int16)
    np.testing.assert_allclose(ct.apply(values), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert ct.apply(values).dtype == np.float32


def test_percentiles_of_the_whole_volume_apply_to_its_parts():
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 100.0, size=(6, 20, 30)).astype(np.float32)
    mr = IntensityPreprocessing(mode="percentile", percentiles=(1.0, 99.0))
    low, high = np.percentile(volume, [1.0, 99.0])
    whole = mr.apply(volume)
    np.testing.assert_allclose(whole, np.clip((volume - low) / (high - low), 0, 1), rtol=1e-5, atol=1e-6)
    part = np.moveaxis(volume, 2, 0)[3:7]  # a strided view, as the volume is sliced sagittally
    np.testing.assert_array_equal(mr.apply(part, mr.intensity_range(volume)), np.moveaxis(whole, 2, 0)[3:7])
    assert not mr.apply(np.full((2, 3, 4), 7.0)).any()  # constant volume


def test_round_trip_through_a_dict_and_bad_settings():
    for settings in (IntensityPreprocessing(mode="ct", window=(-100, 200)), IntensityPreprocessing(mode="percentile")):
        assert IntensityPreprocessing.from_dict(settings.to_dict()) == settings
    with pytest.raises(InputError, match="unknown intensity"):
        IntensityPreprocessing.from_dict({"mode": "pet"})
    with pytest.raises(InputError, match="not understood"):
        IntensityPreprocessing.from_dict({"mode": "ct", "level": 40})
    with pytest.raises(InputError, match="window"):
        IntensityPreprocessing(mode="ct", window=(100, -100))


def test_model_input_and_logits_back_on_the_grid():
    slices = torch.rand(2, 40, 56)
    images = slices_to_model_input(slices, 64)
    assert images.shape == (2, 3, 64, 64) and torch.equal(images[:, 0], images[:, 2])
    square = torch.rand(1, 64, 64)
    assert torch.equal(slices_to_model_input(square, 64)[:, 1], square)  # already the input size: untouched
    same = torch.rand(1, 3, 64, 64)
    assert logits_to_grid(same, (64, 64)) is same
    assert logits_to_grid(same, (40, 56)).shape == (1, 3, 40, 56)
    with pytest.raises(InputError, match="slices of shape"):
        slices_to_model_input(torch.rand(40, 56), 64)
