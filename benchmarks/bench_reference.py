"""Our H-SAM against the authors' code: time per slice, training step, peak memory, output agreement.

    python benchmarks/bench_reference.py --reference /path/to/H-SAM [--preset vit_b] [--img-size 512] [--update-docs]
    python benchmarks/bench_reference.py              # ours alone

``--reference`` is a checkout of github.com/Cccccczh404/H-SAM (read there, never copied here). Peak
memory is measured with each configuration alone in its own process; times with ours and the
reference taking turns in one process (best of ``--repeats`` each, so that the ratio is not skewed by
the machine's load drifting between runs); the ratio is ours / the reference's. The agreement check builds the reference with random weights
(LoRA B non-zero), converts its ``state_dict()`` with ``hsam.from_reference_state_dict`` and runs both
on axial slices of a real volume (the MNI152 template that ships in nilearn): relative error of the
logits in float32; then, with our decoders fitted to grey/white matter for a few steps (random logits
have margins no trained model has), the share of pixels whose argmax label bf16 autocast keeps.
"""

import argparse
import contextlib
import importlib
import json
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, bf16_available, peak_rss_gib, run_isolated, table, update_docs  # noqa: E402

from hsam.runtime.cpu import cpu_capability  # noqa: E402

NUM_CLASSES = 8
AGREEMENT_SLICES = 6


