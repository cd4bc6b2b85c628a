"""Few-shot H-SAM against what a 3D Slicer user has today, within one volume.

    python benchmarks/bench_fewshot.py [--datasets mni ct] [--every 5 10 20] [--budgets 60 120 240]
                                       [--ct CT.nii.gz --ct-labels SEG.nii.gz [--ct-classes classes.json]]
                                       [--update-docs [--force]]

For every dataset, every k (every k-th labelled axial slice annotated) and every time budget, a guided
H-SAM (``tiny`` preset, ``--guided``: the flow prior) is fine-tuned on the annotated slices and
segments the volume three ways: as the product does (guided, each class from the source chosen in
training), guided with the model everywhere, and prompt-free. The baselines are flow propagation
(``hsam propagate``), the nearest-slice copy and the Segment Editor's Fill between slices from the
same slices. Dice per class on the labelled slices that were not annotated. ``--prompt-free-budget``
adds the paper's prompt-free H-SAM (no guidance in training).

Datasets: ``mni`` is the MNI152 2009a template (grey and white matter, from nilearn). ``ct`` is a real
CT given with ``--ct``/``--ct-labels`` (labelmap on its grid). Scored: the classes of ``--ct-classes``
(a JSON file {"classes": {name: label value}}) present on at least ``MIN_CT_SLICES`` axial slices,
or without it the classes of ``CT_CLASSES`` (TotalSegmentator's v2 label values); other labels count as
background. docs/performance.md names the files measured.

The 1-minute load average is recorded before each training run, which waits (up to ``LOAD_WAIT``
seconds) for it to fall below ``MAX_LOAD``; the CPU that other processes used during the whole run is
recorded too (``common.OtherLoad``). With ``--update-docs`` the tables go into docs/performance.md
only when every start was below ``MAX_LOAD`` and the others used under ``MAX_OTHER_CORES`` (``--force``
writes them marked as loaded).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OtherLoad, table, update_docs  # noqa: E402

from hsam.demo import CLASSES  # noqa: E402
from hsam.evaluation.baselines import flow_propagation, nearest_slice_copy  # noqa: E402
from hsam.evaluation.metrics import dice_score  # noqa: E402
from hsam.evaluation.mni import brain_labels, template_path  # noqa: E402
from hsam.guidance.fill import fill_between_slices  # noqa: E402
from hsam.guidance.kinds import DEFAULT_PRIOR  # noqa: E402
from hsam.guidance.priors import annotated_slices  # noqa: E402
from hsam.inference.segment import segment_volume  # noqa: E402
from hsam.training.config import FinetuneConfig  # noqa: E402
from hsam.training.finetune import finetune  # noqa: E402
from hsam.volumes.preprocess import IntensityPreprocessing  # noqa: E402
from hsam.volumes.segmentation import Segment, read_labelmap  # noqa: E402
from hsam.volumes.volume import Volume, read_volume  # noqa: E402

MAX_LOAD = 1.5
LOAD_WAIT = 300.0
MAX_OTHER_CORES = 0.25
MIN_CT_SLICES = 10
DATA_NOTE = (
    "Data. MNI152 ICBM 2009a template (Fonov et al., NeuroImage 2011; McConnell Brain Imaging Centre; "
    "redistributed in nilearn). CT: 3D-IRCADb-01 (IRCAD, Strasbourg; CC BY-NC-ND 4.0, used in place, never "
    "committed), patient 1: 512 × 512 × 129 voxels of 0.57 × 0.57 × 1.6 mm, expert masks of bone, lungs, liver, "
    "spleen, kidneys, liver tumours, venous system, portal vein and artery on every slice (the masks merged "
    "into one labelmap, vessels and tumours over the liver; the liver cyst, on 3 slices, left out), read from the "
    "DICOM slices of the public GitHub repository qk1512/IPCV_1 (commit 455c4b6)."
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


def ct(image_path: Path, labels_path: Path, classes_path: Optional[Path] = None) -> Dataset:
    image = read_volume(image_path)
    raw, _ = read_labelmap(labels_path, reference=image)
    classes = ({int(v): n for n, v in json.loads(classes_path.read_text())["classes"].items()} if classes_path
               else CT_CLASSES)
    classes = {v: n for v, n in classes.items() if np.count_nonzero((raw == v).any(axis=(1, 2))) >= MIN_CT_SLICES}
    labels = np.where(np.isin(raw, list(classes)), raw, 0).astype(np.uint8)
    labelled = np.flatnonzero(raw.any(axis=(1, 2)))  # the reference covers only these slices
    keep = slice(0, int(labelled[-1]) + 1)  # cropped from the end only: the origin stays
    volume = Volume(image.array[keep].astype(np.float32), image.spacing, image.origin, image.direction)
    segments = [Segment(name=n, label_value=v, color=(0.5, 0.5, 0.5)) for v, n in classes.items()]
    return Dataset(f"CT {image_path.name}", volume, labels[keep], segments, IntensityPreprocessing(mode="ct"))


def quiet_start() -> float:
    """The 1-minute load average once it is below ``MAX_LOAD``, or after ``LOAD_WAIT`` seconds."""
    waited = 0.0
    while os.getloadavg()[0] >= MAX_LOAD and waited < LOAD_WAIT:
        time.sleep(10.0)
        waited += 10.0
    return os.getloadavg()[0]


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
    started = time.monotonic()
    flow = flow_propagation(data.volume.array, data.labels, annotated)
    flow_seconds = time.monotonic() - started
    rows.append({"k": every, "method": "flow propagation", **scores(flow[evaluated], reference, data.segments),
                 "train s": f"{flow_seconds:.1f}"})
    for method, baseline in (("nearest-slice copy", nearest_slice_copy), ("Fill between slices", fill_between_slices)):
        rows.append({"k": every, "method": method, **scores(baseline(data.labels, annotated)[evaluated], reference,
                                                             data.segments)})
    print(*rows, sep="\n", flush=True)
    for budget in budgets:
        loads.append(quiet_start())
        started = time.monotonic()
        config = FinetuneConfig(preset="tiny", time_budget=budget, preprocessing=data.preprocessing, device="cpu",
                                seed=seed, slices=annotated, guidance=DEFAULT_PRIOR)
        result = finetune(data.volume, data.labels, data.segments, config)
        seconds = time.monotonic() - started
        epochs = result.metadata.training["epochs"]
        choice = result.metadata.guidance.get("choice")
        print(f"k = {every}, {budget:.0f} s: kept {choice}", flush=True)
        for mode, annotations, kept in (("guided, chosen per class", drawn, choice), ("guided", drawn, None),
                                        ("prompt-free", None, None)):
            result.metadata.guidance["choice"] = kept
            predicted = segment_volume(result.model, data.volume, result.metadata, device="cpu",
                                       annotations=annotations).labels
            rows.append({"k": every, "method": f"H-SAM {mode}, {budget:.0f} s", **scores(predicted[evaluated], reference,
                                                                                       data.segments),
                         "epochs": epochs, "train s": f"{seconds:.0f}"})
            print(rows[-1], flush=True)
        result.metadata.guidance["choice"] = choice
    return rows


def prompt_free_recipe(data: Dataset, every: int, budget: float, seed: int, loads: list[float]) -> dict:
    """The paper's prompt-free H-SAM, trained without guidance."""
    annotated = annotate_every(data.labels, every)
    evaluated = [z for z in annotated_slices(data.labels, 0) if z not in annotated]
    loads.append(quiet_start())
    config = FinetuneConfig(preset="tiny", time_budget=budget, preprocessing=data.preprocessing, device="cpu",
                            seed=seed, slices=annotated)
    result = finetune(data.volume, data.labels, data.segments, config)
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
    parser.add_argument("--ct-classes", type=Path, help='{"classes": {name: label value}} of the CT labels to score')
    parser.add_argument("--seed", type=int, default=2345)
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md")
    parser.add_argument("--force", action="store_true", help="write them even when the machine was loaded")
    args = parser.parse_args()
    if "ct" in args.datasets and (args.ct is None or args.ct_labels is None):
        parser.error("the ct dataset needs --ct and --ct-labels")

    loads: list[float] = [quiet_start()]
    others = OtherLoad()
    sections = []
    for name in args.datasets:
        data = mni() if name == "mni" else ct(args.ct, args.ct_labels, args.ct_classes)
        rows = [row for every in args.every for row in evaluate(data, every, args.budgets, args.seed, loads)]
        if args.prompt_free_budget:
            rows.append(prompt_free_recipe(data, args.every[0], args.prompt_free_budget, args.seed, loads))
            print(rows[-1], flush=True)
        columns = ["k", "method", *[s.name for s in data.segments], "mean", "epochs", "train s"]
        sections.append((data.name, table(rows, columns)))
    other_cores = others.cores()
    text = "\n\n".join(f"**{name}**\n\n{body}" for name, body in sections)
    quiet = (f"1-minute load average at the start of each run: {', '.join(f'{l:.2f}' for l in loads)}; other "
             f"processes used {other_cores:.2f} cores on average meanwhile")
    print(text, quiet, sep="\n\n")
    if not args.update_docs:
        return
    loaded = max(loads) >= MAX_LOAD or other_cores >= MAX_OTHER_CORES
    if loaded and not args.force:
        raise SystemExit(f"not written: the machine was not quiet ({quiet}); rerun alone or --force")
    command = " ".join(["python benchmarks/bench_fewshot.py", *sys.argv[1:]])
    note = "**Loaded machine: these figures are not evidence.**\n\n" if loaded else ""
    grid = f"{', '.join(args.datasets)}; k = {', '.join(map(str, args.every))}; {', '.join(f'{b:.0f}' for b in args.budgets)} s"
    update_docs(f"Few-shot: guided H-SAM against Slicer's baselines ({grid})", command, (
        note + quiet + ". k: every k-th labelled axial slice annotated; Dice per class on "
        "the labelled slices that were not annotated.\n\n" + text + "\n\n" + DATA_NOTE))


if __name__ == "__main__":
    main()
