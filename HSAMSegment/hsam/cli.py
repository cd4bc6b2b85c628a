"""The ``hsam`` command line: segment, fine-tune, evaluate, inspect models, download SAM weights, demo.

Exit status: 0 on success, 2 for bad input or an impossible request (one ``hsam: error: ...`` line),
1 for an internal error (one line; ``hsam --debug ...`` shows the traceback), 130 when interrupted
with Ctrl-C. Arguments, paths and model files are checked before torch is imported, so ``--help``,
``info`` and bad input answer at once. Warnings from HSAM are one ``hsam: warning: ...`` line each;
other libraries' warnings are not shown.
``segment``, ``propagate``, ``suggest``, ``finetune`` and ``download`` take ``--progress json`` for programs that follow them
(``hsam.progress``: one JSON object per line on stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from . import __version__
from .errors import HSAMError, HSAMWarning, InputError, printable
from .files import Outputs, check_distinct, check_writable, file_suffix, write_bytes_atomic
from .presets import DEFAULT_PRIOR, PRIOR_KINDS, SLICE_AXES
from .progress import JsonProgress

if TYPE_CHECKING:
    from .bundle import BundleMetadata
    from .inference import SegmentationResult
    from .io import Volume

SEGMENTATION_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
PROBABILITY_SUFFIXES = (".npy", ".nrrd", ".nii.gz", ".nii", ".mha")
DEVICES = ("auto", "cpu", "cuda", "mps")
EXIT_INTERNAL_ERROR = 1
EMULATED_PRECISION_NOTE = (
    "; on a CPU without native kernels for it (e.g. AVX2-only, no AVX-512) bf16 or fp16 stops with an error "
    "instead of running hundreds of times slower than fp32"
)
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other tools in a pipeline
EXIT_TERMINATED = 143  # 128 + SIGTERM


class _Terminated(BaseException):
    """SIGTERM (e.g. a cancelled worker): unwinds like Ctrl-C, so that claims and temporaries go away."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into ``_Terminated`` while a command runs (main thread only), then restore the handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------- helpers


def _check_output(path: Path, overwrite: bool, allowed: Sequence[str], what: str) -> None:
    """Fail before any work when ``path`` has the wrong suffix or cannot be written."""
    if not path.name.lower().endswith(tuple(allowed)):
        raise InputError(f"{what} {printable(path.name)} must end with {', '.join(allowed)}")
    check_writable(path, overwrite)


def _check_input(path: Optional[str], what: str) -> None:
    """Fail before any work when the file or folder ``path`` (if given) cannot be read."""
    if path is None:
        return
    if not Path(path).exists():
        raise InputError(f"{what} not found: {printable(path)}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {printable(path)} is not readable (permission denied)")


class _ProgressBar:
    """A tqdm bar driven by ``(fraction, message)`` callbacks, shown from the first callback on (an
    early error stays a single line); silent when ``enabled`` is False. When stderr is not a terminal
    (logs, CI), a line per phase and at most one every ``LOG_INTERVAL`` seconds instead."""

    STEPS = 1000
    LOG_INTERVAL = 10.0

    def __init__(self, description: str, enabled: bool = True) -> None:
        self._description = description
        self._enabled = enabled
        self._bar = None
        self._lines = not sys.stderr.isatty()
        self._last_line = -math.inf
        self._phase: Optional[str] = None  # shown once the phase reports progress or ends well

    def _line(self, text: str) -> None:
        if self._enabled:
            print(f"{self._description}: {text}", file=sys.stderr, flush=True)

    def _show_phase(self) -> None:
        if self._phase is not None:
            self._line(self._phase)
            self._phase = None

    def __call__(self, fraction: float, message: str, **details) -> None:
        if self._lines:
            self._show_phase()
            if time.monotonic() - self._last_line >= self.LOG_INTERVAL or fraction >= 1.0:
                self._line(f"{fraction:4.0%} {message}")
                self._last_line = time.monotonic()
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.STEPS, desc=self._description, disable=not self._enabled, file=sys.stderr,
                dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
            )
        self._bar.update(max(0, round(fraction * self.STEPS) - self._bar.n))
        self._bar.set_postfix_str(message, refresh=True)

    def start(self, phase: str, message: str) -> None:
        """A new step of the command; the bar shows it with the next callback, a log as a line."""
        if self._lines:
            self._show_phase()
            self._phase = message

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        if exc_type is None:
            self._show_phase()


