"""Which reduced precisions this CPU computes at speed, asked of PyTorch's oneDNN once.

PyTorch runs CPU bfloat16 (float16) matrix products on oneDNN only where the CPU can convert and
multiply them: AVX512-BW/VL/DQ or AVX-NE-CONVERT for bfloat16 (AVX512-FP16 or AMX-FP16 for float16) on
x86, the BF16 extension on Arm. Elsewhere, e.g. on AVX2-only CPUs, they are emulated element by element,
hundreds of times slower than float32, and oneDNN's bfloat16 weight packing refuses to run.

oneDNN reads ``ONEDNN_MAX_CPU_ISA`` at start-up, so ``ONEDNN_MAX_CPU_ISA=AVX2`` (with
``ATEN_CPU_CAPABILITY=avx2`` for PyTorch's own kernels) makes any x86 CPU answer like an AVX2-only one.
"""

import functools
import platform

import torch

from .errors import InputError

PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_capability() -> str:
    """PyTorch's vector instruction set on this CPU, e.g. ``AVX512``, ``AVX2``, ``DEFAULT``."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def onednn_computes(dtype: torch.dtype) -> bool:
    """Whether oneDNN computes matrix products in ``dtype`` (float32, bfloat16 or float16) on this CPU."""
    if dtype == torch.float32:
        return torch.backends.mkldnn.is_available()
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX on x86, BF16 on Arm), where
    bfloat16 is clearly faster than float32; ``--precision auto`` picks bfloat16 only there."""
    if not onednn_computes(torch.bfloat16):
        return False
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def check_cpu_precision(dtype: torch.dtype) -> None:
    """Refuse an autocast ``dtype`` that this CPU could only emulate, hundreds of times slower than
    float32 (raises ``InputError``)."""
    if dtype != torch.float32 and not onednn_computes(dtype):
        name = PRECISION_NAMES.get(dtype, str(dtype))
        raise InputError(
            f"this CPU ({cpu_capability()}) has no native {name} kernels, so --precision {name} would run "
            f"hundreds of times slower than fp32; use --precision fp32 or auto"
        )
