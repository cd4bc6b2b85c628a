"""HSAM fill (the Segment Editor effect) on the MNI152 demo against Fill between slices, through the
effect's logic: a real MRML scene (slicer-core), real worker processes, the effect's default options.

    python benchmarks/bench_hsam_fill.py [--every 10] [--time-budget S] [--update-docs]

The T1 template becomes the source volume; grey and white matter (``hsam.demo.brain_labels``) are
painted on every ``--every``-th labelled axial slice. ``HSAMFillLogic.start`` (the effect's
Initialize) runs with the default options (tiny preset, ``FAST_BUDGET_SECONDS``) until its final
preview. Recorded: seconds from Initialize to the first preview in the scene and to the last one, the
Dice of each against the reference on the unpainted labelled slices (as in the demo), the CPU time of
the worker processes, and the 1-minute load average before and after (the machine is shared). Fill
between slices (``hsam.baselines.fill_between_slices``, the effect's algorithm) gets the same slices.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "HSAMSegment"))
from common import table, update_docs  # noqa: E402

FIRST_PREVIEW_TARGET_SECONDS = 30.0


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=10, help="paint every n-th labelled axial slice")
    parser.add_argument("--time-budget", type=float, help="training seconds (default: the effect's default budget)")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()

    import slicer

    from hsam.baselines import fill_between_slices
    from hsam.demo import CLASSES, brain_labels, template_path
    from hsam.io import Segment, Volume, read_volume
    from hsam.metrics import dice_score
    from HSAMLib import fill_logic, mrml
    from HSAMLib.fill_logic import FillOptions, HSAMFillLogic

    load_before = os.getloadavg()[0]
    t1 = read_volume(template_path("t1"))
    labels = brain_labels(read_volume(template_path("gm")).array, read_volume(template_path("wm")).array)
    volume = Volume(t1.array.astype(np.float32), t1.spacing, t1.origin, t1.direction)
    labelled = [z for z in range(labels.shape[0]) if labels[z].any()]
    painted_slices = labelled[args.every // 2 :: args.every]
    evaluated = [z for z in labelled if z not in painted_slices]

    def dice(prediction: np.ndarray) -> list[float]:
        return [dice_score(prediction[evaluated] == value, labels[evaluated] == value) for _, value, _ in CLASSES]

    scene = slicer.vtkMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    volume_node = mrml.node_from_volume(volume, scene, "MNI152 T1")
    painting = np.zeros_like(labels)
    painting[painted_slices] = labels[painted_slices]
    segments = [Segment(name, value, color) for name, value, color in CLASSES]
    segmentation = mrml.labels_to_segmentation(painting, segments, volume_node, name="Brain")

    started = time.monotonic()
    filled = fill_between_slices(painting, painted_slices)
    fill_seconds = time.monotonic() - started

    options = FillOptions()  # the effect's defaults
    if args.time_budget:
        options.timeBudgetSeconds = args.time_budget
    logic = HSAMFillLogic()
    cpu_before = children_cpu_seconds()
    try:
        started = time.monotonic()
        painted = logic.start(volume_node, segmentation, options=options)
        logic.wait(until=lambda events: any(e["event"] in ("preview", "failed") for e in events))
        if logic.error:
            raise SystemExit(f"HSAM fill failed: {logic.error}")
        first_seconds = logic.firstPreviewSeconds
        first = logic.previewLabels()
        logic.wait()
        if logic.error or logic.state != fill_logic.DONE:
            raise SystemExit(f"HSAM fill failed: {logic.error or logic.state}")
        final_seconds = time.monotonic() - started
        final = logic.previewLabels()
        kept = bool(np.array_equal(final[painted_slices], painting[painted_slices]))
    finally:
        logic.cleanup()
    worker_cpu = children_cpu_seconds() - cpu_before
    load_after = os.getloadavg()[0]

    rows = []
    for method, prediction, seconds, cpu in (
        ("Fill between slices", filled, fill_seconds, None),
        ("HSAM fill, first preview (the interpolation)", first, first_seconds, None),
        (f"HSAM fill, after the default {options.timeBudgetSeconds:.0f} s budget", final, final_seconds, worker_cpu),
    ):
        scores = dice(prediction)
        rows.append({"method": method, "Grey matter": scores[0], "White matter": scores[1],
                     "mean": float(np.mean(scores)), "seconds from Initialize": seconds,
                     "worker CPU s": "" if cpu is None else f"{cpu:.0f}"})
    text = table(rows, list(rows[0]))
    met = first_seconds <= FIRST_PREVIEW_TARGET_SECONDS and rows[2]["mean"] > rows[0]["mean"]
    notes = (
        f"MNI152 template {labels.shape[::-1]} voxels, grey and white matter painted on {len(painted_slices)} axial "
        f"slices (every {args.every}th labelled one: {painted.summary()}); Dice on the {len(evaluated)} unpainted "
        f"labelled slices. Effect defaults: {options.baseModel} preset, {options.timeBudgetSeconds:.0f} s budget, "
        f"preview every {options.previewIntervalSeconds:.0f} s, device {options.device}. Painted slices kept exactly in "
        f"the final preview: {kept}. 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
        f"(2 cores). First preview within {FIRST_PREVIEW_TARGET_SECONDS:.0f} s and the default budget's preview above "
        f"Fill between slices: {'yes' if met else 'no'}."
    )
    print(text)
    print(notes)
    if args.update_docs:
        command = "python benchmarks/bench_hsam_fill.py " + " ".join(sys.argv[1:])
        update_docs("HSAM fill in the Segment Editor (MNI152, k = 10)", command.strip(), text + "\n\n" + notes + "\n")


if __name__ == "__main__":
    main()
