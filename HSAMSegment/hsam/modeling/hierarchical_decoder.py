"""Stage 2: the hierarchical decoder (CMAttn, learnable mask cross-attention, hierarchical pixel decoder)."""

from typing import Optional

import torch
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn

from .common import ChannelLayerNorm2d
from .cmattn import CMAttn
from .mask_decoder import Stage1Output
from .transformer import HSAMTwoWayTransformer


class HierarchicalDecoder(nn.Module):
    """Refines the stage-1 prior into full-resolution logits (B, K, 16h, 16w).

    Its K mask tokens (no IoU token) attend to the CMAttn-enhanced image embedding through
    cross-attentions scaled by the stage-1 class probabilities; the pixel decoder upsamples the
    result, concatenates stage 1's upscaled embedding and upsamples again to the input resolution,
    where 5-layer hypernetwork MLPs turn each token into a per-pixel classifier.
    """

    def __init__(
        self,
        transformer_dim: int,
        num_classes: int,
        grid_size: int,
        cmattn: str = "reference",
        num_heads: int = 8,
        mlp_dim: int = 2048,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.num_mask_tokens = num_classes + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.cmattn = CMAttn(self.num_mask_tokens, grid_size, mode=cmattn, mlp_dim=mlp_dim)
        self.transformer2 = HSAMTwoWayTransformer(2, transformer_dim, num_heads, mlp_dim, masked=True)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            ChannelLayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.skip_connect = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            ChannelLayerNorm2d(transformer_dim // 8),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 8, transformer_dim // 16, kernel_size=2, stride=2),
            ChannelLayerNorm2d(transformer_dim // 16),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps2 = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 16, 5) for _ in range(self.num_mask_tokens)
        )
        # Unused by H-SAM (its input would be the background token); kept for checkpoint parity.
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        dense_embeddings: Tensor,
        prior: Tensor,
        stage1: Stage1Output,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        """image_embeddings, dense_embeddings: (B, C, h, w); image_pe: (1, C, h, w);
        prior: (B, K, h·w) stage-1 class probabilities; labels: (B, H, W), training only.
        Returns logits (B, K, 16h, 16w)."""
        b, c, h, w = image_embeddings.shape
        tokens = self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        src = self.cmattn(image_embeddings + dense_embeddings, stage1.affinity, labels)
        hs, src = self.transformer2(src, image_pe.expand(b, -1, -1, -1), tokens, prior)

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        upscaled = self.skip_connect(torch.cat([upscaled, stage1.upscaled], dim=1))
        hyper_in = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps2)], dim=1)
        # einsum multiplies in the channels-last layout the pixel decoder leaves, without a copy.
        return torch.einsum("bkc,bchw->bkhw", hyper_in, upscaled)
