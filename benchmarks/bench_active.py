"""The correction loop, simulated on the MNI152 demo with the reference labels as the annotator.

    python benchmarks/bench_active.py [--seeds 2345 7 11] [--update-docs]
    python benchmarks/bench_active.py --flow-alone [--ct FOLDER ...] [--every 10 20] [--update-docs]

``--flow-alone`` (seconds per setting, no model): where to paint next from flow propagation alone
(``hsam.guidance.gaps``). First round: every k-th labelled axial slice painted (``--every``); then two
rounds, each painting the middle slice of M more gaps between painted slices (M: ``--added``, default
a third of the first round's gaps), chosen

* ``uniform``: the largest gaps, evenly spread among those of one size;
* ``total variation``: the gaps where flow propagation from below and from above disagree most, as
  ½ Σ_k |p_below,k − p_above,k| summed over the gap's slices and pixels;
* ``per class``: the same disagreement per class, each class's divided by its mean area on the painted
  slices, summed over the classes (small structures weigh as much as large ones): the ranking of
  ``hsam suggest`` without a model (``hsam.guidance.gaps.rank_gaps``).

After each round the volume is propagated again from each strategy's painted slices and scored (mean
Dice over the classes, voxels pooled) on the labelled slices no strategy has painted. Volumes: the
MNI152 template (grey and white matter) and each ``--ct`` folder (image.nii.gz, labels.nii.gz,
classes.json: the classes on at least 10 axial slices, as in bench_fewshot.py). The 1-minute load
average is recorded before each volume.

Start: 5 uniformly spaced labelled axial slices annotated, a tiny model trained from scratch
(``--initial-epochs``). Then ``--rounds`` rounds: each strategy adds ``--per-round`` slices, the
model is fine-tuned further from the strategy's previous model (``--base-model``) on all its
annotated slices for ``--epochs`` epochs, and the volume is segmented again. Strategies:

* ``suggest``: ``hsam.inference.suggest.suggest_slices`` on the current model's per-slice uncertainty;
* ``uniform``: each new slice the farthest from every annotated one (filling the largest gaps);
* ``random``: uniformly drawn unannotated labelled slices.

Every strategy gets the same seeds, epochs and round structure, run interleaved so that a busy CPU
slows them alike. Scores: mean Dice (grey and white matter, voxels pooled over slices) on the
labelled slices the strategy has not annotated (``own``), and on the labelled slices no strategy
has annotated in that round and seed (``common``: the same slices for every strategy, which removes
the advantage of having annotated the hardest slices). At round 0 the uncertainty signals are also
compared: Spearman correlation between each slice's score and its error 1 − slice Dice, with the
score the mean over the slice (``hsam.inference.uncertainty.slice_scores``) or over its uncertain region
(labelled voxels and voxels above ``OVERLAY_THRESHOLD``).

The volume is the demo's, every ``--z-step``-th axial slice (default 3: 3 mm slices, a third of the cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, update_docs  # noqa: E402

STRATEGIES = ("suggest", "uniform", "random")
SIGNALS = ("disagreement", "entropy", "combined")
CLASS_VALUES = (1, 2)


def demo_data(z_step: int):
    """(volume, labels, segments) of the MNI152 demo, every ``z_step``-th axial slice."""
    from hsam.demo import CLASSES
    from hsam.evaluation.mni import brain_labels, template_path
    from hsam.volumes.segmentation import Segment
    from hsam.volumes.volume import Volume, read_volume

    t1 = read_volume(template_path("t1"))
    labels = brain_labels(read_volume(template_path("gm")).array, read_volume(template_path("wm")).array)
    spacing = (t1.spacing[0], t1.spacing[1], t1.spacing[2] * z_step)
    volume = Volume(t1.array[::z_step].astype(np.float32), spacing, t1.origin, t1.direction)
    segments = [Segment(name=name, label_value=value, color=colour) for name, value, colour in CLASSES]
    return volume, labels[::z_step].copy(), segments


def dice(prediction: np.ndarray, truth: np.ndarray, slices) -> float:
    """Mean over the classes of Dice on the given axial slices (voxels pooled)."""
    scores = []
    for value in CLASS_VALUES:
        p, t = prediction[slices] == value, truth[slices] == value
        scores.append(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
    return float(np.mean(scores))


def slice_dice(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(z,) mean Dice over the classes of each axial slice (a class absent from both counts 1)."""
    scores = []
    for value in CLASS_VALUES:
        p, t = prediction == value, truth == value
        size = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
        scores.append(np.where(size > 0, 2 * (p & t).sum(axis=(1, 2)) / np.maximum(size, 1), 1.0))
    return np.mean(scores, axis=0)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(x: np.ndarray) -> np.ndarray:
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


