"""HSAM model bundles: one safetensors file with what fine-tuning changed plus JSON metadata.

Loading never unpickles. When the model was fine-tuned from official SAM weights the frozen image
encoder is not stored (a few MB instead of hundreds); it is rebuilt from those weights, identified by
name and sha256. A model trained from scratch (the ``tiny`` preset) stores every tensor.

A bundle is checked before anything is built, without torch: the safetensors header must fit the
file, the metadata must pass ``validate_metadata`` (types, ranges, known values); then the stored
tensor shapes are compared with those of the model the metadata describes, built on torch's ``meta``
device (no memory), before the model is allocated.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from ..guidance.kinds import CHOICE_SOURCES, PRIOR_KINDS, REGISTRATION_MODES
from ..modeling.options import CMATTN_MODES
from ..runtime.errors import CheckpointError, InputError, printable
from ..runtime.version import __version__
from ..volumes.constants import INTENSITY_MODES, MAX_LABEL_VALUE, SLICE_AXES
from ..volumes.files import Outputs, check_writable, write_bytes_atomic
from .presets import MAX_CLASSES, MAX_LORA_RANK, PRESETS, SUPPORTED_IMG_SIZES
from .safetensors_header import DTYPE_BYTES, SafetensorsHeader, read_header
from .sam_weights import SAM_CHECKPOINTS, cached_sha256, default_cache_dir

if TYPE_CHECKING:
    import torch

    from ..modeling.hsam import HSAM

PathLike = Union[str, os.PathLike]
BUNDLE_SUFFIX = ".hsam"
FORMAT_VERSION = 1
METADATA_KEY = "hsam"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
ATLAS_PREFIX = "atlas."  # tensors atlas.<i>.image and atlas.<i>.labels (uint8), described in guidance.atlas.grids
MAX_NAME_LENGTH = 1000

# Distinct colours (RGB 0–1) for classes without a colour of their own.
DEFAULT_COLORS = [
    (0.90, 0.36, 0.26), (0.32, 0.62, 0.88), (0.98, 0.82, 0.26), (0.45, 0.78, 0.38),
    (0.70, 0.45, 0.85), (0.95, 0.60, 0.75), (0.35, 0.80, 0.78), (0.85, 0.55, 0.30),
]


def default_color(index: int) -> tuple[float, float, float]:
    return DEFAULT_COLORS[index % len(DEFAULT_COLORS)]


@dataclass
class BundleMetadata:
    """What a model needs to be used correctly: classes, preprocessing, provenance. ``guidance``:
    None for a prompt-free model; for a guided one {"prior": a PRIOR_KINDS name it learned with,
    "prompt_dropout": the share of training steps run prompt-free, "choice": per class, the
    CHOICE_SOURCES name segmentation keeps (absent: guided), "selection": {"slices": how many
    held-out annotated slices the choice was made on, "dice": per source, the per-class Dice there},
    "atlas": with the training volumes' atlases, {"volumes": how many, "registration": a
    REGISTRATION_MODES name, "choice" and "selection" as above for the atlas prior, "grids": per
    atlas {"name", "spacing", "origin", "direction"}}}."""

    @property
    def guided(self) -> bool:
        return self.guidance is not None

    preset: str
    img_size: int
    num_classes: int
    class_names: list[str]
    class_colors: list[tuple[float, float, float]]
    label_values: list[int]
    preprocessing: dict
    slice_axis: str = "axial"
    terminology: list[Optional[str]] = field(default_factory=list)
    cmattn: str = "reference"
    lora_rank: int = 5
    base_checkpoint: Optional[dict] = None
    guidance: Optional[dict] = None
    training: dict = field(default_factory=dict)
    hsam_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        n = self.num_classes
        if not (len(self.class_names) == len(self.class_colors) == len(self.label_values) == n):
            raise InputError(f"metadata must give {n} class names, colours and label values")
        if not self.terminology:
            self.terminology = [None] * n
        self.class_colors = [tuple(float(c) for c in rgb) for rgb in self.class_colors]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BundleMetadata":
        """Parse and check (``validate_metadata``) the JSON; ``ValueError`` naming the first problem."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("it is nested too deeply") from None
        validate_metadata(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ------------------------------------------------------------------------------ metadata schema


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_pair(value: object) -> bool:
    """Two finite numbers, the first smaller."""
    return isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)) and value[0] < value[1]


def _is_color(value: object) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_number(c) and 0 <= c <= 1 for c in value)


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)


