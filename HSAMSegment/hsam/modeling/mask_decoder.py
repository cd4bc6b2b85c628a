"""Stage 1: SAM's mask decoder predicting a prior mask for every class at once."""

from dataclasses import dataclass

import torch
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn

from .common import ChannelLayerNorm2d
from .transformer import HSAMTwoWayTransformer


@dataclass
class Stage1Output:
    """logits: (B, K, 4h, 4w); affinity: (B, K, h·w) mask-token · pixel products (the CMAttn input);
    upscaled: (B, C/8, 4h, 4w) upscaled image embedding, reused by the stage-2 pixel decoder."""

    logits: Tensor
    affinity: Tensor
    upscaled: Tensor


class MaskDecoder(nn.Module):
    """SAM's mask decoder with K = num_classes + 1 mask tokens (channel 0 = background).

    The IoU token and head are kept (SAM weights load into them) although H-SAM never uses their
    output; the transformer blocks run in H-SAM's cross-attention-first order.
    """

    def __init__(
        self,
        transformer_dim: int,
        num_classes: int,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.num_mask_tokens = num_classes + 1
        self.transformer = HSAMTwoWayTransformer(2, transformer_dim, num_heads, mlp_dim, masked=False)
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            ChannelLayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, dense_embeddings: Tensor) -> Stage1Output:
        """image_embeddings, dense_embeddings: (B, C, h, w); image_pe: (1, C, h, w)."""
        b, c, h, w = image_embeddings.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight]).unsqueeze(0).expand(b, -1, -1)
        src = image_embeddings + dense_embeddings
        hs, src = self.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        affinity = mask_tokens_out @ src.transpose(1, 2)

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        logits = (hyper_in @ upscaled.flatten(2)).reshape(b, -1, *upscaled.shape[-2:])
        return Stage1Output(logits=logits, affinity=affinity, upscaled=upscaled)
