"""A synthetic 3D phantom for training tests: smooth shapes that change from slice to slice.

Background, an ellipsoid, a sphere and a box, each of its own mean intensity, plus Gaussian noise.
Class ``k`` (1-based) is drawn with ``label_values[k-1]``; later shapes are drawn over earlier ones.
"""

from typing import Sequence

import numpy as np

# Mean intensity of the background and of each shape, in the order they are drawn.
BACKGROUND = 0.15
INTENSITIES = (0.55, 0.9, 0.35)


def phantom_arrays(
    shape: tuple[int, int, int] = (40, 64, 64),
    label_values: Sequence[int] = (1, 2, 3),
    noise: float = 0.04,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (z, y, x), labels uint8 (z, y, x)) with 1 to 3 classes."""
    if not 1 <= len(label_values) <= len(INTENSITIES):
        raise ValueError(f"the phantom has 1 to {len(INTENSITIES)} classes")
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij"
    )
    ellipsoid = ((z / 0.9) ** 2 + ((y + 0.05) / 0.75) ** 2 + ((x - 0.1) / 0.55) ** 2) <= 1
    sphere = (z - 0.1) ** 2 + (y - 0.35) ** 2 + (x + 0.45) ** 2 <= 0.35**2
    box = (np.abs(z + 0.15) <= 0.55) & (np.abs(y + 0.45) <= 0.2) & (np.abs(x - 0.35 * z - 0.05) <= 0.25)
    shapes = (ellipsoid, sphere, box)

    image = np.full(shape, BACKGROUND, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    for mask, value, intensity in zip(shapes, label_values, INTENSITIES):
        image[mask] = intensity
        labels[mask] = value
    rng = np.random.default_rng(seed)
    image += rng.normal(0.0, noise, size=shape).astype(np.float32)
    return image, labels


def phantom_volume(shape: tuple[int, int, int] = (40, 64, 64), label_values: Sequence[int] = (1, 2, 3), **kwargs):
    """(hsam.volumes.volume.Volume, labels, segments): the phantom scaled to 0–1000 on a 0.8 × 0.8 × 2 mm grid."""
    from hsam.volumes.segmentation import Segment
    from hsam.volumes.volume import Volume

    image, labels = phantom_arrays(shape, label_values, **kwargs)
    volume = Volume(
        array=image * 1000.0,
        spacing=(0.8, 0.8, 2.0),
        origin=(-25.0, -25.0, -40.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )
    names = ("ellipsoid", "sphere", "box")
    colors = ((0.9, 0.3, 0.2), (0.2, 0.6, 0.9), (0.9, 0.8, 0.2))
    segments = [Segment(name=n, label_value=int(v), color=c) for n, v, c in zip(names, label_values, colors)]
    return volume, labels, segments


def every_nth_annotated(labels: np.ndarray, n: int = 10, axis: int = 0) -> list[int]:
    """Every n-th slice carrying a label, starting in the middle of the first interval."""
    carrying = [i for i in range(labels.shape[axis]) if np.take(labels, i, axis=axis).any()]
    return carrying[n // 2 :: n]
