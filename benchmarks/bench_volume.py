"""Time the volume pipeline: seconds per slice, pipeline overhead and peak memory of ``segment_volume``
on a 512×512×N volume, and one fine-tuning epoch on 10 annotated slices.

    python benchmarks/bench_volume.py [--presets tiny vit_b] [--depth 100] [--update-docs]

Every configuration runs in its own process (peak memory is its own). ``overhead`` is the time
``segment_volume`` spends outside the network's forward passes (reading slices, normalising,
resizing, label mapping) over the time inside them, measured in the same run; the ratio column is
each row's seconds per slice over the fp32 row of the same preset.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bf16_available, peak_rss_gib, run_isolated, table, update_docs  # noqa: E402

IMG_SIZE = {"tiny": 256, "vit_b": 512, "vit_l": 512, "vit_h": 512}
NUM_CLASSES = 2
TRAIN_SLICES = 10


def synthetic_volume(depth: int, side: int):
    """A (depth, side, side) CT-like volume with a sphere and a box (labels 1, 2), 0.7×0.7×2.5 mm."""
    from hsam.volumes.volume import Volume

    z, y, x = np.meshgrid(np.linspace(-1, 1, depth), np.linspace(-1, 1, side), np.linspace(-1, 1, side),
                          indexing="ij", sparse=True)
    labels = np.zeros((depth, side, side), np.uint8)
    labels[(z**2 + (y - 0.2) ** 2 + (x + 0.3) ** 2) < 0.3] = 1
    labels[(np.abs(z) < 0.6) & (np.abs(y + 0.4) < 0.2) & (np.abs(x - 0.3) < 0.25)] = 2
    rng = np.random.default_rng(0)
    image = (np.array([-800.0, 60.0, 250.0], np.float32)[labels] + rng.normal(0, 20, labels.shape)).astype(np.float32)
    return Volume(image, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0)), labels


def metadata_for(preset: str):
    from hsam.models.bundle import BundleMetadata

    return BundleMetadata(preset=preset, img_size=IMG_SIZE[preset], num_classes=NUM_CLASSES,
                          class_names=["sphere", "box"], class_colors=[(1, 0, 0), (0, 1, 0)], label_values=[1, 2],
                          preprocessing={"mode": "ct", "window": [-125, 275]})


def measure_segment(preset: str, precision: str, depth: int, batch: int) -> dict:
    from hsam.inference.segment import segment_volume
    from hsam.models.build import build_hsam

    torch.manual_seed(0)
    model = build_hsam(preset, NUM_CLASSES, IMG_SIZE[preset]).eval()
    model.merge_lora()
    volume, _ = synthetic_volume(depth, 512)
    inside = [0.0]
    forward = model.forward

    def timed_forward(*args, **kwargs):
        started = time.perf_counter()
        out = forward(*args, **kwargs)
        inside[0] += time.perf_counter() - started
        return out

    model.forward = timed_forward
    segment_volume(model, volume, metadata_for(preset), device="cpu", precision=precision, batch_size=batch,
                   slice_range=(0, min(batch, depth) - 1))  # warm-up
    inside[0] = 0.0
    started = time.perf_counter()
    segment_volume(model, volume, metadata_for(preset), device="cpu", precision=precision, batch_size=batch)
    total = time.perf_counter() - started
    return {"preset": preset, "job": f"segment {depth} slices", "precision": precision, "batch": batch,
            "s/slice": total / depth, "overhead": (total - inside[0]) / inside[0], "peak_gib": peak_rss_gib()}


def measure_finetune(preset: str, precision: str, batch: int) -> dict:
    from hsam.training.config import FinetuneConfig
    from hsam.training.finetune import finetune
    from hsam.volumes.segmentation import Segment

    volume, labels = synthetic_volume(40, 512)
    slices = list(np.linspace(5, 34, TRAIN_SLICES).astype(int))
    config = FinetuneConfig(preset=preset, img_size=IMG_SIZE[preset], epochs=1, slices=slices, batch_size=batch,
                            device="cpu", precision=precision, validation=False, preprocessing=None)
    segments = [Segment("sphere", 1), Segment("box", 2)]
    started = time.perf_counter()
    result = finetune(volume, labels, segments, config)
    total = time.perf_counter() - started
    return {"preset": preset, "job": f"1 epoch, {TRAIN_SLICES} slices", "precision": precision, "batch": batch,
            "s/epoch": total, "epoch_s_in_loop": result.history[0]["seconds"], "peak_gib": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--depth", type=int, default=100, help="number of 512×512 slices")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    parser.add_argument("--one", nargs=3, metavar=("JOB", "PRESET", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        job, preset, precision = args.one
        row = (measure_segment(preset, precision, args.depth, args.batch_size) if job == "segment"
               else measure_finetune(preset, precision, 2))
        print(json.dumps(row))
        return

    precisions = ["fp32", "bf16"] if bf16_available() else ["fp32"]
    rows = []
    for preset in args.presets:
        baseline = None
        for precision in precisions:
            row = run_isolated(Path(__file__), ["--depth", str(args.depth), "--batch-size", str(args.batch_size),
                                                "--one", "segment", preset, precision])
            baseline = baseline or row["s/slice"]
            row["ratio"] = row["s/slice"] / baseline
            rows.append(row)
            print(row, flush=True)
        for precision in precisions:
            row = run_isolated(Path(__file__), ["--one", "finetune", preset, precision])
            rows.append(row)
            print(row, flush=True)
    columns = ["preset", "job", "precision", "batch", "s/slice", "ratio", "overhead", "s/epoch", "peak_gib"]
    text = table(rows, columns)
    print(text)
    if args.update_docs:
        command = (f"python benchmarks/bench_volume.py --presets {' '.join(args.presets)} --depth {args.depth} "
                   f"--batch-size {args.batch_size} --update-docs")
        update_docs("Volume pipeline", command,
                    "Segment rows: a 512×512×N CT-like volume (tiny at 256 px, vit_* at 512 px), LoRA merged; "
                    "overhead = time outside the network / time inside it. Fine-tune rows: one epoch on 10 "
                    "annotated 512×512 slices at batch 2 with augmentation, from random weights (the whole "
                    "encoder trains, as without SAM weights).\n\n" + text)


if __name__ == "__main__":
    main()