def _progress(args: argparse.Namespace, description: str, phase: str, enabled: bool = True):
    """The command's progress reporter: a tqdm bar on stderr, or JSON lines on stdout (``--progress json``)."""
    if args.progress == "json" and enabled:
        return JsonProgress(phase)
    return _ProgressBar(description, enabled=enabled)


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
    output = Path(args.output)
    probabilities = Path(args.probabilities) if args.probabilities is not None else None
    _check_output(output, args.overwrite, (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES), "output")
    if probabilities is not None:
        _check_output(probabilities, args.overwrite, PROBABILITY_SUFFIXES, "probability file")
    uncertainty = Path(args.uncertainty) if args.uncertainty is not None else None
    if uncertainty is not None:
        _check_uncertainty_output(uncertainty, args.overwrite)
    for path, what in ((args.volume, "volume"), (args.model, "model"), (args.sam_checkpoint, "SAM checkpoint"),
                       (args.annotations, "annotations")):
        _check_input(path, what)
    check_distinct([output, probabilities, *_uncertainty_files(uncertainty)],
                   [args.volume, args.model, args.sam_checkpoint, args.annotations])
    # the labels and the probabilities, or neither
    with Outputs(args.overwrite) as outputs, _progress(args, "segmenting", "load") as bar:
        outputs.claim([output, probabilities, *_uncertainty_files(uncertainty)])
        volume, metadata, result, summary = _segment_volume(args, probabilities is not None, bar)
        from .io import Segment, write_output

        bar.start("write", f"writing {output.name}")
        segments = [
            Segment(name, int(value), tuple(color), term)
            for name, value, color, term in zip(
                metadata.class_names, metadata.label_values, metadata.class_colors, metadata.terminology
            )
        ]
        write_output(output, result.labels, volume, segments, outputs=outputs)
        if probabilities is not None:
            _write_probabilities(probabilities, result.probabilities, volume, outputs)
        if uncertainty is not None:
            from .uncertainty import write_uncertainty

            write_uncertainty(uncertainty, result.uncertainty, result.slice_scores, volume, metadata.slice_axis, outputs)
        outputs.publish()
    if isinstance(bar, JsonProgress):
        bar.result(summary, output=output, probabilities=args.probabilities)
        return
    print(summary, file=sys.stderr)
    print(output)


def _propagate(args: argparse.Namespace) -> None:
    output = Path(args.output)
    _check_output(output, args.overwrite, (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES), "output")
    for path, what in ((args.volume, "volume"), (args.annotations, "annotations")):
        _check_input(path, what)
    check_distinct([output], [args.volume, args.annotations])
    with Outputs(args.overwrite) as outputs, _progress(args, "propagating", "load") as bar:
        outputs.claim([output])
        from .baselines import flow_propagation
        from .guidance.flow import modality_of
        from .guidance.priors import annotated_slices
        from .io import read_labelmap, read_volume, write_output

        bar.start("load", f"loading {Path(args.volume).name} and {Path(args.annotations).name}")
        volume = read_volume(args.volume, series=args.series)
        labels, segments = read_labelmap(args.annotations, reference=volume, resample=args.resample_labels)
        axis = SLICE_AXES[args.axis]
        annotated = annotated_slices(labels, axis)
        if not annotated:
            raise InputError(f"{printable(Path(args.annotations).name)} has no annotated slice")
        modality = args.modality or modality_of(volume.array)
        started = time.monotonic()
        bar.start("propagate", f"propagating {len(annotated)} annotated {args.axis} slices ({modality})")
        result = flow_propagation(volume.array, labels, annotated, axis, modality, progress=bar)
        bar.start("write", f"writing {output.name}")
        write_output(output, result, volume, segments, outputs=outputs)
        outputs.publish()
    summary = (f"{len(annotated)} annotated {args.axis} slices propagated through {volume.array.shape[axis]} "
               f"({modality}) in {time.monotonic() - started:.1f} s")
    if isinstance(bar, JsonProgress):
        bar.result(summary, output=output)
        return
    print(summary, file=sys.stderr)
    print(output)


