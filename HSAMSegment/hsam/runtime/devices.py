"""What PyTorch computes on here: the device and the autocast precision a run uses, and the ``hsam devices``
probe of CUDA GPUs, Apple MPS, the CPU and the torch build."""

from __future__ import annotations

import os
import platform
from typing import Optional, Union

import torch

from .cpu import check_cpu_precision, cpu_capability, cpu_supports_bf16
from .errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: Union[str, torch.device] = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then the CPU. Explicit ``cuda[:i]``, ``mps``, ``cpu`` must exist."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"unknown device {name!r}; choose auto, cpu, cuda or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"no CUDA GPU is available to this PyTorch {torch.__version__}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"there is no GPU {device.index} (this machine has {torch.cuda.device_count()})")
    elif device.type == "mps":
        if not _mps_available():
            raise InputError("Apple MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise InputError(f"unsupported device {name!r}; choose auto, cpu, cuda or mps")
    return device


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def describe_device(device: Union[str, torch.device]) -> str:
    """One line for users: the GPU's name and memory, or the CPU and its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"CUDA GPU {index}: {props.name}, {props.total_memory / 2**30:.1f} GiB"
    if device.type == "mps":
        return f"Apple GPU (MPS), {platform.machine()}"
    processor = platform.processor() or platform.machine()
    bf16 = ", bfloat16" if cpu_supports_bf16() else ""
    return (
        f"CPU: {processor} ({cpu_capability()}), {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} PyTorch threads{bf16}"
    )


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device``; None for float32.

    ``auto``: bfloat16 on CUDA GPUs that support it, else float16; bfloat16 on CPUs with native
    bfloat16; float32 otherwise (Apple MPS included). An explicit bf16 or fp16 that the CPU could only
    emulate is refused (``InputError``) rather than run hundreds of times slower."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return None
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is not None and device.type == "cpu":
        check_cpu_precision(dtype)
    return dtype


def _cuda_devices() -> list[dict]:
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({
            "index": index,
            "name": props.name,
            "memory_bytes": int(props.total_memory),
            "compute_capability": f"{props.major}.{props.minor}",
            "bf16": bool(torch.cuda.is_bf16_supported()) if index == torch.cuda.current_device() else props.major >= 8,
        })
    return devices


def probe_devices() -> dict:
    """A JSON-serialisable description of the devices and of the torch build."""
    cuda_available = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    return {
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,  # CUDA version torch was built with; None for a CPU-only build
            "hip": getattr(torch.version, "hip", None),
            "debug": bool(torch.version.debug),
        },
        "cuda": {"available": cuda_available, "devices": _cuda_devices() if cuda_available else []},
        "mps": {
            "available": bool(mps is not None and mps.is_available()),
            "built": bool(mps is not None and mps.is_built()),
        },
        "cpu": {
            "name": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "bf16": cpu_supports_bf16(),
        },
        "auto": describe_device(select_device("auto")),
    }


def describe_probe(probe: dict) -> list[str]:
    """The probe as lines for people."""
    build = probe["torch"]
    lines = [f"PyTorch {build['version']} (" + (f"CUDA {build['cuda']} build" if build["cuda"] else "CPU-only build") + ")"]
    for gpu in probe["cuda"]["devices"]:
        lines.append(
            f"CUDA GPU {gpu['index']}: {gpu['name']}, {gpu['memory_bytes'] / 2**30:.1f} GiB, compute capability "
            f"{gpu['compute_capability']}" + (", bfloat16" if gpu["bf16"] else "")
        )
    if not probe["cuda"]["available"]:
        lines.append("CUDA: not available")
    lines.append("Apple MPS: " + ("available" if probe["mps"]["available"] else "not available"))
    cpu = probe["cpu"]
    lines.append(f"CPU: {cpu['name']}, {cpu['cores']} cores, {cpu['threads']} PyTorch threads"
                 + (", bfloat16" if cpu["bf16"] else ""))
    lines.append(f"auto picks: {probe['auto']}")
    return lines