def load_reference(reference_dir: str, vit: str, img_size: int) -> torch.nn.Module:
    """The authors' LoRA_Sam (rank 5) as their test.py builds it, random weights, LoRA B non-zero."""
    for name in ("icecream", "cv2"):  # imported by their files, unused by the model
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.ic = lambda *args, **kwargs: None
            sys.modules[name] = stub
    # Their repository has its own `segment_anything` package: hide the installed one meanwhile.
    def is_segment_anything(key: str) -> bool:
        return key == "segment_anything" or key.startswith("segment_anything.")

    installed = {k: sys.modules.pop(k) for k in [k for k in sys.modules if is_segment_anything(k)]}
    sys.path.insert(0, reference_dir)
    try:
        from sam_lora_image_encoder import LoRA_Sam
        from segment_anything import sam_model_registry
    finally:
        sys.path.remove(reference_dir)
        for key in [k for k in sys.modules if is_segment_anything(k)]:
            del sys.modules[key]
        sys.modules.update(installed)
    if not torch.cuda.is_available():  # their training forward moves its noise with .cuda()
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
    torch.manual_seed(0)
    sam, _ = sam_model_registry[vit](image_size=img_size, num_classes=NUM_CLASSES, pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1])
    model = LoRA_Sam(sam, 5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".linear_b_" in name:
                parameter.normal_(0.0, 0.02)
    return model


def reference_forward(model: torch.nn.Module, images: torch.Tensor, low_res_labels: Optional[torch.Tensor] = None):
    """The reference's stage-1 / stage-2 outputs as our ``HSAMOutput`` (masks = their ``--stage 3``)."""
    from hsam.modeling.hsam import HSAMOutput

    mode = "train" if low_res_labels is not None else "test"
    out1, out2, _, _ = model(images, True, images.shape[-1], gt=low_res_labels, mode=mode)
    return HSAMOutput(out1["low_res_logits"], out2["masks"], (out1["masks"] + out2["masks"]) / 2)


def build(which: str, args: argparse.Namespace) -> torch.nn.Module:
    if which == "reference":
        return load_reference(args.reference, args.preset, args.img_size)
    from hsam.models.build import build_hsam

    torch.manual_seed(0)
    return build_hsam(args.preset, num_classes=NUM_CLASSES, img_size=args.img_size)


def make_step(which: str, mode: str, precision: str, batch: int, args: argparse.Namespace) -> Callable[[], None]:
    """One forward pass (inference mode, LoRA merged for ours) or one optimiser step of ``which``."""
    from hsam.training.loss import HSAMLoss

    model = build(which, args)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    images = torch.rand(batch, 3, args.img_size, args.img_size)
    if mode == "forward":
        model.eval()
        if which == "ours":
            model.merge_lora()

        def forward() -> None:
            with torch.inference_mode(), autocast:
                model(images) if which == "ours" else reference_forward(model, images)

        return forward

    model.train()
    if which == "ours":
        model.image_encoder.gradient_checkpointing = args.checkpointing
    labels = torch.randint(0, NUM_CLASSES + 1, (batch, args.img_size, args.img_size))
    low_res = labels[:, ::4, ::4].contiguous()
    loss_fn = HSAMLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)

    def train_step() -> None:
        with autocast:
            output = model(images, labels) if which == "ours" else reference_forward(model, images, low_res)
            loss, _ = loss_fn(output, labels, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def per_unit(seconds: float, mode: str, batch: int) -> float:
    """Seconds per slice for forward passes, per optimiser step for training."""
    return seconds / batch if mode == "forward" else seconds


def measure(which: str, mode: str, precision: str, batch: int, args: argparse.Namespace) -> dict:
    """Time and peak RSS of one configuration alone in this process."""
    step = make_step(which, mode, precision, batch, args)
    seconds = best_of(step, repeats=args.repeats)
    return {"seconds": per_unit(seconds, mode, batch), "peak_gib": peak_rss_gib()}


def paired(mode: str, precision: str, batch: int, args: argparse.Namespace) -> dict:
    """Ours (at ``precision``) and the reference (float32) timed in turns in one process, so that the
    ratio is not skewed by the machine's load drifting between runs; the best of each is kept."""
    steps = {"ours": make_step("ours", mode, precision, batch, args),
             "reference": make_step("reference", mode, "fp32", batch, args)}
    best = {which: best_of(step, repeats=1) for which, step in steps.items()}  # includes one warm-up call
    for _ in range(args.repeats - 1):
        for which, step in steps.items():
            best[which] = min(best[which], best_of(step, repeats=1, warmup=0))
    return {which: per_unit(seconds, mode, batch) for which, seconds in best.items()}


def real_slices(img_size: int, fractions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slices through the MNI152 brain at ``fractions`` of its height: ((N, 3, S, S) percentile-
    normalised images, (N, S, S) labels 0 background, 1 grey matter, 2 white matter)."""
    from hsam.evaluation.mni import brain_labels, template_path
    from hsam.volumes.preprocess import IntensityPreprocessing, resize_slices, slices_to_model_input
    from hsam.volumes.volume import read_volume

    image = IntensityPreprocessing(mode="percentile").apply(read_volume(template_path("t1")).array)
    labels = brain_labels(read_volume(template_path("gm")).array, read_volume(template_path("wm")).array)
    indices = [int(f * (image.shape[0] - 1)) for f in fractions]
    images = slices_to_model_input(torch.from_numpy(image[indices]), img_size).contiguous()
    targets = resize_slices(torch.from_numpy(labels[indices]).float(), img_size).round().long()
    return images, targets


def fit_decoders(model: torch.nn.Module, steps: int) -> None:
    """Train the prompt encoder and both decoding stages (encoder frozen) to grey/white matter, so that
    the logits have the margins of a trained model rather than of random weights."""
    from hsam.training.loss import HSAMLoss

    images, labels = real_slices(model.img_size, np.linspace(0.25, 0.75, 4))
    with torch.no_grad():
        embeddings = model.image_encoder(images)
    decoders = [model.prompt_encoder, model.mask_decoder, model.hierarchical_decoder]
    optimizer = torch.optim.AdamW([p for d in decoders for p in d.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = HSAMLoss()
    model.train()
    for step in range(steps):
        batch = [step % len(images), (step + 1) % len(images)]
        loss, _ = loss_fn(model.decode(embeddings[batch], labels[batch]), labels[batch], epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def agreement(args: argparse.Namespace) -> dict:
    """Float32 relative error of our logits against the reference's (same random weights), and the
    share of pixels with the same argmax under bf16 autocast once the decoders are fitted."""
    from hsam.models.checkpoint import from_reference_state_dict

    reference = load_reference(args.reference, args.preset, args.img_size).eval()
    ours = from_reference_state_dict(reference.state_dict(), args.preset, NUM_CLASSES, args.img_size).eval()
    ours.merge_lora()
    images, _ = real_slices(args.img_size, np.linspace(0.3, 0.7, AGREEMENT_SLICES))
    errors = []
    for image in images.split(1):
        with torch.inference_mode():
            expected, actual = reference_forward(reference, image).masks, ours(image).masks
        errors.append(((actual - expected).abs().max() / expected.abs().max()).item())

    if not bf16_available():
        return {"relative_error_fp32": max(errors)}
    fit_decoders(ours, args.fit_steps)
    same = total = 0
    for image in images.split(1):
        with torch.inference_mode():
            expected = ours(image).masks
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low_precision = ours(image).masks.float()
        same += int((low_precision.argmax(1) == expected.argmax(1)).sum())
        total += expected[:, 0].numel()
    return {"relative_error_fp32": max(errors), "bf16_argmax_agreement": same / total}


CONFIGURATIONS = (
    ("forward", "fp32", 1), ("forward", "bf16", 1), ("forward", "fp32", 4), ("forward", "bf16", 4),
    ("train", "fp32", 2), ("train", "bf16", 2),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="checkout of the authors' H-SAM repository")
    parser.add_argument("--preset", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--img-size", type=int, default=512, choices=(224, 512))
    parser.add_argument("--repeats", type=int, default=4, help="timed calls of each configuration (best kept)")
    parser.add_argument("--fit-steps", type=int, default=60, help="decoder training steps before the bf16 agreement")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in our training step")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    parser.add_argument("--one", nargs=4, metavar=("WHICH", "MODE", "PRECISION", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--paired", nargs=3, metavar=("MODE", "PRECISION", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--agreement", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        which, mode, precision, batch = args.one
        print(json.dumps(measure(which, mode, precision, int(batch), args)))
        return
    if args.paired:
        mode, precision, batch = args.paired
        print(json.dumps(paired(mode, precision, int(batch), args)))
        return
    if args.agreement:
        print(json.dumps(agreement(args)))
        return

    common = ["--preset", args.preset, "--img-size", str(args.img_size), "--fit-steps", str(args.fit_steps)]
    common += ["--reference", args.reference] if args.reference else []
    common += ["--checkpointing"] if args.checkpointing else []
    rows = []
    for mode, precision, batch in CONFIGURATIONS:
        if precision == "bf16" and not bf16_available():
            continue  # emulated: hundreds of times slower than fp32, and refused by the engine
        row = {"mode": mode, "precision": precision, "batch": batch}
        one = [*common, "--repeats", "1", "--one"]
        row["ours_peak_gib"] = run_isolated(Path(__file__), [*one, "ours", mode, precision, str(batch)])["peak_gib"]
        if args.reference:
            # The reference always runs in float32: it is the baseline every precision of ours is compared with.
            row["reference_peak_gib"] = run_isolated(Path(__file__), [*one, "reference", mode, "fp32", str(batch)])["peak_gib"]
            times = run_isolated(Path(__file__), [*common, "--repeats", str(args.repeats), "--paired", mode, precision,
                                                  str(batch)])
            row.update(ours_s=times["ours"], reference_s=times["reference"], ratio=times["ours"] / times["reference"])
        else:
            row["ours_s"] = run_isolated(Path(__file__), [*common, "--repeats", str(args.repeats), "--one", "ours", mode,
                                                          precision, str(batch)])["seconds"]
        rows.append(row)
        print(row, flush=True)
    columns = ["mode", "precision", "batch", "ours_s", "ours_peak_gib"]
    notes = "Forward rows: seconds per slice; train rows: seconds per optimiser step (same loss for both)."
    if args.reference:
        columns += ["reference_s", "reference_peak_gib", "ratio"]
        agree = run_isolated(Path(__file__), [*common, "--agreement"])
        notes += (f" The reference runs in float32 throughout; ratio = ours / reference. On {AGREEMENT_SLICES} MNI152 "
                  f"slices with the same random weights: float32 relative error {agree['relative_error_fp32']:.2e}.")
        if "bf16_argmax_agreement" in agree:
            notes += (f" After {args.fit_steps} steps fitting our decoders to grey/white matter (encoder random), bf16 "
                      f"autocast gives the float32 argmax on {100 * agree['bf16_argmax_agreement']:.3f} % of pixels.")
    text = table(rows, columns)
    print(text)
    print(notes)
    if args.update_docs:
        command = "python benchmarks/bench_reference.py " + " ".join(
            ([f"--reference {args.reference}"] if args.reference else [])
            + [f"--preset {args.preset}", f"--img-size {args.img_size}"]
            + (["--checkpointing"] if args.checkpointing else []) + ["--update-docs"])
        section = f"Against the authors' code: {args.preset} at {args.img_size}, {cpu_capability()} CPU"
        update_docs(section, command, notes + "\n\n" + text)


if __name__ == "__main__":
    main()
