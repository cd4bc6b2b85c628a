"""SAM's ViT image encoder with fused attention and optional activation checkpointing.

SAM's encoder materialises the attention matrix, adds the decomposed relative-position terms and
runs an explicit softmax. Passing those terms to ``F.scaled_dot_product_attention`` as an additive
bias computes the same function with the same parameters, on fused kernels where the backend has them.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos


class RelPosSDPAttention(Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.use_rel_pos:
            r_q = q.reshape(b, self.num_heads, h, w, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h).to(q.dtype))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w).to(q.dtype))
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))


class ImageEncoder(ImageEncoderViT):
    """segment-anything's ImageEncoderViT (same parameters and names) whose blocks use
    :class:`RelPosSDPAttention`, with activation checkpointing of the blocks as an option for training
    (recomputes each block in the backward pass: far less memory for about a third more compute)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gradient_checkpointing = False
        for block in self.blocks:
            block.attn.__class__ = RelPosSDPAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) -> (B, out_chans, S/16, S/16)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
