"""SAM's prompt encoder used prompt-free, as H-SAM does."""

import torch
from segment_anything.modeling import PromptEncoder
from torch import nn

REFERENCE_POINT_EMBEDDINGS = 11


class PromptFreeEncoder(PromptEncoder):
    """SAM's PromptEncoder that H-SAM always calls with no points, boxes or masks.

    Its only live outputs are the ``no_mask_embed`` dense embedding and the random-Fourier positional
    encoding of the image-embedding grid. The authors' copy has 11 point embeddings (9 class points
    + 2 box corners) instead of SAM's 4; they are kept trainable, unused, for checkpoint parity.
    """

    def __init__(self, embed_dim: int, image_embedding_size: int, input_image_size: int) -> None:
        super().__init__(
            embed_dim=embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(input_image_size, input_image_size),
            mask_in_chans=16,
        )
        self.num_point_embeddings = REFERENCE_POINT_EMBEDDINGS
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(REFERENCE_POINT_EMBEDDINGS))

    def dense_embeddings(self, batch_size: int) -> torch.Tensor:
        """The no-prompt dense embedding, (B, C, h, w)."""
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, h, w)