def _segment_volume(
    args: argparse.Namespace, probabilities: bool, bar
) -> tuple[Volume, BundleMetadata, SegmentationResult, str]:
    """Check the model file, read the volume, then check the precision, load the model and segment:
    (volume, metadata, SegmentationResult, a summary line)."""
    from .bundle import read_bundle_metadata
    from .io import read_volume

    metadata = read_bundle_metadata(args.model)  # a bad model file is refused before the volume is read
    if args.annotations is not None and not metadata.guided:
        raise InputError(f"{Path(args.model).name} is a prompt-free model: --annotations needs a model "
                         "fine-tuned with --guided")
    bar.start("load", f"loading {Path(args.volume).name} and {Path(args.model).name}")
    volume = read_volume(args.volume, series=args.series)
    annotations = _read_annotations(args.annotations, volume, metadata, args.model) if args.annotations else None

    from .bundle import load_bundle, read_atlases
    from .inference import NOTHING_FOUND, describe_device, resolve_precision, segment_volume, select_device

    device = select_device(args.device)
    resolve_precision(args.precision, device)  # refuse a precision the CPU can only emulate, before any work
    model, metadata = load_bundle(args.model, sam_checkpoint=args.sam_checkpoint)
    atlases = read_atlases(args.model) if metadata.guided and annotations is None else []
    started = time.monotonic()
    bar.start("segment", f"segmenting on {device.type}")
    result = segment_volume(
        model, volume, metadata, device=device, batch_size=args.batch_size, precision=args.precision,
        slice_range=args.slices, progress=bar, return_probabilities=probabilities,
        largest_component=args.largest_component,
        uncertainty=args.uncertainty_signal if args.uncertainty is not None else None, annotations=annotations,
        atlases=atlases,
    )
    if NOTHING_FOUND in result.notes:
        raise InputError(NOTHING_FOUND)  # rather than an empty file
    for note in result.notes:
        warnings.warn(note, HSAMWarning)
    mode = {"annotations": "guided by the annotations",
            "atlas": f"guided by its {len(atlases)} training volumes registered onto this one"}.get(result.prior, "prompt-free")
    summary = (f"{Path(args.model).name} ({metadata.preset}, {mode}; {printable(', '.join(metadata.class_names))}) "
               f"in {time.monotonic() - started:.1f} s on {describe_device(device)}")
    return volume, metadata, result, summary


def _read_annotations(path: str, volume, metadata: BundleMetadata, model_path: str):
    """The annotation labelmap on the volume's grid, in the model's label values (segments matched
    by name, as when continuing a model; see ``hsam.continuation``)."""
    from .continuation import align_to_base
    from .io import read_labelmap

    labels, segments = read_labelmap(path, reference=volume)
    if not labels.any():
        raise InputError(f"{printable(Path(path).name)} has no annotated slice")
    return align_to_base(labels, segments, metadata, Path(model_path).name)[0]


def _write_probabilities(path: Path, probabilities, volume, outputs: Outputs) -> None:
    """``.npy``: float16 (C+1, z, y, x); an image format: a float32 vector image on the volume's grid,
    one component per class (background first)."""
    import numpy as np

    if file_suffix(path) == ".npy":
        def verify(temporary: Path) -> None:
            if not np.array_equal(np.load(temporary, mmap_mode="r"), probabilities):
                raise OSError("the written file reads back incomplete or different (is the disk full?)")

        outputs.stage(path, lambda temporary: np.save(temporary, probabilities), verify)
        return
    import SimpleITK as sitk

    from .io import write_image

    image = sitk.GetImageFromArray(np.moveaxis(probabilities, 0, -1).astype(np.float32), isVector=True)
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection([float(d) for d in volume.direction])
    write_image(path, image, outputs=outputs)


def _uncertainty_files(path: Optional[Path]) -> list[Path]:
    """The uncertainty map and its per-slice CSV, or nothing."""
    from .uncertainty import scores_csv_path

    return [] if path is None else [path, scores_csv_path(path)]


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


MODEL_ONLY_OPTIONS = ("min_distance", "slices", "sam_checkpoint")


def _suggest(args: argparse.Namespace) -> None:
    if args.csv is not None:
        _check_output(Path(args.csv), args.overwrite, (".csv",), "CSV file")
    for path, what in ((args.volume, "volume"), (args.model, "model"), (args.sam_checkpoint, "SAM checkpoint")):
        _check_input(path, what)
    if args.model is None:
        _suggest_gaps(args)
    else:
        if args.modality is not None:
            raise InputError("--modality sets what the flow ranking sees: it applies without -m only")
        _suggest_uncertain(args)


