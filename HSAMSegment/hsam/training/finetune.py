"""Few-shot fine-tuning of H-SAM on the annotated slices of one volume or of a cohort of volumes, with
the authors' recipe.

A cohort (``finetune_cohort``) is a list of ``TrainingCase``: volumes of any size, spacing and
orientation, each normalised by its own intensity statistics and cut into slices along the same
axis. Classes are matched across volumes by segment name (case and surrounding spaces ignored), then
by label value; a class may be absent from some volumes, not from all training slices.

Recipe (``train.py``/``trainer.py`` of the authors' code): AdamW (betas 0.9/0.999, weight decay 0.1)
over the trainable parameters, linear warm-up then poly(0.9) learning rate, 0.1·CE + 0.9·Dice per
stage with the stage-2 weight growing by epoch, the ``RandomGenerator`` augmentations (see
``hsam.training.augment``), seed 2345. Adapted to a few annotated slices:

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

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..guidance.atlas import Atlas
from ..modeling.hsam import HSAM
from ..models.build import build_hsam
from ..models.bundle import BundleMetadata, load_bundle, read_bundle_metadata
from ..models.checkpoint import load_sam_weights
from ..models.sam_weights import SAM_CHECKPOINTS, cached_sha256, check_sam_checkpoint
from ..runtime.errors import InputError
from ..runtime.version import __version__
from ..volumes.constants import SLICE_AXES
from ..volumes.preprocess import IntensityPreprocessing
from .config import (
    DEFAULT_GUIDED_EPOCHS,
    DEFAULT_IMG_SIZE,
    DEFAULT_LEARNING_RATE,
    FALLBACK_IMG_SIZE,
    FALLBACK_LEARNING_RATE,
    FinetuneConfig,
    PathLike,
    Preview,
    TrainingCase,
    TrainingProgress,
)
from .continuation import align_to_base
from .data import (
    _check_inputs,
    _cohort_classes,
    _select_slices,
    _training_data,
    leave_one_out_atlas_priors,
    training_atlases,
)
from .distributed import _select_device, _start_distributed
from .loop import _Loop
from .selection import select_sources
from .state import TrainingState, load_training_state, save_training_state


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


def finetune(
    volume,
    labels: np.ndarray,
    segments: Sequence = (),
    config: Optional[FinetuneConfig] = None,
    progress: Optional[Callable[[TrainingProgress], None]] = None,
    cancel: Optional[threading.Event] = None,
    preview: Optional[Preview] = None,
) -> FinetuneResult:
    """Fine-tune H-SAM on the annotated slices of ``volume`` (an ``hsam.volumes.volume.Volume``).

    labels: (z, y, x) integer labelmap on the volume's grid (0 = background, values as in
    ``segments``, each an ``hsam.volumes.segmentation.Segment``; without segments, every non-zero value is a class).
    Class ``k`` of the model stands for the ``k``-th segment's label value. Nothing is written; save
    the returned model with ``hsam.models.bundle.save_bundle``. Raises InputError for unusable input and
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


def _atlas_guidance(model: HSAM, loop: _Loop, atlases: list[Atlas], device: torch.device, batch_size: int) -> dict:
    """What segmentation with the atlas prior keeps per class, chosen on the held-out slices with their
    leave-one-volume-out atlas priors; the atlas prior alone where there are none (a single volume)."""
    guidance = {"volumes": len(atlases), "registration": "deformable", "choice": ["prior"] * model.num_classes}
    if loop.val_atlas_priors is not None:
        selection = select_sources(model, loop.val_images, loop.val_targets, loop.val_atlas_priors, device, batch_size)
        guidance["choice"] = selection["choice"]
        guidance["selection"] = {"slices": len(loop.val_images), "dice": selection["dice"]}
    return guidance


