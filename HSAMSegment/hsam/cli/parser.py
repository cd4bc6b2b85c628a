"""The ``hsam`` argument parser: every command, its options and help, and the function that runs it."""

from __future__ import annotations

import argparse

from ..guidance.kinds import DEFAULT_PRIOR, PRIOR_KINDS
from ..runtime.version import __version__
from ..volumes.constants import SLICE_AXES
from .common import _int_list, _positive, _slice_range
from .info import _demo, _devices, _download, _info
from .segment import _propagate, _segment
from .suggest import _suggest
from .train import _evaluate, _finetune

DEVICES = ("auto", "cpu", "cuda", "mps")
EMULATED_PRECISION_NOTE = (
    "; on a CPU without native kernels for it (e.g. AVX2-only, no AVX-512) bf16 or fp16 stops with an error "
    "instead of running hundreds of times slower than fp32"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsam",
        description="H-SAM few-shot medical image segmentation: fine-tune SAM on a few annotated slices of a "
        "volume, then segment whole volumes.",
        epilog="Run `hsam COMMAND --help` for a command's options. `hsam demo` shows the whole workflow.",
    )
    parser.add_argument("--version", action="version", version=f"hsam {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_segment, _add_propagate, _add_suggest, _add_finetune, _add_evaluate, _add_info,
                        _add_download, _add_devices, _add_demo):
        add_command(commands)
    return parser


# Options that several commands share.

def _seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=2345, help="random seed of the fine-tuning (default: 2345, the authors')")


def _cmattn_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cmattn", default="reference", choices=("reference", "paper"),
                   help="CMAttn variant: reference = the authors' code (default), paper = as the paper describes it")


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", default="bar", choices=("bar", "json"),
                   help="bar: a progress bar on stderr (default); json: one JSON object per line on stdout "
                   "(event, phase, fraction, message; epoch, loss, val_dice when training), for programs")


def _series_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", metavar="UID",
                   help="the DICOM series to read when the volume folder holds several (default: the largest)")


def _resample_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--resample-labels", action="store_true",
                   help=f"resample {what} onto the other grid (nearest neighbour) instead of refusing it")


def _uncertainty_signal_option(p: argparse.ArgumentParser, flag: str) -> None:
    from ..inference.uncertainty import DEFAULT_SIGNAL, SIGNALS

    p.add_argument(flag, default=DEFAULT_SIGNAL, choices=SIGNALS,
                   help="disagreement of the two decoding stages, entropy of their mean probabilities, or "
                   f"combined (default: {DEFAULT_SIGNAL}; docs/model.md compares them)")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to compute; auto: a CUDA GPU, then Apple MPS, then the CPU (default: auto)")


def _precision_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help=help + EMULATED_PRECISION_NOTE)


# One function per command, in the order of `hsam --help`.