def _suggest_gaps(args: argparse.Namespace) -> None:
    """Without a model: the middle slices of the gaps between annotated slices where the two
    directions of flow propagation disagree most (``hsam.guidance.gaps``)."""
    given = [name for name in MODEL_ONLY_OPTIONS if getattr(args, name) is not None]
    if given:
        raise InputError(f"--{given[0].replace('_', '-')} needs a model (-m); without one the gaps are ranked by flow")
    if args.annotated is None:
        raise InputError("without a model (-m), give the annotations with --annotated LABELS (a labelmap or .seg.nrrd)")
    if all(part.strip().isdigit() for part in args.annotated.split(",")):
        raise InputError("without a model, --annotated must be the annotations (a labelmap or .seg.nrrd), not slice "
                         "indices: the flow ranking carries their labels")
    _check_input(args.annotated, "annotations")
    check_distinct([args.csv], [args.volume, args.annotated])
    axis_name = args.axis or "axial"
    with _progress(args, "ranking gaps", "load", enabled=not args.json) as bar:
        from .baselines import flow_propagator
        from .guidance.gaps import rank_gaps
        from .guidance.priors import annotated_slices
        from .io import read_labelmap, read_volume

        volume = read_volume(args.volume)
        labels, _ = read_labelmap(args.annotated, reference=volume)
        axis = SLICE_AXES[axis_name]
        annotated = annotated_slices(labels, axis)
        if len(annotated) < 2:
            raise InputError(f"{printable(Path(args.annotated).name)} has {len(annotated)} annotated {axis_name} "
                             "slice: ranking the gaps between annotated slices needs at least two")
        if all(high - low == 1 for low, high in zip(annotated, annotated[1:])):
            raise InputError(f"no {axis_name} slice lies between two annotated slices ({', '.join(map(str, annotated))})")
        propagation, _ = flow_propagator(volume.array, labels, annotated, axis, args.modality)
        bar.start("rank", f"carrying {len(annotated)} annotated {axis_name} slices both ways")
        gaps = rank_gaps(propagation, args.count, progress=bar)
    rows = [{"rank": rank, "slice": gap.slice, "gap": [gap.low, gap.high], "score": round(gap.score, 3)}
            for rank, gap in enumerate(gaps, start=1)]
    if args.csv is not None:
        lines = "".join(f"{r['rank']},{axis_name},{r['slice']},{r['gap'][0]},{r['gap'][1]},{r['score']:.3f}\n" for r in rows)
        write_bytes_atomic(args.csv, ("rank,axis,slice,gap_low,gap_high,score\n" + lines).encode("utf-8"), overwrite=True)
    summary = (f"{len(rows)} gaps between annotated {axis_name} slices, ranked by the disagreement (voxels) of flow "
               "propagation from below and from above")
    _report_suggestions(args, bar, axis_name, "flow", annotated, rows, summary)


def _suggest_uncertain(args: argparse.Namespace) -> None:
    """With a model: the slices where it is least sure, spread over the volume."""
    from .bundle import load_bundle, read_bundle_metadata
    from .inference import segment_volume, select_device
    from .io import read_volume
    from .suggest import SpreadRule, suggest_slices

    metadata = read_bundle_metadata(args.model)
    if args.axis is not None and args.axis != metadata.slice_axis:
        raise InputError(f"{Path(args.model).name} scores {metadata.slice_axis} slices, not --axis {args.axis}")
    device = select_device(args.device)
    volume = read_volume(args.volume)
    model, metadata = load_bundle(args.model, sam_checkpoint=args.sam_checkpoint)
    annotated = _annotated_slices(args.annotated, volume, metadata.slice_axis)
    with _progress(args, f"scoring slices on {device.type}", "segment", enabled=not args.json) as bar:
        result = segment_volume(
            model, volume, metadata, device=device, batch_size=args.batch_size, slice_range=args.slices,
            progress=bar, uncertainty=args.signal,
        )
    picks = suggest_slices(result.slice_scores, args.count, annotated, SpreadRule(min_distance=args.min_distance))
    rows = [{"rank": rank, "slice": index, "score": round(float(result.slice_scores[index]), 6)}
            for rank, index in enumerate(picks, start=1)]
    if args.csv is not None:
        lines = "".join(f"{r['rank']},{metadata.slice_axis},{r['slice']},{r['score']:.6f}\n" for r in rows)
        write_bytes_atomic(args.csv, ("rank,axis,slice,score\n" + lines).encode("utf-8"), overwrite=True)
    summary = f"{len(rows)} {metadata.slice_axis} slices where {Path(args.model).name} is least sure ({args.signal})"
    _report_suggestions(args, bar, metadata.slice_axis, "uncertainty", annotated, rows, summary)


