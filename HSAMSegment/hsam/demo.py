"""The main job: few-shot H-SAM on a real brain MRI, end to end, scored against a simple baseline.

Data: the MNI152 ICBM 2009a nonlinear symmetric T1 template and its grey/white-matter probability
maps, which ship inside the ``nilearn`` wheel (Fonov et al., NeuroImage 2011; McConnell Brain
Imaging Centre; freely redistributable with attribution). Grey matter where GM > 0.5 and GM ≥ WM,
white matter where WM > 0.5 and WM > GM. Every 10th labelled axial slice serves as an annotation;
the model fine-tuned on those segments the whole volume, and the unannotated labelled slices are
scored (Dice, HD95 in mm) beside what a Slicer user gets from the same annotations without a model:
copying the nearest annotated slice, and the Segment Editor's Fill between slices.
"""

import csv
import io
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .evaluation.mni import CITATION, brain_labels, template_path
from .guidance.kinds import DEFAULT_PRIOR
from .runtime.errors import Cancelled
from .volumes.files import Outputs, write_bytes_atomic

PathLike = Union[str, os.PathLike]
CLASSES = (("Grey matter", 1, (0.96, 0.55, 0.20)), ("White matter", 2, (0.25, 0.65, 0.95)))
ANNOTATE_EVERY = 10
# The demo on a CPU: the tiny preset for at most this long (SAM ViT-B when its weights are given).
CPU_TIME_BUDGET = 240.0
OVERLAY_SLICES = 4
OVERLAY_OPACITY = 0.45
TITLE_HEIGHT = 16


@dataclass
class DemoResult:
    out_dir: Path
    files: dict[str, Path]
    scores: list[dict] = field(default_factory=list)  # class, method, dice, hd95_mm
    annotated_slices: list[int] = field(default_factory=list)
    evaluated_slices: list[int] = field(default_factory=list)
    training: dict = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        """The scores as aligned text."""
        lines = [f"{'class':<14}{'method':<26}{'Dice':>7}{'HD95 mm':>10}"]
        for row in self.scores:
            lines.append(f"{row['class']:<14}{row['method']:<26}{row['dice']:>7.3f}{_mm(row['hd95_mm']):>10}")
        return "\n".join(lines)


def _mm(value: Optional[float], decimals: int = 2) -> str:
    """A distance for tables; "-" when undefined (one of the masks is empty)."""
    return "-" if value is None else f"{value:.{decimals}f}"




def _score(prediction: np.ndarray, truth: np.ndarray, slices: list[int], spacing) -> dict[int, tuple[float, float]]:
    """Dice and HD95 (mm) per class on the given axial slices only."""
    from .evaluation.metrics import dice_score, hausdorff95

    scores = {}
    for _, value, _ in CLASSES:
        pred, ref = prediction[slices] == value, truth[slices] == value
        scores[value] = (dice_score(pred, ref), hausdorff95(pred, ref, spacing))
    return scores


def _write_png(path: Path, rgb: np.ndarray, outputs: Outputs) -> None:
    """Write an (H, W, 3) uint8 image as PNG (zlib only, no imaging library)."""
    h, w, _ = rgb.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, dtype=np.uint8))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    write_bytes_atomic(path, png, outputs=outputs)


def _title(text: str, width: int) -> np.ndarray:
    """(TITLE_HEIGHT, width, 3) float: ``text`` in black on white (Pillow's built-in bitmap font)."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, TITLE_HEIGHT), "white")
    ImageDraw.Draw(band).text((4, 2), text, fill="black")
    return np.asarray(band, dtype=np.float32) / 255.0


def overlay_image(image: np.ndarray, rows: list[tuple[str, np.ndarray]], slices: list[int], anterior_up: bool) -> np.ndarray:
    """(H, W, 3) uint8: the chosen axial slices side by side, one row per (title, labels) of ``rows``
    under its title, the labels coloured over the grey image."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    colours = np.zeros((max(v for _, v, _ in CLASSES) + 1, 3), dtype=np.float32)
    for _, value, colour in CLASSES:
        colours[value] = colour

    def tile(labels: np.ndarray, z: int) -> np.ndarray:
        base = np.repeat(grey[z][..., None], 3, axis=2)
        mask = labels[z] > 0
        base[mask] = (1 - OVERLAY_OPACITY) * base[mask] + OVERLAY_OPACITY * colours[labels[z][mask]]
        return base[::-1] if anterior_up else base

    gap = np.ones((grey.shape[1], 2, 3), dtype=np.float32)
    bands = []
    for title, labels in rows:
        tiles = [tile(labels, z) for z in slices]
        row = np.concatenate([part for t in tiles for part in (t, gap)][:-1], axis=1)
        bands += [_title(title, row.shape[1]), row]
    return (np.concatenate(bands, axis=0) * 255).round().astype(np.uint8)


