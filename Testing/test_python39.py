"""Every module of the extension and the engine imports on Python 3.9 (Slicer 5.8, the oldest supported).

Three checks, each catching what the others cannot: ``vermin`` for standard-library and syntax
features newer than 3.9, Python's own parser with the 3.9 grammar, and ``X | Y`` in annotations only
where ``from __future__ import annotations`` keeps them unevaluated.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OLDEST_PYTHON = (3, 9)
SOURCE_FOLDERS = (ROOT / "HSAMSegment", ROOT / "HSAMTraining", ROOT / "SegmentEditorHSAM")


def python_files() -> list[Path]:
    return sorted(p for folder in SOURCE_FOLDERS for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def vermin_executable() -> str:
    found = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if found is None:
        pytest.fail("vermin is not installed: pip install -e '.[test]'")
    return found


def test_vermin_finds_nothing_newer_than_the_oldest_python():
    # ``--exclude long``: torch's ``.long()`` is not Python 2's ``long``.
    target = f"-t={OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]}-"
    result = subprocess.run(
        [vermin_executable(), target, "--violations", "--eval-annotations", "--no-tips", "--exclude", "long",
         *[str(folder) for folder in SOURCE_FOLDERS]],
        capture_output=True, encoding="utf-8", timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Target versions not met" not in result.stdout


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_parses_with_the_oldest_grammar(path):
    ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=OLDEST_PYTHON)


def union_annotations(tree: ast.Module) -> list[int]:
    """Line numbers of annotations that use ``X | Y``."""
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            annotations += [a.annotation for a in arguments if a.annotation is not None]
            annotations += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    return sorted(
        annotation.lineno
        for annotation in annotations
        if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation))
    )


def has_future_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom) and node.module == "__future__" and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    )


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_union_annotations_stay_unevaluated(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = union_annotations(tree)
    assert not lines or has_future_annotations(tree), f"X | Y annotations on lines {lines} need `from __future__ import annotations`"


def test_an_unsupported_slicer_is_named_in_one_sentence():
    sys.path.insert(0, str(ROOT / "HSAMSegment"))
    try:
        from HSAMLib.compatibility import unsupported_slicer_message
    finally:
        sys.path.remove(str(ROOT / "HSAMSegment"))
    assert unsupported_slicer_message(5, 8) is None and unsupported_slicer_message(6, 0) is None
    message = unsupported_slicer_message(5, 6)
    assert "5.8 or later" in message and "Slicer 5.6" in message and message.count(". ") == 0


def test_module_files_refuse_an_unsupported_slicer_before_slicer_5_8_imports():
    source = (ROOT / "HSAMSegment" / "HSAMSegment.py").read_text(encoding="utf-8")
    assert source.index("raise ImportError(UNSUPPORTED_MESSAGE)") < source.index("slicer.parameterNodeWrapper")
