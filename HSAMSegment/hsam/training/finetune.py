"""Few-shot fine-tuning of H-SAM on the annotated slices of one volume or of a cohort of volumes, with
the authors' recipe.

A cohort (``finetune_cohort``) is a list of ``TrainingCase``: volumes of any size, spacing and
orientation, each normalised by its own intensity statistics and cut into slices along the same
axis. Classes are matched across volumes by segment name (case and surrounding spaces ignored), then
by label value; a class may be absent from some volumes, not from all training slices.

Recipe (``train.py``/``trainer.py`` of the authors' code): AdamW (betas 0.9/0.999, weight decay 0.1)
over the trainable parameters, linear warm-up then poly(0.9) learning rate, 0.1·CE + 0.9·Dice per
stage with the stage-2 weight growing by epoch, the ``RandomGenerator`` augmentations (see
``hsam.augment``), seed 2345. Adapted to a few annotated slices:

* The 250-iteration warm-up is shortened to ``min(250, 10 % of the planned iterations)``.
* With a time budget the run is planned on the measured epoch time: after every epoch the number of
  epochs that still fit is estimated and the poly schedule re-planned on it.
* With 6 or more annotated slices about 15 % of them (at least one, spread evenly) are held out; the
  weights with the best validation Dice are returned. A cohort can hold out whole volumes instead
  (``validation_volumes``). Validation reports the Dice of every class.
* Without official SAM weights (the ``tiny`` preset, or a model trained from scratch) the whole
  image encoder trains: a random encoder has nothing to preserve. With SAM weights only its LoRA
  adapters do, as the authors'.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on
CUDA, Gloo on CPU), each process trains on its share of every epoch's shuffled slices, and only
the main process reports progress; every process returns the same model.
"""

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..guidance.atlas import Atlas, AtlasPrior, atlas_prior, make_atlas
from ..guidance.augment import mix_own_priors, perturb_priors
from ..guidance.flow import flow_images, modality_of
from ..guidance.kinds import CHOICE_SOURCES
from ..guidance.priors import SlicePrior, annotated_slices
from ..inference.segment import combine_sources
from ..modeling.hsam import HSAM
from ..models.build import build_hsam
from ..models.bundle import BundleMetadata, default_color, load_bundle, read_bundle_metadata
from ..models.checkpoint import load_sam_weights
from ..models.presets import MAX_CLASSES
from ..models.sam_weights import SAM_CHECKPOINTS, cached_sha256, check_sam_checkpoint
from ..runtime.devices import resolve_precision, select_device
from ..runtime.errors import Cancelled, CheckpointError, InputError
from ..runtime.version import __version__
from ..volumes.constants import MAX_LABEL_VALUE, SLICE_AXES
from ..volumes.files import write_bytes_atomic
from ..volumes.preprocess import IntensityPreprocessing
from .augment import RandomAugmentation
from .continuation import align_to_base
from .loss import HSAMLoss

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
STATE_KEY = "hsam_training_state"
STATE_FORMAT_VERSION = 1


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
    (an ``hsam.io.Volume``); ``segments``: its ``hsam.io.Segment`` list (empty: every non-zero value is
    a class); ``slices``: training slice indices (None: every labelled slice); ``name`` for messages."""

    volume: object
    labels: np.ndarray
    segments: Sequence = ()
    slices: Optional[list[int]] = None
    name: str = ""


@dataclass
class TrainingState:
    """Everything needed to continue a run: the trained tensors, optimiser moments and counters."""

    tensors: dict[str, torch.Tensor]
    info: dict


@dataclass
class FinetuneResult:
    model: HSAM
    metadata: BundleMetadata
    history: list[dict]
    state: Optional[TrainingState] = field(repr=False, default=None)
    atlases: list[Atlas] = field(repr=False, default_factory=list)

    def save_training_state(self, path: PathLike) -> Path:
        """Write the state at the end of the run (last, not best, weights) for ``FinetuneConfig.resume``."""
        return save_training_state(path, self.state)


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


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


# ----------------------------------------------------------------------------------------- data


@dataclass
class _Classes:
    label_values: list[int]
    names: list[str]
    colors: list[tuple[float, float, float]]
    terminology: list[Optional[str]]

    def add(self, value: int, name: str, color, term: Optional[str]) -> int:
        """Append a class (a new label value if ``value`` is taken); its 1-based index."""
        if value in self.label_values:
            value = max(self.label_values) + 1
        self.label_values.append(value)
        self.names.append(name)
        self.colors.append(tuple(color))
        self.terminology.append(term)
        return len(self.label_values)


def _case_classes(labels: np.ndarray, segments: Sequence) -> _Classes:
    """The classes one labelmap describes: its segments, or every non-zero value."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not segments:
        if not present:
            raise InputError("the labelmap has no labelled voxel")
        return _Classes(present, [f"Segment_{v}" for v in present], [default_color(i) for i in range(len(present))],
                        [None] * len(present))
    values = [int(s.label_value) for s in segments]
    if len(set(values)) != len(values):
        raise InputError("two segments share a label value")
    unknown = sorted(set(present) - set(values))
    if unknown:
        raise InputError(f"the labelmap has value {unknown[0]}, which no segment describes")
    return _Classes(values, [s.name for s in segments], [tuple(s.color) for s in segments],
                    [getattr(s, "terminology", None) for s in segments])


