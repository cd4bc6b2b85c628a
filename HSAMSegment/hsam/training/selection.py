"""Scores on held-out slices: per-class Dice, validation, and the source (prior, guided or prompt-free
output) a guided model keeps per class."""

from typing import Optional

import numpy as np
import torch

from ..guidance.kinds import CHOICE_SOURCES
from ..inference.segment import combine_sources
from ..modeling.hsam import HSAM


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
