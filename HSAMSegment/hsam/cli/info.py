"""``hsam info`` (a model bundle or SAM weights described), ``hsam download`` (SAM weights),
``hsam devices`` and ``hsam demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..runtime.errors import InputError, printable
from ..runtime.progress import JsonProgress
from .common import _check_input, _progress, _ProgressBar

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
    from ..models.sam_weights import SAM_CHECKPOINTS, cached_sha256

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
    from ..models.bundle import ATLAS_PREFIX, atlas_bytes, read_bundle

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
    from ..models.download import download_sam_weights

    with _progress(args, f"SAM {args.name}", "download") as bar:
        path = download_sam_weights(args.name, cache_dir=args.cache_dir, progress=bar)
    if isinstance(bar, JsonProgress):
        bar.result(f"SAM {args.name} weights in {path.parent}", output=path)
    else:
        print(path)


def _devices(args: argparse.Namespace) -> None:
    from ..runtime.devices import describe_probe, probe_devices

    probe = probe_devices()
    print(json.dumps(probe) if args.json else "\n".join(describe_probe(probe)))


def _demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    with _ProgressBar("demo") as bar:
        result = run_demo(
            args.out, sam_checkpoint=args.sam_checkpoint, epochs=args.epochs, time_budget=args.time_budget,
            device=args.device, progress=bar, img_size=args.img_size, cmattn=args.cmattn, seed=args.seed,
        )
    print(result.table())
    print(f"files written to {Path(args.out).resolve()}")
