"""Python packages the engine needs inside Slicer, and how to install the missing ones.

PyTorch is installed through the PyTorch extension (it picks the CUDA build that matches the
driver; a plain ``pip install torch`` gives a CPU-only build on Windows). The other packages come
from ``Resources/requirements.txt`` through ``slicer.util.pip_install``, on the main thread and
after the user agreed. SimpleITK ships with Slicer and is never installed or replaced.
"""

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
TORCH_MODULES = ("torch", "torchvision")
BUNDLED_WITH_SLICER = ("SimpleITK",)


@dataclass(frozen=True)
class Requirement:
    module: str  # import name
    spec: str  # pip requirement


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[Requirement]:
    """Pip requirements in ``path``; each line may name its import module after ``# import:``."""
    requirements = []
    for line in path.read_text(encoding="utf-8").splitlines():
        spec, _, comment = line.partition("#")
        spec = spec.strip()
        if not spec:
            continue
        distribution = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
        module = comment.split("import:", 1)[1].strip() if "import:" in comment else distribution.replace("-", "_")
        requirements.append(Requirement(module, spec))
    return requirements


def all_requirements() -> list[Requirement]:
    torch = [Requirement(module, module) for module in TORCH_MODULES]
    bundled = [Requirement(module, module) for module in BUNDLED_WITH_SLICER]
    return torch + bundled + read_requirements()


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_requirements(requirements: Optional[list[Requirement]] = None) -> list[Requirement]:
    importlib.invalidate_caches()  # see packages installed since the last check
    return [r for r in (requirements if requirements is not None else all_requirements()) if not is_installed(r.module)]


@dataclass
class InstallPlan:
    """What to install, and how."""

    torch: bool = False  # through the PyTorch extension
    pip: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # should come with Slicer; cannot be installed here

    @property
    def empty(self) -> bool:
        return not (self.torch or self.pip or self.unavailable)

    def describe(self) -> str:
        lines = []
        if self.torch:
            lines.append("PyTorch (through the PyTorch extension, which picks the GPU build for this computer)")
        lines += [f"{spec} (pip)" for spec in self.pip]
        return "HSAM needs these Python packages:\n  " + "\n  ".join(lines) if lines else ""


def install_plan(missing: list[Requirement]) -> InstallPlan:
    plan = InstallPlan()
    for requirement in missing:
        if requirement.module in TORCH_MODULES:
            plan.torch = True
        elif requirement.module in BUNDLED_WITH_SLICER:
            plan.unavailable.append(requirement.module)
        else:
            plan.pip.append(requirement.spec)
    return plan


def install(plan: InstallPlan, install_torch: Callable[[], bool], pip_install: Callable[[str], None]) -> None:
    """Carry out ``plan`` with the given installers (in Slicer: the PyTorch extension and
    ``slicer.util.pip_install``). Run on the main thread after the user agreed."""
    from hsam.errors import HSAMError

    if plan.unavailable:
        raise HSAMError(f"{', '.join(plan.unavailable)} should come with Slicer but is missing: reinstall Slicer")
    if plan.torch and not install_torch():
        raise HSAMError("PyTorch was not installed: install it from the PyTorch module, then try again")
    if plan.pip:
        pip_install(" ".join(plan.pip))