def _add_segment(commands) -> None:
    p = commands.add_parser(
        "segment", help="segment a volume with a fine-tuned model",
        description="Segment every slice of VOLUME with an HSAM model bundle and write a Slicer segmentation "
        "(.seg.nrrd: segment names and colours from the model) or a labelmap (.nrrd, .nii.gz, .nii, .mha: "
        "the model's label values).",
    )
    p.add_argument("volume", help="image volume (NRRD, NIfTI, MHA, or a DICOM series folder)")
    p.add_argument("-m", "--model", required=True, help="model bundle (.hsam) made by `hsam finetune`")
    p.add_argument("-o", "--output", required=True, help="output .seg.nrrd, .nrrd, .nii.gz, .nii or .mha")
    _series_option(p)
    _device_option(p)
    p.add_argument("--batch-size", type=_positive(int), default=4,
                   help="slices per forward pass; halved automatically when memory runs out (default: 4)")
    _precision_option(p, "autocast precision; auto: bf16 on CPUs with native bf16 (AVX512-BF16, AMX), bf16/fp16 on "
                      "CUDA, else fp32")
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
    _uncertainty_signal_option(p, "--uncertainty-signal")
    p.add_argument("--annotations", metavar="LABELS",
                   help="guided models: this volume's annotated slices (.seg.nrrd or labelmap on its grid, segments "
                   "named as the model's classes); they are propagated into the prior the model corrects, and kept "
                   "exactly as drawn. Without it a guided model runs prompt-free")
    p.add_argument("--sam-checkpoint", metavar="PATH",
                   help="official SAM weights the model was fine-tuned from (default: the download cache)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _progress_option(p)
    p.set_defaults(run=_segment)


def _add_propagate(commands) -> None:
    p = commands.add_parser(
        "propagate", help="carry annotated slices through a volume along the optical flow, no model",
        description="The annotated slices of ANNOTATIONS carried slice by slice through VOLUME along the dense "
        "optical flow between neighbouring slices, in both directions, blended by distance; beyond the first and "
        "last annotated slice the end slice is carried on. The annotated slices are kept exactly. Seconds, no "
        "model, no PyTorch: the prior that guided models correct.",
    )
    p.add_argument("volume", help="image volume (NIfTI, NRRD, MetaImage, or a DICOM folder)")
    p.add_argument("annotations", help="the annotated slices: .seg.nrrd or labelmap on the volume's grid")
    p.add_argument("-o", "--output", required=True,
                   help="the propagated segmentation: .seg.nrrd (3D Slicer, the annotations' segments) or a "
                   "labelmap (.nrrd, .nii.gz, .nii, .mha)")
    p.add_argument("--axis", default="axial", choices=tuple(SLICE_AXES), help="the annotated slices' axis (default: axial)")
    p.add_argument("--modality", choices=("ct", "mr"),
                   help="intensities the flow sees: ct = a −200…300 HU window, mr = the 1st–99th percentiles "
                   "(default: ct when the volume holds air in Hounsfield units, else mr)")
    _series_option(p)
    _resample_option(p, "annotations on another voxel grid than the volume's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _progress_option(p)
    p.set_defaults(run=_propagate)


def _add_suggest(commands) -> None:
    p = commands.add_parser(
        "suggest", help="which slices to annotate next",
        description="Print the N slices of VOLUME to annotate next, most useful first: a comma-separated line on "
        "stdout and a table with the scores on stderr (--json: one JSON object). Without a model, the gaps between "
        "the annotated slices of --annotated are ranked by how much flow propagation from the slice below and from "
        "the slice above disagree there (seconds, no PyTorch), and the middle slice of each of the N first is "
        "suggested; the slices beyond the first and the last annotated slice are not ranked. With -m, the slices "
        "where the model is least sure, spread over the volume and skipping the annotated ones.",
    )
    p.add_argument("volume", help="image volume")
    p.add_argument("-m", "--model", help="model bundle (.hsam): rank by its uncertainty instead of the flow")
    p.add_argument("-n", "--count", type=_positive(int), default=5, help="number of slices to suggest (default: 5)")
    p.add_argument("--annotated", metavar="LABELS|I,J,...",
                   help="the annotations: a labelmap or .seg.nrrd on the volume's grid (needed without -m); with -m "
                   "slice indices will do")
    p.add_argument("--axis", choices=tuple(SLICE_AXES),
                   help="the annotated slices' axis (default: axial; with -m the model's)")
    p.add_argument("--modality", choices=("ct", "mr"),
                   help="without -m, intensities the flow sees: ct = a −200…300 HU window, mr = the 1st–99th "
                   "percentiles (default: ct when the volume holds air in Hounsfield units, else mr)")
    p.add_argument("--min-distance", type=int, metavar="SLICES",
                   help="with -m, keep suggestions at least this many slices from each other and from annotated "
                   "slices while possible (default: half the spacing of evenly spread annotations)")
    _uncertainty_signal_option(p, "--signal")
    p.add_argument("--slices", type=_slice_range, metavar="FIRST:LAST", help="with -m, consider only these slices")
    p.add_argument("--csv", metavar="FILE", help="also write rank, axis, slice (the gap) and score as CSV")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (axis, ranking, annotated, suggestions: rank, slice, gap, score) "
                   "instead of lines for people")
    _device_option(p)
    p.add_argument("--batch-size", type=_positive(int), default=4, help="slices per forward pass (default: 4)")
    p.add_argument("--sam-checkpoint", metavar="PATH", help="official SAM weights of the model (default: the cache)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CSV file")
    _progress_option(p)
    p.set_defaults(run=_suggest)


def _add_finetune(commands) -> None:
    p = commands.add_parser(
        "finetune", help="fine-tune H-SAM on the annotated slices of one or more volumes",
        description="Fine-tune H-SAM on the slices of each VOLUME that its LABELMAP annotates (or those given "
        "with --slices or in the manifest) and save a model bundle. Volumes may differ in size, spacing and "
        "orientation; classes are matched by segment name, then label value. Under torchrun only the first "
        "process prints and saves.",
    )
    p.add_argument("inputs", nargs="*", metavar="VOLUME LABELMAP",
                   help="image volume and its labelmap on the volume's grid (0 = background) or .seg.nrrd "
                   "segmentation; repeat the pair for a cohort of volumes")
    p.add_argument("--manifest", metavar="FILE",
                   help="CSV (header image,labels[,slices][,name]) or JSON list of such objects naming more "
                   "training volumes; paths relative to the manifest")
    p.add_argument("--validation-volumes", type=int, default=0, metavar="N",
                   help="hold out the last N volumes whole for validation (default: ~15%% of each volume's "
                   "slices when it has 6 or more)")
    p.add_argument("-o", "--output", required=True, help="model bundle to write (.hsam)")
    _series_option(p)
    _resample_option(p, "a labelmap on another voxel grid than the volume's")
    _finetune_model_options(p)
    _finetune_training_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    _progress_option(p)
    p.set_defaults(run=_finetune)


def _finetune_model_options(p: argparse.ArgumentParser) -> None:
    """The network, its weights, the training slices and how they are read."""
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


def _finetune_training_options(p: argparse.ArgumentParser) -> None:
    """Where and how the training runs: device, precision, guided mode, previews, early stop."""
    _device_option(p)
    _precision_option(p, "autocast precision of the training steps; auto: bf16 (or fp16) on CUDA, else fp32")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the image encoder: less memory, more time "
                   "(default: on for vit_* on CUDA)")
    p.add_argument("--guided", nargs="?", const=DEFAULT_PRIOR, choices=PRIOR_KINDS, metavar="PRIOR",
                   help="guided mode: each annotated slice is learned from the propagation of the others (the "
                   f"prior: {', '.join(PRIOR_KINDS)}; default {DEFAULT_PRIOR}), so that `hsam segment --annotations` "
                   "corrects the propagation of the user's slices; the model also runs prompt-free. Needs at "
                   "least two annotated slices per volume")
    p.add_argument("--atlas", action="store_true",
                   help="guided: keep every training volume with its labels completed from its annotated slices "
                   "(3 mm grid, some MB each) in the model file, so that `hsam segment` without --annotations "
                   "registers them onto a new volume as its prior; with several volumes the model also learns to "
                   "correct that prior, each volume's built from the others")
    p.add_argument("--preview", metavar="FILE",
                   help="one volume: also segment it with the model in training, before the first step (a guided "
                   "model gives its prior) and then every --preview-interval seconds, replacing FILE (.seg.nrrd or "
                   "a labelmap); --progress json reports each as a \"preview\" event")
    p.add_argument("--preview-interval", type=_positive(float), default=30.0, metavar="SECONDS",
                   help="seconds between previews (default: 30)")
    p.add_argument("--stop-file", metavar="FILE",
                   help="end training early, as when the time budget is spent, once FILE exists (checked before "
                   "each step; the model is saved)")
    _seed_option(p)
    _cmattn_option(p)


