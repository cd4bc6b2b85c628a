"""Guided decoding: a per-class prior as SAM's dense mask prompt, and the decoders' outputs as
corrections of that prior."""

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

# The gates learn this much faster than the optimiser's step on their parameter alone would allow.
GATE_SCALE = 10.0


class PriorEncoder(nn.Module):
    """SAM's ``mask_downscaling`` taking K class probability maps instead of one mask: (B, K, 4h, 4w)
    -> (B, C, h, w). Initialised from the prompt encoder's own layers (the first convolution's
    single-channel weights repeated for every class), so SAM weights carry over."""

    def __init__(self, num_classes: int, embed_dim: int, mask_in_chans: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(num_classes, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )

    @torch.no_grad()
    def initialise_from(self, mask_downscaling: nn.Sequential) -> None:
        """Copy SAM's mask_downscaling, its first convolution repeated over the class channels."""
        for own, source in zip(self.layers, mask_downscaling):
            for name, value in source.named_parameters(recurse=False):
                target = getattr(own, name)
                target.copy_(value.expand_as(target) if value.shape != target.shape else value)

    def forward(self, probabilities: Tensor) -> Tensor:
        return self.layers(probabilities)


class PixelRefinement(nn.Module):
    """Three 3×3 convolutions over the image and the class probabilities at the input resolution, where
    the decoders see only features upsampled from the 16× coarser embedding: (B, 1 + K, S, S) ->
    (B, K, S, S) logits, zero at initialisation (the last layer starts at 0)."""

    def __init__(self, num_classes: int, channels: int = 16) -> None:
        super().__init__()
        k = num_classes + 1
        self.layers = nn.Sequential(
            nn.Conv2d(1 + k, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, k, 3, padding=1),
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, image: Tensor, logits: Tensor) -> Tensor:
        """image: (B, 1, S, S); logits: (B, K, S, S)."""
        return self.layers(torch.cat([image.to(logits.dtype), torch.softmax(logits, dim=1)], dim=1))


class PriorGuidance(nn.Module):
    """What a guided H-SAM adds: the prior encoder, one gate per class and stage starting at 0, and a
    pixel refinement whose last layer starts at 0.

    Guided logits = prior logits + gate · decoder logits (+ the refinement at stage 2), so an
    untrained guided model returns its prior.
    """

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.prior_encoder = PriorEncoder(num_classes, embed_dim)
        self.stage1_gate = nn.Parameter(torch.zeros(num_classes + 1))
        self.stage2_gate = nn.Parameter(torch.zeros(num_classes + 1))
        self.refinement = PixelRefinement(num_classes)

    def dense_embeddings(self, prior: Tensor, mask_size: int) -> Tensor:
        """prior: (B, K+1, S, S) logits -> the dense prompt (B, C, h, w) from its class probabilities
        at SAM's mask-input size (4h)."""
        probabilities = torch.softmax(F.interpolate(prior, size=(mask_size, mask_size), mode="area"), dim=1)
        return self.prior_encoder(probabilities[:, 1:])

    def correct(self, stage: int, prior: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(prior + gated correction, the gated correction alone) at ``logits``' size (B, K+1, H, W)."""
        gate = (self.stage1_gate if stage == 1 else self.stage2_gate) * GATE_SCALE
        correction = logits * gate.to(logits.dtype)[None, :, None, None]
        size = logits.shape[-2:]
        resized = prior if prior.shape[-2:] == size else F.interpolate(prior, size=size, mode="area")
        return resized.to(logits.dtype) + correction, correction
