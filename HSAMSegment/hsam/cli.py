"""The ``hsam`` command line: segment, fine-tune, evaluate, inspect models, download SAM weights, demo.

Exit status: 0 on success, 2 for bad input or an impossible request (one ``hsam: error: ...`` line),
130 when interrupted with Ctrl-C. Heavy modules (torch) are imported by the commands, so ``--help``
is instant.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__
from .errors import HSAMError, InputError
from .io import write_atomic

SEGMENTATION_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
PROBABILITY_SUFFIXES = (".npy", ".nrrd", ".nii.gz", ".nii", ".mha")
DEVICES = ("auto", "cpu", "cuda", "mps")
EMULATED_PRECISION_NOTE = (
    "; on a CPU without native kernels for it (e.g. AVX2-only, no AVX-512) bf16 or fp16 stops with an error "
    "instead of running hundreds of times slower than fp32"
)
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------------- helpers


def _suffix(path: Path, allowed: Sequence[str]) -> Optional[str]:
    name = path.name.lower()
    return next((s for s in allowed if name.endswith(s)), None)


def _check_output(path: Path, overwrite: bool, allowed: Sequence[str], what: str) -> None:
    """Fail before any work when ``path`` cannot be written."""
    if _suffix(path, allowed) is None:
        raise InputError(f"{what} {path.name} must end with {', '.join(allowed)}")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"folder {folder} is not writable")


class _ProgressBar:
    """A tqdm bar driven by ``(fraction, message)`` callbacks, shown from the first callback on (an
    early error stays a single line); silent when ``enabled`` is False."""

    STEPS = 1000

    def __init__(self, description: str, enabled: bool = True) -> None:
        self._description = description
        self._enabled = enabled
        self._bar = None

    def __call__(self, fraction: float, message: str) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.STEPS, desc=self._description, disable=not self._enabled, file=sys.stderr,
                dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
            )
        self._bar.update(max(0, round(fraction * self.STEPS) - self._bar.n))
        self._bar.set_postfix_str(message, refresh=True)

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slice indices, got {text!r}") from None


def _slice_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        return (int(first), int(last)) if sep else (int(first), int(first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST slice indices, got {text!r}") from None


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


# ---------------------------------------------------------------------------------- commands


def _segment(args: argparse.Namespace) -> None:
    from .bundle import load_bundle
    from .inference import describe_device, resolve_precision, segment_volume, select_device
    from .io import Segment, read_volume, write_labelmap, write_segmentation

    output = Path(args.output)
    _check_output(output, args.overwrite, (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES), "output")
    if args.probabilities is not None:
        _check_output(Path(args.probabilities), args.overwrite, PROBABILITY_SUFFIXES, "probability file")
    if args.uncertainty is not None:
        _check_uncertainty_output(Path(args.uncertainty), args.overwrite)
    device = select_device(args.device)
    resolve_precision(args.precision, device)  # refuse a precision the CPU can only emulate, before any work
    volume = read_volume(args.volume)
    model, metadata = load_bundle(args.model, sam_checkpoint=args.sam_checkpoint)
    started = time.monotonic()
    with _ProgressBar(f"segmenting on {device.type}") as bar:
        result = segment_volume(
            model, volume, metadata, device=device, batch_size=args.batch_size, precision=args.precision,
            slice_range=args.slices, progress=bar, return_probabilities=args.probabilities is not None,
            largest_component=args.largest_component,
            uncertainty=args.uncertainty_signal if args.uncertainty is not None else None,
        )
    if _suffix(output, (SEGMENTATION_SUFFIX,)):
        segments = [
            Segment(name, int(value), tuple(color), term)
            for name, value, color, term in zip(
                metadata.class_names, metadata.label_values, metadata.class_colors, metadata.terminology
            )
        ]
        write_segmentation(output, result.labels, volume, segments, overwrite=args.overwrite)
    else:
        write_labelmap(output, result.labels, volume, overwrite=args.overwrite)
    if args.probabilities is not None:
        _write_probabilities(Path(args.probabilities), result.probabilities, volume)
    if args.uncertainty is not None:
        from .uncertainty import write_uncertainty

        write_uncertainty(args.uncertainty, result.uncertainty, result.slice_scores, volume, metadata.slice_axis,
                          overwrite=args.overwrite)
    print(f"{Path(args.model).name} ({metadata.preset}; {', '.join(metadata.class_names)}) in "
          f"{time.monotonic() - started:.1f} s on {describe_device(device)}", file=sys.stderr)
    print(output)


def _write_probabilities(path: Path, probabilities, volume) -> None:
    """``.npy``: float16 (C+1, z, y, x); an image format: a float32 vector image on the volume's grid,
    one component per class (background first)."""
    import numpy as np

    def write(temporary: Path) -> None:  # the temporary name keeps the suffix: SimpleITK picks the format
        if path.name.lower().endswith(".npy"):
            with open(temporary, "wb") as f:
                np.save(f, probabilities)
            return
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.moveaxis(probabilities, 0, -1).astype(np.float32), isVector=True)
        image.SetSpacing([float(s) for s in volume.spacing])
        image.SetOrigin([float(o) for o in volume.origin])
        image.SetDirection([float(d) for d in volume.direction])
        sitk.WriteImage(image, str(temporary), useCompression=True)

    write_atomic(path, write, overwrite=True)


def _check_uncertainty_output(path: Path, overwrite: bool) -> None:
    from .uncertainty import MAP_SUFFIXES, scores_csv_path

    _check_output(path, overwrite, MAP_SUFFIXES, "uncertainty map")
    _check_output(scores_csv_path(path), overwrite, (".csv",), "per-slice score file")


def _annotated_slices(text: Optional[str], volume, axis: str) -> list[int]:
    """Slice indices from ``I,J,...`` or from the labelled slices of a labelmap / segmentation file."""
    if text is None:
        return []
    if all(part.strip().isdigit() for part in text.split(",")):
        return _int_list(text)
    from .io import read_labelmap
    from .training import annotated_slices

    labels, _ = read_labelmap(text, reference=volume)
    return annotated_slices(labels, axis)


def _suggest(args: argparse.Namespace) -> None:
    from .bundle import load_bundle
    from .inference import segment_volume, select_device
    from .io import read_volume
    from .suggest import SpreadRule, suggest_slices

    if args.csv is not None:
        _check_output(Path(args.csv), args.overwrite, (".csv",), "CSV file")
    device = select_device(args.device)
    volume = read_volume(args.volume)
    model, metadata = load_bundle(args.model, sam_checkpoint=args.sam_checkpoint)
    annotated = _annotated_slices(args.annotated, volume, metadata.slice_axis)
    with _ProgressBar(f"scoring slices on {device.type}") as bar:
        result = segment_volume(
            model, volume, metadata, device=device, batch_size=args.batch_size, slice_range=args.slices,
            progress=bar, uncertainty=args.signal,
        )
    picks = suggest_slices(result.slice_scores, args.count, annotated, SpreadRule(min_distance=args.min_distance))
    print(f"{'rank':>4} {metadata.slice_axis + ' slice':>14} {'uncertainty':>11}", file=sys.stderr)
    for rank, index in enumerate(picks, start=1):
        print(f"{rank:>4} {index:>14} {result.slice_scores[index]:>11.4f}", file=sys.stderr)
    if args.csv is not None:
        rows = "".join(f"{rank},{metadata.slice_axis},{index},{result.slice_scores[index]:.6f}\n"
                       for rank, index in enumerate(picks, start=1))
        write_atomic(args.csv, lambda tmp: tmp.write_text("rank,axis,slice,score\n" + rows, encoding="utf-8"), overwrite=True)
    print(",".join(map(str, picks)))


def _finetune(args: argparse.Namespace) -> None:
    from .bundle import read_bundle_metadata, save_bundle
    from .io import read_labelmap, read_volume
    from .preprocess import IntensityPreprocessing
    from .inference import select_device
    from .training import FinetuneConfig, finetune, is_main_process, training_precision

    output = Path(args.output)
    _check_output(output, args.overwrite, (".hsam",), "model file")
    training_precision(args.precision, select_device(args.device))  # before any work, as in segment
    if args.base_model is not None and args.preset is not None:
        base_preset = read_bundle_metadata(args.base_model).preset
        if base_preset != args.preset:
            raise InputError(f"{Path(args.base_model).name} is a {base_preset} model, not --preset {args.preset}")
    volume = read_volume(args.volume)
    labels, segments = read_labelmap(args.labelmap, reference=volume)
    preprocessing = None
    if args.modality is not None:
        preprocessing = IntensityPreprocessing(mode="ct" if args.modality == "ct" else "percentile")
    config = FinetuneConfig(
        preset=args.preset or "tiny",
        sam_checkpoint=args.sam_checkpoint,
        base_bundle=args.base_model,
        img_size=args.img_size,
        epochs=args.epochs,
        time_budget=args.time_budget,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        slices=args.slices,
        slice_axis=args.axis,
        preprocessing=preprocessing,
        class_names=args.class_names,
        device=args.device,
        seed=args.seed,
        cmattn=args.cmattn,
        precision=args.precision,
        gradient_checkpointing=args.checkpointing,
    )
    main_process = is_main_process()
    with _ProgressBar("fine-tuning", enabled=main_process) as bar:
        def on_step(p) -> None:
            dice = f", val Dice {p.val_dice:.3f}" if p.val_dice is not None else ""
            bar(p.fraction, f"epoch {p.epoch}, loss {p.loss:.4f}{dice}")

        result = finetune(volume, labels, segments, config, progress=on_step)
    if main_process:
        save_bundle(output, result.model, result.metadata, overwrite=args.overwrite)
        training = result.metadata.training
        print(f"{training.get('epochs')} epochs, {training.get('steps')} steps in {training.get('seconds')} s; "
              f"saved {output}")


def _evaluate(args: argparse.Namespace) -> None:
    from .metrics import evaluate

    outputs = [(Path(p), kind) for p, kind in ((args.json, ".json"), (args.csv, ".csv")) if p is not None]
    for path, kind in outputs:
        _check_output(path, args.overwrite, (kind,), f"{kind[1:].upper()} file")
    rows = evaluate(args.prediction, args.reference)
    print(f"{'class':<24} {'label':>5} {'Dice':>7} {'HD95 mm':>9}")
    for row in rows:
        hd95 = "-" if row["hd95_mm"] is None else f"{row['hd95_mm']:.2f}"
        print(f"{row['name']:<24} {row['label']:>5} {row['dice']:>7.4f} {hd95:>9}")
    if args.json is not None:
        write_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8"), overwrite=True)
    if args.csv is not None:
        write_atomic(args.csv, lambda tmp: tmp.write_text(_csv(rows), encoding="utf-8"), overwrite=True)


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["name", "label", "dice", "hd95_mm"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _info(args: argparse.Namespace) -> None:
    path = Path(args.model)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    if path.suffix.lower() == ".pth":
        _info_sam(path)
    else:
        _info_bundle(path)


def _info_sam(path: Path) -> None:
    from .checkpoint import SAM_CHECKPOINTS, sha256_file

    by_name = {info.filename: name for name, info in SAM_CHECKPOINTS.items()}
    digest = sha256_file(path)
    matching = [name for name, info in SAM_CHECKPOINTS.items() if info.sha256 == digest]
    if matching:
        print(f"{path.name}: official SAM {matching[0]} weights ({SAM_CHECKPOINTS[matching[0]].filename}); sha256 matches")
    elif path.name in by_name:
        name = by_name[path.name]
        raise InputError(
            f"{path.name} is named like the official SAM {name} weights but its sha256 {digest[:12]}… does not "
            f"match {SAM_CHECKPOINTS[name].sha256[:12]}…: download it again (hsam download {name})"
        )
    else:
        print(f"{path.name}: not an official SAM checkpoint (sha256 {digest})")


def _info_bundle(path: Path) -> None:
    import torch

    from .build import build_hsam, count_parameters
    from .bundle import read_bundle_metadata

    metadata = read_bundle_metadata(path)
    with torch.device("meta"):  # shapes only: instant even for vit_h
        model = build_hsam(metadata.preset, metadata.num_classes, metadata.img_size, metadata.cmattn, metadata.lora_rank)
    trainable, total = count_parameters(model)
    if metadata.training.get("trained_encoder"):
        trainable = total
    print(f"model:        {path.name}")
    print(f"preset:       {metadata.preset}, input {metadata.img_size}×{metadata.img_size}, CMAttn {metadata.cmattn}, "
          f"LoRA rank {metadata.lora_rank}")
    print(f"parameters:   {total:,} ({trainable:,} trained)")
    print(f"slice axis:   {metadata.slice_axis}; preprocessing {json.dumps(metadata.preprocessing)}")
    base = metadata.base_checkpoint
    print(f"base weights: {base['name'] + ' (sha256 ' + base['sha256'][:12] + '…)' if base else 'none (trained from scratch)'}")
    print("classes:")
    for name, value, color, term in zip(
        metadata.class_names, metadata.label_values, metadata.class_colors, metadata.terminology
    ):
        rgb = "#" + "".join(f"{round(255 * c):02x}" for c in color)
        print(f"  {value:>5}  {name:<24} {rgb}" + (f"  {term}" if term else ""))
    if metadata.training:
        print("training:")
        for key, value in metadata.training.items():
            print(f"  {key}: {json.dumps(value)}")


def _download(args: argparse.Namespace) -> None:
    from .download import download_sam_weights

    with _ProgressBar(f"SAM {args.name}") as bar:
        path = download_sam_weights(args.name, cache_dir=args.cache_dir, progress=bar)
    print(path)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    with _ProgressBar("demo") as bar:
        result = run_demo(
            args.out, sam_checkpoint=args.sam_checkpoint, epochs=args.epochs, time_budget=args.time_budget,
            device=args.device, progress=bar, img_size=args.img_size, cmattn=args.cmattn, seed=args.seed,
        )
    print(result.table())
    print(f"files written to {Path(args.out).resolve()}")


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsam",
        description="H-SAM few-shot medical image segmentation: fine-tune SAM on a few annotated slices of a "
        "volume, then segment whole volumes.",
        epilog="Run `hsam COMMAND --help` for a command's options. `hsam demo` shows the whole workflow.",
    )
    parser.add_argument("--version", action="version", version=f"hsam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def seed_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=2345, help="random seed of the fine-tuning (default: 2345, the authors')")

    def cmattn_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cmattn", default="reference", choices=("reference", "paper"),
                       help="CMAttn variant: reference = the authors' code (default), paper = as the paper describes it")

    def uncertainty_signal_option(p: argparse.ArgumentParser, flag: str) -> None:
        from .uncertainty import DEFAULT_SIGNAL, SIGNALS

        p.add_argument(flag, default=DEFAULT_SIGNAL, choices=SIGNALS,
                       help="disagreement of the two decoding stages, entropy of their mean probabilities, or "
                       f"combined (default: {DEFAULT_SIGNAL}; docs/model.md compares them)")

    def device_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", choices=DEVICES,
                       help="where to compute; auto: a CUDA GPU, then Apple MPS, then the CPU (default: auto)")

    p = commands.add_parser(
        "segment", help="segment a volume with a fine-tuned model",
        description="Segment every slice of VOLUME with an HSAM model bundle and write a Slicer segmentation "
        "(.seg.nrrd: segment names and colours from the model) or a labelmap (.nrrd, .nii.gz, .nii, .mha: "
        "the model's label values).",
    )
    p.add_argument("volume", help="image volume (NRRD, NIfTI, MHA, or a DICOM series folder)")
    p.add_argument("-m", "--model", required=True, help="model bundle (.hsam) made by `hsam finetune`")
    p.add_argument("-o", "--output", required=True, help="output .seg.nrrd, .nrrd, .nii.gz, .nii or .mha")
    device_option(p)
    p.add_argument("--batch-size", type=_positive(int), default=4,
                   help="slices per forward pass; halved automatically when memory runs out (default: 4)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision; auto: bf16 on CPUs with native bf16 (AVX512-BF16, AMX), bf16/fp16 on CUDA, "
                   "else fp32" + EMULATED_PRECISION_NOTE)
    p.add_argument("--slices", type=_slice_range, metavar="FIRST:LAST",
                   help="segment only these slices along the model's slice axis, both included; the rest stay background")
    p.add_argument("--largest-component", action="store_true",
                   help="keep only the largest 3D connected component of each class")
    p.add_argument("--probabilities", metavar="FILE",
                   help="also write class probabilities: .npy (float16, classes×z×y×x, background first) or an "
                   "image file (vector image on the volume's grid)")
    p.add_argument("--uncertainty", metavar="FILE",
                   help="also write the model's per-voxel uncertainty (0–1, float) on the volume's grid (.nrrd, "
                   ".nii.gz, .nii, .mha) and its per-slice scores in a CSV beside it (FILE with .csv)")
    uncertainty_signal_option(p, "--uncertainty-signal")
    p.add_argument("--sam-checkpoint", metavar="PATH",
                   help="official SAM weights the model was fine-tuned from (default: the download cache)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(run=_segment)

    p = commands.add_parser(
        "suggest", help="which slices to annotate next",
        description="Segment VOLUME with an HSAM model and print the N slices (along the model's slice axis) "
        "where the model is least sure, spread over the volume and skipping the annotated ones, most useful "
        "first: a comma-separated line on stdout, a table with the scores on stderr.",
    )
    p.add_argument("volume", help="image volume")
    p.add_argument("-m", "--model", required=True, help="model bundle (.hsam)")
    p.add_argument("-n", "--count", type=_positive(int), default=5, help="number of slices to suggest (default: 5)")
    p.add_argument("--annotated", metavar="LABELS|I,J,...",
                   help="slices already annotated: a labelmap or .seg.nrrd on the volume's grid, or slice indices")
    p.add_argument("--min-distance", type=int, metavar="SLICES",
                   help="keep suggestions at least this many slices from each other and from annotated slices "
                   "while possible (default: half the spacing of evenly spread annotations)")
    uncertainty_signal_option(p, "--signal")
    p.add_argument("--slices", type=_slice_range, metavar="FIRST:LAST", help="consider only these slices")
    p.add_argument("--csv", metavar="FILE", help="also write rank, axis, slice and score as CSV")
    device_option(p)
    p.add_argument("--batch-size", type=_positive(int), default=4, help="slices per forward pass (default: 4)")
    p.add_argument("--sam-checkpoint", metavar="PATH", help="official SAM weights of the model (default: the cache)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CSV file")
    p.set_defaults(run=_suggest)

    p = commands.add_parser(
        "finetune", help="fine-tune H-SAM on the annotated slices of a volume",
        description="Fine-tune H-SAM on the slices of VOLUME that LABELMAP annotates (or those given with "
        "--slices) and save a model bundle. Under torchrun only the first process prints and saves.",
    )
    p.add_argument("volume", help="image volume")
    p.add_argument("labelmap", help="labelmap on the volume's grid (0 = background) or a .seg.nrrd segmentation")
    p.add_argument("-o", "--output", required=True, help="model bundle to write (.hsam)")
    p.add_argument("--preset", choices=("tiny", "vit_b", "vit_l", "vit_h"),
                   help="network size: tiny (trains from scratch, CPU-friendly) or a SAM ViT (needs "
                   "--sam-checkpoint or downloaded weights); default: tiny, or the base model's")
    p.add_argument("--sam-checkpoint", metavar="PATH", help="official SAM weights of the preset (.pth)")
    p.add_argument("--base-model", metavar="BUNDLE", help="continue from this model bundle (same classes)")
    p.add_argument("--slices", type=_int_list, metavar="I,J,...",
                   help="training slices along --axis (default: every slice with a label)")
    p.add_argument("--epochs", type=_positive(int), help="number of epochs (default: 300 unless --time-budget)")
    p.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                   help="stop after this long; the learning-rate schedule is planned to fit it")
    p.add_argument("--lr", type=_positive(float), help="base learning rate (default: 0.0025 for vit_*, 0.001 for tiny)")
    p.add_argument("--batch-size", type=_positive(int), default=2, help="slices per step (default: 2)")
    p.add_argument("--img-size", type=int, choices=(224, 256, 512, 1024),
                   help="network input size (default: 512 for vit_*, 256 for tiny)")
    p.add_argument("--class-names", type=lambda s: [n.strip() for n in s.split(",")], metavar="A,B,...",
                   help="class names in label-value order (default: from the segmentation, else Segment_<value>)")
    p.add_argument("--modality", choices=("ct", "mr"),
                   help="intensity normalisation: ct = abdominal window, mr = percentiles (default: percentiles)")
    p.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"),
                   help="slicing direction (default: axial)")
    device_option(p)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision of the training steps; auto: bf16 (or fp16) on CUDA, else fp32"
                   + EMULATED_PRECISION_NOTE)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the image encoder: less memory, more time "
                   "(default: on for vit_* on CUDA)")
    seed_option(p)
    cmattn_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.set_defaults(run=_finetune)

    p = commands.add_parser(
        "evaluate", help="Dice and HD95 of a segmentation against a reference",
        description="Per-class Dice and 95th-percentile Hausdorff distance (mm) of PREDICTION against REFERENCE "
        "(labelmaps or .seg.nrrd on the same grid).",
    )
    p.add_argument("prediction", help="predicted labelmap or segmentation")
    p.add_argument("reference", help="reference labelmap or segmentation")
    p.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    p.add_argument("--csv", metavar="FILE", help="also write the scores as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace existing score files")
    p.set_defaults(run=_evaluate)

    p = commands.add_parser(
        "info", help="describe a model bundle or check SAM weights",
        description="Print a model bundle's preset, classes (label values, colours), parameter counts and "
        "training record; for a .pth file, say whether it is official SAM weights (sha256).",
    )
    p.add_argument("model", help="model bundle (.hsam) or SAM checkpoint (.pth)")
    p.set_defaults(run=_info)

    p = commands.add_parser(
        "download", help="download official SAM weights",
        description="Download SAM weights from dl.fbaipublicfiles.com into the cache (resumable, sha256-checked) "
        "and print the file's path. The cache is $HSAM_HOME/checkpoints or ~/.cache/hsam/checkpoints.",
    )
    p.add_argument("name", choices=("vit_b", "vit_l", "vit_h"), help="vit_b (375 MB), vit_l (1.2 GB) or vit_h (2.6 GB)")
    p.add_argument("--cache-dir", metavar="DIR", help="download into this folder instead")
    p.set_defaults(run=_download)

    p = commands.add_parser(
        "demo", help="fine-tune on a brain template and segment it",
        description="Fine-tune on every 10th slice of the MNI152 brain template's grey/white matter labels, "
        "segment the whole volume, score it against the nearest-slice copy and write the results.",
    )
    p.add_argument("--out", default="hsam-demo", help="output folder (default: ./hsam-demo)")
    p.add_argument("--sam-checkpoint", metavar="PATH", help="SAM ViT-B weights: fine-tune vit_b instead of tiny")
    p.add_argument("--epochs", type=_positive(int), help="number of epochs")
    p.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                   help="training time limit (default on a CPU: 240 s)")
    p.add_argument("--img-size", type=int, choices=(224, 256, 512, 1024),
                   help="network input size (default: 256 for tiny, 512 for vit_b)")
    cmattn_option(p)
    seed_option(p)
    device_option(p)
    p.set_defaults(run=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``hsam`` with ``argv`` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except HSAMError as e:
        print(f"hsam: error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("hsam: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
