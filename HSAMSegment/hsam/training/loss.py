"""H-SAM's training loss: per stage 0.1·CE + 0.9·Dice, stages weighted by epoch (authors' recipe)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.hsam import HSAMOutput


def soft_dice_loss(logits: Tensor, labels: Tensor, smooth: float = 1e-5) -> Tensor:
    """Mean over all K classes (background included) of 1 − (2Σpt + s)/(Σp² + Σt² + s), sums over the
    whole batch. logits: (B, K, H, W); labels: (B, H, W) class indices."""
    probs = torch.softmax(logits, dim=1)
    target = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)
    union = (probs * probs).sum(dims) + (target * target).sum(dims)
    return (1 - (2 * intersection + smooth) / (union + smooth)).mean()


def stage2_weight(epoch: int) -> float:
    """w = 0.6^(0.99^epoch): 0.60 at epoch 0, 0.83 at 100, 0.975 at 299."""
    return 0.6 ** (0.99**epoch)


class HSAMLoss(nn.Module):
    def __init__(self, dice_weight: float = 0.9) -> None:
        super().__init__()
        self.dice_weight = dice_weight

    def stage_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, labels)
        return (1 - self.dice_weight) * ce + self.dice_weight * soft_dice_loss(logits, labels)

    def forward(self, output: HSAMOutput, labels: Tensor, epoch: int) -> tuple[Tensor, dict[str, float]]:
        """labels: (B, S, S) class indices; stage 1 is scored against them downsampled (nearest) to S/4."""
        low_res = F.interpolate(labels[:, None].float(), size=output.stage1_logits.shape[-2:], mode="nearest")
        stage1 = self.stage_loss(output.stage1_logits.float(), low_res[:, 0].long())
        stage2 = self.stage_loss(output.stage2_logits.float(), labels)
        w = stage2_weight(epoch)
        total = (1 - w) * stage1 + w * stage2
        return total, {"stage1": stage1.item(), "stage2": stage2.item(), "weight": w}
