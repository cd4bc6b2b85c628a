"""SAM's ViT image encoder with fused attention, unpadded window projections and optional
activation checkpointing: the same parameters (names included) and the same function.

* SAM's attention materialises the attention matrix, adds the decomposed relative-position terms and
  runs an explicit softmax. Passing those terms to ``F.scaled_dot_product_attention`` as an additive
  bias computes the same function on fused kernels where the backend has them.
* SAM's windowed blocks pad the normalised tokens to a multiple of the window (32 -> 42 at 512 px:
  1.7× the tokens) before the qkv and output projections. A padding token is 0 after the padding, so
  its q, k, v are ``qkv(0)`` (the bias); here qkv and the output projection run on the real tokens only
  and the padding is filled with ``qkv(0)``, which leaves every real token's output unchanged.
"""

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT, get_rel_pos
from torch.utils.checkpoint import checkpoint


def _partition(x: torch.Tensor, window: int, fill: torch.Tensor) -> torch.Tensor:
    """x: (B, H, W, C) -> (B·nW, window, window, C), padded at the bottom/right with ``fill`` (C,)."""
    b, h, w, c = x.shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    if (hp, wp) != (h, w):
        padded = fill.reshape(1, 1, 1, c).expand(b, hp, wp, c).clone()
        padded[:, :h, :w] = x
        x = padded
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c)


def _unpartition(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B·nW, window, window, C) -> (B, H, W, C), padding dropped."""
    hp, wp = -(-h // window) * window, -(-w // window) * window
    c = windows.shape[-1]
    x = windows.reshape(-1, hp // window, wp // window, window, window, c).transpose(2, 3)
    x = x.reshape(-1, hp, wp, c)
    # contiguous: a Linear on a strided 4D input takes a batched-matmul path that copies its weight per row.
    return x[:, :h, :w].contiguous() if (hp, wp) != (h, w) else x


def _key_positions(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(h + w, h·w): column (y, x) is one at row y and at row h + x."""
    rows = torch.eye(h, dtype=dtype, device=device).repeat_interleave(w, dim=0)
    columns = torch.eye(w, dtype=dtype, device=device).repeat(h, 1)
    return torch.cat([rows, columns], dim=1).T


class RelPosSDPAttention(Attention):
    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); ``window`` > 0: attention within window × window tiles."""
        b, h, w, c = x.shape
        qkv = self.qkv(x)
        if window > 0:
            qkv = _partition(qkv, window, self.qkv(x.new_zeros(c)))
        x = self.attend(qkv)
        if window > 0:
            x = _unpartition(x, window, h, w)
        return self.proj(x)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: (B, H, W, 3C) -> attention output before the projection (B, H, W, C)."""
        b, h, w, _ = qkv.shape
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.use_rel_pos:
            r_q = q.reshape(b, self.num_heads, h, w, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h).to(q.dtype))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w).to(q.dtype))
            # bias[i, (h2, w2)] = rel_h[i, h2] + rel_w[i, w2], written by one matmul with 0/1 key codes
            # (exact: two non-zero terms) instead of a broadcast add and a copy of the (h·w)² tensor.
            rel = torch.cat([rel_h, rel_w], dim=-1).reshape(b, self.num_heads, h * w, h + w)
            bias = rel @ _key_positions(h, w, rel.dtype, rel.device)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return x.transpose(1, 2).reshape(b, h, w, -1)


class EncoderBlock(Block):
    """segment-anything's Block (same parameters) running :class:`RelPosSDPAttention` windowed in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = x + self.attn(self.norm1(x), self.window_size)
        return x + self.mlp(self.norm2(x))


class ImageEncoder(ImageEncoderViT):
    """segment-anything's ImageEncoderViT (same parameters and names) with :class:`EncoderBlock` blocks,
    and activation checkpointing of the blocks as an option for training (recomputes each block in the
    backward pass: far less memory for about a third more compute)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gradient_checkpointing = False
        for block in self.blocks:
            block.__class__ = EncoderBlock
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