class Loop:
    """One seed of the simulation: the data, the labelled range and a folder for the models."""

    def __init__(self, args, seed: int, folder: Path) -> None:
        from hsam.guidance.priors import annotated_slices

        self.args, self.seed, self.folder = args, seed, folder
        self.volume, self.labels, self.segments = demo_data(args.z_step)
        self.labelled = annotated_slices(self.labels, 0)
        self.range = (self.labelled[0], self.labelled[-1])

    def train(self, slices: list[int], base, name: str, epochs: int) -> Path:
        from hsam.models.bundle import save_bundle
        from hsam.training.config import FinetuneConfig
        from hsam.training.finetune import finetune
        from hsam.volumes.preprocess import IntensityPreprocessing

        config = FinetuneConfig(
            preset="tiny", img_size=self.args.img_size, epochs=epochs, slices=sorted(slices), device="cpu",
            seed=self.seed, validation=False, base_bundle=base,
            preprocessing=None if base else IntensityPreprocessing(mode="percentile"),
        )
        result = finetune(self.volume, self.labels, self.segments, config)
        self.epoch_seconds = float(np.mean([h["seconds"] for h in result.history]))
        return save_bundle(self.folder / f"{name}.hsam", result.model, result.metadata, overwrite=True)

    def segment(self, path: Path, signal: str):
        from hsam.inference.segment import segment_volume
        from hsam.models.bundle import load_bundle

        model, metadata = load_bundle(path)
        return segment_volume(model, self.volume, metadata, device="cpu", slice_range=self.range, uncertainty=signal)

    def initial_slices(self) -> list[int]:
        count, labelled = self.args.initial, self.labelled
        return [labelled[int((i + 0.5) * len(labelled) / count)] for i in range(count)]

    def choose(self, strategy: str, scores: np.ndarray, annotated: list[int], round_index: int) -> list[int]:
        from hsam.inference.suggest import suggest_slices, uniform_slices

        count = self.args.per_round
        if strategy == "suggest":
            return suggest_slices(scores, count, annotated)
        eligible = np.zeros(len(self.labels), dtype=bool)
        eligible[self.labelled] = True
        if strategy == "uniform":
            return uniform_slices(eligible, count, annotated)
        rng = np.random.default_rng([self.seed, round_index])
        pool = [z for z in self.labelled if z not in annotated]
        return [int(z) for z in rng.choice(pool, size=count, replace=False)]

    def signal_quality(self, path: Path, annotated: list[int]) -> list[dict]:
        """Spearman (slice score, 1 − slice Dice) of each signal on the unannotated labelled slices."""
        from hsam.inference.uncertainty import OVERLAY_THRESHOLD, slice_scores

        maps = {}
        for signal in ("disagreement", "entropy"):
            result = self.segment(path, signal)
            maps[signal], predicted = result.uncertainty, result.labels
        maps["combined"] = (maps["disagreement"] + maps["entropy"]) / 2
        evaluated = [z for z in self.labelled if z not in annotated]
        error = 1 - slice_dice(predicted[evaluated], self.labels[evaluated])
        rows = []
        for signal in SIGNALS:
            region = (predicted != 0) | (maps[signal] > OVERLAY_THRESHOLD)
            region_mean = np.where(region, maps[signal], 0).sum(axis=(1, 2)) / np.maximum(region.sum(axis=(1, 2)), 1)
            scores = {"region mean": region_mean, "slice mean": slice_scores(maps[signal], 0)}
            for how, score in scores.items():
                rows.append({"seed": self.seed, "signal": signal, "slice score": how,
                             "Spearman": spearman(score[evaluated], error)})
        return rows

    def run(self, strategies, log) -> tuple[list[dict], list[dict]]:
        args = self.args
        annotated0 = self.initial_slices()
        started = time.monotonic()
        model0 = self.train(annotated0, None, "round0", args.initial_epochs)
        quality = self.signal_quality(model0, annotated0)
        for row in quality:
            log(row)
        first = self.segment(model0, args.signal)
        state = {s: (list(annotated0), model0, first) for s in strategies}
        rows = [self.row("start", 0, annotated0, first.labels, None, time.monotonic() - started)]
        log(rows[-1])
        for round_index in range(1, args.rounds + 1):
            predictions = {}
            for strategy in strategies:
                annotated, model, result = state[strategy]
                started = time.monotonic()
                added = self.choose(strategy, result.slice_scores, annotated, round_index)
                annotated = annotated + added
                model = self.train(annotated, model, f"{strategy}{round_index}", args.epochs)
                result = self.segment(model, args.signal)
                state[strategy] = (annotated, model, result)
                predictions[strategy] = result.labels
                rows.append(self.row(strategy, round_index, annotated, result.labels, added, time.monotonic() - started))
            common = [z for z in self.labelled if all(z not in state[s][0] for s in strategies)]
            for row in rows[-len(strategies):]:
                row["Dice common"] = dice(predictions[row["strategy"]], self.labels, common)
                log(row)
        return rows, quality

    def row(self, strategy, round_index, annotated, predicted, added, seconds) -> dict:
        own = [z for z in self.labelled if z not in annotated]
        return {"seed": self.seed, "round": round_index, "strategy": strategy, "annotated": len(annotated),
                "added": sorted(added) if added else sorted(annotated), "Dice own": dice(predicted, self.labels, own),
                "Dice common": dice(predicted, self.labels, own), "epoch s": self.epoch_seconds, "seconds": seconds}


