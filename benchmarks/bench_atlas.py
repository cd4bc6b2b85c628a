"""A model trained on some patients segments the next one: atlas priors across patients.

    python benchmarks/bench_atlas.py --cohort DIR --train P1 P2 ... --test P6 P7 ... [--every 10]
                                     [--budget 240] [--update-docs [--force]]

The cohort folder holds one folder per patient with ``image.nii.gz``, ``labels.nii.gz`` and
``classes.json`` ({"classes": {name: label value}}, the same in every patient). Every ``--every``-th
labelled axial slice of each training patient is annotated. A guided H-SAM (``tiny``, the flow prior,
``--atlas``) is fine-tuned on those slices for ``--budget`` seconds of training (atlas completion and
the leave-one-patient-out registrations come before and are timed apart). Each test patient, never
painted, is segmented by:

* the fair baseline: the training volumes, completed from the same annotated slices, registered
  affinely and fused by majority vote;
* the atlas prior alone: the same volumes registered affinely then deformably, soft vote;
* H-SAM guided by the atlas prior, each class from the source chosen in training (the product);
* H-SAM guided by the atlas prior everywhere; H-SAM prompt-free.

3D Dice per class on the whole test volume; seconds per test patient (all atlases registered). The 1-minute load average is recorded before training
(which waits for it to fall below ``MAX_LOAD``) and the CPU other processes used (``common.OtherLoad``).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "HSAMSegment"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fewshot import MAX_LOAD, MAX_OTHER_CORES, annotate_every, quiet_start  # noqa: E402
from common import OtherLoad, table, update_docs  # noqa: E402
from hsam.evaluation.metrics import dice_score  # noqa: E402
from hsam.guidance import atlas as atlases_module  # noqa: E402
from hsam.guidance.kinds import DEFAULT_PRIOR  # noqa: E402
from hsam.inference.segment import segment_volume  # noqa: E402
from hsam.runtime.errors import InputError  # noqa: E402
from hsam.training.config import FinetuneConfig, TrainingCase  # noqa: E402
from hsam.training.finetune import finetune_cohort  # noqa: E402
from hsam.volumes.preprocess import IntensityPreprocessing  # noqa: E402
from hsam.volumes.segmentation import Segment, read_labelmap  # noqa: E402
from hsam.volumes.volume import read_volume  # noqa: E402


def load_patient(folder: Path):
    volume = read_volume(folder / "image.nii.gz")
    labels, _ = read_labelmap(folder / "labels.nii.gz", reference=volume)
    classes = json.loads((folder / "classes.json").read_text())["classes"]
    segments = [Segment(name=n, label_value=int(v), color=(0.5, 0.5, 0.5)) for n, v in classes.items()]
    return volume, labels, segments


def scores(prediction: np.ndarray, reference: np.ndarray, segments: list) -> dict:
    row = {s.name: dice_score(prediction == s.label_value, reference == s.label_value) for s in segments}
    row["mean"] = float(np.mean(list(row.values())))
    return row


def affine_majority_vote(volume, atlases, num_classes: int) -> np.ndarray:
    """(z, y, x) class indices: each atlas registered affinely, its labels carried, the most frequent class."""
    full = volume.to_sitk(atlases_module.registration_intensities(volume.array))
    target = sitk.Resample(full, atlases_module.coarse_grid(full), sitk.Transform(), sitk.sitkLinear, 0.0,
                           sitk.sitkUInt8)
    votes = 0
    for atlas in atlases:
        carried = atlases_module.carried_probabilities(atlas, target, atlases_module.register(target, atlas, "affine"),
                                                       num_classes)
        votes = votes + np.eye(num_classes + 1, dtype=np.float32)[carried.argmax(0)].transpose(3, 0, 1, 2)
    prior = atlases_module.AtlasPrior(votes / len(atlases), target.GetSpacing(), volume.array.shape, volume.spacing, 0)
    return np.stack([prior.class_indices(i) for i in range(volume.array.shape[0])])


def atlas_alone(volume, atlases, num_classes: int) -> np.ndarray:
    prior = atlases_module.atlas_prior(volume, atlases, num_classes, 0)
    return np.stack([prior.class_indices(i) for i in range(volume.array.shape[0])])


def as_values(indices: np.ndarray, segments: list) -> np.ndarray:
    return np.array([0, *(s.label_value for s in segments)], dtype=np.uint16)[indices]


def train(cohort: Path, names: list[str], every: int, budget: float, seed: int):
    cases = []
    for name in names:
        volume, labels, segments = load_patient(cohort / name)
        annotated = annotate_every(labels, every)
        drawn = np.zeros_like(labels)
        drawn[annotated] = labels[annotated]
        cases.append(TrainingCase(volume.__class__(volume.array.astype(np.float32), volume.spacing, volume.origin,
                                                   volume.direction), drawn, segments, annotated, name))
    config = FinetuneConfig(preset="tiny", time_budget=budget, preprocessing=IntensityPreprocessing(mode="percentile"),
                            device="cpu", seed=seed, guidance=DEFAULT_PRIOR, atlas=True)
    return finetune_cohort(cases, config)


def evaluate(result, cohort: Path, names: list[str]) -> list[dict]:
    rows = []
    metadata, k = result.metadata, result.metadata.num_classes
    choice = metadata.guidance["atlas"]["choice"]
    for name in names:
        volume, labels, segments = load_patient(cohort / name)
        volume = volume.__class__(volume.array.astype(np.float32), volume.spacing, volume.origin, volume.direction)
        methods, seconds = {}, {}
        for method, fuse in (("affine atlas, majority vote (baseline)", affine_majority_vote),
                             ("atlas prior alone (deformable)", atlas_alone)):
            started = time.monotonic()
            methods[method] = as_values(fuse(volume, result.atlases, k), segments)
            seconds[method] = f"{time.monotonic() - started:.0f}"
        for mode, atlases, kept in (("H-SAM + atlas prior, chosen per class", result.atlases, choice),
                                    ("H-SAM + atlas prior, guided everywhere", result.atlases, ["guided"] * k),
                                    ("H-SAM prompt-free", [], None)):
            metadata.guidance["atlas"]["choice"] = kept
            started = time.monotonic()
            try:
                segmented = segment_volume(result.model, volume, metadata, device="cpu", atlases=atlases)
                methods[mode], notes = segmented.labels, segmented.notes
            except InputError as e:
                methods[mode], notes = np.zeros_like(labels), [str(e)]
            seconds[mode] = f"{time.monotonic() - started:.0f}"
            if notes:
                print(f"{name}, {mode}: {notes}", flush=True)
        metadata.guidance["atlas"]["choice"] = choice
        for method, predicted in methods.items():
            rows.append({"patient": name, "method": method, **scores(predicted, labels, segments), "s": seconds[method]})
            print(rows[-1], flush=True)
    return rows


def mean_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return [{"patient": "mean", "method": m, **{c: float(np.mean([r[c] for r in rows if r["method"] == m]))
                                               for c in columns}} for m in methods]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--train", nargs="+", required=True)
    parser.add_argument("--test", nargs="+", required=True)
    parser.add_argument("--every", type=int, default=10, help="annotate every k-th labelled axial slice")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds of training")
    parser.add_argument("--seed", type=int, default=2345)
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--force", action="store_true", help="write the tables even when the machine was loaded")
    args = parser.parse_args()

    load = quiet_start()
    others = OtherLoad()
    started = time.monotonic()
    result = train(args.cohort, args.train, args.every, args.budget, args.seed)
    training = result.metadata.training
    print(f"trained: {time.monotonic() - started:.0f} s in all, {training['seconds']} s of training, "
          f"{training['epochs']} epochs; atlas choice {result.metadata.guidance['atlas']}", flush=True)
    rows = evaluate(result, args.cohort, args.test)
    classes = [s for s in rows[0] if s not in ("patient", "method", "s")]
    rows += mean_rows(rows, classes)
    other_cores = others.cores()
    quiet = load < MAX_LOAD and other_cores < MAX_OTHER_CORES
    body = (f"Train {', '.join(args.train)}; test {', '.join(args.test)}; every {args.every}th labelled slice of the "
            f"training patients annotated; {training['epochs']} epochs in {training['seconds']} s of training, "
            f"{time.monotonic() - started:.0f} s for everything. Load at start {load:.2f}, other processes "
            f"{other_cores:.2f} cores{'' if quiet else ' (LOADED: not a valid figure)'}. Kept per class with the atlas "
            f"prior: {', '.join(f'{n}: {c}' for n, c in zip(result.metadata.class_names, result.metadata.guidance['atlas']['choice']))}.\n\n"
            + table(rows, ["patient", "method", *classes, "s"]))
    print(body)
    if args.update_docs and (quiet or args.force):
        command = "python benchmarks/bench_atlas.py " + " ".join(sys.argv[1:])
        update_docs(f"Across patients: atlas prior, {args.cohort.name}", command, body)


if __name__ == "__main__":
    main()