def _report_suggestions(args: argparse.Namespace, bar, axis: str, ranking: str, annotated: list[int],
                        rows: list[dict], summary: str) -> None:
    """``--json``: one object on stdout; ``--progress json``: the result event holds it; else a table
    on stderr and the slices, comma-separated, on stdout."""
    report = {"axis": axis, "ranking": ranking, "annotated": annotated, "suggestions": rows}
    if args.json:
        print(json.dumps(report))
    elif isinstance(bar, JsonProgress):
        bar.result(summary, **report)
    else:
        print(summary, file=sys.stderr)
        print(f"{'rank':>4} {axis + ' slice':>14} {'gap':>11} {'score':>12}", file=sys.stderr)
        for r in rows:
            gap = f"{r['gap'][0]}–{r['gap'][1]}" if "gap" in r else ""
            print(f"{r['rank']:>4} {r['slice']:>14} {gap:>11} {r['score']:>12.4f}", file=sys.stderr)
        print(",".join(str(r["slice"]) for r in rows))


def _finetune(args: argparse.Namespace) -> None:
    from .cohort import cases_from_arguments

    output = Path(args.output)
    _check_output(output, args.overwrite, (".hsam",), "model file")
    listed = cases_from_arguments(args.inputs, args.manifest, ("image", "labels"))
    if args.preview is not None:
        _check_output(Path(args.preview), True, (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES), "preview")
        if len(listed) != 1:
            raise InputError("--preview segments the training volume: give one volume")
    for what, path in (("SAM checkpoint", args.sam_checkpoint), ("base model", args.base_model)):
        _check_input(path, what)
    files = [path for case in listed for path in (case.first, case.second)]
    check_distinct([output, args.preview], [*files, args.sam_checkpoint, args.base_model])
    from .bundle import read_bundle_metadata
    from .io import read_labelmap, read_volume
    from .sam_weights import check_sam_checkpoint

    preset = args.preset or "tiny"
    if args.base_model is not None:
        base_preset = read_bundle_metadata(args.base_model).preset
        if args.preset is not None and base_preset != args.preset:
            raise InputError(f"{Path(args.base_model).name} is a {base_preset} model, not --preset {args.preset}")
    elif args.sam_checkpoint is not None:
        check_sam_checkpoint(args.sam_checkpoint, preset)
    from .training import TrainingCase

    cases = []
    for case in listed:
        volume = read_volume(case.first, series=args.series)
        labels, segments = read_labelmap(case.second, reference=volume, resample=args.resample_labels)
        cases.append(TrainingCase(volume, labels, segments, case.slices, case.name))

    from .bundle import save_bundle
    from .inference import select_device
    from .preprocess import IntensityPreprocessing
    from .training import FinetuneConfig, finetune_cohort, is_main_process, training_precision

    training_precision(args.precision, select_device(args.device))  # refuse an emulated precision before training
    preprocessing = None
    if args.modality is not None:
        preprocessing = IntensityPreprocessing(mode="ct" if args.modality == "ct" else "percentile")
    config = FinetuneConfig(
        preset=preset,
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
        validation_volumes=args.validation_volumes,
        guidance=args.guided,
        atlas=args.atlas,
        stop=(lambda: Path(args.stop_file).exists()) if args.stop_file is not None else None,
    )
    main_process = is_main_process()
    if args.atlas and args.guided is None:
        raise InputError("--atlas keeps the training volumes for a guided model's prior: add --guided")
    with Outputs(args.overwrite) as outputs, _progress(args, "fine-tuning", "train", enabled=main_process) as bar:
        if main_process:
            outputs.claim([output])
        preview = _PreviewWriter(Path(args.preview), cases[0], args.preview_interval, bar) if args.preview else None

        def on_step(p) -> None:
            dice = f", val Dice {p.val_dice:.3f}" if p.val_dice is not None else ""
            bar(p.fraction, f"epoch {p.epoch}, loss {p.loss:.4f}{dice}",
                epoch=p.epoch, step=p.step, loss=p.loss, val_dice=p.val_dice)

        volumes = cases[0].name if len(cases) == 1 else f"{len(cases)} volumes"
        bar.start("train", f"fine-tuning {config.preset} on {volumes}")
        result = finetune_cohort(cases, config, progress=on_step, preview=preview)
        if main_process:
            bar.start("save", f"saving {output.name}")
            save_bundle(output, result.model, result.metadata, outputs=outputs, atlases=result.atlases)
            outputs.publish()
    if main_process:
        training = result.metadata.training
        summary = f"{training.get('epochs')} epochs, {training.get('steps')} steps in {training.get('seconds')} s"
        choice = (result.metadata.guidance or {}).get("choice")
        if choice:
            summary += "; kept " + ", ".join(f"{n}: {c}" for n, c in zip(result.metadata.class_names, choice))
        if result.atlases:
            summary += f"; atlas of {len(result.atlases)} volumes ({output.stat().st_size / 2**20:.1f} MB model file)"
        if isinstance(bar, JsonProgress):
            bar.result(summary, output=output)
        else:
            print(f"{summary}; saved {output}")


