"""Model presets and the values a model may be built and used with: plain data, no torch, so that
model files can be checked before the network code is loaded."""

from dataclasses import asdict, dataclass

PATCH_SIZE = 16
SUPPORTED_IMG_SIZES = (224, 256, 512, 1024)
MAX_CLASSES = 255
MAX_LORA_RANK = 64


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