def _match_classes(merged: _Classes, own: _Classes) -> dict[int, int]:
    """Label value of ``own`` -> 1-based class index in ``merged`` (extended with unmatched classes):
    by name first (case and surrounding spaces ignored), then by label value."""
    keys = [n.strip().casefold() for n in merged.names]
    mapping: dict[int, int] = {}
    for value, name in zip(own.label_values, own.names):
        key = name.strip().casefold()
        if key in keys and keys.index(key) + 1 not in mapping.values():
            mapping[value] = keys.index(key) + 1
    for value in own.label_values:
        if value not in mapping and value in merged.label_values:
            index = merged.label_values.index(value) + 1
            if index not in mapping.values():
                mapping[value] = index
    for i, value in enumerate(own.label_values):
        if value not in mapping:
            mapping[value] = merged.add(value, own.names[i], own.colors[i], own.terminology[i])
    return mapping


def _cohort_classes(cases: Sequence[TrainingCase], config: FinetuneConfig) -> tuple[_Classes, list[np.ndarray]]:
    """The classes of all cases and each case's labels as class indices (0 = background)."""
    merged = _Classes([], [], [], [])
    class_labels = []
    for case in cases:
        mapping = _match_classes(merged, _case_classes(case.labels, case.segments))
        lookup = np.zeros(max([*mapping, int(case.labels.max())]) + 1, dtype=np.int64)
        lookup[list(mapping)] = list(mapping.values())
        class_labels.append(lookup[case.labels])
    for given, what in ((config.class_names, "class names"), (config.class_colors, "class colours")):
        if given is not None and len(given) != len(merged.label_values):
            raise InputError(f"{len(given)} {what} given for {len(merged.label_values)} classes")
    if len(merged.label_values) > MAX_CLASSES or max(merged.label_values) > MAX_LABEL_VALUE:
        raise InputError(f"a model holds at most {MAX_CLASSES} classes with label values up to {MAX_LABEL_VALUE}")
    if config.class_names is not None:
        merged.names = list(config.class_names)
    if config.class_colors is not None:
        merged.colors = [tuple(c) for c in config.class_colors]
    return merged, class_labels


