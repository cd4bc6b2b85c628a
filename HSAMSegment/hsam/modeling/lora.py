"""Low-rank adaptation of the image encoder's fused qkv projections (H-SAM: q and v only)."""

import math

import torch
from torch import nn


class LoRAQKV(nn.Module):
    """A frozen fused qkv ``nn.Linear`` plus rank-r adapters on its query and value thirds.

    ``qkv(x) = W x + b`` with ``W`` of shape (3·D, D); the adapters add ``B_q A_q x`` to the first D
    outputs and ``B_v A_v x`` to the last D, with no scaling (α/r = 1) and no dropout, as the
    authors' code. ``A`` is kaiming-uniform(a=√5), ``B`` zero, so a fresh adapter changes nothing.
    """

    def __init__(self, qkv: nn.Linear, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.qkv = qkv
        self.dim = qkv.in_features
        self.rank = rank
        self.a_q = nn.Linear(self.dim, rank, bias=False)
        self.b_q = nn.Linear(rank, self.dim, bias=False)
        self.a_v = nn.Linear(self.dim, rank, bias=False)
        self.b_v = nn.Linear(rank, self.dim, bias=False)
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for a in (self.a_q, self.a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.b_q, self.b_v):
            nn.init.zeros_(b.weight)

    def delta_weight(self) -> torch.Tensor:
        """The adapters as a (3·D, D) update of the qkv weight: [B_q A_q; 0; B_v A_v]."""
        zeros = torch.zeros_like(self.qkv.weight[: self.dim])
        return torch.cat([self.b_q.weight @ self.a_q.weight, zeros, self.b_v.weight @ self.a_v.weight])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into the base weight for inference (one matmul per block instead of five)."""
        if not self.merged:
            self.qkv.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.qkv.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., 3·D)."""
        qkv = self.qkv(x)
        if self.merged:
            return qkv
        q, k, v = qkv.split(self.dim, dim=-1)
        q = q + self.b_q(self.a_q(x))
        v = v + self.b_v(self.a_v(x))
        return torch.cat([q, k, v], dim=-1)


def add_lora(image_encoder: nn.Module, rank: int) -> list[LoRAQKV]:
    """Freeze every image-encoder parameter and wrap each block's ``attn.qkv`` with a LoRAQKV."""
    for parameter in image_encoder.parameters():
        parameter.requires_grad_(False)
    adapters = []
    for block in image_encoder.blocks:
        block.attn.qkv = LoRAQKV(block.attn.qkv, rank)
        adapters.append(block.attn.qkv)
    return adapters
