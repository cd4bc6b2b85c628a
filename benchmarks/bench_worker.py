"""Time segmentation through the worker process (``HSAMLib.worker``, what Slicer uses) against
``segment_volume`` called in this process, on the same volume and model.

    python benchmarks/bench_worker.py [--preset tiny] [--depth 100] [--side 256] [--repeats 2] [--update-docs]

The worker's seconds per slice come from its progress stream: from the event that starts the
``segment`` phase to the one that starts ``write``. Its fixed start-up cost is the time from
launching the process to that first event (interpreter, imports, reading the volume, loading the
model); the write cost is from ``write`` to the result. The client's own file work (writing the input
volume, reading the result) is timed separately. Runs alternate between the two paths; the best of
``--repeats`` is kept for each.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "HSAMSegment"))
from bench_volume import IMG_SIZE, metadata_for, synthetic_volume  # noqa: E402
from common import table, update_docs  # noqa: E402

from HSAMLib.worker import SUCCEEDED, WorkerJob  # noqa: E402


def time_in_process(model, volume, metadata, batch: int) -> float:
    from hsam.inference.segment import segment_volume

    started = time.perf_counter()
    segment_volume(model, volume, metadata, device="cpu", batch_size=batch)
    return time.perf_counter() - started


def time_worker(volume_path: Path, bundle: Path, batch: int) -> dict:
    """Wall-clock marks of one ``hsam segment`` worker run, from its progress events as they arrive."""
    job = WorkerJob()
    marks = {}

    def on_events(events) -> None:
        now = time.perf_counter()
        for event in events:
            if event["phase"] in ("segment", "write", "done"):
                marks.setdefault(event["phase"], now)

    launched = time.perf_counter()
    job.start(["segment", volume_path, "-m", bundle, "-o", job.folder / "result.seg.nrrd", "--device", "cpu",
               "--batch-size", batch, "--progress", "json"])
    job.wait(interval=0.01, on_events=on_events)
    ended = time.perf_counter()
    assert job.state == SUCCEEDED, job.error
    read_started = time.perf_counter()
    from hsam.volumes.segmentation import read_labelmap

    read_labelmap(job.folder / "result.seg.nrrd")
    marks["read"] = time.perf_counter() - read_started
    job.cleanup()
    return {
        "startup": marks["segment"] - launched,
        "segment": marks["write"] - marks["segment"],
        "write": marks["done"] - marks["write"],
        "total": ended - launched,
        "read": marks["read"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(IMG_SIZE))
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    from hsam.models.build import build_hsam
    from hsam.models.bundle import save_bundle
    from hsam.volumes.volume import write_volume

    torch.manual_seed(0)
    metadata = metadata_for(args.preset)
    model = build_hsam(args.preset, metadata.num_classes, metadata.img_size).eval()
    volume, _ = synthetic_volume(args.depth, args.side)
    with tempfile.TemporaryDirectory() as folder:
        bundle = save_bundle(Path(folder) / "model.hsam", model, metadata)
        started = time.perf_counter()
        write_volume(Path(folder) / "volume.nrrd", volume)
        write_input = time.perf_counter() - started
        time_in_process(model, volume, metadata, args.batch)  # warm-up
        in_process, worker = [], []
        for _ in range(args.repeats):
            in_process.append(time_in_process(model, volume, metadata, args.batch))
            worker.append(time_worker(Path(folder) / "volume.nrrd", bundle, args.batch))

    best = min(worker, key=lambda run: run["segment"])
    per_slice_in_process = min(in_process) / args.depth
    per_slice_worker = best["segment"] / args.depth
    rows = [
        {"path": "segment_volume in this process", "s/slice": per_slice_in_process, "ratio": 1.0},
        {"path": "worker process (hsam segment)", "s/slice": per_slice_worker,
         "ratio": per_slice_worker / per_slice_in_process},
    ]
    fixed = [
        {"worker cost": "start-up: interpreter, imports, read volume, load model", "s": best["startup"]},
        {"worker cost": "write the .seg.nrrd result", "s": best["write"]},
        {"worker cost": "client: write the input volume", "s": write_input},
        {"worker cost": "client: read the result", "s": best["read"]},
        {"worker cost": "whole worker run (launch to exit)", "s": best["total"]},
    ]
    body = (
        f"{args.preset} preset at {IMG_SIZE[args.preset]} px, a {args.depth}×{args.side}×{args.side} volume, "
        f"batch {args.batch}, CPU, best of {args.repeats} alternating runs.\n\n"
        + table(rows, ["path", "s/slice", "ratio"]) + "\n\n" + table(fixed, ["worker cost", "s"]) + "\n"
    )
    print(body)
    if args.update_docs:
        command = f"python benchmarks/bench_worker.py --preset {args.preset} --depth {args.depth} --side {args.side} " \
                  f"--repeats {args.repeats} --update-docs"
        update_docs("Worker process", command, body)


if __name__ == "__main__":
    main()
