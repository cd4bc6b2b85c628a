"""What PyTorch can compute on here (``hsam devices``): CUDA GPUs, Apple MPS, the CPU, and the torch build."""

from __future__ import annotations

import os
import platform

import torch

from .inference import cpu_supports_bf16, describe_device, select_device


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
