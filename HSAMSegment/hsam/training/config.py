"""What a fine-tuning run is asked for and what it reports: the recipe's defaults, ``FinetuneConfig``,
``TrainingCase``, ``TrainingProgress``, and the authors' learning-rate schedule and warm-up."""

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..modeling.hsam import HSAM
from ..models.bundle import BundleMetadata
from ..runtime.devices import resolve_precision
from ..volumes.preprocess import IntensityPreprocessing

PathLike = Union[str, os.PathLike]

DEFAULT_IMG_SIZE = {"tiny": 256}  # every vit_* preset: 512, as the authors' 10 % Synapse run
FALLBACK_IMG_SIZE = 512
DEFAULT_EPOCHS = 300
# Guided models train on a handful of slices next to a strong prior: longer runs lose on held-out
# slices (MNI k = 10: 0.942 after 60 epochs, 0.924 after 223; docs/performance.md).
DEFAULT_GUIDED_EPOCHS = 60
DEFAULT_LEARNING_RATE = {"tiny": 0.001}  # vit_*: the authors' 0.0025
FALLBACK_LEARNING_RATE = 0.0025
BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.1
POLY_POWER = 0.9
REFERENCE_WARMUP = 250
WARMUP_FRACTION = 0.1
DEFAULT_PROMPT_DROPOUT = 0.2
ATLAS_SHARE = 0.5  # of a guided model's training priors taken from the other volumes' atlases
VALIDATION_FRACTION = 0.15
MIN_SLICES_FOR_VALIDATION = 6


@dataclass
class FinetuneConfig:
    """What to train and how. ``epochs`` and ``time_budget`` (seconds) both stop the run, whichever
    comes first; without ``epochs``, 300 (the authors' count), or ``DEFAULT_GUIDED_EPOCHS`` for a
    guided model. ``learning_rate`` None: 0.0025 (the
    authors') for vit_* presets, 0.001 for ``tiny``. ``slices``: training slice indices along
    ``slice_axis`` (default: every slice carrying a label). ``resume``: a file written by
    ``FinetuneResult.save_training_state``; ``epochs`` is then the total, the epochs already done included.
    ``precision``: autocast for the training steps; auto = bf16 (fp16 with loss scaling where bf16 is
    unsupported) on CUDA, float32 elsewhere. ``gradient_checkpointing``: recompute the image encoder's
    activations in the backward pass (less memory, ~30 % more time); None = on for vit_* on CUDA.
    ``validation_volumes``: in a cohort, hold out the last N volumes whole for validation instead of
    ~15 % of the slices. ``guidance``: train a guided model with priors of this kind
    (``hsam.guidance.priors``; a guided base model keeps its own); ``prompt_dropout``: the share of
    its steps run prompt-free, so that it also segments without annotations. ``atlas`` (guided): keep
    every volume's atlas (``hsam.guidance.atlas``: its image and labels completed from its annotated
    slices, on a 3 mm grid) with the model, so that it segments volumes nobody painted; with several
    volumes, ``ATLAS_SHARE`` of the priors it learns from are the other volumes registered onto each
    (leave-one-volume-out), and the sources it keeps are chosen on those too. ``stop``: called before
    each step; once it returns True, training ends as when the time budget is spent (after at least
    one step, the model kept), e.g. to continue at once with more annotations."""

    preset: str = "tiny"
    sam_checkpoint: Optional[PathLike] = None
    base_bundle: Optional[PathLike] = None
    img_size: Optional[int] = None
    epochs: Optional[int] = None
    time_budget: Optional[float] = None
    learning_rate: Optional[float] = None
    batch_size: int = 2
    slices: Optional[list[int]] = None
    slice_axis: str = "axial"
    preprocessing: Optional[IntensityPreprocessing] = None
    class_names: Optional[list[str]] = None
    class_colors: Optional[list[tuple[float, float, float]]] = None
    device: str = "auto"
    seed: int = 2345
    cmattn: str = "reference"
    lora_rank: int = 5
    augment: bool = True
    validation: bool = True
    validation_volumes: int = 0
    resume: Optional[PathLike] = None
    precision: str = "auto"
    gradient_checkpointing: Optional[bool] = None
    guidance: Optional[str] = None
    prompt_dropout: float = DEFAULT_PROMPT_DROPOUT
    atlas: bool = False
    stop: Optional[Callable[[], bool]] = None


Preview = Callable[[HSAM, BundleMetadata], None]


@dataclass
class TrainingProgress:
    """Reported after every optimisation step (and after each validation)."""

    fraction: float
    epoch: int
    step: int
    loss: float
    val_dice: Optional[float]
    message: str


@dataclass
class TrainingCase:
    """One annotated volume of a cohort. ``labels``: (z, y, x) integer labelmap on ``volume``'s grid
    (an ``hsam.volumes.volume.Volume``); ``segments``: its ``hsam.volumes.segmentation.Segment`` list (empty: every non-zero value is
    a class); ``slices``: training slice indices (None: every labelled slice); ``name`` for messages."""

    volume: object
    labels: np.ndarray
    segments: Sequence = ()
    slices: Optional[list[int]] = None
    name: str = ""


def reference_learning_rate(iteration: int, base_lr: float, warmup: int, max_iterations: int) -> float:
    """The authors' schedule for the step of index ``iteration`` (0-based): ``base/warmup`` first,
    then linear to ``base`` over ``warmup`` steps, then ``base·(1 − (i − warmup)/max_iterations)^0.9``
    with ``i`` the previous step (their LR is set after each step). The warm-up is not subtracted from
    the denominator, as theirs, so the rate ends above zero."""
    if warmup > 0 and iteration <= warmup:
        return base_lr * max(iteration, 1) / warmup
    done = iteration - 1 - warmup if warmup > 0 else iteration
    return base_lr * max(0.0, 1.0 - done / max(max_iterations, 1)) ** POLY_POWER


def training_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of training steps (None: float32); see ``FinetuneConfig.precision``."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return resolve_precision(precision, device)


def warmup_iterations(planned_iterations: int) -> int:
    return min(REFERENCE_WARMUP, max(1, round(WARMUP_FRACTION * planned_iterations)))
