"""Layers shared by the decoders."""

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d


class ChannelLayerNorm2d(LayerNorm2d):
    """segment-anything's LayerNorm2d (same parameters) as one ``F.layer_norm`` over channels-last
    pixels instead of five passes of mean, subtraction, power, division and affine over the map;
    the output is channels-last, which the next transposed convolution takes as it is.
    Equal to float rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        channels_last = x.permute(0, 2, 3, 1)
        return F.layer_norm(channels_last, (x.shape[1],), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