def _readme(result: DemoResult, model_name: str) -> str:
    return (
        "HSAM few-shot demo\n==================\n\n"
        f"Data: {CITATION}\n\n"
        f"Grey and white matter labels come from the template's probability maps (> 0.5, the larger wins). "
        f"{len(result.annotated_slices)} axial slices (every {ANNOTATE_EVERY}th labelled slice: "
        f"{', '.join(map(str, result.annotated_slices))}) were used as annotations to fine-tune H-SAM "
        f"({model_name}) in guided mode; the whole volume was then segmented twice: guided (the model "
        "corrects the flow propagation of the annotated slices, which it keeps as drawn, and each class is "
        "taken from the output that scored best on held-out annotated slices: the propagation, the guided or "
        "the prompt-free model) and prompt-free (as the paper's H-SAM, from the image alone). Scores on the "
        f"{len(result.evaluated_slices)} unannotated labelled slices, beside what the same annotations give "
        "without a model: flow propagation (hsam propagate), copying the nearest annotated slice, and the "
        f"Segment Editor's Fill between slices (morphological contour interpolation):\n\n{result.table()}\n\n"
        "Files: mni152_t1.nrrd (image), labels.nrrd (reference labels), segmentation.seg.nrrd (H-SAM guided, "
        "open it in 3D Slicer over the image), overlay.png (rows: reference, guided, prompt-free), dice.csv, "
        "demo.hsam (the fine-tuned model: hsam segment IMAGE -m demo.hsam -o OUT.seg.nrrd "
        "[--annotations ANNOTATED.seg.nrrd]).\n"
    )


