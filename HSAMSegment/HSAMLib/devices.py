"""The device probe for the panels: ``hsam devices --json`` in a worker process (torch stays out of
Slicer's own process), and the line shown for a device choice."""

from __future__ import annotations

from typing import Optional

from .worker import WorkerJob


def device_choices(system: str, machine: str) -> tuple[str, ...]:
    """The device choices offered on a platform (``sys.platform``, ``platform.machine()``): Apple's MPS
    only on macOS on Apple silicon, the one place PyTorch builds can use it."""
    apple_silicon = system == "darwin" and machine == "arm64"
    return ("auto", "cuda", "cpu", "mps") if apple_silicon else ("auto", "cuda", "cpu")


def startProbe(python: Optional[str] = None) -> WorkerJob:
    return WorkerJob(python, "hsam-devices").start(["devices", "--json"])


def probeResult(job: WorkerJob) -> dict:
    """The probe of a finished job (raises with the worker's message if it failed); removes its folder."""
    try:
        job.check()
        return job.result
    finally:
        job.cleanup()


def describeChoice(probe: dict, choice: str) -> str:
    """One line for the device combo box's choice (auto, cuda, mps, cpu)."""
    if choice == "auto":
        return probe["auto"]
    if choice == "cuda":
        gpus = probe["cuda"]["devices"]
        if not gpus:
            build = probe["torch"]
            kind = f"a CUDA {build['cuda']} build" if build["cuda"] else "a CPU-only build"
            return f"No CUDA GPU is available to PyTorch {build['version']} ({kind}); see Troubleshooting."
        return "; ".join(f"GPU {g['index']}: {g['name']}, {g['memory_bytes'] / 2**30:.1f} GiB" for g in gpus)
    if choice == "mps":
        return "Apple GPU (MPS)" if probe["mps"]["available"] else "Apple MPS is not available on this computer."
    cpu = probe["cpu"]
    return f"CPU: {cpu['name']}, {cpu['cores']} cores" + (", bfloat16" if cpu["bf16"] else "")
