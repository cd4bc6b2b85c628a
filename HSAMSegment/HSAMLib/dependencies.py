"""Python packages the engine needs inside Slicer, and how to install the missing ones.

PyTorch comes from the PyTorch extension (``PyTorchUtils``: it picks the CUDA build that matches the
driver; a plain ``pip install torch`` gives a CPU-only build on Windows), with the minimum version
the engine needs. The other packages come from ``Resources/requirements.txt`` (plain requirement
lines, as ``slicer.packaging.load_requirements`` reads them) through pip with ``--no-deps``, so that
Slicer's own SimpleITK and numpy are never replaced. Versions are read from package metadata:
nothing here imports torch.

A package already imported into Slicer's process (PyTorchUtils and other extensions import torch)
is never replaced in place: on Windows its open DLLs would leave a half-replaced torch. The plan
says so before anything is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from packaging.requirements import Requirement

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
# Installed through the PyTorch extension. torch.amp.GradScaler (fine-tuning) needs torch 2.3.
TORCH_REQUIREMENT = Requirement("torch>=2.3")
TORCHVISION_REQUIREMENT = Requirement("torchvision>=0.18")
# Ship with Slicer; HSAM never installs or replaces them.
BUNDLED_WITH_SLICER = (Requirement("SimpleITK"), Requirement("numpy"))
# Import names that differ from the distribution name.
IMPORT_NAMES = {"segment-anything": "segment_anything", "SimpleITK": "SimpleITK", "opencv-python-headless": "cv2"}
# Other distributions of the same module: any of them satisfies the requirement (two would collide).
ALTERNATIVES = {"opencv-python-headless": ("opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless")}


def import_name(requirement: Requirement) -> str:
    return IMPORT_NAMES.get(requirement.name, requirement.name.replace("-", "_"))


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[Requirement]:
    """The requirement lines of ``path`` (comments and pip options skipped, as Slicer does)."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(requirement: Requirement) -> bool:
    """True when the distribution, or one of its ``ALTERNATIVES``, is installed in a fitting version."""
    for name in (requirement.name, *ALTERNATIVES.get(requirement.name, ())):
        version = installed_version(name)
        if version is not None and requirement.specifier.contains(version, prereleases=True):
            return True
    return False


def is_installed(module: str) -> bool:
    """True when ``module``'s distribution is installed (checked without importing it)."""
    return installed_version(module) is not None


def all_requirements() -> list[Requirement]:
    return [TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT, *BUNDLED_WITH_SLICER, *read_requirements()]


def torch_platform_limit(system: str, machine: str) -> Optional[str]:
    """Why PyTorch cannot be installed on this platform (``sys.platform``, ``platform.machine()``), or None."""
    if system == "darwin" and machine == "x86_64":
        return (f"PyTorch publishes no build for macOS on Intel processors (x86_64) newer than 2.2.2, and HSAM "
                f"needs {TORCH_REQUIREMENT}. This Slicer is an x86_64 program (it runs that way on Apple silicon "
                "too). Use HSAM in Slicer on Windows or Linux, or the hsam command line in a Python of its own.")
    return None


