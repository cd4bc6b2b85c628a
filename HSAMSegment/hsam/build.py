"""Model presets and the H-SAM builder."""

from dataclasses import asdict, dataclass
from functools import partial
from typing import Union

import torch

from .modeling.hierarchical_decoder import HierarchicalDecoder
from .modeling.image_encoder import ImageEncoder
from .modeling.hsam import HSAM
from .modeling.mask_decoder import MaskDecoder
from .modeling.prompt import PromptFreeEncoder

PATCH_SIZE = 16
SUPPORTED_IMG_SIZES = (224, 256, 512, 1024)


@dataclass(frozen=True)
class Preset:
    """Image-encoder and decoder sizes. ``vit_*`` are SAM's; ``tiny`` is for tests and CPU demos."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    decoder_dim: int = 256
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    window_size: int = 14

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "vit_b": Preset(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": Preset(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": Preset(1280, 32, 16, (7, 15, 23, 31)),
    # The smallest decoder the design allows keeps 8 heads and a width divisible by 16 (pixel decoder).
    "tiny": Preset(64, 2, 2, (1,), decoder_dim=64, decoder_heads=4, decoder_mlp_dim=256, window_size=7),
}


def build_hsam(
    preset: Union[str, Preset] = "vit_b",
    num_classes: int = 8,
    img_size: int = 512,
    cmattn: str = "reference",
    lora_rank: int = 5,
    embedding_noise: float = 0.2,
) -> HSAM:
    """Build an H-SAM with randomly initialised weights (load SAM or HSAM weights afterwards).

    preset: a name of PRESETS or a custom Preset; img_size: input side S, 224 and 512 as the authors
    build them, 256 and 1024 (SAM's native size) too.
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
    return HSAM(image_encoder, prompt_encoder, mask_decoder, hierarchical_decoder, lora_rank, embedding_noise)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