def _check_items(data: dict, key: str, count: int, valid: Callable[[object], bool], what: str) -> None:
    items = data[key]
    _require(isinstance(items, list) and len(items) == count, f"{key} must be a list of {count}")
    bad = next((item for item in items if not valid(item)), None)
    _require(bad is None, f"{key} holds {printable(json.dumps(bad), 60)}, not {what}")


def _check_preprocessing(value: object) -> None:
    _require(isinstance(value, dict), "preprocessing must be an object")
    _require(value.get("mode") in INTENSITY_MODES, f"preprocessing mode must be one of {', '.join(INTENSITY_MODES)}")
    extra = set(value) - {"mode", "window", "percentiles"}
    _require(not extra, f"preprocessing has unknown fields {printable(sorted(extra), 60)}")
    for key in ("window", "percentiles"):
        _require(key not in value or _is_pair(value[key]), f"preprocessing {key} must be two increasing numbers")


def _check_base_checkpoint(value: object) -> None:
    if value is None:
        return
    _require(
        isinstance(value, dict) and isinstance(value.get("name"), str)
        and isinstance(value.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", value["sha256"]) is not None,
        "base_checkpoint must hold a name and a sha256",
    )


def _check_guidance(value: object, num_classes: object) -> None:
    if value is None:
        return
    _require(isinstance(value, dict) and value.get("prior") in PRIOR_KINDS,
             f"guidance must name a prior, one of {', '.join(PRIOR_KINDS)}")
    dropout = value.get("prompt_dropout", 0.0)
    _require(_is_number(dropout) and 0 <= dropout <= 1, "guidance prompt_dropout must be from 0 to 1")
    choice = value.get("choice")
    _check_choice(choice, num_classes, "guidance choice")
    _check_atlas(value.get("atlas"), num_classes)


def _check_choice(choice: object, num_classes: object, what: str) -> None:
    _require(choice is None or (isinstance(choice, list) and len(choice) == num_classes
                                and all(c in CHOICE_SOURCES for c in choice)),
             f"{what} must list one of {', '.join(CHOICE_SOURCES)} per class")


def _check_atlas(value: object, num_classes: object) -> None:
    if value is None:
        return
    _require(isinstance(value, dict) and _is_int(value.get("volumes")) and value["volumes"] >= 1
             and value.get("registration") in REGISTRATION_MODES, "guidance atlas must give volumes and a registration")
    _check_choice(value.get("choice"), num_classes, "guidance atlas choice")
    grids = value.get("grids", [])
    _require(isinstance(grids, list) and all(
        isinstance(g, dict) and isinstance(g.get("name"), str) and _is_triple(g.get("spacing"))
        and _is_triple(g.get("origin")) and isinstance(g.get("direction"), list) and len(g["direction"]) == 9
        and all(_is_number(d) for d in g["direction"]) for g in grids), "guidance atlas grids are malformed")


def _is_triple(value: object) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)


REQUIRED_FIELDS = ("preset", "img_size", "num_classes", "class_names", "class_colors", "label_values", "preprocessing")


def validate_metadata(data: object) -> None:
    """Check bundle metadata parsed from JSON field by field (unknown fields are ignored, for newer
    bundles); ``ValueError`` naming the first problem."""
    _require(isinstance(data, dict), "it is not a JSON object")
    missing = [key for key in REQUIRED_FIELDS if key not in data]
    _require(not missing, f"{', '.join(missing)} missing")
    _require(_is_int(data.get("format_version", FORMAT_VERSION)) and 1 <= data.get("format_version", 1) <= FORMAT_VERSION,
             f"format_version {printable(data.get('format_version'), 20)} is not one this HSAM {__version__} reads")
    _require(data["preset"] in PRESETS, f"preset must be one of {', '.join(PRESETS)}")
    _require(data["img_size"] in SUPPORTED_IMG_SIZES and _is_int(data["img_size"]),
             f"img_size must be one of {', '.join(map(str, SUPPORTED_IMG_SIZES))}")
    n = data["num_classes"]
    _require(_is_int(n) and 1 <= n <= MAX_CLASSES, f"num_classes must be an integer from 1 to {MAX_CLASSES}")
    _check_items(data, "class_names", n, lambda v: isinstance(v, str) and 0 < len(v) <= MAX_NAME_LENGTH,
                 f"a name of 1–{MAX_NAME_LENGTH} characters")
    _check_items(data, "class_colors", n, _is_color, "three numbers from 0 to 1")
    _check_items(data, "label_values", n, lambda v: _is_int(v) and 1 <= v <= MAX_LABEL_VALUE,
                 f"an integer from 1 to {MAX_LABEL_VALUE}")
    _require(len(set(data["label_values"])) == n, "label_values repeat a value")
    if data.get("terminology"):
        _check_items(data, "terminology", n, lambda v: v is None or isinstance(v, str), "a string or null")
    _check_preprocessing(data["preprocessing"])
    _require(data.get("slice_axis", "axial") in SLICE_AXES, f"slice_axis must be one of {', '.join(SLICE_AXES)}")
    _require(data.get("cmattn", "reference") in CMATTN_MODES, f"cmattn must be one of {', '.join(CMATTN_MODES)}")
    rank = data.get("lora_rank", 5)
    _require(_is_int(rank) and 1 <= rank <= MAX_LORA_RANK, f"lora_rank must be an integer from 1 to {MAX_LORA_RANK}")
    _check_base_checkpoint(data.get("base_checkpoint"))
    _check_guidance(data.get("guidance"), data.get("num_classes"))
    _require(isinstance(data.get("training", {}), dict), "training must be an object")
    _require(isinstance(data.get("hsam_version", ""), str), "hsam_version must be a string")


