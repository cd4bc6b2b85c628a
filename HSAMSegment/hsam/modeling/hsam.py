"""H-SAM: SAM's image encoder with LoRA, prompt-free, decoded in two hierarchical stages."""

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .guidance import PriorGuidance
from .hierarchical_decoder import HierarchicalDecoder
from .image_encoder import ImageEncoder
from .lora import LoRAQKV, add_lora
from .mask_decoder import MaskDecoder
from .prompt import PromptFreeEncoder


@dataclass
class HSAMOutput:
    """stage1_logits: (B, K, S/4, S/4); stage2_logits and masks: (B, K, S, S); K = classes + background.

    ``masks`` is the mean of both stages' full-resolution logits, the authors' default prediction.
    Guided (given a prior), each stage's logits are the prior plus a gated correction, and
    ``correction`` (B, K, S, S) is the mean correction, to add to the prior on any grid.
    """

    stage1_logits: Tensor
    stage2_logits: Tensor
    masks: Tensor
    correction: Optional[Tensor] = None


class HSAM(nn.Module):
    def __init__(
        self,
        image_encoder: ImageEncoder,
        prompt_encoder: PromptFreeEncoder,
        mask_decoder: MaskDecoder,
        hierarchical_decoder: HierarchicalDecoder,
        lora_rank: int = 5,
        embedding_noise: float = 0.2,
        guidance: Optional[PriorGuidance] = None,
    ) -> None:
        """embedding_noise: in training, stage 2 sees the image embedding plus Gaussian noise of std
        ``embedding_noise`` × (max − min of the batch's embeddings), as the authors' code.
        guidance: makes the model guided (it then also runs prompt-free, without a prior)."""
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.hierarchical_decoder = hierarchical_decoder
        self.lora_rank = lora_rank
        self.embedding_noise = embedding_noise
        add_lora(self.image_encoder, lora_rank)
        if guidance is not None:
            guidance.prior_encoder.initialise_from(prompt_encoder.mask_downscaling)
        self.guidance = guidance

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def num_classes(self) -> int:
        return self.mask_decoder.num_mask_tokens - 1

    @property
    def cmattn_mode(self) -> str:
        return self.hierarchical_decoder.cmattn.mode

    def lora_adapters(self) -> list[LoRAQKV]:
        return [block.attn.qkv for block in self.image_encoder.blocks]

    def merge_lora(self) -> None:
        """Fold LoRA into the frozen qkv weights: faster inference, same function up to rounding."""
        for adapter in self.lora_adapters():
            adapter.merge()

    def unmerge_lora(self) -> None:
        for adapter in self.lora_adapters():
            adapter.unmerge()

    @property
    def guided(self) -> bool:
        return self.guidance is not None

    def forward(self, images: Tensor, labels: Optional[Tensor] = None, prior: Optional[Tensor] = None) -> HSAMOutput:
        """images: (B, 3, S, S) float in [0, 1] (a slice repeated to 3 channels, no mean/std);
        labels: (B, S, S) class indices, used only in training by the ``paper`` CMAttn;
        prior: (B, K, S, S) prior logits (``hsam.guidance.priors``), guided models only."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected images of size {self.img_size}, got {tuple(images.shape[-2:])}")
        if prior is not None and self.guidance is None:
            raise ValueError("this model was not trained with a prior")
        output = self.decode(self.image_encoder(images), labels, prior)
        return output if self.guidance is None else self.refine(images, output, prior)

    def refine(self, images: Tensor, output: HSAMOutput, prior: Optional[Tensor]) -> HSAMOutput:
        """A guided model's pixel refinement added to stage 2 (and so to the mean prediction)."""
        refinement = self.guidance.refinement(images[:, :1], output.stage2_logits)
        stage2 = output.stage2_logits + refinement
        if prior is None:
            return HSAMOutput(output.stage1_logits, stage2, output.masks + refinement / 2)
        correction = output.correction + refinement / 2
        return HSAMOutput(output.stage1_logits, stage2, prior.to(correction.dtype) + correction, correction)

    def decode(self, embeddings: Tensor, labels: Optional[Tensor] = None, prior: Optional[Tensor] = None) -> HSAMOutput:
        """Both decoding stages from image embeddings (B, C, S/16, S/16); labels, prior as in ``forward``."""
        b, s = embeddings.shape[0], self.img_size
        image_pe = self.prompt_encoder.get_dense_pe()
        if prior is None:
            dense = self.prompt_encoder.dense_embeddings(b)
        else:
            dense = self.guidance.dense_embeddings(prior, 4 * embeddings.shape[-1]).to(embeddings.dtype)

        stage1 = self.mask_decoder(embeddings, image_pe, dense)
        stage1_correction = None
        if prior is not None:
            guided, stage1_correction = self.guidance.correct(1, prior, stage1.logits)
            stage1 = replace(stage1, logits=guided)
        prior_logits = F.interpolate(stage1.logits, size=embeddings.shape[-2:], mode="bilinear", align_corners=False)
        class_probabilities = torch.softmax(prior_logits, dim=1).flatten(2)

        if self.training and self.embedding_noise > 0:
            value_range = (embeddings.max() - embeddings.min()).detach()
            embeddings = embeddings + torch.randn_like(embeddings) * self.embedding_noise * value_range
        stage2_logits = self.hierarchical_decoder(embeddings, image_pe, dense, class_probabilities, stage1, labels)

        stage1_full = F.interpolate(stage1.logits, size=(s, s), mode="bilinear", align_corners=False)
        if prior is None:
            return HSAMOutput(stage1.logits, stage2_logits, (stage1_full + stage2_logits) / 2)
        stage2_logits, stage2_correction = self.guidance.correct(2, prior, stage2_logits)
        stage1_correction = F.interpolate(stage1_correction, size=(s, s), mode="bilinear", align_corners=False)
        correction = (stage1_correction + stage2_correction) / 2
        return HSAMOutput(stage1.logits, stage2_logits, prior.to(correction.dtype) + correction, correction)
