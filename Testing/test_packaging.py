"""The Slicer extension's packaging: CMake lists, extension description, Qt Designer files."""

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("HSAMSegment", "HSAMTraining")
S4EXT_REQUIRED = ("scm", "scmurl", "depends", "category", "iconurl", "description", "homepage", "contributors", "status")
# Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: required keys, and the type of each allowed key.
CATALOG_SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
CATALOG_REQUIRED = ("$schema", "category", "scm_url")
CATALOG_TYPES = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
}
REPOSITORY = "https://github.com/hsam-slicer/HSAM"
RAW_FILES = re.compile(r"https://raw\.githubusercontent\.com/hsam-slicer/HSAM/main/([^\s\"';)]+)")


def cmake_list(cmake: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", cmake, re.S)
    assert match, f"{variable} is not set"
    return match.group(1).split()


def module_files(folder: Path, pattern: str) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob(pattern)
        if "__pycache__" not in p.parts and ".egg-info" not in p.as_posix()
    }


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_ships_its_ui_and_icon_and_runs_its_self_test(module):
    """Every file listed once, and nothing missing: Testing/test_layout.py."""
    cmake = (ROOT / module / "CMakeLists.txt").read_text(encoding="utf-8")
    resources = {s.replace("${MODULE_NAME}", module) for s in cmake_list(cmake, "MODULE_PYTHON_RESOURCES")}
    assert {f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png"} <= resources
    assert "slicerMacroBuildScriptedModule" in cmake
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", cmake)


def test_engine_and_slicer_logic_ship_inside_the_segment_module():
    scripts = cmake_list((ROOT / "HSAMSegment" / "CMakeLists.txt").read_text(encoding="utf-8"), "MODULE_PYTHON_SCRIPTS")
    assert "hsam/__init__.py" in scripts and "HSAMLib/__init__.py" in scripts


def test_top_level_cmake_adds_both_modules():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(HSAM\)", cmake)
    for module in MODULES:
        assert f"add_subdirectory({module})" in cmake
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} \S", cmake), key
    assert "find_package(Slicer REQUIRED)" in cmake
    assert cmake.index("include(${Slicer_USE_FILE})") < cmake.index("add_subdirectory(")
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in cmake and "Slicer_EXTENSION_CPACK" in cmake


