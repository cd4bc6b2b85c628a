"""Few-shot H-SAM against what a 3D Slicer user has today, within one volume.

    python benchmarks/bench_fewshot.py [--datasets mni ct] [--every 5 10 20] [--budgets 60 120 240]
                                       [--ct CT.nii.gz --ct-labels SEG.nii.gz] [--update-docs [--force]]

For every dataset, every k (every k-th labelled axial slice annotated) and every time budget, a guided
H-SAM (``tiny`` preset, ``--guided linear``) is fine-tuned on the annotated slices and segments the
volume twice: guided by the annotated slices, and prompt-free. The baselines are the nearest-slice copy
and the Segment Editor's Fill between slices from the same slices. Dice per class on the labelled
slices that were not annotated. ``--prompt-free-budget`` adds the paper's prompt-free H-SAM (no
guidance in training), the figure guided training must not cost.

Datasets: ``mni`` is the MNI152 2009a template (grey and white matter, from nilearn). ``ct`` is a real
CT given with ``--ct``/``--ct-labels`` (labelmap on its grid; the classes of ``CT_CLASSES``, with
TotalSegmentator's v2 label values, are scored; others count as background; slices without labels
are cut off). The default files are TotalSegmentator's test CT (Apache-2.0), see docs/performance.md.

The 1-minute load average is recorded before and after each training run. With ``--update-docs`` the
tables go into docs/performance.md only when it stayed below ``MAX_LOAD`` throughout (``--force``
writes them marked as loaded).
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, update_docs  # noqa: E402

from hsam.baselines import fill_between_slices, nearest_slice_copy  # noqa: E402
from hsam.demo import CLASSES, brain_labels, template_path  # noqa: E402
from hsam.inference import segment_volume  # noqa: E402
from hsam.io import Segment, Volume, read_labelmap, read_volume  # noqa: E402
from hsam.metrics import dice_score  # noqa: E402
from hsam.preprocess import IntensityPreprocessing  # noqa: E402
from hsam.training import FinetuneConfig, annotated_slices, finetune  # noqa: E402

MAX_LOAD = 1.5
DATA_NOTE = (
    "Data. MNI152 ICBM 2009a template (Fonov et al., NeuroImage 2011; McConnell Brain Imaging Centre; "
    "redistributed in nilearn). CT: TotalSegmentator's test case `tests/reference_files/example_ct.nii.gz` "
    "with `example_seg.nii.gz` (github.com/wasserth/TotalSegmentator, Apache-2.0): a real chest-abdomen CT, "
    "122 × 101 × 112 voxels of 3 mm, whose labels cover its first 30 axial slices and are TotalSegmentator's "
    "own output, not expert contours. With 30 labelled slices, k = 10 annotates 3 slices and k = 20 only one "
    "(skipped: guided mode needs two)."
)
# TotalSegmentator v2 ("total") label values of the scored CT classes: organs, vessels, a vertebra.
CT_CLASSES = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 6: "stomach", 7: "pancreas",
              4: "gallbladder", 20: "colon", 52: "aorta", 63: "inferior_vena_cava",
              64: "portal_vein_and_splenic_vein", 31: "vertebrae_L1"}


@dataclass
class Dataset:
    name: str
    volume: Volume
    labels: np.ndarray
    segments: list
    preprocessing: IntensityPreprocessing


def mni() -> Dataset:
    t1 = read_volume(template_path("t1"))
    labels = brain_labels(read_volume(template_path("gm")).array, read_volume(template_path("wm")).array)
    volume = Volume(t1.array.astype(np.float32), t1.spacing, t1.origin, t1.direction)
    segments = [Segment(name=name, label_value=value, color=colour) for name, value, colour in CLASSES]
    return Dataset("MNI152 2009a (T1)", volume, labels, segments, IntensityPreprocessing(mode="percentile"))


def ct(image_path: Path, labels_path: Path) -> Dataset:
    image = read_volume(image_path)
    raw, _ = read_labelmap(labels_path, reference=image)
    labels = np.where(np.isin(raw, list(CT_CLASSES)), raw, 0).astype(np.uint8)
    labelled = np.flatnonzero(raw.any(axis=(1, 2)))  # the reference covers only these slices
    keep = slice(int(labelled[0]), int(labelled[-1]) + 1)
    origin = image.origin  # cropping along z from slice 0 keeps the origin when labelled[0] == 0
    if labelled[0] != 0:
        raise SystemExit("the CT labels must start at the volume's first slice")
    volume = Volume(image.array[keep].astype(np.float32), image.spacing, origin, image.direction)
    segments = [Segment(name=n, label_value=v, color=(0.5, 0.5, 0.5)) for v, n in CT_CLASSES.items()
                if (labels == v).any()]
    return Dataset(f"CT {image_path.name}", volume, labels[keep], segments, IntensityPreprocessing(mode="ct"))


def scores(prediction: np.ndarray, reference: np.ndarray, segments: list) -> dict:
    row = {s.name: dice_score(prediction == s.label_value, reference == s.label_value) for s in segments}
    row["mean"] = float(np.mean(list(row.values())))
    return row


def annotate_every(labels: np.ndarray, every: int) -> list[int]:
    return annotated_slices(labels, 0)[every // 2 :: every]


def evaluate(data: Dataset, every: int, budgets: list[float], seed: int, loads: list[float]) -> list[dict]:
    annotated = annotate_every(data.labels, every)
    if len(annotated) < 2:
        print(f"{data.name}, k = {every}: {len(annotated)} annotated slice, guided mode needs 2: skipped", flush=True)
        return []
    evaluated = [z for z in annotated_slices(data.labels, 0) if z not in annotated]
    reference = data.labels[evaluated]
    drawn = np.zeros_like(data.labels)
    drawn[annotated] = data.labels[annotated]
    rows = []
    for method, baseline in (("nearest-slice copy", nearest_slice_copy), ("Fill between slices", fill_between_slices)):
        rows.append({"k": every, "method": method, **scores(baseline(data.labels, annotated)[evaluated], reference,
                                                             data.segments)})
    for budget in budgets:
        loads.append(os.getloadavg()[0])
        started = time.monotonic()
        config = FinetuneConfig(preset="tiny", time_budget=budget, preprocessing=data.preprocessing, device="cpu",
                                seed=seed, slices=annotated, guidance="linear")
        result = finetune(data.volume, data.labels, data.segments, config)
        seconds = time.monotonic() - started
        loads.append(os.getloadavg()[0])
        epochs = result.metadata.training["epochs"]
        for mode, annotations in (("guided", drawn), ("prompt-free", None)):
            predicted = segment_volume(result.model, data.volume, result.metadata, device="cpu",
                                       annotations=annotations).labels
            rows.append({"k": every, "method": f"H-SAM {mode}, {budget:.0f} s", **scores(predicted[evaluated], reference,
                                                                                       data.segments),
                         "epochs": epochs, "train s": f"{seconds:.0f}"})
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def prompt_free_recipe(data: Dataset, every: int, budget: float, seed: int, loads: list[float]) -> dict:
    """The paper's prompt-free H-SAM, trained without guidance."""
    annotated = annotate_every(data.labels, every)
    evaluated = [z for z in annotated_slices(data.labels, 0) if z not in annotated]
    loads.append(os.getloadavg()[0])
    config = FinetuneConfig(preset="tiny", time_budget=budget, preprocessing=data.preprocessing, device="cpu",
                            seed=seed, slices=annotated)
    result = finetune(data.volume, data.labels, data.segments, config)
    loads.append(os.getloadavg()[0])
    predicted = segment_volume(result.model, data.volume, result.metadata, device="cpu").labels
    return {"k": every, "method": f"H-SAM prompt-free recipe (no guidance), {budget:.0f} s",
            **scores(predicted[evaluated], data.labels[evaluated], data.segments),
            "epochs": result.metadata.training["epochs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mni", "ct"], choices=("mni", "ct"))
    parser.add_argument("--every", type=int, nargs="+", default=[10, 5, 20], help="annotate every k-th labelled slice")
    parser.add_argument("--budgets", type=float, nargs="+", default=[60.0, 120.0, 240.0], help="seconds of training")
    parser.add_argument("--prompt-free-budget", type=float, default=None,
                        help="also train the prompt-free recipe this long at the first k")
    parser.add_argument("--ct", type=Path, help="CT volume (e.g. TotalSegmentator's tests/reference_files/example_ct.nii.gz)")
    parser.add_argument("--ct-labels", type=Path, help="its labelmap (e.g. example_seg.nii.gz, same folder)")
    parser.add_argument("--seed", type=int, default=2345)
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md")
    parser.add_argument("--force", action="store_true", help="write them even when the machine was loaded")
    args = parser.parse_args()
    if "ct" in args.datasets and (args.ct is None or args.ct_labels is None):
        parser.error("the ct dataset needs --ct and --ct-labels")

    loads: list[float] = [os.getloadavg()[0]]
    sections = []
    for name in args.datasets:
        data = mni() if name == "mni" else ct(args.ct, args.ct_labels)
        rows = [row for every in args.every for row in evaluate(data, every, args.budgets, args.seed, loads)]
        if args.prompt_free_budget:
            rows.append(prompt_free_recipe(data, args.every[0], args.prompt_free_budget, args.seed, loads))
            print(rows[-1], flush=True)
        columns = ["k", "method", *[s.name for s in data.segments], "mean", "epochs", "train s"]
        sections.append((data.name, table(rows, columns)))
    loads.append(os.getloadavg()[0])
    text = "\n\n".join(f"**{name}**\n\n{body}" for name, body in sections)
    print(text, f"1-minute load average: {', '.join(f'{l:.2f}' for l in loads)}", sep="\n\n")
    if not args.update_docs:
        return
    loaded = max(loads) > MAX_LOAD
    if loaded and not args.force:
        raise SystemExit(f"not written: the 1-minute load reached {max(loads):.2f} (> {MAX_LOAD}); rerun alone or --force")
    command = " ".join(["python benchmarks/bench_fewshot.py", *sys.argv[1:]])
    note = (f"**Loaded machine: the 1-minute load reached {max(loads):.2f}; these figures are not evidence.**\n\n"
            if loaded else "")
    update_docs("Few-shot: guided H-SAM against Slicer's baselines", command, (
        note + "1-minute load average before and after each training run: "
        f"{', '.join(f'{l:.2f}' for l in loads)}. k: every k-th labelled axial slice annotated; Dice per class on "
        "the labelled slices that were not annotated.\n\n" + text + "\n\n" + DATA_NOTE))


if __name__ == "__main__":
    main()