@dataclass
class InstallPlan:
    """What to install, and how."""

    torch: Optional[str] = None  # torch requirement for the PyTorch extension; None: leave torch alone
    torchvision: Optional[str] = None  # torchvision requirement for the PyTorch extension
    pip: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # should come with Slicer; cannot be installed here
    platform_limit: Optional[str] = None  # PyTorch is needed but cannot be installed on this platform

    @property
    def empty(self) -> bool:
        return not (self.torchvision or self.pip or self.unavailable)

    @property
    def replaced(self) -> list[str]:
        """Installed distributions that carrying out the plan would replace."""
        names = [Requirement(spec).name for spec in self.pip]
        if self.torchvision:
            names += ["torchvision"] + ([] if self.torch.startswith("==") else ["torch"])
        return [name for name in names if installed_version(name) is not None]

    @property
    def problem(self) -> Optional[str]:
        """Why the plan cannot be carried out in this Slicer session (None: it can), said before any download."""
        if self.unavailable:
            return f"{', '.join(self.unavailable)} should come with Slicer but is missing: reinstall Slicer."
        if self.platform_limit:
            return self.platform_limit
        loaded = [name for name in self.replaced if _loaded(name)]
        if loaded:
            return (f"{', '.join(loaded)} must be updated for HSAM but is already in use in Slicer (another module "
                    "imported it) and cannot be replaced while loaded. Restart Slicer, then install from HSAM before "
                    "using other modules that need PyTorch.")
        return None

    def describe(self) -> str:
        lines = []
        if self.torchvision and self.torch.startswith("=="):
            lines.append(f"torchvision {self.torchvision} (through the PyTorch extension, for the installed PyTorch)")
        elif self.torchvision:
            lines.append(f"PyTorch {self.torch} and torchvision (through the PyTorch extension, which picks the "
                         "GPU build for this computer)")
        lines += [f"{spec} (pip)" for spec in self.pip]
        return "HSAM needs these Python packages:\n  " + "\n  ".join(lines) if lines else ""


def install_plan(requirements: Optional[list[Requirement]] = None, system: str = sys.platform,
                 machine: str = platform.machine()) -> InstallPlan:
    """How to satisfy ``requirements`` (default: all of HSAM's) on the platform ``system``, ``machine``.
    torch is only reinstalled when it is missing or too old; a missing torchvision alone is installed
    for the torch that is there."""
    importlib.invalidate_caches()  # see packages installed since the last check
    requirements = all_requirements() if requirements is None else requirements
    plan = InstallPlan()
    bundled = {r.name for r in BUNDLED_WITH_SLICER}
    torch = next((r for r in requirements if r.name == "torch"), TORCH_REQUIREMENT)
    torchvision = next((r for r in requirements if r.name == "torchvision"), TORCHVISION_REQUIREMENT)
    for requirement in requirements:
        if is_satisfied(requirement):
            continue
        if requirement.name in ("torch", "torchvision"):
            plan.torchvision = str(torchvision.specifier)
        elif requirement.name in bundled:
            plan.unavailable.append(requirement.name)
        else:
            plan.pip.append(str(requirement))
    if plan.torchvision:  # torchvision is installed for the torch that stays, or with the torch that comes
        plan.torch = f"=={installed_version('torch')}" if is_satisfied(torch) else str(torch.specifier)
        plan.platform_limit = torch_platform_limit(system, machine)
    return plan


TorchInstaller = Callable[[str, str], bool]  # (torch requirement, torchvision requirement) -> installed


def install(plan: InstallPlan, install_torch: TorchInstaller, pip_install: Callable[[str], None]) -> None:
    """Carry out ``plan`` with the given installers (in Slicer: ``PyTorchUtilsLogic.installTorch`` and
    ``slicer.util.pip_install``), on the main thread, after the user agreed once. Raises ``HSAMError``
    with ``plan.problem`` before installing anything when the plan cannot be carried out."""
    from hsam.runtime.errors import HSAMError

    if plan.problem:
        raise HSAMError(plan.problem)
    if plan.torchvision and not install_torch(plan.torch, plan.torchvision):
        raise HSAMError("PyTorch was not installed: install it from the PyTorch module, then try again")
    if plan.pip:
        pip_install("--no-deps " + " ".join(plan.pip))  # never replaces Slicer's numpy or SimpleITK
    importlib.invalidate_caches()


_installing = False


@contextlib.contextmanager
def exclusive() -> Iterator[bool]:
    """True for the one caller at a time that may check and install packages, False for the others.

    Slicer's ``pip_install`` (``logProcessOutput``) processes GUI events while pip runs for minutes,
    so a second click on Segment, Fine-tune or Download would start a second install meanwhile.
    """
    global _installing
    if _installing:
        yield False
        return
    _installing = True
    try:
        yield True
    finally:
        _installing = False


def _loaded(distribution: str) -> bool:
    module = import_name(Requirement(distribution))
    return any(name == module or name.startswith(module + ".") for name in sys.modules)