def _check_inputs(volume, labels: np.ndarray, name: str = "") -> None:
    of = f" of {name}" if name else ""
    if labels.shape != volume.array.shape:
        raise InputError(
            f"the labelmap grid {labels.shape}{of} differs from the volume's {volume.array.shape}: "
            "resample it onto the volume first (hsam.io.read_labelmap(path, reference=volume))"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise InputError(f"the labelmap{of} holds non-integer values")
    if labels.min() < 0:
        raise InputError(f"the labelmap{of} holds negative values")


def _select_slices(labels: np.ndarray, axis: int, requested: Optional[Sequence[int]]) -> list[int]:
    depth = labels.shape[axis]
    if requested is None:
        chosen = annotated_slices(labels, axis)
        if not chosen:
            raise InputError("no annotated slice: label at least one slice of the volume")
        return chosen
    chosen = sorted({int(i) for i in requested})
    if not chosen:
        raise InputError("the list of training slices is empty")
    outside = [i for i in chosen if not 0 <= i < depth]
    if outside:
        raise InputError(f"slice {outside[0]} is outside the volume (0–{depth - 1} along this axis)")
    return chosen


def _split_validation(slices: list[int], enabled: bool) -> tuple[list[int], list[int]]:
    """(training, validation): ~15 % held out, evenly spread, when there are at least 6 slices."""
    if not enabled or len(slices) < MIN_SLICES_FOR_VALIDATION:
        return slices, []
    count = max(1, round(VALIDATION_FRACTION * len(slices)))
    held = {slices[int((i + 0.5) * len(slices) / count)] for i in range(count)}
    return [s for s in slices if s not in held], sorted(held)


def _slice_tensors(
    image: np.ndarray, labels: np.ndarray, axis: int, indices: list[int], img_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed (0–1) image and class-index slices resized to the network: ((N, S, S) float32,
    (N, S, S) int64); images bilinearly, labels by nearest neighbour."""
    images = torch.from_numpy(np.stack([np.take(image, i, axis=axis) for i in indices]).astype(np.float32))
    targets = torch.from_numpy(np.stack([np.take(labels, i, axis=axis) for i in indices]).astype(np.int64))
    size = (img_size, img_size)
    images = F.interpolate(images[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    targets = F.interpolate(targets[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return images, targets


# ----------------------------------------------------------------------------------------- model


@dataclass
class _Model:
    model: HSAM
    preset: str
    base_checkpoint: Optional[dict]
    base_bundle: Optional[str]
    preprocessing: Optional[dict]
    guidance: Optional[str]  # the prior kind of a guided model


def _build_model(config: FinetuneConfig, num_classes: int) -> _Model:
    if config.base_bundle is not None:
        name = Path(config.base_bundle).name
        model, meta = load_bundle(config.base_bundle, sam_checkpoint=config.sam_checkpoint)
        if meta.num_classes != num_classes:
            raise InputError(f"{name} segments {meta.num_classes} classes, the labelmap {num_classes}")
        if config.img_size is not None and config.img_size != meta.img_size:
            raise InputError(f"{name} works at {meta.img_size}px, not {config.img_size}px")
        if config.guidance is not None and not meta.guided:
            raise InputError(f"{name} is a prompt-free model: guided training starts from a guided model or anew")
        guidance = config.guidance or (meta.guidance["prior"] if meta.guided else None)
        return _Model(model, meta.preset, meta.base_checkpoint, name, meta.preprocessing, guidance)

    img_size = config.img_size or DEFAULT_IMG_SIZE.get(config.preset, FALLBACK_IMG_SIZE)
    try:
        model = build_hsam(config.preset, num_classes, img_size, config.cmattn, config.lora_rank,
                           guided=config.guidance is not None)
    except ValueError as e:
        raise InputError(str(e)) from e
    base = None
    if config.sam_checkpoint is not None:
        path = Path(config.sam_checkpoint)
        check_sam_checkpoint(path, config.preset)
        load_sam_weights(model, path, config.preset)
        base = {"name": SAM_CHECKPOINTS[config.preset].filename, "sha256": cached_sha256(path)}
    return _Model(model, config.preset, base, None, None, config.guidance)


def _trainable_state(model: HSAM) -> dict[str, torch.Tensor]:
    """The tensors a run changes: every parameter that trains, plus buffers, on the CPU."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


# ------------------------------------------------------------------------------------- distributed


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    created_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _start_distributed(device: torch.device) -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed()
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return _Distributed(dist.get_rank(), dist.get_world_size(), created)


def _select_device(name: str) -> torch.device:
    device = select_device(name)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _all_reduce(values: list[float], device: torch.device, op) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _epoch_order(count: int, epoch: int, seed: int, ddp: _Distributed) -> list[int]:
    """This process's share of a shuffle shared by all processes, padded to equal lengths."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    per_rank = math.ceil(count / ddp.world_size)
    order = (order * ddp.world_size)[: per_rank * ddp.world_size]
    return order[ddp.rank :: ddp.world_size]


# ------------------------------------------------------------------------------------------ state


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


# --------------------------------------------------------------------------------------- training


def _class_dice(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[Optional[float]]:
    """Dice of each class index 1..C; None where the class is in neither the prediction nor the target."""
    scores: list[Optional[float]] = []
    for c in range(1, num_classes + 1):
        p, t = prediction == c, target == c
        total = int(p.sum() + t.sum())
        scores.append(2.0 * int((p & t).sum()) / total if total else None)
    return scores


@torch.no_grad()
def _validate(
    model: HSAM, images: torch.Tensor, targets: torch.Tensor, device: torch.device, batch_size: int,
    priors: Optional[torch.Tensor] = None,
) -> list[Optional[float]]:
    """Per-class Dice of the model on the validation slices (see ``_class_dice``), guided by
    ``priors`` when given."""
    model.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        prior = priors[start : start + batch_size].to(device) if priors is not None else None
        predictions.append(model(batch[:, None].expand(-1, 3, -1, -1), prior=prior).masks.argmax(1).cpu())
    model.train()
    return _class_dice(torch.cat(predictions), targets, model.num_classes)


@torch.no_grad()
def _source_logits(model: HSAM, images: torch.Tensor, priors: torch.Tensor, device: torch.device,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """(N, K+1, S, S) logits of each of ``CHOICE_SOURCES`` on the slices ``images`` (N, S, S): the
    priors themselves, the model guided by them, the model prompt-free."""
    model.eval()
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in CHOICE_SOURCES}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)[:, None].expand(-1, 3, -1, -1)
        prior = priors[start : start + batch_size].to(device)
        logits["prior"].append(prior.float().cpu())
        logits["guided"].append(model(batch, prior=prior).masks.float().cpu())
        logits["prompt-free"].append(model(batch).masks.float().cpu())
    model.train()
    return {name: torch.cat(values) for name, values in logits.items()}


def choose_sources(logits: dict[str, torch.Tensor], targets: torch.Tensor) -> list[str]:
    """A source of ``CHOICE_SOURCES`` per class, for logits (N, K+1, H, W) per source on slices with
    labels ``targets`` (N, H, W). Per class, the guided output where it scores a higher Dice than the
    prior alone, else the prior (the two share one scale: guided = prior + correction). The prompt-free
    output, on a scale of its own, is kept only for every class at once: where no class scores below
    the prior and its mean beats the per-class choice. A class in neither output nor slices scores 1."""
    classes = logits["prior"].shape[1] - 1

    def scores(choice: list[str]) -> np.ndarray:
        dice = _class_dice(combine_sources(logits, choice).argmax(1), targets, classes)
        return np.array([1.0 if d is None else d for d in dice])

    prior, guided = scores(["prior"] * classes), scores(["guided"] * classes)
    choice = ["guided" if g > p else "prior" for g, p in zip(guided, prior)]
    prompt_free = scores(["prompt-free"] * classes)
    if (prompt_free >= prior).all() and prompt_free.mean() > scores(choice).mean():
        return ["prompt-free"] * classes
    return choice


def select_sources(model: HSAM, images: torch.Tensor, targets: torch.Tensor, priors: torch.Tensor,
                   device: torch.device, batch_size: int) -> dict:
    """What segmentation keeps per class, chosen on held-out annotated slices (``choose_sources``):
    {"choice": a source per class, "dice": the per-class Dice of each source alone and of the choice}."""
    logits = _source_logits(model, images, priors, device, batch_size)
    dice = {name: _class_dice(values.argmax(1), targets, model.num_classes) for name, values in logits.items()}
    choice = choose_sources(logits, targets)
    dice["chosen"] = _class_dice(combine_sources(logits, choice).argmax(1), targets, model.num_classes)
    return {"choice": choice, "dice": dice}


def _mean_dice(per_class: list[Optional[float]]) -> float:
    """Mean over the classes that occur (1.0 when none does)."""
    scores = [d for d in per_class if d is not None]
    return float(np.mean(scores)) if scores else 1.0


def finetune(
    volume,
    labels: np.ndarray,
    segments: Sequence = (),
    config: Optional[FinetuneConfig] = None,
    progress: Optional[Callable[[TrainingProgress], None]] = None,
    cancel: Optional[threading.Event] = None,
    preview: Optional[Preview] = None,
) -> FinetuneResult:
    """Fine-tune H-SAM on the annotated slices of ``volume`` (an ``hsam.io.Volume``).

    labels: (z, y, x) integer labelmap on the volume's grid (0 = background, values as in
    ``segments``, each an ``hsam.io.Segment``; without segments, every non-zero value is a class).
    Class ``k`` of the model stands for the ``k``-th segment's label value. Nothing is written; save
    the returned model with ``hsam.bundle.save_bundle``. Raises InputError for unusable input and
    Cancelled when ``cancel`` is set. ``preview(model, metadata)`` is called before the first step
    and after every epoch with the model as it is (a guided model's first one returns its prior).
    """
    config = config or FinetuneConfig()
    case = TrainingCase(volume, np.asarray(labels), segments, config.slices)
    return finetune_cohort([case], config, progress, cancel, preview)


def finetune_cohort(
    cases: Sequence[TrainingCase],
    config: Optional[FinetuneConfig] = None,
    progress: Optional[Callable[[TrainingProgress], None]] = None,
    cancel: Optional[threading.Event] = None,
    preview: Optional[Preview] = None,
) -> FinetuneResult:
    """Fine-tune H-SAM on the annotated slices of several volumes (see ``TrainingCase``); a case's
    ``slices`` default to ``config.slices``, then to its labelled slices. Otherwise as ``finetune``."""
    config = config or FinetuneConfig()
    _check_config(config, len(cases))
    axis = SLICE_AXES[config.slice_axis]
    base = read_bundle_metadata(config.base_bundle) if config.base_bundle is not None else None
    for index, case in enumerate(cases):
        case.labels = np.asarray(case.labels)
        case.name = case.name or f"volume {index + 1}"
        _check_inputs(case.volume, case.labels, case.name if len(cases) > 1 else "")
        if base is not None:  # continuing: the base model's classes, names and colours, in its order
            case.labels, case.segments = align_to_base(case.labels, case.segments, base, Path(config.base_bundle).name)
    classes, class_labels = _cohort_classes(cases, config)
    slices = [_select_slices(labels, axis, case.slices if case.slices is not None else config.slices)
              for case, labels in zip(cases, class_labels)]
    if config.base_bundle is None:
        seen = set().union(*({int(v) for v in np.unique(np.take(labels, chosen, axis=axis))}
                             for labels, chosen in zip(class_labels, slices)))
        missing = [n for k, n in enumerate(classes.names, start=1) if k not in seen]
        if missing:
            raise InputError(f"segment {missing[0]!r} has no voxel in the training slices")

    device = _select_device(config.device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        ddp = _start_distributed(device)
        try:
            return _run(cases, class_labels, slices, classes, config, device, ddp, progress, cancel, preview)
        finally:
            if ddp.created_group:
                dist.destroy_process_group()


def _check_config(config: FinetuneConfig, volumes: int) -> None:
    if volumes < 1:
        raise InputError("no training volume given")
    if config.slice_axis not in SLICE_AXES:
        raise InputError(f"unknown slice axis {config.slice_axis!r}; choose one of {', '.join(SLICE_AXES)}")
    if config.epochs is not None and config.epochs < 1:
        raise InputError("epochs must be at least 1")
    if config.time_budget is not None and config.time_budget <= 0:
        raise InputError("the time budget must be positive")
    if config.batch_size < 1:
        raise InputError("the batch size must be at least 1")
    if not 0 <= config.validation_volumes < volumes:
        raise InputError(f"cannot hold out {config.validation_volumes} of {volumes} volumes for validation")


class _Loop:
    """The optimisation loop of one process: schedule, augmentation, stopping, best weights."""

    def __init__(self, model, config, ddp, device, base_lr, data, class_names, progress, cancel) -> None:
        self.model, self.config, self.ddp, self.device = model, config, ddp, device
        self.class_names = class_names
        self.train_images, self.train_targets, *train_priors = data.train
        self.val_images, self.val_targets, *val_priors = data.validation
        self.train_priors, self.train_atlas_priors = (*train_priors, None, None)[:2]
        self.val_priors, self.val_atlas_priors = (*val_priors, None, None)[:2]
        self.progress, self.cancel = progress, cancel
        self.base_lr = base_lr
        self.network = model
        if ddp.active:
            self.network = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=base_lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
        self.autocast_dtype = training_precision(config.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.autocast_dtype == torch.float16 else None
        self.loss_fn = HSAMLoss()
        self.augmentation = RandomAugmentation(config.seed + 7919 * (ddp.rank + 1))
        slices_per_process = math.ceil(len(self.train_images) / ddp.world_size)
        self.batches_per_epoch = math.ceil(slices_per_process / config.batch_size)
        self.planned_epochs = config.epochs or DEFAULT_EPOCHS
        self.epoch = self.iteration = 0
        self.history: list[dict] = []
        self.best_dice: Optional[float] = None
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        self.prior_dice: Optional[float] = None
        self.on_epoch: Callable[[], None] = lambda: None
        self.last_loss = float("nan")
        self.started = time.monotonic()
        self.previous_seconds = 0.0

    @property
    def max_iterations(self) -> int:
        return self.planned_epochs * self.batches_per_epoch

    def report(self, message: str, val_dice: Optional[float] = None, fraction: Optional[float] = None) -> None:
        if self.progress is not None and self.ddp.rank == 0:
            fraction = self.iteration / max(self.max_iterations, 1) if fraction is None else fraction
            dice = self.best_dice if val_dice is None else val_dice
            self.progress(TrainingProgress(min(fraction, 1.0), self.epoch, self.iteration, self.last_loss, dice, message))

    def should_stop(self) -> bool:
        """Raise Cancelled when any process was cancelled; True when the time budget is spent or a stop was asked for."""
        budget = self.config.time_budget
        flags = [
            float(self.cancel is not None and self.cancel.is_set()),
            float((budget is not None and time.monotonic() - self.started >= budget)
                  or (self.config.stop is not None and bool(self.config.stop()))),
        ]
        if self.ddp.active:
            flags = _all_reduce(flags, self.device, dist.ReduceOp.MAX)
        if flags[0]:
            raise Cancelled("training cancelled")
        return bool(flags[1]) and self.iteration > 0

    def step(self, index: torch.Tensor, warmup: int) -> dict[str, float]:
        lr = reference_learning_rate(self.iteration, self.base_lr, warmup, self.max_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = self.train_images[index].to(self.device)
        targets = self.train_targets[index].to(self.device)
        priors = self._priors(index, targets)
        if self.config.augment and priors is not None:
            stacked, targets = self.augmentation(torch.cat([images[:, None], priors], dim=1), targets)
            images, priors = stacked[:, 0], perturb_priors(stacked[:, 1:], self.augmentation.generator)
        elif self.config.augment:
            images, targets = self.augmentation(images, targets)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            output = self.network(images[:, None].expand(-1, 3, -1, -1), targets, priors)
            loss, parts = self.loss_fn(output, targets, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.iteration += 1
        self.last_loss = float(loss.detach())
        return {"loss": self.last_loss, "stage1": parts["stage1"], "stage2": parts["stage2"], "lr": lr}

    def _priors(self, index: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """The batch's priors (leave-one-out or, perturbed later, the slices' own labels); None (a
        prompt-free step) for unguided models and for a ``prompt_dropout`` share of guided steps. With
        atlas priors, each slice's is its atlas prior with probability ``ATLAS_SHARE``."""
        if self.train_priors is None:
            return None
        generator = self.augmentation.generator
        if float(torch.rand(1, generator=generator)) < self.config.prompt_dropout:
            return None
        priors = self.train_priors[index]
        if self.train_atlas_priors is not None:
            from_atlas = torch.rand(len(index), generator=generator) < ATLAS_SHARE
            priors = torch.where(from_atlas[:, None, None, None], self.train_atlas_priors[index], priors)
        return mix_own_priors(priors.to(self.device), targets, generator)

    def validate(self) -> tuple[float, list[Optional[float]]]:
        """(mean, per-class) validation Dice; the best weights so far kept."""
        per_class = _validate(self.model, self.val_images, self.val_targets, self.device, self.config.batch_size,
                              self.val_priors)
        dice = _mean_dice(per_class)
        if self.best_dice is None or dice > self.best_dice:
            self.best_dice, self.best_state = dice, _trainable_state(self.model)
        return dice, per_class

    def train_epoch(self) -> bool:
        """One pass over this process's share of the slices; False when the time budget ran out."""
        started = time.monotonic()
        warmup = warmup_iterations(self.max_iterations)
        order = _epoch_order(len(self.train_images), self.epoch, self.config.seed, self.ddp)
        steps = []
        for start in range(0, len(order), self.config.batch_size):
            if self.should_stop():
                return False
            steps.append(self.step(torch.tensor(order[start : start + self.config.batch_size]), warmup))
            self.report(f"epoch {self.epoch + 1}/{self.planned_epochs}, step {self.iteration}: loss {self.last_loss:.4f}")
        means = [float(np.mean([s[k] for s in steps])) for k in ("loss", "stage1", "stage2")]
        if self.ddp.active:
            means = [m / self.ddp.world_size for m in _all_reduce(means, self.device, dist.ReduceOp.SUM)]
        record = dict(zip(("loss", "stage1", "stage2"), means))
        record.update(epoch=self.epoch, steps=self.iteration, lr=steps[-1]["lr"])
        if self.val_images is not None:
            dice, per_class = self.validate()
            record["val_dice"] = dice
            record["val_dice_per_class"] = dict(zip(self.class_names, per_class))
            self.report(f"epoch {self.epoch + 1}: validation Dice {dice:.3f}", val_dice=dice)
        record["seconds"] = time.monotonic() - started
        self.history.append(record)
        self.epoch += 1
        if self.config.time_budget is not None:
            self.replan(record["seconds"])
        return True

    def replan(self, epoch_seconds: float) -> None:
        """Plan the epochs that still fit the budget on the latest epoch's duration (all processes agree)."""
        remaining = self.config.time_budget - (time.monotonic() - self.started)
        planned = self.epoch + max(0, int(remaining // max(epoch_seconds, 1e-6)))
        if self.ddp.active:
            planned = int(_all_reduce([float(planned)], self.device, dist.ReduceOp.MIN)[0])
        self.planned_epochs = min(self.config.epochs or planned, planned)

    def run(self) -> None:
        if self.val_priors is not None and self.best_dice is None:
            self.prior_dice, _ = self.validate()  # the prior itself: training keeps what beats it
            self.report(f"prior alone: validation Dice {self.prior_dice:.3f}", val_dice=self.prior_dice)
        self.on_epoch()
        self.model.train()
        while self.epoch < self.planned_epochs and self.train_epoch():
            self.on_epoch()
        if self.iteration == 0:
            raise InputError("the time budget ended before the first training step")

    @property
    def seconds(self) -> float:
        return self.previous_seconds + time.monotonic() - self.started

    def state(self, classes: _Classes) -> TrainingState:
        """The state after the last step (not the best weights), for resuming."""
        tensors = {f"model.{k}": v for k, v in _trainable_state(self.model).items()}
        optimizer_tensors, groups = _optimizer_tensors(self.optimizer)
        tensors.update(optimizer_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        tensors["rng.augmentation"] = self.augmentation.get_state()
        if self.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
        info = {
            "format_version": STATE_FORMAT_VERSION,
            "hsam_version": __version__,
            "img_size": self.model.img_size,
            "num_classes": self.model.num_classes,
            "label_values": classes.label_values,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "history": self.history,
            "best_val_dice": self.best_dice,
            "seconds": self.seconds,
            "optimizer_param_groups": groups,
        }
        return TrainingState(tensors, info)

    def resume(self, state: TrainingState) -> None:
        info, model = state.info, self.model
        if info["num_classes"] != model.num_classes or info["img_size"] != model.img_size:
            raise InputError(
                f"the saved run trained {info['num_classes']} classes at {info['img_size']}px, "
                f"this one {model.num_classes} at {model.img_size}px"
            )
        weights = {k.removeprefix("model."): v for k, v in state.tensors.items() if k.startswith("model.")}
        own = model.state_dict()
        wrong = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
        if wrong:
            raise InputError(f"the saved run does not fit this model (e.g. {wrong[0]})")
        model.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=False)
        _restore_optimizer(self.optimizer, state.tensors, info["optimizer_param_groups"])
        torch.set_rng_state(state.tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in state.tensors:
            torch.cuda.set_rng_state(state.tensors["rng.cuda"], self.device)
        self.augmentation.set_state(state.tensors["rng.augmentation"])
        self.epoch, self.iteration = info["epoch"], info["iteration"]
        self.history = list(info["history"])
        self.previous_seconds = float(info["seconds"])
        self.best_dice = info.get("best_val_dice")
        best = {k.removeprefix("best."): v for k, v in state.tensors.items() if k.startswith("best.")}
        self.best_state = best or None
        if self.epoch >= self.planned_epochs:
            raise InputError(f"the saved run already did {self.epoch} epochs; ask for more epochs to continue")


@dataclass
class _TrainingData:
    """Slices of all cases at the network's size: (images (N, S, S), targets (N, S, S)) for training
    and validation (None, None when nothing is held out), and each case's (training, validation) slices."""

    train: tuple[torch.Tensor, ...]
    validation: tuple[Optional[torch.Tensor], ...]
    split: list[tuple[list[int], list[int]]]


def volume_prior(labels: np.ndarray, axis: int, annotated: list[int], num_classes: int, kind: str,
                 image: np.ndarray) -> SlicePrior:
    """The ``SlicePrior`` of kind ``kind`` of one volume's class labels (z, y, x) along ``axis``;
    ``image``: the volume's voxels, which the ``flow`` prior follows."""
    slices = np.moveaxis(image, axis, 0)
    flow = flow_images(slices, modality_of(slices)) if kind == "flow" else None
    return SlicePrior(np.moveaxis(labels, axis, 0), annotated, num_classes, kind, flow)


def leave_one_out_priors(prior: SlicePrior, part: list[int], img_size: int) -> torch.Tensor:
    """(N, K+1, S, S) prior logits of the annotated slices ``part``, each built from the other
    annotated slices only (``SlicePrior.leave_one_out``), resized to the network's input."""
    return _network_size([prior.leave_one_out(i) for i in part], img_size)


def _network_size(logits: list[np.ndarray], img_size: int) -> torch.Tensor:
    """(K+1, H, W) logits of N slices -> (N, K+1, S, S) at the network's input size."""
    return F.interpolate(torch.from_numpy(np.stack(logits)), size=(img_size, img_size), mode="bilinear",
                         align_corners=False)


def training_atlases(cases, class_labels, slices, axis: int, num_classes: int, report) -> list[Atlas]:
    """Every case's ``Atlas``: its labels completed from its annotated ``slices``."""
    atlases = []
    for index, (case, labels, chosen) in enumerate(zip(cases, class_labels, slices)):
        report(f"atlas {index + 1}/{len(cases)}: completing {case.name}'s labels")
        atlases.append(make_atlas(case.volume, labels, chosen, axis, num_classes, name=case.name))
    return atlases


def leave_one_out_atlas_priors(cases, atlases: list[Atlas], num_classes: int, axis: int, report,
                               cancel=None) -> list[Optional[AtlasPrior]]:
    """Each case's ``AtlasPrior`` from the other cases' atlases registered onto it, never its own
    labels; None for the case of a single-volume run."""
    if len(atlases) < 2:
        return [None] * len(cases)
    priors = []
    for index, case in enumerate(cases):
        report(f"atlas {index + 1}/{len(cases)}: registering the other volumes onto {case.name}")
        others = atlases[:index] + atlases[index + 1 :]
        priors.append(atlas_prior(case.volume, others, num_classes, axis, cancel=cancel))
    return priors


def _training_data(cases, class_labels, slices, preprocessing, config: FinetuneConfig, img_size: int,
                   guidance: Optional[str] = None, num_classes: int = 0,
                   atlas_priors: Sequence[Optional[AtlasPrior]] = ()) -> _TrainingData:
    """Each case normalised by its own statistics; the last ``validation_volumes`` cases held out
    whole, else ~15 % of each case's slices (``_split_validation``). Guided, every slice also gets its
    leave-one-out prior of kind ``guidance``: (images, targets, priors), and its case's atlas prior
    where ``atlas_priors`` gives one: (images, targets, priors, atlas priors)."""
    axis = SLICE_AXES[config.slice_axis]
    held_out_from = len(cases) - config.validation_volumes
    train, validation, split = [], [], []
    for index, (case, labels, chosen) in enumerate(zip(cases, class_labels, slices)):
        if index >= held_out_from:
            parts = ([], chosen)
        else:
            parts = _split_validation(chosen, config.validation and not config.validation_volumes)
        image = preprocessing.apply(case.volume.array)
        prior = volume_prior(labels, axis, chosen, num_classes, guidance, case.volume.array) if guidance else None
        atlas = atlas_priors[index] if atlas_priors else None
        for tensors, part in zip((train, validation), parts):
            if part:
                tensors.append(_slice_tensors(image, labels, axis, part, img_size))
                if prior is not None:
                    tensors[-1] += (leave_one_out_priors(prior, part, img_size),)
                if atlas is not None:
                    tensors[-1] += (_network_size([atlas.logits(i) for i in part], img_size),)
        split.append(parts)
    if not train:
        raise InputError("no training slice is left once the validation slices are held out")
    width = 2 + (guidance is not None) + any(p is not None for p in atlas_priors)
    joined = [tuple(torch.cat(t) for t in zip(*tensors)) if tensors else (None,) * width for tensors in (train, validation)]
    return _TrainingData(joined[0], joined[1], split)


def _atlas_guidance(model: HSAM, loop: _Loop, atlases: list[Atlas], device: torch.device, batch_size: int) -> dict:
    """What segmentation with the atlas prior keeps per class, chosen on the held-out slices with their
    leave-one-volume-out atlas priors; the atlas prior alone where there are none (a single volume)."""
    guidance = {"volumes": len(atlases), "registration": "deformable", "choice": ["prior"] * model.num_classes}
    if loop.val_atlas_priors is not None:
        selection = select_sources(model, loop.val_images, loop.val_targets, loop.val_atlas_priors, device, batch_size)
        guidance["choice"] = selection["choice"]
        guidance["selection"] = {"slices": len(loop.val_images), "dice": selection["dice"]}
    return guidance


def _run(cases, class_labels, slices, classes, config, device, ddp, progress, cancel, preview) -> FinetuneResult:
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    built = _build_model(config, len(classes.label_values))
    model = built.model
    train_encoder = built.base_checkpoint is None
    if train_encoder:
        model.requires_grad_(True)
    checkpointing = config.gradient_checkpointing
    model.image_encoder.gradient_checkpointing = (
        device.type == "cuda" and built.preset != "tiny" if checkpointing is None else checkpointing
    )

    if config.preprocessing is not None:
        preprocessing = config.preprocessing
    elif built.preprocessing is not None:
        preprocessing = IntensityPreprocessing.from_dict(built.preprocessing)
    else:
        preprocessing = IntensityPreprocessing(mode="percentile")
    atlases, atlas_priors = [], []
    if config.atlas and built.guidance is not None:
        def report(message: str) -> None:
            if progress is not None and ddp.rank == 0:
                progress(TrainingProgress(0.0, 0, 0, float("nan"), None, message))

        atlases = training_atlases(cases, class_labels, slices, SLICE_AXES[config.slice_axis], model.num_classes, report)
        atlas_priors = leave_one_out_atlas_priors(cases, atlases, model.num_classes, SLICE_AXES[config.slice_axis],
                                                  report, cancel)
    data = _training_data(cases, class_labels, slices, preprocessing, config, model.img_size, built.guidance,
                          model.num_classes, atlas_priors)

    model.to(device)
    base_lr = config.learning_rate or DEFAULT_LEARNING_RATE.get(built.preset, FALLBACK_LEARNING_RATE)
    metadata = BundleMetadata(
        preset=built.preset,
        img_size=model.img_size,
        num_classes=model.num_classes,
        class_names=classes.names,
        class_colors=classes.colors,
        label_values=classes.label_values,
        terminology=classes.terminology,
        preprocessing=preprocessing.to_dict(),
        slice_axis=config.slice_axis,
        cmattn=model.cmattn_mode,
        lora_rank=model.lora_rank,
        base_checkpoint=built.base_checkpoint,
        guidance={"prior": built.guidance, "prompt_dropout": config.prompt_dropout} if built.guidance else None,
    )
    if built.guidance is not None and config.epochs is None:
        config = replace(config, epochs=DEFAULT_GUIDED_EPOCHS)
    loop = _Loop(model, config, ddp, device, base_lr, data, classes.names, progress, cancel)
    if preview is not None and ddp.rank == 0:
        loop.on_epoch = lambda: preview(model, metadata)
    torch.manual_seed(config.seed + ddp.rank)  # the embedding noise differs between processes
    if config.resume is not None:
        loop.resume(load_training_state(config.resume))
    loop.run()

    state = loop.state(classes)
    if loop.best_state is not None:
        model.load_state_dict({k: v.to(device) for k, v in loop.best_state.items()}, strict=False)
    if metadata.guided and loop.val_priors is not None:
        selection = select_sources(model, loop.val_images, loop.val_targets, loop.val_priors, device, config.batch_size)
        metadata.guidance["choice"] = selection["choice"]
        metadata.guidance["selection"] = {"slices": len(loop.val_images), "dice": selection["dice"]}
    if atlases:
        metadata.guidance["atlas"] = _atlas_guidance(model, loop, atlases, device, config.batch_size)
    model.eval()
    metadata.training = {
        "hsam_version": __version__,
        "cases": [
            {
                "name": case.name,
                "shape": list(case.volume.array.shape),
                "spacing": [float(v) for v in case.volume.spacing],
                "labelled_voxels": {n: int((labels == k).sum()) for k, n in enumerate(classes.names, 1)},
                "slices": train_slices,
                "validation_slices": val_slices,
            }
            for case, labels, (train_slices, val_slices) in zip(cases, class_labels, data.split)
        ],
        "base_bundle": built.base_bundle,
        "resumed_from": Path(config.resume).name if config.resume is not None else None,
        "epochs": loop.epoch,
        "steps": loop.iteration,
        "final_loss": loop.last_loss,
        "best_val_dice": loop.best_dice,
        "prior_val_dice": loop.prior_dice,
        "seconds": round(loop.seconds, 2),
        "learning_rate": base_lr,
        "batch_size": config.batch_size,
        "processes": ddp.world_size,
        "augmentation": config.augment,
        "trained_encoder": train_encoder,
        "seed": config.seed,
        "device": str(device),
    }
    loop.report(f"finished: {loop.epoch} epochs, {loop.iteration} steps", fraction=1.0)
    return FinetuneResult(model, metadata, loop.history, state, atlases)
