"""H-SAM's two-way transformers.

Both stages use blocks that run token→image cross-attention *before* token self-attention (the
order of the authors' code; upstream SAM runs self-attention first). Stage 2 replaces the two
cross-attentions with :class:`MaskedAttention`, whose attention probabilities are scaled by the
stage-1 class probabilities. Parameter names follow segment-anything's so SAM weights load as is.
"""

import math
from typing import Optional

import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn


class MaskedAttention(Attention):
    """Attention whose softmax probabilities are multiplied by a class prior, not renormalised.

    ``prior`` is (B, T, N): P(class t | pixel n) for the T tokens and N image positions. For
    token→image attention (queries are tokens) the (T, N) attention map is scaled by ``prior``;
    for image→token attention the (N, T) map is scaled by ``priorᵀ``.
    """

    def __init__(self, embedding_dim: int, num_heads: int) -> None:
        super().__init__(embedding_dim, num_heads, downsample_rate=1)
        # The authors' Attention2 owns three LayerNorms it never uses; kept so their checkpoints load.
        self.unused_norms = nn.ModuleList([nn.LayerNorm(196), nn.LayerNorm(9), nn.LayerNorm(1024)])

    def forward(self, q: Tensor, k: Tensor, v: Tensor, prior: Tensor) -> Tensor:
        """q: (B, Nq, C), k and v: (B, Nk, C), prior: (B, T, N) with {Nq, Nk} = {T, N} -> (B, Nq, C)."""
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        attn = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        attn = torch.softmax(attn, dim=-1)
        scale = prior if attn.shape[-2] == prior.shape[-2] else prior.transpose(-2, -1)
        attn = attn * scale.unsqueeze(1)
        return self.out_proj(self._recombine_heads(attn @ v))


class CrossFirstTwoWayBlock(nn.Module):
    """Token→image cross-attention, token self-attention, token MLP, image→token cross-attention.

    With ``masked=True`` (stage 2) both cross-attentions are :class:`MaskedAttention` at full width,
    with dropout on the token→image update; otherwise they are SAM's downsampled ``Attention``.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        skip_first_layer_pe: bool,
        masked: bool,
        attention_downsample_rate: int = 2,
        cross_attention_dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.masked = masked
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        if masked:
            self.cross_attn_token_to_image = MaskedAttention(embedding_dim, num_heads)
            self.cross_attn_image_to_token = MaskedAttention(embedding_dim, num_heads)
        else:
            self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
            self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.dropout = nn.Dropout(cross_attention_dropout if masked else 0.0)
        self.skip_first_layer_pe = skip_first_layer_pe

    def _cross(self, attention: nn.Module, q: Tensor, k: Tensor, v: Tensor, prior: Optional[Tensor]) -> Tensor:
        return attention(q, k, v, prior) if self.masked else attention(q=q, k=k, v=v)

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, prior: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """queries: (B, T, C), keys: (B, N, C), pes alike, prior: (B, T, N) or None."""
        update = self._cross(self.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys, prior)
        queries = self.norm2(queries + self.dropout(update))

        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        queries = self.norm3(queries + self.mlp(queries))

        update = self._cross(self.cross_attn_image_to_token, keys + key_pe, queries + query_pe, queries, prior)
        keys = self.norm4(keys + update)
        return queries, keys


class HSAMTwoWayTransformer(nn.Module):
    """A stack of :class:`CrossFirstTwoWayBlock` and SAM's final (unmasked) token→image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        masked: bool,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CrossFirstTwoWayBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                skip_first_layer_pe=(i == 0),
                masked=masked,
                attention_downsample_rate=attention_downsample_rate,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, tokens: Tensor, prior: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """image_embedding, image_pe: (B, C, h, w); tokens: (B, T, C); prior: (B, T, h·w) or None.

        Returns the tokens (B, T, C) and the image embedding (B, h·w, C).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe, prior)
        q = queries + tokens
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=keys + key_pe, v=keys))
        return queries, keys