def _add_evaluate(commands) -> None:
    p = commands.add_parser(
        "evaluate", help="Dice and HD95 of a segmentation against a reference",
        description="Per-case and per-class Dice and 95th-percentile Hausdorff distance (mm) of each PREDICTION "
        "against its REFERENCE (labelmaps or .seg.nrrd on the same grid), and for several cases the mean ± sd "
        "per class.",
    )
    p.add_argument("inputs", nargs="*", metavar="PREDICTION REFERENCE",
                   help="predicted and reference labelmap or segmentation; repeat the pair for a cohort")
    p.add_argument("--manifest", metavar="FILE",
                   help="CSV (header prediction,reference[,name]) or JSON list of such objects; paths relative "
                   "to the manifest")
    p.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    p.add_argument("--csv", metavar="FILE", help="also write the scores as CSV")
    _resample_option(p, "a prediction on another voxel grid than the reference's")
    p.add_argument("--overwrite", action="store_true", help="replace existing score files")
    p.set_defaults(run=_evaluate)


def _add_info(commands) -> None:
    p = commands.add_parser(
        "info", help="describe a model bundle or check SAM weights",
        description="Print a model bundle's preset, classes (label values, colours), parameter counts and "
        "training record; for a .pth file, say whether it is official SAM weights (sha256).",
    )
    p.add_argument("model", help="model bundle (.hsam) or SAM checkpoint (.pth)")
    p.set_defaults(run=_info)


def _add_download(commands) -> None:
    p = commands.add_parser(
        "download", help="download official SAM weights",
        description="Download SAM weights from dl.fbaipublicfiles.com into the cache (resumable, sha256-checked) "
        "and print the file's path. The cache is $HSAM_HOME/checkpoints or ~/.cache/hsam/checkpoints.",
    )
    p.add_argument("name", choices=("vit_b", "vit_l", "vit_h"), help="vit_b (375 MB), vit_l (1.2 GB) or vit_h (2.6 GB)")
    p.add_argument("--cache-dir", metavar="DIR", help="download into this folder instead")
    _progress_option(p)
    p.set_defaults(run=_download)


def _add_devices(commands) -> None:
    p = commands.add_parser(
        "devices", help="list the GPUs and the CPU PyTorch can use",
        description="Describe what PyTorch can compute on: CUDA GPUs (name, memory, bfloat16), Apple MPS, the CPU, "
        "the torch version and build, and the device `--device auto` picks.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines for people")
    p.set_defaults(run=_devices)


def _add_demo(commands) -> None:
    p = commands.add_parser(
        "demo", help="fine-tune on a brain template and segment it",
        description="Fine-tune on every 10th slice of the MNI152 brain template's grey/white matter labels, "
        "segment the whole volume, score it beside the nearest-slice copy and the Segment Editor's Fill between slices "
        "(from the same annotated slices) and write the results.",
    )
    p.add_argument("--out", default="hsam-demo", help="output folder (default: ./hsam-demo)")
    p.add_argument("--sam-checkpoint", metavar="PATH", help="SAM ViT-B weights: fine-tune vit_b instead of tiny")
    p.add_argument("--epochs", type=_positive(int), help="number of epochs")
    p.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                   help="training time limit (default on a CPU: 240 s)")
    p.add_argument("--img-size", type=int, choices=(224, 256, 512, 1024),
                   help="network input size (default: 256 for tiny, 512 for vit_b)")
    _cmattn_option(p)
    _seed_option(p)
    _device_option(p)
    p.set_defaults(run=_demo)