def summary(rows: list[dict], strategies, rounds: int) -> list[dict]:
    out = []
    for round_index in range(1, rounds + 1):
        for strategy in strategies:
            mine = [r for r in rows if r["round"] == round_index and r["strategy"] == strategy]
            out.append({"round": round_index, "annotated": mine[0]["annotated"], "strategy": strategy,
                        "seeds": len(mine),
                        "Dice own": float(np.mean([r["Dice own"] for r in mine])),
                        "Dice own std": float(np.std([r["Dice own"] for r in mine])),
                        "Dice common": float(np.mean([r["Dice common"] for r in mine])),
                        "epoch s": float(np.mean([r["epoch s"] for r in mine]))})
    return out



# --- flow propagation alone ----------------------------------------------------------------------

FLOW_STRATEGIES = ("uniform", "total variation", "per class")


def uniform_gaps(gaps: list, count: int) -> list:
    """The ``count`` largest gaps, evenly spread among the gaps of the smallest size taken."""
    chosen: list = []
    for size in sorted({g.high - g.low for g in gaps}, reverse=True):
        same = sorted((g for g in gaps if g.high - g.low == size), key=lambda g: g.low)
        need = count - len(chosen)
        chosen += same if len(same) <= need else [same[int((i + 0.5) * len(same) / need)] for i in range(need)]
        if len(chosen) == count:
            break
    return chosen


