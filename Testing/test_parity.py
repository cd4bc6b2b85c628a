"""Parity with the authors' code: their state dict in, the same logits out.

The fixtures in Testing/Data were produced by running the authors' code (commit 5bdf491) on CPU in
mode 'test' with random weights (LoRA B non-zero) for the smallest configurations its classes allow;
they hold the full LoRA_Sam state dict, an input batch and the reference outputs. See
docs/model.md for how they were made.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hsam.models.checkpoint import from_reference_state_dict
from hsam.models.presets import Preset

DATA = Path(__file__).parent / "Data"


def _load(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    with safe_open(str(DATA / name), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    outputs = {k: v for k, v in tensors.items() if not k.startswith("state_dict.")}
    return config, state, outputs


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("fixture", ["reference_parity_224.safetensors", "reference_parity_512.safetensors"])
def test_same_logits_as_the_reference(fixture: str) -> None:
    config, state, outputs = _load(fixture)
    preset = Preset(
        encoder_embed_dim=config["embed_dim"],
        encoder_depth=config["depth"],
        encoder_num_heads=config["num_heads"],
        encoder_global_attn_indexes=tuple(config["global_attn_indexes"]),
        window_size=config["window_size"],
    )
    model = from_reference_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
        vit=preset, num_classes=config["num_classes"], img_size=config["img_size"],
    ).eval()
    with torch.no_grad():
        out = model(outputs["input"])
    assert _relative_error(out.stage1_logits, outputs["stage1_low_res_logits"]) <= 1e-4
    assert _relative_error(out.stage2_logits, outputs["stage2_masks"]) <= 1e-4
    assert _relative_error(out.masks, (outputs["stage1_masks"] + outputs["stage2_masks"]) / 2) <= 1e-4


def test_a_mismatched_state_dict_is_refused() -> None:
    from hsam.runtime.errors import CheckpointError

    config, state, _ = _load("reference_parity_224.safetensors")
    preset = Preset(config["embed_dim"], config["depth"], config["num_heads"], tuple(config["global_attn_indexes"]),
                    window_size=config["window_size"])
    with pytest.raises(CheckpointError, match="num_classes"):
        from_reference_state_dict(state, vit=preset, num_classes=config["num_classes"] + 1, img_size=config["img_size"])
