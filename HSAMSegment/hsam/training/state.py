"""A run's state, saved and resumed: the tensors it trains, the optimiser's moments, the random
generators and counters, in safetensors + JSON (no pickle)."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..modeling.hsam import HSAM
from ..runtime.errors import CheckpointError
from ..volumes.files import write_bytes_atomic
from .config import PathLike

STATE_KEY = "hsam_training_state"
STATE_FORMAT_VERSION = 1


@dataclass
class TrainingState:
    """Everything needed to continue a run: the trained tensors, optimiser moments and counters."""

    tensors: dict[str, torch.Tensor]
    info: dict


def _trainable_state(model: HSAM) -> dict[str, torch.Tensor]:
    """The tensors a run changes: every parameter that trains, plus buffers, on the CPU."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def save_training_state(path: PathLike, state: TrainingState) -> Path:
    """Write a training state (safetensors + JSON, no pickle) atomically."""
    path = Path(path)
    payload = save({k: v.contiguous() for k, v in state.tensors.items()}, {STATE_KEY: json.dumps(state.info)})
    write_bytes_atomic(path, payload, overwrite=True)
    return path


def load_training_state(path: PathLike) -> TrainingState:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(STATE_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not an HSAM training state or is truncated ({e})") from e
    if raw is None:
        raise CheckpointError(f"{path.name} is not an HSAM training state")
    info = json.loads(raw)
    if info.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"{path.name} was written by an incompatible HSAM version")
    return TrainingState(tensors, info)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{key}": value.detach().cpu().clone()
        for index, slots in state["state"].items()
        for key, value in slots.items()
    }
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": slots, "param_groups": groups})
