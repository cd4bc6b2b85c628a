"""CMAttn as the authors' code computes it ("reference") against the paper's ("paper") on the demo.

    python benchmarks/bench_cmattn.py [--epochs 150] [--seeds 2345 7] [--update-docs]

Each run is the `hsam demo` job (MNI152 template, grey/white matter, every 10th labelled axial slice
annotated, tiny preset) with the same seed and epoch count for both modes; the figures are Dice and
HD95 on the labelled slices that were not annotated, and the ratio paper / reference.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, update_docs  # noqa: E402

MODES = ("reference", "paper")


def run(mode: str, seed: int, epochs: int, img_size: int) -> dict[str, tuple[float, float]]:
    """{class name: (Dice, HD95 mm)} of H-SAM on the demo's held-out slices."""
    from hsam.demo import run_demo

    with tempfile.TemporaryDirectory() as out:
        result = run_demo(out, epochs=epochs, img_size=img_size, device="cpu", cmattn=mode, seed=seed)
    return {r["class"]: (r["dice"], r["hd95_mm"]) for r in result.scores if r["method"].startswith("H-SAM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2345, 7])
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        scores = {mode: run(mode, seed, args.epochs, args.img_size) for mode in MODES}
        for name in scores["reference"]:
            row = {"seed": seed, "class": name}
            for mode in MODES:
                row[f"Dice {mode}"], row[f"HD95 mm {mode}"] = scores[mode][name]
            row["Dice paper/reference"] = row["Dice paper"] / row["Dice reference"]
            rows.append(row)
            print(row, flush=True)
    for mode in MODES:
        print(f"mean Dice {mode}: {np.mean([r[f'Dice {mode}'] for r in rows]):.4f}")
    columns = ["seed", "class", "Dice reference", "Dice paper", "Dice paper/reference", "HD95 mm reference",
               "HD95 mm paper"]
    text = table(rows, columns)
    print(text)
    if args.update_docs:
        means = ", ".join(f"{mode} {np.mean([r[f'Dice {mode}'] for r in rows]):.4f}" for mode in MODES)
        command = (f"python benchmarks/bench_cmattn.py --epochs {args.epochs} --img-size {args.img_size} "
                   f"--seeds {' '.join(map(str, args.seeds))} --update-docs")
        update_docs("CMAttn: reference vs paper on the demo", command,
                    f"Tiny preset, {args.epochs} epochs, {args.img_size}px, Dice/HD95 on the held-out labelled "
                    f"slices of the MNI152 demo. Mean Dice: {means}.\n\n" + text)


if __name__ == "__main__":
    main()
