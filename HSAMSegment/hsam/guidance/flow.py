"""Flow propagation: annotated slices carried through the volume along the optical flow between
neighbouring image slices.

Each annotated slice's class probabilities are warped slice by slice, along the dense optical flow
(OpenCV's DIS at full resolution) from every slice to its neighbour, up to the next annotated slice in
both directions; between two annotated slices the two carried maps are blended by distance, beyond the
first and the last the end slice is carried on alone. Probabilities stay soft, so the propagation
keeps its uncertainty where structures move. Flows are computed once per pair of neighbouring slices
and kept (``SliceFlows``), so training, segmentation and previews of one volume reuse them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..runtime.errors import InputError

# Intensities the flow sees: CT in a soft-tissue window, other images between two percentiles.
FLOW_CT_WINDOW = (-200.0, 300.0)
FLOW_PERCENTILES = (1.0, 99.0)
# CT if at least this share of the voxels lies below −500 (air, the table's surroundings, padding).
CT_AIR_HU = -500.0
CT_AIR_SHARE = 0.01
# DIS (medium preset) at full resolution (its finest scale 1 loses thin structures), patches every 4
# pixels and no variational refinement: on a 512² CT at k = 10, 0.823 mean Dice in half the time of the
# preset at full resolution (0.820); see docs/performance.md.
FINEST_SCALE = 0
PATCH_STRIDE = 4
VARIATIONAL_REFINEMENT_ITERATIONS = 0
CACHED_VOLUMES = 2
FLOW_WORKERS = 2
ROI_MARGIN = 0.1
MIN_ROI_MARGIN = 16


def _cv2():
    try:
        import cv2
    except ImportError:
        raise InputError("flow propagation needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def looks_like_ct(array: np.ndarray) -> bool:
    """True when a share of the voxels is air in Hounsfield units (a CT; MR has no such values)."""
    sample = np.asarray(array).ravel()[:: max(1, array.size // 1_000_000)]
    return bool(np.mean(sample < CT_AIR_HU) >= CT_AIR_SHARE)


def modality_of(array: np.ndarray) -> str:
    """``ct`` or ``mr`` (any other image), as ``flow_images`` takes it."""
    return "ct" if looks_like_ct(array) else "mr"


def flow_images(slices: np.ndarray, modality: str) -> np.ndarray:
    """(n, H, W) slices -> (n, H, W) uint8 for the flow: CT (``modality`` ``ct``) in
    ``FLOW_CT_WINDOW`` HU, any other image (``mr``) between the volume's ``FLOW_PERCENTILES``."""
    if modality == "ct":
        low, high = FLOW_CT_WINDOW
    elif modality == "mr":
        low, high = (float(v) for v in np.percentile(slices, FLOW_PERCENTILES))
    else:
        raise InputError(f"unknown modality {modality!r} for flow propagation; choose ct or mr")
    scale = 255.0 / max(high - low, 1e-6)
    out = np.empty(slices.shape, dtype=np.uint8)
    for index, image in enumerate(slices):  # slice by slice: no float copy of the volume
        out[index] = np.rint(np.clip((image.astype(np.float32) - low) * scale, 0.0, 255.0))
    return out


FlowEstimator = Callable[[np.ndarray, np.ndarray], np.ndarray]


