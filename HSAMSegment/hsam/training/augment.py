"""The authors' training augmentations (``RandomGenerator``), in torch so that they run on the GPU too.

Each slice independently gets one of (fresh uniform draw per branch, as the authors' code):

* p = 0.45: rotation by an integer angle in [−20, 19]° about the centre, zeros outside;
* else p = 0.75 (≈ 0.41 overall): a square crop of side U(0.2, 0.8)·size at a random position,
  zoomed back to the full size;
* else p = 0.85 (≈ 0.12 overall): elastic deformation, a random affine (corners moved by up to
  ``0.08·W``) composed with a Gaussian-smoothed random displacement (``alpha = 2·W``,
  ``sigma = 0.08·W``);
* else (≈ 0.02): unchanged.

An image may carry extra channels, (C, H, W) (guided mode's prior logits), transformed with it.
Labels are always resampled by nearest neighbour. The authors' elastic branch interpolated labels
bilinearly (fractional labels at borders, truncated to the lower class); that is not reproduced.
Their rotation also uses nearest neighbour for the image; that is the default here
(``rotation_image_mode="bilinear"`` smooths it). Random numbers come from a ``torch.Generator`` on
the CPU, so a seed gives the same augmentations on every device; the prior perturbations of guided
training (``hsam.guidance.augment``) draw from it too, with the same ``uniform`` and ``randint``.
"""

import math
import torch
import torch.nn.functional as F
from torch import Tensor

from ..guidance.augment import randint, uniform

ROTATE_THRESHOLD = 0.55
CROP_THRESHOLD = 0.25
ELASTIC_THRESHOLD = 0.15
MAX_ANGLE = 20
CROP_RATIO = (0.2, 0.8)
ELASTIC_ALPHA = 2.0
ELASTIC_SIGMA = 0.08
ELASTIC_ALPHA_AFFINE = 0.08


