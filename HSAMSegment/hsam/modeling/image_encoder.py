"""SAM's ViT image encoder with fused attention, unpadded window projections and optional
activation checkpointing: the same parameters (names included) and the same function.

* SAM's attention materialises the attention matrix, adds the decomposed relative-position terms and
  runs an explicit softmax. Passing those terms to ``F.scaled_dot_product_attention`` as an additive
  bias computes the same function on fused kernels where the backend has them.
* SAM's windowed blocks pad the normalised tokens to a multiple of the window (32 -> 42 at 512 px:
  1.7× the tokens) before the qkv and output projections. A padding token is 0 after the padding, so
  its q, k, v are ``qkv(0)`` (the bias); here qkv and the output projection run on the real tokens only
  and the padding is filled with ``qkv(0)``, which leaves every real token's output unchanged.
* At CPU inference the linear layers run on oneDNN's fused kernel (:mod:`.fused_linear`), the bias is
  written into a reused buffer, and bfloat16 attention is two batched GEMMs (faster there than the
  fused kernel).
"""

import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT, get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fused_linear import linear


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


class _ScratchBuffer(threading.local):
    """One reusable CPU tensor per thread for the attention bias (then scores) of inference passes.
    A fresh one per block (50 MB per slice for a global block at 512 px) costs as much in page faults
    as the matmul that fills it; blocks run one after the other, so they share it."""

    storage: Optional[torch.Tensor] = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        if self.storage is None or self.storage.dtype != dtype or self.storage.numel() < size:
            self.storage = None  # free the old one before allocating
            self.storage = torch.empty(size, dtype=dtype)
        return self.storage[:size].view(shape)


_SCRATCH = _ScratchBuffer()


def release_scratch_buffer() -> None:
    """Free this thread's attention scratch buffer (kept between inference calls; 200 MB for a batch of
    4 slices at 512 px in float32)."""
    _SCRATCH.storage = None


def _cpu_inference(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def _bfloat16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float):
    """softmax(q kᵀ·scale + bias) v as two batched GEMMs, for bfloat16 on CPUs, where they are 1.6–2×
    faster than the fused kernel; the scores, then the probabilities, overwrite ``bias`` (a new
    25 MB tensor per global block would cost more in page faults than the softmax itself).
    q, k, v: (B, heads, N, d); bias: (B, heads, N, N) scratch -> (B, heads, N, d)."""
    n, d = q.shape[-2:]
    scores = bias.view(-1, n, n).baddbmm_(q.reshape(-1, n, d), k.reshape(-1, n, d).transpose(1, 2), alpha=scale)
    probabilities = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return torch.bmm(probabilities, v.reshape(-1, n, d)).view(q.shape)


class RelPosSDPAttention(Attention):
    def forward(self, x: torch.Tensor, window: int = 0, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, H, W, C) -> [residual +] attention(x) (B, H, W, C); ``window`` > 0: attention within
        window × window tiles."""
        b, h, w, c = x.shape
        qkv = linear(self.qkv, x)
        if window > 0:
            qkv = _partition(qkv, window, linear(self.qkv, x.new_zeros(1, c))[0])
        x = self.attend(qkv)
        if window > 0:
            x = _unpartition(x, window, h, w)
        return linear(self.proj, x, residual=residual)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: (B, H, W, 3C) -> attention output before the projection (B, H, W, C)."""
        b, h, w, _ = qkv.shape
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.use_rel_pos:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif _cpu_inference(q) and q.dtype == torch.bfloat16:
            x = _bfloat16_attention(q, k, v, self.relative_position_bias(q, h, w), self.scale)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.relative_position_bias(q, h, w), scale=self.scale)
        return x.transpose(1, 2).reshape(b, h, w, -1)

    def relative_position_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """SAM's decomposed relative positions as an additive bias: q (B, heads, h·w, d) -> (B, heads, h·w, h·w)
        (in a scratch buffer reused by the next block at CPU inference)."""
        b = q.shape[0]
        r_q = q.reshape(b, self.num_heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h).to(q.dtype))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w).to(q.dtype))
        shape = (b, self.num_heads, h * w, h * w)
        if _cpu_inference(q) and not (q.dtype == torch.bfloat16 and w < 32):
            # bias[i, (h2, w2)] = rel_h[i, h2] + rel_w[i, w2], broadcast straight into the buffer at memory
            # speed (bfloat16 rows narrower than 32 take a slow path there; they use the matmul below).
            bias = _SCRATCH.take(shape, q.dtype)
            torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=bias.view(b, self.num_heads, h, w, h, w))
            return bias
        # The same sum written by one matmul with 0/1 key codes (exact: two non-zero terms), faster than a
        # broadcast add into a fresh tensor.
        rel = torch.cat([rel_h, rel_w], dim=-1).reshape(b, self.num_heads, h * w, h + w)
        out = _SCRATCH.take(shape, rel.dtype) if _cpu_inference(rel) else None
        return torch.matmul(rel, _key_positions(h, w, rel.dtype, rel.device), out=out)


class EncoderBlock(Block):
    """segment-anything's Block (same parameters) running :class:`RelPosSDPAttention` windowed in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = self.attn(self.norm1(x), self.window_size, residual=x)
        exact_gelu = type(self.mlp.act) is nn.GELU and self.mlp.act.approximate == "none"
        if not exact_gelu:
            return x + self.mlp(self.norm2(x))
        return linear(self.mlp.lin2, linear(self.mlp.lin1, self.norm2(x), gelu=True), residual=x)


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
