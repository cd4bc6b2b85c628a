"""``hsam suggest``: the slices to annotate next, ranked by flow disagreement without a model or by a
model's uncertainty."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..runtime.errors import InputError, printable
from ..runtime.progress import JsonProgress
from ..volumes.constants import SLICE_AXES
from ..volumes.files import check_distinct, write_bytes_atomic
from .common import _check_input, _check_output, _int_list, _progress

def _annotated_slices(text: Optional[str], volume, axis: str) -> list[int]:
    """Slice indices from ``I,J,...`` or from the labelled slices of a labelmap / segmentation file."""
    if text is None:
        return []
    if all(part.strip().isdigit() for part in text.split(",")):
        return _int_list(text)
    from ..guidance.priors import annotated_slices
    from ..volumes.segmentation import read_labelmap

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
        from ..evaluation.baselines import flow_propagator
        from ..guidance.gaps import rank_gaps
        from ..guidance.priors import annotated_slices
        from ..volumes.segmentation import read_labelmap
        from ..volumes.volume import read_volume

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
    from ..inference.segment import segment_volume
    from ..inference.suggest import SpreadRule, suggest_slices
    from ..models.bundle import load_bundle, read_bundle_metadata
    from ..runtime.devices import select_device
    from ..volumes.volume import read_volume

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