def dis_flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32 offsets from each pixel of the uint8 slice ``source`` to its match in
    ``target``: OpenCV's DIS with this module's settings, on one thread."""
    cv2 = _cv2()
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(FINEST_SCALE)
    dis.setPatchStride(PATCH_STRIDE)
    dis.setVariationalRefinementIterations(VARIATIONAL_REFINEMENT_ITERATIONS)
    return dis.calc(source, target, None)


class SliceFlows:
    """Dense optical flow between neighbouring slices of (n, H, W) uint8 ``images``, computed on
    first use by ``estimator`` and kept. ``toward(s, t)`` for |s − t| = 1: (H, W, 2) float32, for
    each pixel p of slice ``s`` the offset to its match in slice ``t``."""

    def __init__(self, images: np.ndarray, estimator: FlowEstimator = dis_flow) -> None:
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected (n, H, W) uint8 slices, got {images.dtype} {images.shape}")
        self.images = images
        self.estimator = estimator
        self._flows: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.images)

    def toward(self, source: int, target: int) -> np.ndarray:
        if (source, target) not in self._flows:
            self.prepare([(source, target)])
        return self._flows[source, target].astype(np.float32)

    def prepare(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Compute the flows of ``pairs`` not yet known, two at a time (OpenCV releases the GIL;
        two single-threaded flows at once beat one flow on two threads by ~1.5×)."""
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self._flows]
        if not missing:
            return
        cv2 = _cv2()
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with ThreadPoolExecutor(FLOW_WORKERS) as pool:
                for pair, flow in zip(missing, pool.map(self._compute, missing)):
                    self._flows[pair] = flow
        finally:
            cv2.setNumThreads(threads)

    def _compute(self, pair: tuple[int, int]) -> np.ndarray:
        return self.estimator(self.images[pair[0]], self.images[pair[1]]).astype(np.float16)


_CACHE: OrderedDict[tuple, SliceFlows] = OrderedDict()


def volume_flows(images: np.ndarray, estimator: FlowEstimator = dis_flow) -> SliceFlows:
    """The ``SliceFlows`` of (n, H, W) uint8 ``images``, shared by every caller in this process that
    asks for the same images and estimator (the last ``CACHED_VOLUMES`` are kept)."""
    images = np.ascontiguousarray(images)
    digest = hashlib.blake2b(images.tobytes(), digest_size=16)
    digest.update(repr(images.shape).encode())
    key = (digest.hexdigest(), estimator)
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        _CACHE[key] = SliceFlows(images, estimator)
        while len(_CACHE) > CACHED_VOLUMES:
            _CACHE.popitem(last=False)
    return _CACHE[key]


