"""The engine's layout (docs/architecture.md): packages ranked from the command line down to runtime,
imports only downwards and without cycles, short modules, and CMake lists that ship every file once."""

import ast
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "HSAMSegment" / "hsam"
# High to low: a module may import from its own package and from those below it, never from one above.
RANKS = ("top", "evaluation", "training", "inference", "models", "guidance", "modeling", "volumes", "runtime")
TOP_LEVEL = {"__init__.py", "__main__.py", "demo.py", "cli.py", "cli"}
MAX_MODULE_LINES = 500
SOURCE_SKIPPED = ("__pycache__", ".egg-info")


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ENGINE.rglob("*.py")) if "__pycache__" not in p.parts}


def package_of(module: str) -> str:
    """The ranked package a module of the engine belongs to: ``top`` for the command line, the demo,
    ``__main__`` and the ``hsam`` package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else "top"


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(engine module, line) for every import statement of ``path`` (functions included), resolved to
    the module it loads: ``from P import m`` names module ``P.m`` when there is one, else ``P``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.append((f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target, node.lineno))
    return [(target, line) for target, line in found if target in modules]


def import_graph(modules: dict[str, Path]) -> dict[str, list[tuple[str, int]]]:
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    return [
        f"{module}:{line} imports {target} ({package_of(module)} < {package_of(target)})"
        for module, targets in graph.items()
        for target, line in targets
        if RANKS.index(package_of(target)) < RANKS.index(package_of(module))
    ]


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {module: {target for target, _ in targets if target != module} for module, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    return found


def test_every_engine_package_is_ranked():
    packages = {p.name for p in ENGINE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages - {"cli"} == set(RANKS[1:])


def test_imports_run_from_the_command_line_down_to_runtime():
    assert upward_imports(import_graph(engine_modules())) == []


def test_no_import_cycle_between_modules():
    assert cycles(import_graph(engine_modules())) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    graph = {"hsam.runtime.errors": [("hsam.volumes.files", 3)], "hsam.volumes.files": [("hsam.runtime.errors", 5)],
             "hsam.cli": [("hsam.volumes.files", 1)]}
    assert upward_imports(graph) == ["hsam.runtime.errors:3 imports hsam.volumes.files (runtime < volumes)"]
    assert cycles(graph) == [["hsam.runtime.errors", "hsam.volumes.files"]]


def test_the_top_of_the_engine_holds_only_the_command_line_the_demo_and_packages():
    loose = {p.name for p in ENGINE.iterdir() if p.name not in SOURCE_SKIPPED and not (p / "__init__.py").is_file()}
    assert loose <= TOP_LEVEL, sorted(loose - TOP_LEVEL)


def test_no_engine_module_is_longer_than_500_lines():
    lengths = {module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in engine_modules().items()}
    assert {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES} == {}


# --- CMake lists of shipped files -------------------------------------------------------------------


def extension_modules() -> list[str]:
    return re.findall(r"^add_subdirectory\((\w+)\)", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"), re.M)


def cmake_list(cmake: str, variable: str, module: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", cmake, re.S)
    assert match, f"{variable} is not set"
    return [entry.replace("${MODULE_NAME}", module) for entry in match.group(1).split()]


def duplicates(entries: list[str]) -> list[str]:
    return sorted(entry for entry, count in Counter(entries).items() if count > 1)


def shipped_files(folder: Path) -> tuple[set[str], set[str]]:
    """(Python files, other files) of a module folder that its CMakeLists.txt must list."""
    files = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "CMakeLists.txt" and p.suffix != ".pyc"
        and not any(skipped in part for part in p.relative_to(folder).parts for skipped in SOURCE_SKIPPED)
    }
    python = {f for f in files if f.endswith(".py")}
    return python, files - python


def listing_problems(module: str, cmake: Optional[str] = None) -> list[str]:
    folder = ROOT / module
    cmake = (folder / "CMakeLists.txt").read_text(encoding="utf-8") if cmake is None else cmake
    scripts = cmake_list(cmake, "MODULE_PYTHON_SCRIPTS", module)
    resources = cmake_list(cmake, "MODULE_PYTHON_RESOURCES", module)
    python, other = shipped_files(folder)
    return (
        [f"listed twice: {entry}" for entry in duplicates(scripts + resources)]
        + [f"listed, not on disk: {entry}" for entry in sorted(set(scripts + resources) - python - other)]
        + [f"not listed: {entry}" for entry in sorted(python - set(scripts))]
        + [f"not listed: {entry}" for entry in sorted(other - set(resources))]
    )


def test_the_extension_has_its_three_modules():
    assert extension_modules() == ["HSAMSegment", "HSAMTraining", "SegmentEditorHSAM"]


@pytest.mark.parametrize("module", extension_modules())
def test_cmake_lists_every_shipped_file_once(module):
    assert listing_problems(module) == []


def test_the_listing_check_sees_a_duplicate_and_a_missing_file():
    cmake = (ROOT / "HSAMSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    doubled = cmake.replace("  hsam/__init__.py\n", "  hsam/__init__.py\n  hsam/__init__.py\n  hsam/gone.py\n", 1)
    assert listing_problems("HSAMSegment", doubled) == ["listed twice: hsam/__init__.py", "listed, not on disk: hsam/gone.py"]
