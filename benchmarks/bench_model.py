"""Time the H-SAM network: forward per slice (batch 1 and 4), one training step (batch 2), peak memory.

    python benchmarks/bench_model.py [--preset vit_b] [--img-size 512] [--json out.json] [--update-docs]

Each configuration runs in its own process so that its peak memory is its own. CPU: fp32 and (where oneDNN
has bf16 kernels for the CPU) bf16 autocast at batch 1 and 4; CUDA (when present): fp32, fp16, bf16 at batch 1, 8 and 32. Weights are random: speed does not depend on them.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, bf16_available, peak_rss_gib, run_isolated, table, update_docs  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(preset: str, img_size: int, device: str, precision: str, mode: str, batch: int, checkpointing: bool) -> dict:
    from hsam.models.build import build_hsam
    from hsam.training.loss import HSAMLoss

    torch.manual_seed(0)
    model = build_hsam(preset, num_classes=8, img_size=img_size).to(device)
    dtype = DTYPES[precision]
    autocast = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
    images = torch.rand(batch, 3, img_size, img_size, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode == "forward":
        model.eval().merge_lora()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(images)

        seconds = best_of(step, repeats=3, device=device) / batch
    else:
        model.train()
        model.image_encoder.gradient_checkpointing = checkpointing
        labels = torch.randint(0, 9, (batch, img_size, img_size), device=device)
        loss_fn = HSAMLoss()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)

        def step() -> None:
            with autocast:
                loss, _ = loss_fn(model(images, labels), labels, epoch=0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = best_of(step, repeats=2, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else peak_rss_gib()
    return {
        "preset": preset, "img_size": img_size, "device": device, "precision": precision, "mode": mode,
        "batch": batch, "checkpointing": checkpointing, "seconds": seconds, "peak_gib": peak,
    }


def configurations(args: argparse.Namespace) -> list[list[str]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = []
    for device in devices:
        cpu_precisions = ["fp32", "bf16"] if bf16_available() else ["fp32"]
        precisions = ["fp32", "fp16", "bf16"] if device == "cuda" else cpu_precisions
        batches = (1, 4) if device == "cpu" else (1, 8, 32)
        for precision in precisions:
            for batch in batches:
                runs.append([device, precision, "forward", str(batch), "0"])
            for checkpointing in ("0", "1"):
                runs.append([device, precision, "train", "2", checkpointing])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_b")
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    parser.add_argument("--one", nargs=5, metavar=("DEVICE", "PRECISION", "MODE", "BATCH", "CHECKPOINTING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        device, precision, mode, batch, ckpt = args.one
        print(json.dumps(measure(args.preset, args.img_size, device, precision, mode, int(batch), ckpt == "1")))
        return

    rows = []
    for config in configurations(args):
        row = run_isolated(Path(__file__), ["--preset", args.preset, "--img-size", str(args.img_size), "--one", *config])
        row["s/slice or s/step"] = row.pop("seconds")
        row["slices/s"] = 1 / row["s/slice or s/step"] if row["mode"] == "forward" else ""
        rows.append(row)
        print(f"{config}: {row['s/slice or s/step']:.3f} s, peak {row['peak_gib']:.2f} GiB", flush=True)
    columns = ["device", "precision", "mode", "batch", "checkpointing", "s/slice or s/step", "slices/s", "peak_gib"]
    text = table(rows, columns)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.update_docs:
        command = f"python benchmarks/bench_model.py --preset {args.preset} --img-size {args.img_size} --update-docs"
        update_docs(f"Model: {args.preset} at {args.img_size}", command,
                    "Forward rows are seconds per slice (LoRA merged, inference mode); train rows are seconds per "
                    "optimiser step (forward, both stage losses, backward, AdamW).\n\n" + text)


if __name__ == "__main__":
    main()