# ----------------------------------------------------------------------------------- the file


def _stored_state(model: HSAM, full: bool) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if full:
        return state
    return {k: v for k, v in state.items() if not k.startswith("image_encoder.") or ".qkv.a_" in k or ".qkv.b_" in k}


def save_bundle(
    path: PathLike, model: HSAM, metadata: BundleMetadata, overwrite: bool = False, outputs: Optional[Outputs] = None,
    atlases: Sequence = (),
) -> Path:
    """Write the bundle atomically (``hsam.volumes.files``; staged in ``outputs`` if given). Returns the path.
    ``atlases`` (``hsam.guidance.atlas.Atlas``, a guided model's): stored with it, their grids in
    ``metadata.guidance["atlas"]``."""
    from safetensors.torch import save

    path = Path(path)
    check_writable(path, overwrite or outputs is not None and outputs.overwrite)
    if atlases:
        metadata.guidance["atlas"]["grids"] = [atlas_grid(a) for a in atlases]
    try:
        validate_metadata(json.loads(metadata.to_json()))
    except ValueError as e:
        raise InputError(f"cannot save {path.name}: its metadata would be invalid ({e})") from None
    merged = [a for a in model.lora_adapters() if a.merged]
    for adapter in merged:
        adapter.unmerge()
    try:
        state = _stored_state(model, full=metadata.base_checkpoint is None)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        payload = save({**tensors, **_atlas_tensors(atlases)}, {METADATA_KEY: metadata.to_json()})
    finally:
        for adapter in merged:
            adapter.merge()
    write_bytes_atomic(path, payload, overwrite, outputs)
    return path