class _PreviewWriter:
    """Segments the training volume with the model in training (guided: from its annotations) and
    replaces ``path``, before the first step and then at most every ``interval`` seconds."""

    def __init__(self, path: Path, case, interval: float, bar) -> None:
        self.path, self.case, self.interval, self.bar = path, case, interval, bar
        self.last = -math.inf

    def __call__(self, model, metadata: BundleMetadata) -> None:
        if time.monotonic() - self.last < self.interval:
            return
        from .continuation import align_to_base
        from .inference import segment_volume
        from .io import write_output

        labels, segments = align_to_base(self.case.labels, self.case.segments, metadata, self.path.name)
        annotations = labels if metadata.guided else None
        device = next(model.parameters()).device
        result = segment_volume(model, self.case.volume, metadata, device=device, annotations=annotations)
        write_output(self.path, result.labels, self.case.volume, segments, overwrite=True)
        self.last = time.monotonic()
        if isinstance(self.bar, JsonProgress):
            self.bar.emit("preview", f"preview written: {self.path.name}", output=self.path)


def _evaluate(args: argparse.Namespace) -> None:
    from .cohort import cases_from_arguments

    outputs = [(Path(p), kind) for p, kind in ((args.json, ".json"), (args.csv, ".csv")) if p is not None]
    for path, kind in outputs:
        _check_output(path, args.overwrite, (kind,), f"{kind[1:].upper()} file")
    cases = cases_from_arguments(args.inputs, args.manifest, ("prediction", "reference"))
    check_distinct([path for path, _ in outputs], [path for case in cases for path in (case.first, case.second)])
    from .metrics import evaluate, summarise

    rows = [{"case": case.name, **row}
            for case in cases for row in evaluate(case.first, case.second, resample=args.resample_labels)]
    print(f"{'case':<24} {'class':<24} {'label':>5} {'Dice':>7} {'HD95 mm':>9}")
    for row in rows:
        print(f"{printable(row['case'])[:24]:<24} {printable(row['name'])[:24]:<24} {row['label']:>5} "
              f"{row['dice']:>7.4f} {_mm(row['hd95_mm']):>9}")
    summary = summarise(rows)
    if len(cases) > 1:
        print(f"\n{'class':<24} {'cases':>5} {'Dice mean ± sd':>16} {'HD95 mm mean ± sd':>19}")
        for row in summary:
            dice = f"{row['dice_mean']:.4f} ± {row['dice_sd']:.4f}"
            hd95 = "-" if row["hd95_mm_mean"] is None else f"{row['hd95_mm_mean']:.2f} ± {row['hd95_mm_sd']:.2f}"
            print(f"{printable(row['name'])[:24]:<24} {row['cases']:>5} {dice:>16} {hd95:>19}")
    with Outputs(args.overwrite) as files:  # both score files or neither
        if args.json is not None:
            report = json.dumps({"cases": rows, "summary": summary}, indent=2) + "\n"
            write_bytes_atomic(args.json, report.encode("utf-8"), outputs=files)
        if args.csv is not None:
            write_bytes_atomic(args.csv, _csv(rows).encode("utf-8"), outputs=files)
        files.publish()


