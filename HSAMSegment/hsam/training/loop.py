"""The optimisation loop of one process: learning-rate schedule, augmentation, prompt dropout, stopping,
validation, the best weights, and its state for resuming."""

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..guidance.augment import mix_own_priors, perturb_priors
from ..runtime.errors import Cancelled, InputError
from ..runtime.version import __version__
from .augment import RandomAugmentation
from .config import (
    ATLAS_SHARE,
    BETAS,
    DEFAULT_EPOCHS,
    WEIGHT_DECAY,
    TrainingProgress,
    reference_learning_rate,
    training_precision,
    warmup_iterations,
)
from .data import _Classes
from .distributed import _all_reduce, _epoch_order
from .loss import HSAMLoss
from .selection import _mean_dice, _validate
from .state import STATE_FORMAT_VERSION, TrainingState, _optimizer_tensors, _restore_optimizer, _trainable_state


class _Schedule:
    """The learning-rate plan and stopping: planned epochs, the time budget, cancellation and stop requests."""

    def __init__(self, config, ddp, device, batches_per_epoch: int, cancel) -> None:
        self.config, self.ddp, self.device, self.cancel = config, ddp, device, cancel
        self.batches_per_epoch = batches_per_epoch
        self.planned_epochs = config.epochs or DEFAULT_EPOCHS
        self.started = time.monotonic()

    @property
    def max_iterations(self) -> int:
        return self.planned_epochs * self.batches_per_epoch

    def should_stop(self, iteration: int) -> bool:
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
        return bool(flags[1]) and iteration > 0

    def replan(self, epoch: int, epoch_seconds: float) -> None:
        """Plan the epochs that still fit the budget on the latest epoch's duration (all processes agree)."""
        remaining = self.config.time_budget - (time.monotonic() - self.started)
        planned = epoch + max(0, int(remaining // max(epoch_seconds, 1e-6)))
        if self.ddp.active:
            planned = int(_all_reduce([float(planned)], self.device, dist.ReduceOp.MIN)[0])
        self.planned_epochs = min(self.config.epochs or planned, planned)


class _Optimisation:
    """One optimisation step: its learning rate, the batch's priors and augmentation, forward, backward."""

    def __init__(self, model, config, ddp, device, base_lr, train) -> None:
        self.config, self.device, self.base_lr = config, device, base_lr
        self.train_images, self.train_targets, *train_priors = train
        self.train_priors, self.train_atlas_priors = (*train_priors, None, None)[:2]
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

    def step(self, index: torch.Tensor, lr: float, epoch: int) -> dict[str, float]:
        """One step on the slices at ``index``: the loss, its stages and the learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, targets, priors = self._batch(index)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            output = self.network(images[:, None].expand(-1, 3, -1, -1), targets, priors)
            loss, parts = self.loss_fn(output, targets, epoch)
        self._backward(loss)
        return {"loss": float(loss.detach()), "stage1": parts["stage1"], "stage2": parts["stage2"], "lr": lr}

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The batch's images, targets and priors on the device, augmented when asked for."""
        images = self.train_images[index].to(self.device)
        targets = self.train_targets[index].to(self.device)
        priors = self._priors(index, targets)
        if self.config.augment and priors is not None:
            stacked, targets = self.augmentation(torch.cat([images[:, None], priors], dim=1), targets)
            images, priors = stacked[:, 0], perturb_priors(stacked[:, 1:], self.augmentation.generator)
        elif self.config.augment:
            images, targets = self.augmentation(images, targets)
        return images, targets, priors

    def _backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

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


class _Validation:
    """Validation on the held-out slices and the best weights so far."""

    def __init__(self, model, device, batch_size: int, validation) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.val_images, self.val_targets, *val_priors = validation
        self.val_priors, self.val_atlas_priors = (*val_priors, None, None)[:2]
        self.best_dice: Optional[float] = None
        self.best_state: Optional[dict[str, torch.Tensor]] = None

    def validate(self) -> tuple[float, list[Optional[float]]]:
        """(mean, per-class) validation Dice; the best weights so far kept."""
        per_class = _validate(self.model, self.val_images, self.val_targets, self.device, self.batch_size,
                              self.val_priors)
        dice = _mean_dice(per_class)
        if self.best_dice is None or dice > self.best_dice:
            self.best_dice, self.best_state = dice, _trainable_state(self.model)
        return dice, per_class


def _loop_state(loop: "_Loop", classes: _Classes) -> TrainingState:
    """The loop's state after the last step (not the best weights), for resuming."""
    model = loop.model
    tensors = {f"model.{k}": v for k, v in _trainable_state(model).items()}
    optimizer_tensors, groups = _optimizer_tensors(loop.optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if loop.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(loop.device)
    tensors["rng.augmentation"] = loop.augmentation.get_state()
    if loop.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in loop.best_state.items()})
    info = {
        "format_version": STATE_FORMAT_VERSION,
        "hsam_version": __version__,
        "img_size": model.img_size,
        "num_classes": model.num_classes,
        "label_values": classes.label_values,
        "epoch": loop.epoch,
        "iteration": loop.iteration,
        "history": loop.history,
        "best_val_dice": loop.best_dice,
        "seconds": loop.seconds,
        "optimizer_param_groups": groups,
    }
    return TrainingState(tensors, info)


def _check_resumable(model, state: TrainingState) -> dict[str, torch.Tensor]:
    """The saved run's model weights; InputError when they do not fit ``model``."""
    info = state.info
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
    return weights


def _resume_loop(loop: "_Loop", state: TrainingState) -> None:
    """Continue ``loop`` from a saved state: weights, optimiser, random streams, progress, best weights."""
    info, device = state.info, loop.device
    weights = _check_resumable(loop.model, state)
    loop.model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    _restore_optimizer(loop.optimizer, state.tensors, info["optimizer_param_groups"])
    torch.set_rng_state(state.tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in state.tensors:
        torch.cuda.set_rng_state(state.tensors["rng.cuda"], device)
    loop.augmentation.set_state(state.tensors["rng.augmentation"])
    loop.epoch, loop.iteration = info["epoch"], info["iteration"]
    loop.history = list(info["history"])
    loop.previous_seconds = float(info["seconds"])
    loop.validation.best_dice = info.get("best_val_dice")
    best = {k.removeprefix("best."): v for k, v in state.tensors.items() if k.startswith("best.")}
    loop.validation.best_state = best or None
    if loop.epoch >= loop.planned_epochs:
        raise InputError(f"the saved run already did {loop.epoch} epochs; ask for more epochs to continue")


class _Loop:
    """The optimisation loop of one process: it composes the schedule, the optimisation step, validation
    with the best weights, and the state for resuming."""

    def __init__(self, model, config, ddp, device, base_lr, data, class_names, progress, cancel) -> None:
        self.model, self.config, self.ddp, self.device = model, config, ddp, device
        self.class_names = class_names
        self.validation = _Validation(model, device, config.batch_size, data.validation)
        self.progress, self.cancel = progress, cancel
        self.base_lr = base_lr
        self.optimisation = _Optimisation(model, config, ddp, device, base_lr, data.train)
        slices_per_process = math.ceil(len(self.train_images) / ddp.world_size)
        batches_per_epoch = math.ceil(slices_per_process / config.batch_size)
        self.schedule = _Schedule(config, ddp, device, batches_per_epoch, cancel)
        self.epoch = self.iteration = 0
        self.history: list[dict] = []
        self.prior_dice: Optional[float] = None
        self.on_epoch: Callable[[], None] = lambda: None
        self.last_loss = float("nan")
        self.previous_seconds = 0.0

    # Names used elsewhere, kept on the loop itself.
    train_images = property(lambda self: self.optimisation.train_images)
    train_targets = property(lambda self: self.optimisation.train_targets)
    train_priors = property(lambda self: self.optimisation.train_priors)
    train_atlas_priors = property(lambda self: self.optimisation.train_atlas_priors)
    optimizer = property(lambda self: self.optimisation.optimizer)
    augmentation = property(lambda self: self.optimisation.augmentation)
    network = property(lambda self: self.optimisation.network)
    val_images = property(lambda self: self.validation.val_images)
    val_targets = property(lambda self: self.validation.val_targets)
    val_priors = property(lambda self: self.validation.val_priors)
    val_atlas_priors = property(lambda self: self.validation.val_atlas_priors)
    best_dice = property(lambda self: self.validation.best_dice)
    best_state = property(lambda self: self.validation.best_state)
    started = property(lambda self: self.schedule.started)
    batches_per_epoch = property(lambda self: self.schedule.batches_per_epoch)
    max_iterations = property(lambda self: self.schedule.max_iterations)

    @property
    def planned_epochs(self) -> int:
        return self.schedule.planned_epochs

    @planned_epochs.setter
    def planned_epochs(self, value: int) -> None:
        self.schedule.planned_epochs = value

    @property
    def seconds(self) -> float:
        return self.previous_seconds + time.monotonic() - self.started

    def report(self, message: str, val_dice: Optional[float] = None, fraction: Optional[float] = None) -> None:
        if self.progress is not None and self.ddp.rank == 0:
            fraction = self.iteration / max(self.max_iterations, 1) if fraction is None else fraction
            dice = self.best_dice if val_dice is None else val_dice
            self.progress(TrainingProgress(min(fraction, 1.0), self.epoch, self.iteration, self.last_loss, dice, message))

    def should_stop(self) -> bool:
        """Raise Cancelled when any process was cancelled; True when the time budget is spent or a stop was asked for."""
        return self.schedule.should_stop(self.iteration)

    def replan(self, epoch_seconds: float) -> None:
        """Plan the epochs that still fit the budget on the latest epoch's duration (all processes agree)."""
        self.schedule.replan(self.epoch, epoch_seconds)

    def step(self, index: torch.Tensor, warmup: int) -> dict[str, float]:
        lr = reference_learning_rate(self.iteration, self.base_lr, warmup, self.max_iterations)
        result = self.optimisation.step(index, lr, self.epoch)
        self.iteration += 1
        self.last_loss = result["loss"]
        return result

    def validate(self) -> tuple[float, list[Optional[float]]]:
        """(mean, per-class) validation Dice; the best weights so far kept."""
        return self.validation.validate()

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
        record = self._epoch_record(steps)
        record["seconds"] = time.monotonic() - started
        self.history.append(record)
        self.epoch += 1
        if self.config.time_budget is not None:
            self.replan(record["seconds"])
        return True

    def _epoch_record(self, steps: list[dict[str, float]]) -> dict:
        """The epoch's history record: mean losses over all processes and, with held-out slices, validation."""
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
        return record

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

    def state(self, classes: _Classes) -> TrainingState:
        """The state after the last step (not the best weights), for resuming."""
        return _loop_state(self, classes)

    def resume(self, state: TrainingState) -> None:
        _resume_loop(self, state)