def atlas_grid(atlas) -> dict:
    """The geometry of an atlas as ``guidance.atlas.grids`` keeps it."""
    image = atlas.image
    return {"name": atlas.name, "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}


def _atlas_tensors(atlases: Sequence) -> dict:
    import torch

    tensors = {}
    for index, atlas in enumerate(atlases):
        image, labels = atlas.arrays
        tensors[f"{ATLAS_PREFIX}{index}.image"] = torch.from_numpy(image)
        tensors[f"{ATLAS_PREFIX}{index}.labels"] = torch.from_numpy(labels)
    return tensors


def atlas_bytes(header: SafetensorsHeader) -> int:
    """The bytes a bundle's atlases take."""
    return sum(math.prod(t.shape) * DTYPE_BYTES[t.dtype] for k, t in header.tensors.items() if k.startswith(ATLAS_PREFIX))


def read_atlases(path: PathLike) -> list:
    """The ``hsam.guidance.atlas.Atlas`` list a bundle stores (empty without one)."""
    from safetensors import SafetensorError, safe_open

    from ..guidance.atlas import atlas_from_arrays

    header, metadata = read_bundle(path)
    grids = ((metadata.guidance or {}).get("atlas") or {}).get("grids", [])
    try:
        with safe_open(str(path), framework="np") as f:
            return [atlas_from_arrays(f.get_tensor(f"{ATLAS_PREFIX}{i}.image"), f.get_tensor(f"{ATLAS_PREFIX}{i}.labels"),
                                      g["spacing"], g["origin"], g["direction"], g["name"]) for i, g in enumerate(grids)]
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{Path(path).name}: its atlases are unreadable ({e})") from None


def read_bundle(path: PathLike) -> tuple[SafetensorsHeader, BundleMetadata]:
    """The bundle's safetensors header and checked metadata, without torch and without reading tensors."""
    path = Path(path)
    header = read_header(path)
    raw = header.metadata.get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(f"{path.name} is a safetensors file without HSAM metadata")
    try:
        return header, BundleMetadata.from_json(raw)
    except (ValueError, TypeError, InputError) as e:
        raise CheckpointError(f"{path.name} has invalid HSAM metadata: {e}") from None


def read_bundle_metadata(path: PathLike) -> BundleMetadata:
    """The bundle's checked metadata (see ``read_bundle``)."""
    return read_bundle(path)[1]


def find_sam_checkpoint(preset: str, explicit: Optional[PathLike] = None) -> Path:
    """The official SAM file for a preset: the given path, else the download cache; its size and
    sha256 are checked (the sha256 once per file, see ``hsam.models.sam_weights.cached_sha256``)."""
    if preset not in SAM_CHECKPOINTS:
        raise CheckpointError(f"this model says it was fine-tuned from SAM weights, but the {preset} preset has none")
    info = SAM_CHECKPOINTS[preset]
    path = Path(explicit) if explicit else default_cache_dir() / info.filename
    if not path.is_file():
        raise CheckpointError(
            f"this model needs the SAM {preset} weights {info.filename}: run `hsam download {preset}` "
            f"or pass the file (sha256 {info.sha256[:12]}…)"
        )
    if path.stat().st_size != info.size:
        raise CheckpointError(f"{path} is not the official {info.filename} (size {path.stat().st_size} != {info.size})")
    if cached_sha256(path) != info.sha256:
        raise CheckpointError(f"{path} is not the official {info.filename} (its sha256 differs): download it again")
    return path


def check_stored_tensors(header: SafetensorsHeader, metadata: BundleMetadata, name: str) -> None:
    """Compare the tensors a bundle stores with those of the model its metadata describes, built on
    torch's ``meta`` device (shapes only, no memory)."""
    import torch

    from .build import build_hsam

    with torch.device("meta"):
        skeleton = build_hsam(metadata.preset, metadata.num_classes, metadata.img_size, metadata.cmattn,
                              metadata.lora_rank, guided=metadata.guided)
    expected = {k: tuple(v.shape) for k, v in _stored_state(skeleton, full=metadata.base_checkpoint is None).items()}
    stored = {k: t.shape for k, t in header.tensors.items() if not k.startswith(ATLAS_PREFIX)}
    missing = sorted(set(expected) - set(stored))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    unexpected = sorted(set(stored) - set(expected))
    not_float = sorted(k for k, t in header.tensors.items() if t.dtype not in FLOAT_DTYPES and k in stored)
    if missing or wrong or unexpected or not_float:
        example = printable((missing or wrong or unexpected or not_float)[0], 100)
        raise CheckpointError(
            f"{name}: its weights do not fit a {metadata.preset} model with {metadata.num_classes} "
            f"classes at {metadata.img_size}px (e.g. {example})"
        )


def load_bundle(
    path: PathLike,
    map_location: Union[str, torch.device] = "cpu",
    sam_checkpoint: Optional[PathLike] = None,
    expected_preset: Optional[str] = None,
    expected_num_classes: Optional[int] = None,
) -> tuple[HSAM, BundleMetadata]:
    """Rebuild the model of a bundle (eval mode). Clear errors for a truncated file, a bundle whose
    tensors do not fit its metadata, or one made for another preset / class count than expected;
    all checked before the model is allocated."""
    from safetensors import SafetensorError, safe_open

    from .build import build_hsam
    from .checkpoint import load_sam_weights

    name = Path(path).name
    header, metadata = read_bundle(path)
    if expected_preset and metadata.preset != expected_preset:
        raise CheckpointError(f"{name} is a {metadata.preset} model, not {expected_preset}")
    if expected_num_classes and metadata.num_classes != expected_num_classes:
        raise CheckpointError(f"{name} segments {metadata.num_classes} classes, not {expected_num_classes}")
    check_stored_tensors(header, metadata, name)
    sam_weights = find_sam_checkpoint(metadata.preset, sam_checkpoint) if metadata.base_checkpoint else None
    model = build_hsam(metadata.preset, metadata.num_classes, metadata.img_size, metadata.cmattn, metadata.lora_rank,
                       guided=metadata.guided)
    if sam_weights is not None:
        load_sam_weights(model, sam_weights, metadata.preset)
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(ATLAS_PREFIX)}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{name} is truncated or corrupt ({e})") from None
    model.load_state_dict(stored, strict=False)
    return model.to(map_location).eval(), metadata