def run_demo(
    out_dir: PathLike,
    sam_checkpoint: Optional[PathLike] = None,
    epochs: Optional[int] = None,
    time_budget: Optional[float] = None,
    device: str = "auto",
    progress: Optional[Callable[[float, str], None]] = None,
    cancel: Optional[threading.Event] = None,
    img_size: Optional[int] = None,
    annotate_every: int = ANNOTATE_EVERY,
    cmattn: str = "reference",
    seed: int = 2345,
) -> DemoResult:
    """Run the demo and write its files into ``out_dir`` (created; existing demo files replaced).

    Without ``sam_checkpoint`` the ``tiny`` preset trains from scratch (on a CPU for at most
    ``CPU_TIME_BUDGET`` seconds unless ``epochs``/``time_budget`` say otherwise); with it, SAM
    ViT-B is fine-tuned. ``cmattn``: "reference" or "paper" (see docs/model.md); ``seed`` makes the
    run repeatable. ``progress(fraction, message)``; ``cancel`` stops it before anything is written.
    """
    from .runtime.devices import select_device
    from .training.finetune import finetune

    started = time.monotonic()
    report = progress or (lambda fraction, message: None)
    out_dir = Path(out_dir)
    report(0.0, "reading the MNI152 2009a template (nilearn)")
    t1, volume, labels, segments = _demo_data()
    labelled = _labelled_slices(labels)
    annotated = labelled[annotate_every // 2 :: annotate_every]
    evaluated = [z for z in labelled if z not in annotated]

    report(0.01, "baselines: flow propagation, nearest-slice copy and Fill between slices")
    baselines = _baselines(volume, labels, annotated)

    torch_device = select_device(device)
    preset = "vit_b" if sam_checkpoint is not None else "tiny"
    if time_budget is None and epochs is None and torch_device.type == "cpu":
        time_budget = CPU_TIME_BUDGET
    config = _demo_config(preset, sam_checkpoint, img_size, epochs, time_budget, annotated, torch_device, cmattn, seed)

    def on_step(p) -> None:
        report(0.05 + 0.75 * p.fraction, f"fine-tuning: {p.message}")

    report(0.05, f"fine-tuning {preset} on {len(annotated)} annotated slices ({annotated[0]}, {annotated[1]}, …)")
    result = finetune(volume, labels, segments, config, progress=on_step, cancel=cancel)
    predictions = _predictions(result, volume, labels, annotated, preset, torch_device, report, cancel)

    report(0.95, "scoring and writing the results")
    scores = _scores({**predictions, **baselines}, labels, evaluated, volume.spacing)
    files = {key: Path(out_dir) / name for key, name in _FILES.items()}
    demo = DemoResult(out_dir, files, scores, annotated, evaluated, result.metadata.training, time.monotonic() - started)
    _write_demo(demo, preset, result, t1, volume, labels, segments, predictions)
    report(1.0, f"done in {demo.seconds:.0f} s")
    return demo


_FILES = {
    "model": "demo.hsam",
    "image": "mni152_t1.nrrd",
    "segmentation": "segmentation.seg.nrrd",
    "labels": "labels.nrrd",
    "overlay": "overlay.png",
    "scores": "dice.csv",
    "readme": "README.txt",
}


def _demo_data():
    """(T1 template, its float volume, the brain labels, their segments)."""
    from .volumes.segmentation import Segment
    from .volumes.volume import Volume, read_volume

    t1 = read_volume(template_path("t1"))
    gm, wm = read_volume(template_path("gm")).array, read_volume(template_path("wm")).array
    labels = brain_labels(gm, wm)
    volume = Volume(t1.array.astype(np.float32), t1.spacing, t1.origin, t1.direction)
    segments = [Segment(name=name, label_value=value, color=colour) for name, value, colour in CLASSES]
    return t1, volume, labels, segments


def _labelled_slices(labels: np.ndarray) -> list[int]:
    from .guidance.priors import annotated_slices

    return annotated_slices(labels, 0)


def _baselines(volume, labels: np.ndarray, annotated: list[int]) -> dict[str, np.ndarray]:
    from .evaluation.baselines import flow_propagation, nearest_slice_copy
    from .guidance.fill import fill_between_slices

    return {
        "flow propagation": flow_propagation(volume.array, labels, annotated),
        "nearest-slice copy": nearest_slice_copy(labels, annotated),
        "Fill between slices": fill_between_slices(labels, annotated),
    }


def _demo_config(preset, sam_checkpoint, img_size, epochs, time_budget, annotated, torch_device, cmattn, seed):
    from .training.config import FinetuneConfig
    from .volumes.preprocess import IntensityPreprocessing

    return FinetuneConfig(
        preset=preset,
        sam_checkpoint=sam_checkpoint,
        img_size=img_size,
        epochs=epochs,
        time_budget=time_budget,
        slices=annotated,
        preprocessing=IntensityPreprocessing(mode="percentile"),
        device=str(torch_device),
        cmattn=cmattn,
        seed=seed,
        guidance=DEFAULT_PRIOR,
    )


def _predictions(result, volume, labels, annotated, preset, torch_device, report, cancel) -> dict[str, np.ndarray]:
    """The fine-tuned model's labelmaps of the whole volume, guided by the drawn slices and prompt-free."""
    from .inference.segment import segment_volume

    drawn = np.zeros_like(labels)
    drawn[annotated] = labels[annotated]
    predictions = {}
    for index, (mode, annotations) in enumerate((("guided", drawn), ("prompt-free", None))):
        start = 0.8 + 0.075 * index
        report(start, f"segmenting the whole volume, {mode}")
        predictions[f"H-SAM {preset} {mode}"] = segment_volume(
            result.model, volume, result.metadata, device=torch_device, annotations=annotations,
            progress=lambda f, m: report(min(start + 0.075 * f, 0.95), f"segmenting {mode}: {m}"), cancel=cancel,
        ).labels
    if cancel is not None and cancel.is_set():
        raise Cancelled("demo cancelled")
    return predictions


def _scores(labelmaps: dict[str, np.ndarray], labels, evaluated, spacing) -> list[dict]:
    """Dice and HD95 of every method (predictions first, then baselines) per class."""
    tables = {method: _score(p, labels, evaluated, spacing) for method, p in labelmaps.items()}
    scores = []
    for name, value, _ in CLASSES:
        for method, table in tables.items():
            scores.append({"class": name, "method": method, "dice": table[value][0], "hd95_mm": table[value][1]})
    return scores


def _write_demo(demo: DemoResult, preset, result, t1, volume, labels, segments, predictions) -> None:
    """Write all of the demo's files, or none."""
    from .models.bundle import save_bundle
    from .volumes.segmentation import write_labelmap, write_segmentation
    from .volumes.volume import write_volume

    files, evaluated = demo.files, demo.evaluated_slices
    demo.out_dir.mkdir(parents=True, exist_ok=True)
    with Outputs(overwrite=True) as outputs:  # all files or none
        save_bundle(files["model"], result.model, result.metadata, outputs=outputs)
        write_volume(files["image"], t1, outputs=outputs)
        write_segmentation(files["segmentation"], predictions[f"H-SAM {preset} guided"], volume, segments,
                           outputs=outputs)
        write_labelmap(files["labels"], labels, volume, outputs=outputs)
        shown = [evaluated[int(i)] for i in np.linspace(0.3, 0.7, OVERLAY_SLICES) * (len(evaluated) - 1)]
        anterior_up = volume.direction[4] < 0  # LPS: y index growing anteriorly
        rows = [("reference", labels), *predictions.items()]
        _write_png(files["overlay"], overlay_image(volume.array, rows, shown, anterior_up), outputs)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["class", "method", "dice", "hd95_mm"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "dice": f"{r['dice']:.4f}", "hd95_mm": _mm(r["hd95_mm"], 3)} for r in demo.scores)
        write_bytes_atomic(files["scores"], text.getvalue().encode(), outputs=outputs)
        write_bytes_atomic(files["readme"], _readme(demo, preset).encode(), outputs=outputs)
        outputs.publish()
