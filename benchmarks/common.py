"""Shared helpers of the benchmark scripts: timing, peak memory, tables, docs/performance.md."""

import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def best_of(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Minimum wall time of ``repeats`` calls after ``warmup`` calls (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_isolated(script: Path, args: list[str]) -> dict:
    """Run one configuration in a fresh process (so its peak memory is its own) and return its JSON."""
    out = subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({cpu_features()}), {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}"


def cpu_features() -> str:
    """The CPU features the figures depend on: PyTorch's vector ISA and its bfloat16 support."""
    from hsam.runtime.cpu import cpu_capability, cpu_supports_bf16

    bf16 = "native bf16" if cpu_supports_bf16() else "bf16 kernels, not native" if bf16_available() else "no bf16"
    return f"{cpu_capability()}, {bf16}"


def bf16_available() -> bool:
    """Whether bf16 configurations are worth timing here (oneDNN has bf16 kernels for this CPU)."""
    from hsam.runtime.cpu import onednn_computes

    return onednn_computes(torch.bfloat16)


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def update_docs(section: str, command: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- section -->`` markers in docs/performance.md."""
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{start}\n## {section}\n\nMachine: {machine()}\n\nCommand: `{command}`\n\n{body}\n{end}"
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# HSAM performance\n\nFigures written by the scripts in `benchmarks/`.\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text, encoding="utf-8")


class OtherLoad:
    """The CPU time every other process used since this object was made, in cores on average: the
    machine's busy time (/proc/stat) less this process's and its children's (``os.times``). Unlike the
    load average, it leaves out the benchmark's own threads."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        busy = sum(fields[:3]) + sum(fields[5:8])  # user, nice, system, irq, softirq, steal (guests are in user)
        own = os.times()
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system

    def cores(self) -> float:
        (then, busy_then, own_then), (now, busy, own) = self.start, self._sample()
        return max(0.0, ((busy - busy_then) - (own - own_then)) / max(now - then, 1e-6))
