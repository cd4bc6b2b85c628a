"""CPUs without native bfloat16 (AVX2-only x86): the probes say so, inference falls back to the plain
modules, and an explicit ``--precision bf16`` (or fp16) stops with a one-line error.

Every machine runs these: the worker processes start with ``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2``, so oneDNN, PyTorch and MKL see this
CPU as an AVX2-only one (on such a CPU the variables change nothing). The probes' answers are real,
not mocked.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import _bundle, _write_image
from phantom import phantom_arrays

ROOT = Path(__file__).resolve().parent.parent
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the AVX2 cap applies to x86-64 CPUs only"
)

PROBE = """
import json
import torch
import torch.nn.functional as F
from hsam.runtime.cpu import cpu_capability, cpu_supports_bf16, onednn_computes
from hsam.runtime.devices import resolve_precision
from hsam.modeling.fused_linear import fused_dtype, linear, onednn_works

torch.manual_seed(0)
layer, x = torch.nn.Linear(16, 8), torch.randn(3, 16)
expected = F.gelu(F.linear(x, layer.weight, layer.bias))
with torch.inference_mode():
    float32_path = str(fused_dtype(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bfloat16_path = str(fused_dtype(x))
        low = linear(layer, x, gelu=True).float()
print(json.dumps({
    "capability": cpu_capability(),
    "fused_float32": onednn_works(torch.float32),
    "fused_bfloat16": onednn_works(torch.bfloat16),
    "bfloat16_kernels": onednn_computes(torch.bfloat16),
    "native_bfloat16": cpu_supports_bf16(),
    "auto_precision": str(resolve_precision("auto", torch.device("cpu"))),
    "float32_path": float32_path,
    "bfloat16_path": bfloat16_path,
    "bfloat16_error": float((low - expected).abs().max()),
}))
"""


def run_avx2_only(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *args`` with this checkout's engine, on the CPU seen as AVX2-only."""
    env = {**os.environ, **AVX2_ONLY, "PYTHONPATH": str(ROOT / "HSAMSegment")}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, encoding="utf-8", timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("avx2")
    image, labels = phantom_arrays((4, 32, 40), label_values=(1, 2))
    return {
        "volume": _write_image(folder / "volume.nrrd", image * 1000),
        "labels": _write_image(folder / "labels.nrrd", labels),
        "model": _bundle(folder / "tiny.hsam"),
    }


def test_probes_find_no_bfloat16_and_inference_falls_back_to_the_modules() -> None:
    done = run_avx2_only("-c", PROBE)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout)
    assert probe["capability"] == "AVX2"
    assert probe["fused_float32"] and probe["float32_path"] == "torch.float32"  # fp32 keeps the fused path
    assert not probe["fused_bfloat16"] and not probe["bfloat16_kernels"] and not probe["native_bfloat16"]
    assert probe["auto_precision"] == "None"  # auto: float32
    assert probe["bfloat16_path"] == "None"  # plain autocast modules, no oneDNN weight packing
    assert probe["bfloat16_error"] < 0.05


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("command", ["segment", "finetune"])
def test_explicit_emulated_precision_is_a_one_line_error(files: dict, tmp_path: Path, command: str, precision: str):
    if command == "segment":
        output = tmp_path / "out.seg.nrrd"
        args = ["segment", files["volume"], "-m", files["model"], "-o", output]
    else:
        output = tmp_path / "out.hsam"
        args = ["finetune", files["volume"], files["labels"], "-o", output, "--epochs", "1"]
    done = run_avx2_only("-m", "hsam", *map(str, args), "--device", "cpu", "--precision", precision, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("hsam: error: "), done.stderr
    assert f"no native {precision}" in lines[0] and "--precision fp32" in lines[0]
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_auto_precision_segments_in_float32(files: dict, tmp_path: Path) -> None:
    output = tmp_path / "labels.nrrd"
    args = ["segment", files["volume"], "-m", files["model"], "-o", output, "--device", "cpu"]
    done = run_avx2_only("-m", "hsam", *map(str, args), timeout=120)
    assert done.returncode == 0, done.stderr
    assert output.stat().st_size > 0
