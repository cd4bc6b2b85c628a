"""``hsam finetune`` (a model from annotated volumes, with previews while it trains) and ``hsam evaluate``
(Dice and HD95 against references)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..runtime.errors import InputError, printable
from ..runtime.progress import JsonProgress
from ..volumes.files import Outputs, check_distinct, write_bytes_atomic
from .common import LABELMAP_SUFFIXES, SEGMENTATION_SUFFIX, _check_input, _check_output, _progress

if TYPE_CHECKING:
    from ..models.bundle import BundleMetadata


def _finetune(args: argparse.Namespace) -> None:
    output = Path(args.output)
    cases = _read_training_cases(args, output)  # every check that needs no torch, before it is loaded
    from ..runtime.devices import select_device
    from ..training.config import training_precision
    from ..training.distributed import is_main_process

    training_precision(args.precision, select_device(args.device))  # refuse an emulated precision before training
    config = _finetune_config(args)
    main_process = is_main_process()
    if args.atlas and args.guided is None:
        raise InputError("--atlas keeps the training volumes for a guided model's prior: add --guided")
    with Outputs(args.overwrite) as outputs, _progress(args, "fine-tuning", "train", enabled=main_process) as bar:
        result = _train_and_save(args, cases, config, output, outputs, bar, main_process)
    if main_process:
        _print_finetune_summary(result, output, bar)


def _read_training_cases(args: argparse.Namespace, output: Path) -> list:
    """Checks the output, the inputs and the SAM checkpoint or base model, then reads every training volume
    and its labels (``TrainingCase``s)."""
    from ..training.cohort import cases_from_arguments

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
    from ..models.bundle import read_bundle_metadata
    from ..models.sam_weights import check_sam_checkpoint
    from ..volumes.segmentation import read_labelmap
    from ..volumes.volume import read_volume

    preset = args.preset or "tiny"
    if args.base_model is not None:
        base_preset = read_bundle_metadata(args.base_model).preset
        if args.preset is not None and base_preset != args.preset:
            raise InputError(f"{Path(args.base_model).name} is a {base_preset} model, not --preset {args.preset}")
    elif args.sam_checkpoint is not None:
        check_sam_checkpoint(args.sam_checkpoint, preset)
    from ..training.config import TrainingCase

    cases = []
    for case in listed:
        volume = read_volume(case.first, series=args.series)
        labels, segments = read_labelmap(case.second, reference=volume, resample=args.resample_labels)
        cases.append(TrainingCase(volume, labels, segments, case.slices, case.name))
    return cases


def _finetune_config(args: argparse.Namespace):
    """The ``FinetuneConfig`` of the command's options."""
    from ..training.config import FinetuneConfig
    from ..volumes.preprocess import IntensityPreprocessing

    preprocessing = None
    if args.modality is not None:
        preprocessing = IntensityPreprocessing(mode="ct" if args.modality == "ct" else "percentile")
    return FinetuneConfig(
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
        validation_volumes=args.validation_volumes,
        guidance=args.guided,
        atlas=args.atlas,
        stop=(lambda: Path(args.stop_file).exists()) if args.stop_file is not None else None,
    )


def _train_and_save(args: argparse.Namespace, cases: list, config, output: Path, outputs: Outputs, bar,
                    main_process: bool):
    """Fine-tunes on ``cases`` with progress (and previews) on ``bar``; the main process saves the bundle."""
    from ..models.bundle import save_bundle
    from ..training.finetune import finetune_cohort

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
    return result


def _print_finetune_summary(result, output: Path, bar) -> None:
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
        from ..inference.segment import segment_volume
        from ..training.continuation import align_to_base
        from ..volumes.segmentation import write_output

        labels, segments = align_to_base(self.case.labels, self.case.segments, metadata, self.path.name)
        annotations = labels if metadata.guided else None
        device = next(model.parameters()).device
        result = segment_volume(model, self.case.volume, metadata, device=device, annotations=annotations)
        write_output(self.path, result.labels, self.case.volume, segments, overwrite=True)
        self.last = time.monotonic()
        if isinstance(self.bar, JsonProgress):
            self.bar.emit("preview", f"preview written: {self.path.name}", output=self.path)


def _evaluate(args: argparse.Namespace) -> None:
    from ..training.cohort import cases_from_arguments

    outputs = [(Path(p), kind) for p, kind in ((args.json, ".json"), (args.csv, ".csv")) if p is not None]
    for path, kind in outputs:
        _check_output(path, args.overwrite, (kind,), f"{kind[1:].upper()} file")
    cases = cases_from_arguments(args.inputs, args.manifest, ("prediction", "reference"))
    check_distinct([path for path, _ in outputs], [path for case in cases for path in (case.first, case.second)])
    from ..evaluation.metrics import evaluate, summarise

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