def _setup_model(config: FinetuneConfig, num_classes: int, device: torch.device):
    """The model to fine-tune, seeded, with its trainable parts and gradient checkpointing set."""
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    built = _build_model(config, num_classes)
    model = built.model
    if built.base_checkpoint is None:
        model.requires_grad_(True)
    checkpointing = config.gradient_checkpointing
    model.image_encoder.gradient_checkpointing = (
        device.type == "cuda" and built.preset != "tiny" if checkpointing is None else checkpointing
    )
    return built


def _preprocessing(config: FinetuneConfig, built) -> IntensityPreprocessing:
    """The intensity preprocessing asked for, else the base bundle's, else percentile scaling."""
    if config.preprocessing is not None:
        return config.preprocessing
    if built.preprocessing is not None:
        return IntensityPreprocessing.from_dict(built.preprocessing)
    return IntensityPreprocessing(mode="percentile")


def _atlas_priors(cases, class_labels, slices, config, built, ddp, progress, cancel) -> tuple[list, list]:
    """The training atlases and their leave-one-volume-out priors; empty without atlas guidance."""
    if not (config.atlas and built.guidance is not None):
        return [], []

    def report(message: str) -> None:
        if progress is not None and ddp.rank == 0:
            progress(TrainingProgress(0.0, 0, 0, float("nan"), None, message))

    num_classes, axis = built.model.num_classes, SLICE_AXES[config.slice_axis]
    atlases = training_atlases(cases, class_labels, slices, axis, num_classes, report)
    return atlases, leave_one_out_atlas_priors(cases, atlases, num_classes, axis, report, cancel)


def _metadata(built, classes, preprocessing: IntensityPreprocessing, config: FinetuneConfig) -> BundleMetadata:
    model = built.model
    return BundleMetadata(
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


def _keep_best(model: HSAM, loop: _Loop, metadata: BundleMetadata, atlases: list[Atlas], device, batch_size) -> None:
    """Load the best weights and choose, per class, what segmentation with a prior keeps."""
    if loop.best_state is not None:
        model.load_state_dict({k: v.to(device) for k, v in loop.best_state.items()}, strict=False)
    if metadata.guided and loop.val_priors is not None:
        selection = select_sources(model, loop.val_images, loop.val_targets, loop.val_priors, device, batch_size)
        metadata.guidance["choice"] = selection["choice"]
        metadata.guidance["selection"] = {"slices": len(loop.val_images), "dice": selection["dice"]}
    if atlases:
        metadata.guidance["atlas"] = _atlas_guidance(model, loop, atlases, device, batch_size)


def _training_summary(cases, class_labels, classes, data, built, loop: _Loop, config, base_lr, ddp, device) -> dict:
    """The training record kept in the bundle's metadata."""
    return {
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
        "trained_encoder": built.base_checkpoint is None,
        "seed": config.seed,
        "device": str(device),
    }


def _run(cases, class_labels, slices, classes, config, device, ddp, progress, cancel, preview) -> FinetuneResult:
    built = _setup_model(config, len(classes.label_values), device)
    model = built.model
    preprocessing = _preprocessing(config, built)
    atlases, atlas_priors = _atlas_priors(cases, class_labels, slices, config, built, ddp, progress, cancel)
    data = _training_data(cases, class_labels, slices, preprocessing, config, model.img_size, built.guidance,
                          model.num_classes, atlas_priors)

    model.to(device)
    base_lr = config.learning_rate or DEFAULT_LEARNING_RATE.get(built.preset, FALLBACK_LEARNING_RATE)
    metadata = _metadata(built, classes, preprocessing, config)
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
    _keep_best(model, loop, metadata, atlases, device, config.batch_size)
    model.eval()
    metadata.training = _training_summary(cases, class_labels, classes, data, built, loop, config, base_lr, ddp, device)
    loop.report(f"finished: {loop.epoch} epochs, {loop.iteration} steps", fraction=1.0)
    return FinetuneResult(model, metadata, loop.history, state, atlases)