def _pixel_grid(h: int, w: int, device: torch.device) -> Tensor:
    """(H, W, 2) pixel coordinates (x, y) of every output pixel."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([xs, ys], dim=-1)


def _channels(image: Tensor) -> Tensor:
    """(H, W) or (C, H, W) -> (1, C, H, W)."""
    return image.reshape(1, -1, *image.shape[-2:])


def _sample(image: Tensor, label: Tensor, pixels: Tensor, image_mode: str, padding: str) -> tuple[Tensor, Tensor]:
    """Resample one (H, W) or (C, H, W) slice at (H, W, 2) pixel coordinates (x, y): the image with
    ``image_mode``, the label by nearest neighbour."""
    h, w = image.shape[-2:]
    scale = torch.tensor([2.0 / w, 2.0 / h], device=pixels.device)
    grid = ((pixels + 0.5) * scale - 1.0)[None]  # align_corners=False convention
    out_image = F.grid_sample(_channels(image), grid, mode=image_mode, padding_mode=padding, align_corners=False)
    out_label = F.grid_sample(
        label[None, None].float(), grid, mode="nearest", padding_mode=padding, align_corners=False
    )
    return out_image.reshape(image.shape), out_label[0, 0].round().to(label.dtype)


def rotate(image: Tensor, label: Tensor, angle_degrees: float, image_mode: str = "nearest") -> tuple[Tensor, Tensor]:
    """Rotate one (H, W) or (C, H, W) slice about its centre, same size, zeros outside."""
    h, w = image.shape[-2:]
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=image.device)
    theta = math.radians(angle_degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    inverse = torch.tensor([[cos, sin], [-sin, cos]], device=image.device)
    source = (_pixel_grid(h, w, image.device) - centre) @ inverse.T + centre
    return _sample(image, label, source, image_mode, "zeros")


def crop_and_zoom(image: Tensor, label: Tensor, top: int, left: int, side_h: int, side_w: int) -> tuple[Tensor, Tensor]:
    """Crop one (H, W) or (C, H, W) slice and zoom it back to (H, W): bicubic image (kept within each
    channel's range), nearest label."""
    h, w = image.shape[-2:]
    image_crop = _channels(image[..., top : top + side_h, left : left + side_w])
    label_crop = label[top : top + side_h, left : left + side_w]
    zoomed = F.interpolate(image_crop, size=(h, w), mode="bicubic", align_corners=False)
    lo, hi = image_crop.amin(dim=(2, 3), keepdim=True), image_crop.amax(dim=(2, 3), keepdim=True)
    zoomed_label = F.interpolate(label_crop[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    return torch.maximum(torch.minimum(zoomed, hi), lo).reshape(image.shape), zoomed_label.to(label.dtype)


def gaussian_blur(field: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, 1, H, W), kernel radius 4σ, mirrored borders (scipy's default)."""
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for dim in (2, 3):
        size = field.shape[dim]
        pad = min(radius, size - 1)
        k = kernel[radius - pad : radius + pad + 1]
        k = k / k.sum()
        padding = (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad)
        shape = (1, 1, 1, -1) if dim == 3 else (1, 1, -1, 1)
        field = F.conv2d(F.pad(field, padding, mode="reflect"), k.view(shape))
    return field


def elastic(
    image: Tensor, label: Tensor, generator: torch.Generator, image_mode: str = "bilinear"
) -> tuple[Tensor, Tensor]:
    """Elastic deformation of one (H, W) or (C, H, W) slice: random affine then smooth random displacement."""
    h, w = image.shape[-2:]
    alpha, sigma, alpha_affine = ELASTIC_ALPHA * w, ELASTIC_SIGMA * w, ELASTIC_ALPHA_AFFINE * w
    device = image.device

    # Affine: three points around the centre moved by up to alpha_affine pixels (x, y order).
    centre = torch.tensor([w // 2, h // 2], dtype=torch.float32)
    side = min(h, w) // 3
    points = torch.stack([centre + side, centre + torch.tensor([side, -side]), centre - side])
    moved = points + (torch.rand((3, 2), generator=generator) * 2 - 1) * alpha_affine
    ones = torch.ones(3, 1)
    # Output pixel p takes the value at forward⁻¹(p); solve for the map moved -> points directly.
    inverse = torch.linalg.solve(torch.cat([moved, ones], 1), points).T  # (2, 3)

    noise = (torch.rand((2, 1, h, w), generator=generator) * 2 - 1).to(device)
    displacement = gaussian_blur(noise, sigma)[:, 0] * alpha  # (2, H, W): dx, dy
    pixels = _pixel_grid(h, w, device) + displacement.permute(1, 2, 0)
    inverse = inverse.to(device)
    source = pixels @ inverse[:, :2].T + inverse[:, 2]
    return _sample(image, label, source, image_mode, "reflection")


class RandomAugmentation:
    """The authors' ``RandomGenerator`` on (N, H, W) batches: image float, label integer."""

    def __init__(self, seed: int = 0, rotation_image_mode: str = "nearest") -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.rotation_image_mode = rotation_image_mode

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def augment_slice(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        g = self.generator
        if uniform(g) > ROTATE_THRESHOLD:
            angle = randint(g, -MAX_ANGLE, MAX_ANGLE)
            return rotate(image, label, angle, self.rotation_image_mode)
        if uniform(g) > CROP_THRESHOLD:
            h, w = image.shape[-2:]
            scale = CROP_RATIO[0] + uniform(g) * (CROP_RATIO[1] - CROP_RATIO[0])
            side_h, side_w = max(1, int(h * scale)), max(1, int(w * scale))
            top, left = randint(g, 0, h - side_h), randint(g, 0, w - side_w)
            return crop_and_zoom(image, label, top, left, side_h, side_w)
        if uniform(g) > ELASTIC_THRESHOLD:
            return elastic(image, label, g)
        return image, label

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """images: (N, H, W) or (N, C, H, W) float; labels: (N, H, W) integer -> augmented copies, same shapes."""
        pairs = [self.augment_slice(image, label) for image, label in zip(images, labels)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
