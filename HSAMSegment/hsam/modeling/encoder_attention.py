"""segment-anything's image-encoder attention on ``scaled_dot_product_attention``.

SAM's encoder materialises the attention matrix, adds the decomposed relative-position terms and
runs an explicit softmax. Passing those terms to ``F.scaled_dot_product_attention`` as an additive
bias computes the same function with the same parameters, on fused kernels where the backend has them.
"""

import torch
import torch.nn.functional as F
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


def use_sdpa_attention(encoder: ImageEncoderViT) -> None:
    """Switch every block's attention to :class:`RelPosSDPAttention` in place (same parameters)."""
    for block in encoder.blocks:
        block.attn.__class__ = RelPosSDPAttention
