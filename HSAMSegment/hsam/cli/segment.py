"""``hsam segment`` (a volume with a model, guided by annotations or an atlas, or prompt-free) and
``hsam propagate`` (annotated slices along the optical flow, no model)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..runtime.errors import HSAMWarning, InputError, printable
from ..runtime.progress import JsonProgress
from ..volumes.constants import SLICE_AXES
from ..volumes.files import Outputs, check_distinct, file_suffix
from .common import LABELMAP_SUFFIXES, PROBABILITY_SUFFIXES, SEGMENTATION_SUFFIX, _check_input, _check_output, _progress

if TYPE_CHECKING:
    from ..inference.segment import SegmentationResult
    from ..models.bundle import BundleMetadata
    from ..volumes.volume import Volume


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
        from ..volumes.segmentation import Segment, write_output

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
            from ..inference.uncertainty import write_uncertainty

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
        from ..evaluation.baselines import flow_propagation
        from ..guidance.flow import modality_of
        from ..guidance.priors import annotated_slices
        from ..volumes.segmentation import read_labelmap, write_output
        from ..volumes.volume import read_volume

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
    from ..models.bundle import read_bundle_metadata
    from ..volumes.volume import read_volume

    metadata = read_bundle_metadata(args.model)  # a bad model file is refused before the volume is read
    if args.annotations is not None and not metadata.guided:
        raise InputError(f"{Path(args.model).name} is a prompt-free model: --annotations needs a model "
                         "fine-tuned with --guided")
    bar.start("load", f"loading {Path(args.volume).name} and {Path(args.model).name}")
    volume = read_volume(args.volume, series=args.series)
    annotations = _read_annotations(args.annotations, volume, metadata, args.model) if args.annotations else None

    from ..inference.segment import NOTHING_FOUND, segment_volume
    from ..models.bundle import load_bundle, read_atlases
    from ..runtime.devices import describe_device, resolve_precision, select_device

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
    by name, as when continuing a model; see ``hsam.training.continuation``)."""
    from ..training.continuation import align_to_base
    from ..volumes.segmentation import read_labelmap

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

    from ..volumes.volume import write_image

    image = sitk.GetImageFromArray(np.moveaxis(probabilities, 0, -1).astype(np.float32), isVector=True)
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection([float(d) for d in volume.direction])
    write_image(path, image, outputs=outputs)


def _uncertainty_files(path: Optional[Path]) -> list[Path]:
    """The uncertainty map and its per-slice CSV, or nothing."""
    from ..inference.uncertainty import scores_csv_path

    return [] if path is None else [path, scores_csv_path(path)]


def _check_uncertainty_output(path: Path, overwrite: bool) -> None:
    from ..inference.uncertainty import MAP_SUFFIXES, scores_csv_path

    _check_output(path, overwrite, MAP_SUFFIXES, "uncertainty map")
    _check_output(scores_csv_path(path), overwrite, (".csv",), "per-slice score file")