def _mm(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


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
    _check_input(args.model, "model file")
    if not path.is_file():
        raise InputError(f"{printable(path)} is not a file")
    if path.suffix.lower() == ".pth":
        _info_sam(path)
    else:
        _info_bundle(path)


def _info_sam(path: Path) -> None:
    from .sam_weights import SAM_CHECKPOINTS, cached_sha256

    name = printable(path.name)
    by_name = {info.filename: preset for preset, info in SAM_CHECKPOINTS.items()}
    digest = cached_sha256(path)
    matching = [preset for preset, info in SAM_CHECKPOINTS.items() if info.sha256 == digest]
    if matching:
        print(f"{name}: official SAM {matching[0]} weights ({SAM_CHECKPOINTS[matching[0]].filename}); sha256 matches")
    elif path.name in by_name:
        preset = by_name[path.name]
        raise InputError(
            f"{name} is named like the official SAM {preset} weights but its sha256 {digest[:12]}… does not "
            f"match {SAM_CHECKPOINTS[preset].sha256[:12]}…: download it again (hsam download {preset})"
        )
    else:
        print(f"{name}: not an official SAM checkpoint (sha256 {digest})")


def _info_bundle(path: Path) -> None:
    from .bundle import ATLAS_PREFIX, atlas_bytes, read_bundle

    header, metadata = read_bundle(path)
    weights = {k: t for k, t in header.tensors.items() if not k.startswith(ATLAS_PREFIX)}
    stored = sum(tensor.numel for tensor in weights.values())
    base = metadata.base_checkpoint
    print(f"model:        {printable(path.name)}")
    print(f"preset:       {metadata.preset}, input {metadata.img_size}×{metadata.img_size}, CMAttn {metadata.cmattn}, "
          f"LoRA rank {metadata.lora_rank}")
    print(f"weights:      {stored:,} values in {len(weights)} tensors"
          + (f", on the frozen SAM {metadata.preset} image encoder" if base else ""))
    print(f"slice axis:   {metadata.slice_axis}; preprocessing {json.dumps(metadata.preprocessing)}")
    print("base weights: " + (f"{printable(base['name'])} (sha256 {base['sha256'][:12]}…)" if base
                              else "none (trained from scratch)"))
    guidance = metadata.guidance
    print("mode:         " + (f"guided (prior: {guidance['prior']}; prompt-free on "
                              f"{guidance.get('prompt_dropout', 0):.0%} of the training steps)" if guidance
                              else "prompt-free"))
    atlas = (guidance or {}).get("atlas")
    if atlas:
        print(f"atlas:        {atlas['volumes']} training volumes ({atlas_bytes(header) / 2**20:.1f} MB), registered "
              f"({atlas['registration']}) onto a volume segmented without annotations")
    print("classes:")
    for index, (name, value, color, term) in enumerate(zip(
        metadata.class_names, metadata.label_values, metadata.class_colors, metadata.terminology
    )):
        rgb = "#" + "".join(f"{round(255 * c):02x}" for c in color)
        print(f"  {value:>5}  {printable(name):<24} {rgb}" + (f"  {printable(term)}" if term else "")
              + _class_choice(guidance, index) + _class_choice(atlas, index, " with the atlas"))
    if metadata.training:
        print("training:")
        for key, value in metadata.training.items():
            print(f"  {printable(key, 60)}: {printable(json.dumps(value))}")


def _class_choice(guidance: Optional[dict], index: int, where: str = "") -> str:
    """What a guided model keeps for class ``index`` (``where``: with which prior) and the Dice of each
    source that chose it."""
    if not guidance or "choice" not in guidance:
        return ""
    dice = guidance.get("selection", {}).get("dice", {})
    scores = ", ".join(f"{source} {'–' if d[index] is None else f'{d[index]:.3f}'}"
                       for source, d in dice.items() if source != "chosen")
    slices = guidance.get("selection", {}).get("slices")
    held_out = f"{slices} held-out slice{'' if slices == 1 else 's'}"
    return f"  keeps {guidance['choice'][index]}{where}" + (f" (Dice on {held_out}: {scores})" if scores else "")


def _download(args: argparse.Namespace) -> None:
    from .download import download_sam_weights

    with _progress(args, f"SAM {args.name}", "download") as bar:
        path = download_sam_weights(args.name, cache_dir=args.cache_dir, progress=bar)
    if isinstance(bar, JsonProgress):
        bar.result(f"SAM {args.name} weights in {path.parent}", output=path)
    else:
        print(path)


def _devices(args: argparse.Namespace) -> None:
    from .devices import describe_probe, probe_devices

    probe = probe_devices()
    print(json.dumps(probe) if args.json else "\n".join(describe_probe(probe)))


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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def seed_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=2345, help="random seed of the fine-tuning (default: 2345, the authors')")

    def cmattn_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cmattn", default="reference", choices=("reference", "paper"),
                       help="CMAttn variant: reference = the authors' code (default), paper = as the paper describes it")

    def progress_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--progress", default="bar", choices=("bar", "json"),
                       help="bar: a progress bar on stderr (default); json: one JSON object per line on stdout "
                       "(event, phase, fraction, message; epoch, loss, val_dice when training), for programs")

    def series_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--series", metavar="UID",
                       help="the DICOM series to read when the volume folder holds several (default: the largest)")

    def resample_option(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--resample-labels", action="store_true",
                       help=f"resample {what} onto the other grid (nearest neighbour) instead of refusing it")

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
    series_option(p)
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
    p.add_argument("--annotations", metavar="LABELS",
                   help="guided models: this volume's annotated slices (.seg.nrrd or labelmap on its grid, segments "
                   "named as the model's classes); they are propagated into the prior the model corrects, and kept "
                   "exactly as drawn. Without it a guided model runs prompt-free")
    p.add_argument("--sam-checkpoint", metavar="PATH",
                   help="official SAM weights the model was fine-tuned from (default: the download cache)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    progress_option(p)
    p.set_defaults(run=_segment)

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
    series_option(p)
    resample_option(p, "annotations on another voxel grid than the volume's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    progress_option(p)
    p.set_defaults(run=_propagate)

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
    uncertainty_signal_option(p, "--signal")
    p.add_argument("--slices", type=_slice_range, metavar="FIRST:LAST", help="with -m, consider only these slices")
    p.add_argument("--csv", metavar="FILE", help="also write rank, axis, slice (the gap) and score as CSV")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (axis, ranking, annotated, suggestions: rank, slice, gap, score) "
                   "instead of lines for people")
    device_option(p)
    p.add_argument("--batch-size", type=_positive(int), default=4, help="slices per forward pass (default: 4)")
    p.add_argument("--sam-checkpoint", metavar="PATH", help="official SAM weights of the model (default: the cache)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CSV file")
    progress_option(p)
    p.set_defaults(run=_suggest)

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
    series_option(p)
    resample_option(p, "a labelmap on another voxel grid than the volume's")
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
    seed_option(p)
    cmattn_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    progress_option(p)
    p.set_defaults(run=_finetune)

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
    resample_option(p, "a prediction on another voxel grid than the reference's")
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
    progress_option(p)
    p.set_defaults(run=_download)

    p = commands.add_parser(
        "devices", help="list the GPUs and the CPU PyTorch can use",
        description="Describe what PyTorch can compute on: CUDA GPUs (name, memory, bfloat16), Apple MPS, the CPU, "
        "the torch version and build, and the device `--device auto` picks.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines for people")
    p.set_defaults(run=_devices)

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
    cmattn_option(p)
    seed_option(p)
    device_option(p)
    p.set_defaults(run=_demo)
    return parser


@contextlib.contextmanager
def _only_hsam_warnings() -> Iterator[None]:
    """HSAM's warnings as one ``hsam: warning: ...`` line each; other libraries' are not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", HSAMWarning)
        warnings.showwarning = lambda message, *_: print(f"hsam: warning: {printable(message, 400)}", file=sys.stderr)
        yield


def _stdout_to_nowhere() -> None:
    """After a closed pipe (``hsam info … | head``): no second error when Python flushes stdout at exit."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``hsam`` with ``argv`` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _only_hsam_warnings(), _sigterm_unwinds():
            args.run(args)
            sys.stdout.flush()
    except HSAMError as error:
        print(f"hsam: error: {printable(error, 600)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("hsam: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("hsam: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        _stdout_to_nowhere()
        return EXIT_BROKEN_PIPE
    except MemoryError:
        print("hsam: error: out of memory; try a smaller batch, volume or model", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, OSError) and error.filename is not None:  # a file the system refused
            print(f"hsam: error: {printable(error.filename)}: {error.strerror or error}", file=sys.stderr)
            return EXIT_INPUT_ERROR
        print(f"hsam: internal error: {type(error).__name__}: {printable(error, 300)} "
              f"(rerun as `hsam --debug {args.command} ...` for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return 0
