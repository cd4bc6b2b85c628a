"""Class-balanced mask-guided self-attention (CMAttn): the stage-2 image-embedding enhancement.

The class rows of the stage-1 token·pixel affinity (K rows of h·w values) attend to each other; a
linear map over classes then gives one gate value per pixel, and the embedding becomes
``src + src · gate``.

Two modes share the same parameters:

* ``"reference"`` — what the authors' code computes. It takes a softmax over a single channel, so the
  gate is identically 1 and the embedding is only doubled; the attention parameters get no gradient.
  The branch is skipped (same output, less work) and its parameters are kept so checkpoints load.
* ``"paper"`` — the module as the paper describes it: a sigmoid gate that varies per pixel, and during
  training dropout on the affinity plus class-balancing Gaussian noise added at each class's
  ground-truth pixels, stronger for rarer classes (the authors' commented-out ``noise_list``), with the
  ground truth downsampled to the embedding grid (the authors' code reinterpreted memory instead).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn

from .options import CMATTN_MODES

# Noise std of the i-th rarest class present in a batch (authors' modeling/utils.py).
CLASS_BALANCING_NOISE = (0.35, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0)
MAX_GRID = 32


def cmattn_width(grid_size: int) -> int:
    """Length of one class row: the embedding grid, average-pooled to at most 32×32."""
    side = min(grid_size, MAX_GRID)
    return side * side


def cmattn_heads(width: int) -> int:
    """The authors use 8 heads at 1024 (512 input) and 7 at 196 (224 input)."""
    return next(h for h in (8, 7, 4, 2, 1) if width % h == 0)


class CMAttn(nn.Module):
    def __init__(
        self, num_tokens: int, grid_size: int, mode: str = "reference", dropout: float = 0.1, mlp_dim: int = 2048
    ) -> None:
        super().__init__()
        if mode not in CMATTN_MODES:
            raise ValueError(f"cmattn must be one of {CMATTN_MODES}, got {mode!r}")
        self.mode = mode
        self.grid_size = grid_size
        width = cmattn_width(grid_size)
        heads = cmattn_heads(width)
        self.self_attn = Attention(width, heads)
        self.norm1 = nn.LayerNorm(width)
        self.self_attn2 = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLPBlock(width, mlp_dim, nn.ReLU)
        self.med_sel = nn.Sequential(nn.Linear(num_tokens, 1), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def gate_logits(self, affinity: Tensor) -> Tensor:
        """affinity: (B, K, h·w) -> per-pixel gate logits (B, 1, h', w') on the pooled grid."""
        b, k, _ = affinity.shape
        side = min(self.grid_size, MAX_GRID)
        if side != self.grid_size:
            grid = affinity.reshape(b, k, self.grid_size, self.grid_size)
            affinity = F.adaptive_avg_pool2d(grid, side).flatten(2)
        x = self.norm1(self.self_attn(q=affinity, k=affinity, v=affinity))
        x = self.self_attn2(q=x, k=x, v=x)
        x = self.norm2(x + self.mlp(x))
        return self.med_sel(x.transpose(1, 2)).transpose(1, 2).reshape(b, 1, side, side)

    def class_balancing_noise(self, affinity: Tensor, labels: Tensor) -> Tensor:
        """Add noise at each class's ground-truth pixels, more for rarer classes. labels: (B, H, W)."""
        b, k, n = affinity.shape
        grid_labels = F.interpolate(labels[:, None].float(), size=(self.grid_size, self.grid_size), mode="nearest")
        grid_labels = grid_labels.reshape(b, 1, n).long()
        present, counts = torch.unique(grid_labels, return_counts=True)
        noise_mean = affinity.mean()
        noisy = affinity
        for rank, index in enumerate(torch.argsort(counts)[: len(CLASS_BALANCING_NOISE)].tolist()):
            std = CLASS_BALANCING_NOISE[rank]
            if std == 0.0:
                continue
            at_class = (grid_labels == present[index]).expand(b, k, n)
            noise = torch.randn_like(affinity) * std + noise_mean
            noisy = noisy + noise * at_class
        return noisy

    def forward(self, src: Tensor, affinity: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """src: (B, C, h, w) image embedding; affinity: (B, K, h·w); labels: (B, H, W) in training."""
        if self.mode == "reference":
            return src + src
        if self.training:
            affinity = self.dropout(affinity)
            if labels is not None:
                affinity = self.class_balancing_noise(affinity, labels)
        gate = torch.sigmoid(self.gate_logits(affinity))
        if gate.shape[-1] != src.shape[-1]:
            gate = F.interpolate(gate, size=src.shape[-2:], mode="bilinear", align_corners=False)
        return src + src * gate
