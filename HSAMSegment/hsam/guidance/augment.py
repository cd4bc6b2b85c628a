"""Perturbing priors in training, so that the model learns to correct interpolation errors it will
meet: shifted structures, structures too large or too small, and structures the prior lacks.

The random draws (``uniform``, ``randint``) are also those of the image augmentations (``hsam.training.augment``):
training draws both from one ``torch.Generator``, whose stream a seed fixes.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .priors import PRIOR_LOGIT, one_hot_logits

SHIFT_PROBABILITY = 0.5
MAX_SHIFT = 0.02  # of the slice side
MORPHOLOGY_PROBABILITY = 0.3
MAX_RADIUS = 2  # pixels at the network's input size
DROP_PROBABILITY = 0.05
# The share of training priors made from the slice's own labels, perturbed: the near slices of segment
# time, whose interpolation is almost right, next to the leave-one-out priors' far ones.
OWN_PRIOR_PROBABILITY = 0.5


def uniform(generator: torch.Generator) -> float:
    """A number in [0, 1)."""
    return float(torch.rand(1, generator=generator))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high), as ``torch.randint``."""
    return int(torch.randint(low, high, (1,), generator=generator))


def shift(prior: Tensor, dy: int, dx: int) -> Tensor:
    """(K, H, W) moved by (dy, dx) pixels, edges repeated."""
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    padded = F.pad(prior[None], pad, mode="replicate")[0]
    h, w = prior.shape[-2:]
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[:, top : top + h, left : left + w]


def dilate(logits: Tensor, radius: int) -> Tensor:
    """(H, W) logits grown (radius > 0) or shrunk (radius < 0) by a square of that radius."""
    if radius == 0:
        return logits
    sign = 1.0 if radius > 0 else -1.0
    size = 2 * abs(radius) + 1
    return sign * F.max_pool2d((sign * logits)[None, None], size, stride=1, padding=abs(radius))[0, 0]


def perturb_prior(prior: Tensor, generator: torch.Generator) -> Tensor:
    """One slice's (K+1, H, W) prior logits, randomly shifted, each class grown or shrunk, or dropped."""
    out = prior.clone()
    h, w = prior.shape[-2:]
    if uniform(generator) < SHIFT_PROBABILITY:
        reach = max(1, round(MAX_SHIFT * max(h, w)))
        out = shift(out, randint(generator, -reach, reach + 1), randint(generator, -reach, reach + 1))
    for k in range(1, prior.shape[0]):
        if uniform(generator) < DROP_PROBABILITY:
            out[k] = -PRIOR_LOGIT
        elif uniform(generator) < MORPHOLOGY_PROBABILITY:
            out[k] = dilate(out[k], randint(generator, -MAX_RADIUS, MAX_RADIUS + 1))
    return out


def own_label_prior(labels: Tensor, num_classes: int) -> Tensor:
    """(H, W) class indices -> (K+1, H, W) one-hot prior logits, ``SlicePrior``'s (``one_hot_logits``),
    on the labels' device: each pixel gets the logits of its class."""
    by_class = torch.from_numpy(one_hot_logits(np.arange(num_classes + 1), num_classes))  # (K+1, K+1)
    return by_class.to(labels.device)[:, labels.long()]


def mix_own_priors(priors: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
    """(N, K+1, H, W) leave-one-out priors, each replaced with probability ``OWN_PRIOR_PROBABILITY``
    by its slice's own labels (``targets`` (N, H, W)), to be perturbed like the others."""
    out = priors.clone()
    for i in range(len(priors)):
        if uniform(generator) < OWN_PRIOR_PROBABILITY:
            out[i] = own_label_prior(targets[i], priors.shape[1] - 1)
    return out


def perturb_priors(priors: Tensor, generator: torch.Generator) -> Tensor:
    """(N, K+1, H, W) -> each slice's prior perturbed on its own (``perturb_prior``)."""
    return torch.stack([perturb_prior(p, generator) for p in priors])