def test_s4ext_has_the_fields_the_extensions_index_requires():
    fields = {}
    for line in (ROOT / "HSAM.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    for key in S4EXT_REQUIRED:
        assert fields.get(key), f"{key} missing or empty"
    assert fields["scm"] == "git" and fields["scmurl"].endswith(".git")
    assert fields["depends"] == "PyTorch" and fields["category"] == "Segmentation"
    assert fields["iconurl"].endswith(".png") and fields["enabled"] == "1"
    assert not fields.get("name", "HSAM").lower().startswith("slicer")


def cmake_setting(key: str) -> str:
    match = re.search(rf'set\({key} "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert match, key
    return match.group(1)


def test_catalog_entry_follows_the_extensions_index_schema():
    entry = json.loads((ROOT / "HSAM.json").read_text(encoding="utf-8"))
    for key in CATALOG_REQUIRED:
        assert entry.get(key), f"{key} missing or empty"
    assert set(entry) <= set(CATALOG_TYPES), sorted(set(entry) - set(CATALOG_TYPES))
    for key, value in entry.items():
        assert isinstance(value, CATALOG_TYPES[key]), key
    assert entry["$schema"] == CATALOG_SCHEMA
    assert entry.get("tier", 5) in (1, 3, 5) and entry.get("scm_type", "git") in ("git", "local")
    assert all(isinstance(name, str) for name in entry.get("build_dependencies", []))


def test_catalog_entry_agrees_with_cmake_and_the_s4ext():
    entry = json.loads((ROOT / "HSAM.json").read_text(encoding="utf-8"))
    s4ext = dict(line.partition(" ")[::2] for line in (ROOT / "HSAM.s4ext").read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#"))
    assert entry["category"] == cmake_setting("EXTENSION_CATEGORY") == s4ext["category"]
    assert entry["scm_url"] == REPOSITORY and s4ext["scmurl"] == REPOSITORY + ".git"
    assert entry["build_dependencies"] == [cmake_setting("EXTENSION_DEPENDS")] == [s4ext["depends"]]
    assert entry["scm_revision"] == s4ext["scmrevision"] and entry["tier"] == int(s4ext["tier"])
    assert cmake_setting("EXTENSION_HOMEPAGE").startswith(REPOSITORY) and s4ext["homepage"] == cmake_setting("EXTENSION_HOMEPAGE")
    contributors = cmake_setting("EXTENSION_CONTRIBUTORS")
    assert re.fullmatch(r"[^()]+ \([^()]+\)(, [^()]+ \([^()]+\))*", contributors), "Name (Organisation), ..."
    assert s4ext["contributors"] == contributors and "contributors" not in contributors.lower()


def test_every_file_url_names_a_file_in_the_repository():
    texts = [(ROOT / name).read_text(encoding="utf-8") for name in ("CMakeLists.txt", "HSAM.s4ext", "HSAM.json")]
    paths = {match for text in texts for match in RAW_FILES.findall(text)}
    homepage = cmake_setting("EXTENSION_HOMEPAGE")
    paths.add(homepage.split("/blob/main/", 1)[1] if "/blob/main/" in homepage else "README.md")
    assert {"docs/screenshot.png", "HSAMSegment/Resources/Icons/HSAMSegment.png"} <= paths
    for path in paths:
        assert (ROOT / path).is_file(), path


def test_screenshot_is_a_real_picture():
    from PIL import Image

    url = cmake_setting("EXTENSION_SCREENSHOTURLS")
    with Image.open(ROOT / RAW_FILES.fullmatch(url).group(1)) as screenshot:
        assert screenshot.format == "PNG" and min(screenshot.size) >= 256
        assert screenshot.convert("RGB").getcolors(64) is None  # over 64 colours: not a blank or flat placeholder


def ui_widgets(module: str) -> dict[str, ET.Element]:
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    return {w.get("name"): w for w in tree.iter("widget")}


def names_looked_up(source: Path) -> set[str]:
    """Attribute names of every ``self.ui.<name>`` in a module file."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


@pytest.mark.parametrize("module", MODULES)
def test_ui_defines_every_widget_the_module_uses(module):
    widgets = ui_widgets(module)
    assert widgets[module].get("class") == "qMRMLWidget"
    used = names_looked_up(ROOT / module / f"{module}.py")
    assert used, "the module looks up no widget"
    assert used <= set(widgets), f"missing in {module}.ui: {sorted(used - set(widgets))}"


def test_the_segment_panel_only_wires_widgets_to_its_logic():
    """``HSAMSegmentWidget`` shows what ``HSAMLib.segment_panel`` decides (tested there, without Qt)."""
    tree = ast.parse((ROOT / "HSAMSegment" / "HSAMSegment.py").read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HSAMSegmentWidget")
    assert widget.end_lineno - widget.lineno < 150
    methods = {f.name: f.end_lineno - f.lineno + 1 for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert max(methods.values()) <= 40, methods
    names = {n.id for n in ast.walk(widget) if isinstance(n, ast.Name)} | _calls(widget, "")
    assert "panel" in names and not names & {"segmenter", "WorkerJob", "CANCELLED", "SUCCEEDED", "models"}


def parameter_fields(source: Path, class_name: str) -> set[str]:
    tree = ast.parse(source.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


@pytest.mark.parametrize("module", MODULES)
def test_parameter_names_in_ui_exist_in_the_parameter_node(module):
    fields = parameter_fields(ROOT / module / f"{module}.py", f"{module}ParameterNode")
    bound = set()
    for widget in ui_widgets(module).values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.add(prop.findtext("string"))
    assert bound and bound <= fields, sorted(bound - fields)


@pytest.mark.parametrize("module", MODULES)
def test_node_selectors_get_the_scene(module):
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    combos = {w.get("name") for w in tree.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in tree.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert combos and combos == connected


@pytest.mark.parametrize("module", MODULES)
def test_module_icon_is_128_pixels(module):
    from PIL import Image

    with Image.open(ROOT / module / "Resources" / "Icons" / f"{module}.png") as icon:
        assert icon.size == (128, 128)


@pytest.mark.parametrize("module", MODULES)
def test_module_file_imports_qt_only_inside_functions(module):
    tree = ast.parse((ROOT / module / f"{module}.py").read_text(encoding="utf-8"))
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"qt", "ctk", "torch", "hsam"}


def test_slicer_logic_never_imports_qt():
    for path in (ROOT / "HSAMSegment" / "HSAMLib").glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"qt", "ctk"}, path.name


def test_every_third_party_import_of_the_engine_is_a_checked_dependency():
    """Module-level imports only: optional extras (the demo's data downloader) are imported lazily."""
    import sys

    sys.path.insert(0, str(ROOT / "HSAMSegment"))
    try:
        from HSAMLib import dependencies
    finally:
        sys.path.remove(str(ROOT / "HSAMSegment"))
    provided = {dependencies.import_name(r) for r in dependencies.all_requirements()}
    imported = set()
    for path in (ROOT / "HSAMSegment" / "hsam").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"hsam"}
    assert third_party <= provided, sorted(third_party - provided)


# --- the HSAM fill Segment Editor effect ------------------------------------------------------------

EFFECT_MODULE = "SegmentEditorHSAM"
# What a Python effect reaches through ``self.scriptedEffect`` in Slicer 5.8.1 (the oldest supported): the
# Q_INVOKABLE methods and Q_PROPERTY names of qSlicerSegmentEditorAbstractEffect.h and
# qSlicerSegmentEditorScriptedEffect.h (Modules/Loadable/Segmentations/EditorEffects, tag v5.8.1).
SCRIPTED_EFFECT_API_5_8 = {
    "activate", "active", "addActor2D", "addActor3D", "addLabeledOptionsWidget", "addOptionsWidget", "applyImageMask",
    "commonParameterDefined", "confirmCurrentSegmentVisible", "cursorOff", "cursorOn", "deactivate",
    "defaultModifierLabelmap", "doubleParameter", "forceRender", "helpText", "integerParameter", "maskLabelmap",
    "masterVolumeImageData", "modifierLabelmap", "modifySegmentByLabelmap", "modifySelectedSegmentByLabelmap", "name",
    "nodeReference", "optionsFrame", "optionsLayout", "parameter", "parameterDefined", "parameterSetNode", "perSegment",
    "pythonSource", "rasToXy", "referenceGeometryImage", "removeActor2D", "removeActor3D", "renderWindow", "renderer",
    "requireSegments", "saveStateForUndo", "scene", "scheduleRender", "segmentationDisplayableInView", "selectEffect",
    "selectedSegmentLabelmap", "self", "setCommonNodeReference", "setCommonParameter", "setCommonParameterDefault",
    "setNodeReference", "setParameter", "setParameterDefault", "setParameterSetNode", "setPythonSource",
    "showEffectCursorInSliceView", "showEffectCursorInThreeDView", "sliceSpacing", "sourceVolumeImageData", "title",
    "viewNode", "xyToIjk", "xyToRas", "xyzToIjk", "xyzToRas",
}
# Members of AbstractScriptedSegmentEditorAutoCompleteEffect (Slicer 5.8.1) that the effect uses or overrides.
AUTOCOMPLETE_BASE_5_8 = {
    "scriptedEffect", "setupOptionsFrame", "setMRMLDefaults", "updateGUIFromMRML", "updateMRMLFromGUI", "onPreview",
    "onCancel", "onApply", "reset", "getPreviewNode", "setPreviewOpacity", "observeSegmentation",
    "delayedAutoUpdateTimer", "previewComputationInProgress", "previewButton", "cancelButton", "applyButton",
    "selectedSegmentIds", "__class__",
}
EFFECT_FILE = ROOT / EFFECT_MODULE / f"{EFFECT_MODULE}Lib" / "SegmentEditorEffect.py"


def test_effect_module_has_the_wizard_layout_and_is_built():
    folder = ROOT / EFFECT_MODULE
    cmake = (folder / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = {s.replace("${MODULE_NAME}", EFFECT_MODULE) for s in cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")}
    resources = {s.replace("${MODULE_NAME}", EFFECT_MODULE) for s in cmake_list(cmake, "MODULE_PYTHON_RESOURCES")}
    assert scripts == module_files(folder, "*.py") == {
        f"{EFFECT_MODULE}.py", f"{EFFECT_MODULE}Lib/__init__.py", f"{EFFECT_MODULE}Lib/SegmentEditorEffect.py"}
    assert resources == {f"{EFFECT_MODULE}Lib/SegmentEditorEffect.png"}
    assert re.search(rf"set\(MODULE_NAME {EFFECT_MODULE}\)", cmake) and "slicerMacroBuildScriptedModule" in cmake
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f"add_subdirectory({EFFECT_MODULE})" in top
    assert top.index("add_subdirectory(HSAMSegment)") < top.index(f"add_subdirectory({EFFECT_MODULE})")
    from PIL import Image

    with Image.open(folder / f"{EFFECT_MODULE}Lib" / "SegmentEditorEffect.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def _calls(tree: ast.AST, owner: str) -> set[str]:
    """Attribute names of every ``self.<owner>.<name>`` (or ``self.<name>`` when ``owner`` is empty)."""
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if owner and isinstance(node.value, ast.Attribute) and node.value.attr == owner \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
            names.add(node.attr)
        elif not owner and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return names


def test_effect_is_registered_like_slicers_own_scripted_effects():
    module = (ROOT / EFFECT_MODULE / f"{EFFECT_MODULE}.py").read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", self.registerEditorEffect)' in module
    assert "qSlicerSegmentEditorScriptedEffect(None)" in module and "setPythonSource(" in module
    assert ".self().register()" in module and 'EFFECT_FILE = "SegmentEditorHSAMLib/SegmentEditorEffect.py"' in module
    assert '"HSAMSegment"' in module  # loaded after the module that ships HSAMLib and the engine
    tree = ast.parse(EFFECT_FILE.read_text(encoding="utf-8"))
    effect = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentEditorEffect")
    assert [b.id for b in effect.bases] == ["AbstractScriptedSegmentEditorAutoCompleteEffect"]
    assert 'scriptedEffect.name = "HSAM fill"' in EFFECT_FILE.read_text(encoding="utf-8")


def test_effect_uses_only_the_slicer_5_8_effect_api():
    tree = ast.parse(EFFECT_FILE.read_text(encoding="utf-8"))
    assert _calls(tree, "scriptedEffect") <= SCRIPTED_EFFECT_API_5_8, sorted(_calls(tree, "scriptedEffect") - SCRIPTED_EFFECT_API_5_8)
    effect = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentEditorEffect")
    own = {n.name for n in effect.body if isinstance(n, ast.FunctionDef)}
    assigned = {t.attr for n in ast.walk(effect) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    inherited = _calls(effect, "") - own - assigned
    assert inherited <= AUTOCOMPLETE_BASE_5_8, sorted(inherited - AUTOCOMPLETE_BASE_5_8)
    overridden = own & AUTOCOMPLETE_BASE_5_8
    assert {"onPreview", "onApply", "onCancel", "setupOptionsFrame"} <= overridden


def test_effect_stays_thin_over_the_fill_logic():
    text = EFFECT_FILE.read_text(encoding="utf-8")
    tree = ast.parse(text)
    imported = {alias.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "HSAMLib.fill_logic"
                for alias in n.names}
    assert "HSAMFillLogic" in imported
    top_level = {alias.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for alias in n.names}
    assert not top_level & {"numpy", "torch", "hsam", "HSAMLib"}  # no image work here; HSAMLib once needed
    module_tree = ast.parse((ROOT / EFFECT_MODULE / f"{EFFECT_MODULE}.py").read_text(encoding="utf-8"))
    module_imports = {alias.name.split(".")[0] for n in module_tree.body if isinstance(n, ast.Import) for alias in n.names}
    assert not module_imports & {"qt", "ctk", "torch", "hsam", "HSAMLib"}


def _method(tree: ast.AST, name: str) -> ast.FunctionDef:
    effect = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentEditorEffect")
    return next(n for n in effect.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_effect_keeps_to_what_slicers_sources_require():
    """The Qt side, which runs only in Slicer, against the lines of Slicer's sources listed in docs/slicer.md
    ("APIs no test exercises")."""
    tree = ast.parse(EFFECT_FILE.read_text(encoding="utf-8"))
    defaults = ast.unparse(_method(tree, "setMRMLDefaults"))
    # the base class defines AutoUpdate "1" first, and setParameterDefault keeps a defined parameter
    assert "AbstractScriptedSegmentEditorAutoCompleteEffect.setMRMLDefaults" not in defaults
    assert "setParameterDefault('AutoUpdate', '0')" in defaults
    # Cancel from the click on: the base class enables it only once a preview exists
    assert "self.cancelButton.setEnabled(running" in ast.unparse(_method(tree, "updateGUIFromMRML"))
    # the owner of the shared preview is a common parameter: the base class's check never sees it
    assert "commonParameterDefined(PREVIEW_OWNER)" in ast.unparse(_method(tree, "_previewOwner"))
    assert "_previewOwner" in ast.unparse(_method(tree, "getPreviewNode"))
    # errors other than HSAM's are shown, under the wait cursor, as the base class's onPreview does
    assert "tryWithErrorDisplay(failure, waitCursor=True)" in ast.unparse(_method(tree, "_run"))
    assert "self._run(" in ast.unparse(_method(tree, "onPreview")) and "self._run(" in ast.unparse(_method(tree, "onApply"))
    # Slicer 5.10 calls cleanup() before deleting an effect: observers, connections and the fill go
    cleanup = ast.unparse(_method(tree, "cleanup")) + ast.unparse(_method(tree, "cleanupFill"))
    for released in ("RemoveObserver(self.sceneObserverTag)", "disconnect('aboutToQuit()', self.cleanupFill)",
                     "self.pollTimer.disconnect('timeout()', self.onPollTimer)", "self.fillLogic.cleanup()"):
        assert released in cleanup
    init = ast.unparse(_method(tree, "__init__"))
    assert "AddObserver" not in init and "aboutToQuit" not in init  # only effects that run a fill observe


def test_effect_self_test_activates_it_on_a_segmentation_with_a_source_volume():
    """qMRMLSegmentEditorWidget refuses (5.8.1) or crashes on (5.10.0) an effect without a segmentation."""
    module = (ROOT / EFFECT_MODULE / f"{EFFECT_MODULE}.py").read_text(encoding="utf-8")
    test = module[module.index("def test_effect_is_registered"):]
    activation = test.index('setActiveEffectByName("HSAM fill")')
    assert -1 < test.index("setSegmentationNode(segmentationNode)") < activation
    assert -1 < test.index("setSourceVolumeNode(volumeNode)") < activation
    assert 'assertEqual(effect.parameter("AutoUpdate"), "0")' in test
