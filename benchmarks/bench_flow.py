"""Flow propagation: which optical flow, at what cost. Every k-th labelled axial slice is annotated
and carried through the volume (``hsam.guidance.flow.FlowPropagation``) with each flow estimator;
Dice per class on the labelled slices that were not annotated, and the seconds for the whole volume
(flows and carrying, two threads).

    python benchmarks/bench_flow.py [--datasets mni ct] [--every 10] [--ct CT --ct-labels LABELS
                                    --ct-classes classes.json] [--update-docs]

Estimators: OpenCV DIS at its medium preset (finest scale 1), at full resolution, and with this
project's settings (full resolution, patch stride 4, no variational refinement); DIS's fast preset at
full resolution; OpenCV's Farnebäck; SimpleITK's fast symmetric forces demons per slice pair.
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fewshot import MAX_LOAD, annotate_every, ct, mni, quiet_start, scores  # noqa: E402
from common import OtherLoad, table, update_docs  # noqa: E402

import cv2  # noqa: E402
import hsam.guidance.flow as flow  # noqa: E402
from hsam.guidance.priors import annotated_slices  # noqa: E402

DEMONS_ITERATIONS = 30
DEMONS_SMOOTHING = 1.5


def dis(preset: int, finest_scale: int, stride: int = 0, refinement: int = -1) -> Callable:
    def estimate(source: np.ndarray, target: np.ndarray) -> np.ndarray:
        method = cv2.DISOpticalFlow_create(preset)
        method.setFinestScale(finest_scale)
        if stride:
            method.setPatchStride(stride)
        if refinement >= 0:
            method.setVariationalRefinementIterations(refinement)
        return method.calc(source, target, None)
    return estimate


def farneback(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    return cv2.calcOpticalFlowFarneback(source, target, None, 0.5, 4, 15, 3, 5, 1.1, 0)


def demons(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The displacement taking each pixel of ``source`` to ``target`` (the fixed image is ``source``)."""
    fixed, moving = (sitk.GetImageFromArray(a.astype(np.float32)) for a in (source, target))
    registration = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    registration.SetNumberOfIterations(DEMONS_ITERATIONS)
    registration.SetStandardDeviations(DEMONS_SMOOTHING)
    field = registration.Execute(fixed, moving)
    return sitk.GetArrayFromImage(field).astype(np.float32)  # (H, W, 2) as (x, y)


ESTIMATORS = {
    "DIS medium preset (finest scale 1)": dis(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM, 1),
    "DIS medium, full resolution": dis(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM, 0),
    "DIS medium, full resolution, stride 4, no refinement (HSAM)": flow.dis_flow,
    "DIS fast, full resolution": dis(cv2.DISOPTICAL_FLOW_PRESET_FAST, 0),
    "Farnebäck": farneback,
    "SimpleITK demons (fast symmetric forces)": demons,
}


def evaluate(data, every: int, loads: list[float]) -> list[dict]:
    annotated = annotate_every(data.labels, every)
    evaluated = [z for z in annotated_slices(data.labels, 0) if z not in annotated]
    values = [s.label_value for s in data.segments]
    lookup = np.zeros(int(data.labels.max()) + 1, dtype=np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    class_labels = lookup[data.labels]
    images = flow.flow_images(data.volume.array, flow.modality_of(data.volume.array))
    rows = []
    for name, estimator in ESTIMATORS.items():
        flow._CACHE.clear()
        loads.append(quiet_start())
        started = time.monotonic()
        carried = flow.FlowPropagation(images, class_labels, annotated, len(values), estimator).volume()
        seconds = time.monotonic() - started
        predicted = np.concatenate([[0], values]).astype(data.labels.dtype)[carried]
        rows.append({"k": every, "flow": name, **scores(predicted[evaluated], data.labels[evaluated], data.segments),
                     "seconds": f"{seconds:.1f}"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mni", "ct"], choices=("mni", "ct"))
    parser.add_argument("--every", type=int, nargs="+", default=[10])
    parser.add_argument("--ct", type=Path)
    parser.add_argument("--ct-labels", type=Path)
    parser.add_argument("--ct-classes", type=Path)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    loads: list[float] = []
    others = OtherLoad()
    sections = []
    for name in args.datasets:
        data = mni() if name == "mni" else ct(args.ct, args.ct_labels, args.ct_classes)
        rows = [row for every in args.every for row in evaluate(data, every, loads)]
        columns = ["k", "flow", *[s.name for s in data.segments], "mean", "seconds"]
        sections.append(f"**{data.name}** ({' × '.join(map(str, data.volume.array.shape[::-1]))} voxels)\n\n"
                        + table(rows, columns))
    quiet = (f"1-minute load average at the start of each run: {', '.join(f'{l:.2f}' for l in loads)}; other "
             f"processes used {others.cores():.2f} cores on average meanwhile")
    text = "\n\n".join(sections)
    print(text, quiet, sep="\n\n")
    if args.update_docs:
        if max(loads) >= MAX_LOAD:
            raise SystemExit(f"not written: the machine was not quiet ({quiet})")
        update_docs("Flow propagation: optical flow estimators", " ".join(["python benchmarks/bench_flow.py", *sys.argv[1:]]),
                    quiet + f"; OpenCV {cv2.__version__}, {os.cpu_count()} cores. k: every k-th labelled axial "
                    "slice annotated; Dice on the labelled slices that were not annotated; seconds: flows and "
                    "carrying for the whole volume.\n\n" + text)


if __name__ == "__main__":
    main()