def choose_gaps(strategy: str, gaps: list, count: int) -> list[int]:
    """The slices to paint: the middles of ``count`` of the ``gaps`` (ranked by ``rank_gaps``)."""
    if strategy == "uniform":
        chosen = uniform_gaps(gaps, count)
    elif strategy == "total variation":
        chosen = sorted(gaps, key=lambda g: (-g.disagreement.sum(), g.low))[:count]
    else:
        chosen = gaps[:count]
    return [g.slice for g in chosen]


def propagate_and_rank(image: np.ndarray, labels: np.ndarray, painted: list[int]):
    """(labels propagated from the ``painted`` slices, their gaps ranked), one set of flows for both."""
    from hsam.evaluation.baselines import flow_propagator
    from hsam.guidance.gaps import rank_gaps

    propagation, values = flow_propagator(image, labels, painted)
    gaps = rank_gaps(propagation)
    return np.concatenate([[0], values]).astype(labels.dtype)[propagation.volume()], gaps


def flow_dice(predicted: np.ndarray, labels: np.ndarray, slices: list[int], values: list[int]) -> float:
    from hsam.evaluation.metrics import dice_score

    return float(np.mean([dice_score(predicted[slices] == v, labels[slices] == v) for v in values]))


def flow_alone(name: str, image: np.ndarray, labels: np.ndarray, values: list[int], every: int,
               added: int | None, rounds: int, log) -> list[dict]:
    """Uniform against suggested gaps over ``rounds`` rounds from every ``every``-th labelled slice."""
    from hsam.guidance.priors import annotated_slices

    labelled = annotated_slices(labels, 0)
    first = labelled[every // 2 :: every]
    started = time.monotonic()
    predicted, gaps = propagate_and_rank(image, labels, first)
    count = added or max(1, math.ceil(len(gaps) / 3))
    state = {s: (list(first), gaps) for s in FLOW_STRATEGIES}
    rows = [{"volume": name, "k": every, "round": 0, "painted": len(first), "strategy": "first round",
             "Dice": flow_dice(predicted, labels, [z for z in labelled if z not in first], values)}]
    log(rows[-1])
    for round_index in range(1, rounds + 1):
        results = {}
        for strategy in FLOW_STRATEGIES:
            painted, gaps = state[strategy]
            painted = sorted(painted + choose_gaps(strategy, gaps, count))
            predicted, gaps = propagate_and_rank(image, labels, painted)
            state[strategy] = (painted, gaps)
            results[strategy] = predicted
        common = [z for z in labelled if all(z not in state[s][0] for s in FLOW_STRATEGIES)]
        for strategy in FLOW_STRATEGIES:
            rows.append({"volume": name, "k": every, "round": round_index, "painted": len(state[strategy][0]),
                         "added": count, "strategy": strategy,
                         "Dice": flow_dice(results[strategy], labels, common, values)})
            log(rows[-1])
    rows[0]["seconds"] = time.monotonic() - started
    return rows


def flow_volumes(ct_folders: list[Path]) -> list[tuple[str, np.ndarray, np.ndarray, list[int]]]:
    """(name, image, labels, scored label values) of the MNI152 template and each CT folder."""
    from bench_fewshot import ct, mni

    named = [("MNI152", mni())] + [(f"CT {f.name}", ct(f / "image.nii.gz", f / "labels.nii.gz", f / "classes.json"))
                                   for f in ct_folders]
    return [(f"{name}, {len(d.segments)} classes", d.volume.array, d.labels, [s.label_value for s in d.segments])
            for name, d in named]


def run_flow_alone(args, log) -> None:
    rows = []
    for name, image, labels, values in flow_volumes(args.ct):
        for every in args.every:
            load = os.getloadavg()[0]
            setting = flow_alone(name, image, labels, values, every, args.added, 2, log)
            setting[0]["load"] = load
            rows += setting
    summary = []
    for first in (r for r in rows if r["round"] == 0):
        mine = [r for r in rows if (r["volume"], r["k"]) == (first["volume"], first["k"]) and r["round"] > 0]
        for round_index in sorted({r["round"] for r in mine}):
            row = {"volume": first["volume"], "k": first["k"],
                   "first round": f"{first['painted']} ({first['Dice']:.3f})", "round": round_index,
                   "added": mine[0]["added"] * round_index, "load": f"{first['load']:.2f}",
                   "s": f"{first['seconds']:.0f}"}
            row.update({r["strategy"]: r["Dice"] for r in mine if r["round"] == round_index})
            summary.append(row)
    columns = ["volume", "k", "first round", "round", "added", *FLOW_STRATEGIES, "load", "s"]
    text = (f"{table(summary, columns)}\n\nFirst round: painted slices (mean Dice on the others). Dice: mean over "
            "the classes, voxels pooled over the labelled slices painted by no strategy in that round. load: the "
            "1-minute load average before the volume; s: seconds for the setting (both rounds, every strategy).")
    print(text)
    if args.update_docs:
        command = " ".join(["python benchmarks/bench_active.py", *sys.argv[1:]])
        update_docs("Paint here next: gaps by flow disagreement vs uniform", command, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2345, 7, 11])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--signal", choices=SIGNALS, default="disagreement", help="uncertainty signal of `suggest`")
    parser.add_argument("--initial", type=int, default=5, help="uniformly spaced slices annotated at the start")
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--initial-epochs", type=int, default=30, help="epochs of the first model (from scratch)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each round (from the previous model)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--z-step", type=int, default=3, help="use every n-th axial slice of the template")
    parser.add_argument("--log", type=Path, help="also append every row as a JSON line to this file")
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md")
    parser.add_argument("--flow-alone", action="store_true",
                        help="only compare uniform and suggested gaps with flow propagation alone (no model)")
    parser.add_argument("--ct", type=Path, nargs="*", default=[],
                        help="--flow-alone: CT folders holding image.nii.gz, labels.nii.gz and classes.json")
    parser.add_argument("--every", type=int, nargs="+", default=[10, 20],
                        help="--flow-alone: first round, every k-th labelled axial slice")
    parser.add_argument("--added", type=int, help="--flow-alone: gaps painted per round (default: a third of the gaps)")
    args = parser.parse_args()

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.log is not None:
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    if args.flow_alone:
        run_flow_alone(args, log)
        return
    rows, quality = [], []
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            seed_rows, seed_quality = Loop(args, seed, Path(folder)).run(args.strategies, log)
            rows += seed_rows
            quality += seed_quality
    result = table(summary(rows, args.strategies, args.rounds),
                   ["round", "annotated", "strategy", "seeds", "Dice own", "Dice own std", "Dice common", "epoch s"])
    signals = [{"signal": q["signal"], "slice score": q["slice score"],
                "mean Spearman": float(np.mean([r["Spearman"] for r in quality
                                                if (r["signal"], r["slice score"]) == (q["signal"], q["slice score"])]))}
               for q in quality if q["seed"] == args.seeds[0]]
    start = float(np.mean([r["Dice own"] for r in rows if r["round"] == 0]))
    text = (f"Round 0 (5 slices, shared by every strategy): mean Dice {start:.3f}.\n\n{result}\n\n"
            f"Uncertainty signals at round 0 (Spearman of slice score vs 1 − slice Dice, unannotated labelled "
            f"slices, mean over seeds):\n\n{table(signals, ['signal', 'slice score', 'mean Spearman'])}")
    print(text)
    if args.update_docs:
        command = " ".join(["python benchmarks/bench_active.py", *sys.argv[1:]])
        update_docs("Correction loop: suggested vs uniform vs random slices", command,
                    f"MNI152 demo (every {args.z_step}th axial slice), tiny preset at {args.img_size}px, "
                    f"{args.initial_epochs} epochs from scratch on {args.initial} uniform slices, then per round "
                    f"+{args.per_round} slices and {args.epochs} epochs from the previous model; suggestion signal "
                    f"`{args.signal}`; seeds {' '.join(map(str, args.seeds))}.\n\n" + text)


if __name__ == "__main__":
    main()
