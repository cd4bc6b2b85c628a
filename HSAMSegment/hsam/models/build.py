"""Model presets and the H-SAM builder."""

from functools import partial
from typing import Union

import torch

from ..modeling.guidance import PriorGuidance
from ..modeling.hierarchical_decoder import HierarchicalDecoder
from ..modeling.hsam import HSAM
from ..modeling.image_encoder import ImageEncoder
from ..modeling.mask_decoder import MaskDecoder
from ..modeling.prompt import PromptFreeEncoder
from .presets import PATCH_SIZE, PRESETS, SUPPORTED_IMG_SIZES, Preset


def build_hsam(
    preset: Union[str, Preset] = "vit_b",
    num_classes: int = 8,
    img_size: int = 512,
    cmattn: str = "reference",
    lora_rank: int = 5,
    embedding_noise: float = 0.2,
    guided: bool = False,
) -> HSAM:
    """Build an H-SAM with randomly initialised weights (load SAM or HSAM weights afterwards).

    preset: a name of PRESETS or a custom Preset; img_size: input side S, 224 and 512 as the authors
    build them, 256 and 1024 (SAM's native size) too. guided: add the prior encoder and correction
    gates of guided mode (``hsam.modeling.guidance``).
    """
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if img_size not in SUPPORTED_IMG_SIZES:
        raise ValueError(f"img_size must be one of {SUPPORTED_IMG_SIZES}, got {img_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    p = PRESETS[preset] if isinstance(preset, str) else preset
    grid = img_size // PATCH_SIZE
    image_encoder = ImageEncoder(
        img_size=img_size,
        patch_size=PATCH_SIZE,
        embed_dim=p.encoder_embed_dim,
        depth=p.encoder_depth,
        num_heads=p.encoder_num_heads,
        mlp_ratio=4,
        out_chans=p.decoder_dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=p.window_size,
        global_attn_indexes=p.encoder_global_attn_indexes,
    )
    prompt_encoder = PromptFreeEncoder(p.decoder_dim, grid, img_size)
    mask_decoder = MaskDecoder(p.decoder_dim, num_classes, p.decoder_heads, p.decoder_mlp_dim)
    hierarchical_decoder = HierarchicalDecoder(
        p.decoder_dim, num_classes, grid, cmattn=cmattn, num_heads=p.decoder_heads, mlp_dim=p.decoder_mlp_dim
    )
    guidance = PriorGuidance(num_classes, p.decoder_dim) if guided else None
    return HSAM(image_encoder, prompt_encoder, mask_decoder, hierarchical_decoder, lora_rank, embedding_noise, guidance)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
