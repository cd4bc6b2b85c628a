"""Seconds per epoch of continued fine-tuning (``--base-model``) against a fresh run, same slices.

    python benchmarks/bench_continue.py [--epochs 2] [--repeats 5] [--every 30] [--update-docs]

MNI152 demo, tiny preset at 224 px, every ``--every``-th labelled axial slice; the base model is a
fresh run's result. Continued and fresh runs alternate (same seed, slices and epochs) so that a busy
CPU slows both alike; besides the medians, each continued run is compared with the fresh run right
after it (median of those ratios).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_active import demo_data  # noqa: E402
from common import table, update_docs  # noqa: E402


def main() -> None:
    from hsam.guidance.priors import annotated_slices
    from hsam.models.bundle import save_bundle
    from hsam.training.config import FinetuneConfig
    from hsam.training.finetune import finetune
    from hsam.volumes.preprocess import IntensityPreprocessing

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every", type=int, default=30, help="annotate every n-th labelled axial slice")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    volume, labels, segments = demo_data(1)
    slices = annotated_slices(labels, 0)[args.every // 2 :: args.every]

    def run(base):
        config = FinetuneConfig(preset="tiny", img_size=224, epochs=args.epochs, slices=slices, device="cpu",
                                validation=False, base_bundle=base,
                                preprocessing=None if base else IntensityPreprocessing(mode="percentile"))
        return finetune(volume, labels, segments, config)

    def seconds(result) -> list[float]:
        return [h["seconds"] for h in result.history]

    with tempfile.TemporaryDirectory() as folder:
        first = run(None)
        base = save_bundle(Path(folder) / "base.hsam", first.model, first.metadata)
        times = {"continued": [], "fresh": []}
        for _ in range(args.repeats):
            times["continued"].append(seconds(run(base)))
            times["fresh"].append(seconds(run(None)))
    rows = [{"run": name, "epochs": sum(map(len, t)), "mean s/epoch": float(np.mean(np.concatenate(t))),
             "median s/epoch": float(np.median(np.concatenate(t)))} for name, t in times.items()]
    pairs = [np.mean(c) / np.mean(f) for c, f in zip(times["continued"], times["fresh"])]
    text = (table(rows, list(rows[0])) + f"\n\nContinued / fresh, each continued run against the fresh run after it: "
            f"{', '.join(f'{p:.2f}' for p in pairs)}; median {np.median(pairs):.3f}")
    print(text)
    if args.update_docs:
        update_docs("Continued fine-tuning: seconds per epoch", f"python benchmarks/bench_continue.py --epochs {args.epochs} "
                    f"--repeats {args.repeats} --every {args.every} --update-docs",
                    f"Tiny preset, 224 px, {len(slices)} annotated slices of the MNI152 demo, batch 2, runs alternated.\n\n" + text)


if __name__ == "__main__":
    main()