def region_of_interest(class_labels: np.ndarray, annotated: Sequence[int]) -> tuple[slice, slice]:
    """The in-plane box around every label of the ``annotated`` slices, grown by ``ROI_MARGIN`` of
    the slice's size (at least ``MIN_ROI_MARGIN`` pixels): labels are carried within it."""
    present = np.any(class_labels[list(annotated)] != 0, axis=0)
    h, w = present.shape
    if not present.any():
        return slice(0, h), slice(0, w)
    rows, cols = np.flatnonzero(present.any(1)), np.flatnonzero(present.any(0))
    box = []
    for (low, high), size in (((rows[0], rows[-1]), h), ((cols[0], cols[-1]), w)):
        margin = max(MIN_ROI_MARGIN, round(ROI_MARGIN * size))
        box.append(slice(max(0, int(low) - margin), min(size, int(high) + 1 + margin)))
    return box[0], box[1]


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class indices -> (K+1, H, W) float32 probabilities."""
    return (np.arange(num_classes + 1)[:, None, None] == labels[None]).astype(np.float32)


class FlowPropagation:
    """Class probabilities of every slice of one volume carried from its annotated slices.

    ``images``: (n, H, W) uint8 slices (``flow_images``); ``class_labels``: (n, H, W) class indices
    (0 = background) on the same grid, drawn on the slices ``annotated``. Labels are carried within
    the ``region_of_interest`` of the annotated slices; outside it every slice is background.
    ``estimator``: the optical flow between two slices (default: ``dis_flow``)."""

    def __init__(self, images: np.ndarray, class_labels: np.ndarray, annotated: Sequence[int], num_classes: int,
                 estimator: FlowEstimator = dis_flow):
        if images.shape != class_labels.shape:
            raise InputError(f"the image slices {images.shape} do not match the labels {class_labels.shape}")
        self.annotated = sorted({int(i) for i in annotated})
        if not self.annotated:
            raise InputError("flow propagation needs at least one annotated slice")
        self.shape = class_labels.shape
        self.num_classes = num_classes
        self.roi = (slice(None), *region_of_interest(class_labels, self.annotated))
        self.labels = class_labels[self.roi]
        self.flows = volume_flows(images[self.roi], estimator)
        cv2 = _cv2()
        self._remap = lambda image, maps: cv2.remap(image, maps, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        h, w = self.labels.shape[1:]
        self._grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), -1)
        self._span: Optional[tuple[tuple[int, int], int, np.ndarray]] = None

    def carry(self, source: int, target: int) -> Iterator[tuple[int, np.ndarray]]:
        """(slice, (K+1, h, w) probabilities in the region) for every slice after ``source`` up to
        ``target`` included, ``source``'s labels carried one slice at a time."""
        step = 1 if target > source else -1
        self.flows.prepare([(i, i - step) for i in range(source + step, target + step, step)])
        current = one_hot(self.labels[source], self.num_classes).transpose(1, 2, 0)
        for index in range(source + step, target + step, step):
            current = self._remap(current, self._grid + self.flows.toward(index, index - step))
            current = current.reshape(*current.shape[:2], -1)  # OpenCV drops a single channel's axis
            yield index, current.transpose(2, 0, 1)

    def between(self, low: int, high: int) -> np.ndarray:
        """(high − low − 1, K+1, h, w) probabilities of the slices strictly between ``low`` and
        ``high``: the two carried maps blended linearly by distance."""
        self.flows.prepare([(i, i + 1) for i in range(low + 1, high)] + [(i, i - 1) for i in range(low + 1, high)])
        out = np.empty((high - low - 1, self.num_classes + 1, *self.labels.shape[1:]), dtype=np.float32)
        for index, carried in self.carry(low, high - 1):
            out[index - low - 1] = carried * ((high - index) / (high - low))
        for index, carried in self.carry(high, low + 1):
            out[index - low - 1] += carried * ((index - low) / (high - low))
        return out

    def beyond(self, end: int, last: int) -> np.ndarray:
        """The slices from ``end`` (exclusive) to ``last`` (inclusive) in slice order, ``end`` carried alone."""
        carried = np.stack([p for _, p in self.carry(end, last)])
        return carried if last > end else carried[::-1]

    def region_probabilities(self, index: int, exclude: Optional[int] = None) -> np.ndarray:
        """(K+1, h, w) probabilities in the region of slice ``index``, from the annotated slices but
        ``exclude``. The span of slices around ``index`` is computed whole and kept for the next call."""
        known = [a for a in self.annotated if a != exclude]
        if not known:
            raise InputError("flow propagation needs at least one annotated slice")
        if index in known:
            return one_hot(self.labels[index], self.num_classes)
        below = [a for a in known if a < index]
        above = [a for a in known if a > index]
        if below and above:
            low, high = below[-1], above[0]
            key, first, build = (low, high), low + 1, lambda: self.between(low, high)
        elif below:
            last = len(self.labels) - 1 if exclude is None else index
            key, first, build = (below[-1], last), below[-1] + 1, lambda: self.beyond(below[-1], last)
        else:
            first = 0 if exclude is None else index
            key, build = (above[0], first), lambda: self.beyond(above[0], first)
        if self._span is None or self._span[0] != key:
            self._span = (key, first, build())
        return self._span[2][index - first]

    def probabilities(self, index: int, exclude: Optional[int] = None) -> np.ndarray:
        """(K+1, H, W) probabilities of slice ``index`` (see ``region_probabilities``)."""
        out = np.zeros((self.num_classes + 1, *self.shape[1:]), dtype=np.float32)
        out[0] = 1.0
        out[(slice(None), *self.roi[1:])] = self.region_probabilities(index, exclude)
        return out

    def volume(self, progress: Optional[Callable[[float, str], None]] = None) -> np.ndarray:
        """(n, H, W) class indices of every slice (the annotated ones as drawn); ``progress(fraction,
        message)`` after every slice."""
        out = np.zeros(self.shape, dtype=np.uint8 if self.num_classes < 256 else np.uint16)
        region = out[self.roi]
        for index in range(len(out)):
            region[index] = self.region_probabilities(index).argmax(0)
            if progress is not None:
                progress((index + 1) / len(out), f"slice {index + 1}/{len(out)}")
        return out
