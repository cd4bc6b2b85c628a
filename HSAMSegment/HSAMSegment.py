"""HSAMSegment: segment a volume with an HSAM (hierarchical decoding SAM) model.

The work is done by ``HSAMLib`` (no Qt; usable from scripts and tests) and the engine runs in a
worker process (``python -m hsam``), so Slicer's own process never imports torch. This file only
wires the panel: selectors, a worker job polled by a timer, progress, cancel and export.
"""

import logging
import platform
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Callable

import slicer
import vtk
from HSAMLib.compatibility import unsupported_slicer_message

# Said once, at load, instead of failing at the first click (the imports below need Slicer 5.8).
UNSUPPORTED_MESSAGE = unsupported_slicer_message(slicer.app.majorVersion, slicer.app.minorVersion)
if UNSUPPORTED_MESSAGE:
    raise ImportError(UNSUPPORTED_MESSAGE)

from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402
from HSAMLib.devices import device_choices  # noqa: E402

DEVICES = device_choices(sys.platform, platform.machine())
POLL_INTERVAL_MS = 200
# The export dialogs' titles and file filters, by kind (``HSAMLib.segment_panel.EXPORT_SUFFIXES``).
EXPORT_DIALOGS = {
    "segmentation": ("Export segmentation", "Segmentation (*.seg.nrrd)"),
    "labelmap": ("Export labelmap", "Labelmap (*.nrrd)"),
}


class HSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HSAM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["The HSAM authors (hsam-slicer)"]
        self.parent.helpText = (
            "Segment a volume slice by slice with an H-SAM model (hierarchical decoding Segment Anything, "
            "Cheng et al., CVPR 2024) fine-tuned from a few annotated slices in the HSAM Training module. "
            "See the <a href='https://github.com/hsam-slicer/HSAM'>documentation</a>."
        )
        self.parent.acknowledgementText = (
            "H-SAM: Cheng Z. et al., Unleashing the Potential of SAM for Medical Adaptation via Hierarchical "
            "Decoding, CVPR 2024. Segment Anything: Kirillov A. et al., ICCV 2023."
        )


@parameterNodeWrapper
class HSAMSegmentParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    modelPath: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    batchSize: Annotated[int, WithinRange(1, 256)] = 4
    useSliceRange: bool = False
    firstSlice: Annotated[int, WithinRange(0, 100000)] = 0
    lastSlice: Annotated[int, WithinRange(0, 100000)] = 0
    show3D: bool = False


def ensureDependencies() -> bool:
    """Check the engine's Python packages; offer, in one dialog, to install the missing ones. True when
    all are present. Install errors are raised: call it inside ``slicer.util.tryWithErrorDisplay``."""
    from HSAMLib import dependencies

    with dependencies.exclusive() as allowed:
        if not allowed:  # a click while pip runs: Slicer's pip_install processes GUI events meanwhile
            slicer.util.showStatusMessage("HSAM is installing its Python packages; try again once it has finished.", 5000)
            return False
        plan = dependencies.install_plan()
        if plan.empty:
            return True
        if plan.problem:
            slicer.util.errorDisplay(plan.problem)
            return False
        if not slicer.util.confirmOkCancelDisplay(plan.describe() + "\n\nInstall them now? This may take several minutes."):
            return False
        dependencies.install(plan, _installTorch, slicer.util.pip_install)
        return dependencies.install_plan().empty


def _installTorch(torchRequirement: str, torchvisionRequirement: str) -> bool:
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager, restart Slicer, then try again.")
        return False
    logic = PyTorchUtils.PyTorchUtilsLogic()
    installed = logic.installTorch(
        askConfirmation=False, torchVersionRequirement=torchRequirement, torchvisionVersionRequirement=torchvisionRequirement
    )
    return installed is not None


def reloadHSAMPackages() -> None:
    """Forget the loaded ``HSAMLib`` and ``hsam`` modules, so that their next import reads the files again."""
    for name in [name for name in sys.modules if name.split(".")[0] in ("HSAMLib", "hsam")]:
        del sys.modules[name]


def reportWorkerError(title: str, job) -> None:
    """The worker's one-line message; its stderr goes to the details and the log."""
    details = "\n".join(job.stderr_lines[-200:])
    logging.error("%s %s\n%s", title, job.error, details)
    slicer.util.errorDisplay(f"{title}\n{job.error}", detailedText=details)


class JobRunner:
    """Follows an ``HSAMLib.worker.WorkerJob``: a QTimer on the main thread polls it, hands its progress
    events to ``onEvents(list)`` and the ended job to ``onFinished(job)``."""

    def __init__(self, onEvents: Callable, onFinished: Callable):
        import qt

        self.job = None
        self._onEvents = onEvents
        self._onFinished = onFinished
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)

    @property
    def running(self) -> bool:
        return self.job is not None

    def start(self, job) -> None:
        self.job = job
        self._timer.start()

    def cancel(self) -> None:
        """End the worker (within a second or two) and report the job as cancelled."""
        if self.job:
            self.job.cancel()
            self._poll()

    def stop(self) -> None:
        """End the worker and stop polling, without callbacks (the panel is going away)."""
        self._timer.stop()
        if self.job:
            self.job.cancel()
            self.job = None

    def _poll(self) -> None:
        events = self.job.poll()
        if events:
            self._onEvents(events)
        if not self.job.running:
            self._timer.stop()
            job, self.job = self.job, None
            self._onFinished(job)


class DeviceLabel:
    """Fills ``label`` with what the device chosen in ``comboBox`` is on this computer. The first call
    starts ``hsam devices`` in a worker process; its answer is kept for the session, for both panels."""

    probe = None  # shared by every panel

    def __init__(self, comboBox, label):
        self._comboBox, self._label = comboBox, label
        self._job = JobRunner(lambda events: None, self._onFinished)
        comboBox.connect("currentTextChanged(QString)", self.update)

    def update(self, text: str = "") -> None:
        from HSAMLib import dependencies, devices

        if DeviceLabel.probe is not None:
            self._label.text = devices.describeChoice(DeviceLabel.probe, self._comboBox.currentText)
        elif not dependencies.is_installed("torch"):
            self._label.text = "PyTorch is not installed yet."
        elif not self._job.running:
            self._label.text = "Looking for GPUs…"
            self._job.start(devices.startProbe())

    def stop(self) -> None:
        self._job.stop()

    def _onFinished(self, job) -> None:
        from hsam.runtime.errors import HSAMError
        from HSAMLib import devices

        try:
            DeviceLabel.probe = devices.probeResult(job)
        except HSAMError as e:
            self._label.text = f"Cannot list the devices: {e}"
            return
        self.update()


class ModelsSection:
    """The model list (item data: the bundle's path) over the models folder, the folder's label and the
    Refresh, Import and Open folder buttons (``SegmentPanelLogic.modelChoices``, ``importModel``);
    ``onChanged(path)`` follows the choice, ``onStatus(text)`` says what was imported."""

    def __init__(self, ui, panel, onChanged: Callable[[str], None], onStatus: Callable[[str], None]):
        self.ui, self._panel, self._onChanged, self._onStatus = ui, panel, onChanged, onStatus
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._changed)
        self.ui.refreshModelsButton.connect("clicked()", self.refresh)
        self.ui.importModelButton.connect("clicked()", self.onImport)
        self.ui.openModelsFolderButton.connect("clicked()", self.onOpenFolder)

    @property
    def path(self) -> str:
        return self.ui.modelComboBox.currentData or ""

    def refresh(self) -> None:
        """List the models folder again (models trained or copied there meanwhile), keeping the choice."""
        self.show(self.path)

    def show(self, selected: str) -> None:
        """List the models folder, ``selected`` chosen."""
        from HSAMLib import models

        choices, index = self._panel.modelChoices(selected)
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for name, path in choices:
            self.ui.modelComboBox.addItem(name, path)
        self.ui.modelComboBox.setCurrentIndex(index)
        self.ui.modelComboBox.blockSignals(False)
        self.ui.modelsFolderLabel.text = str(models.models_dir())
        self._changed()

    def onImport(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(self.ui.importModelButton, "Import HSAM model", "", "HSAM model (*.hsam)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not import the model.", waitCursor=True):
                if ensureDependencies():
                    imported, status = self._panel.importModel(path)
                    self.show(imported)
                    self._onStatus(status)

    def onOpenFolder(self) -> None:
        import qt
        from HSAMLib import models

        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(models.models_dir())))

    def _changed(self, index: int = -1) -> None:
        self.ui.modelComboBox.toolTip = self.path
        self._onChanged(self.path)


class WeightsDownload:
    """The SAM weights row: the names, Download (Cancel download while it runs) and a progress bar, over
    an ``hsam download`` worker (``SegmentPanelLogic.startDownload``); ``onStatus(text)`` says how it ended."""

    def __init__(self, ui, panel, onStatus: Callable[[str], None]):
        from HSAMLib.models import SAM_WEIGHTS_NAMES

        self.ui, self._panel, self._onStatus = ui, panel, onStatus
        self._job = JobRunner(self._onProgress, self._onFinished)
        self.ui.samWeightsComboBox.addItems(list(SAM_WEIGHTS_NAMES))
        self.ui.downloadWeightsButton.connect("clicked()", self.onButton)

    def onButton(self) -> None:
        if self._job.running:
            self._job.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Could not start the download.", waitCursor=True):
            if ensureDependencies():
                self._job.start(self._panel.startDownload(self.ui.samWeightsComboBox.currentText))
                self.ui.downloadWeightsButton.text = "Cancel download"
                self.ui.downloadProgressBar.value = 0
                self.ui.downloadProgressBar.visible = True

    def stop(self) -> None:
        self._job.stop()

    def _onProgress(self, events) -> None:
        self.ui.downloadProgressBar.value = int(100 * events[-1]["fraction"])
        self.ui.downloadProgressBar.toolTip = events[-1]["message"]

    def _onFinished(self, job) -> None:
        self.ui.downloadWeightsButton.text = "Download"
        self.ui.downloadProgressBar.visible = False
        showEnded(self._panel.downloadEnded(job), job, self._onStatus)


def showEnded(ended, job, onStatus: Callable[[str], None]) -> None:
    """What the panel says once a job has ended (``HSAMLib.segment_panel.Ended``): the status line, an error dialog."""
    if ended.status is not None:
        onStatus(ended.status)
    if ended.failure:
        reportWorkerError(ended.failure, job)


class HSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: its widgets wired to ``HSAMLib.segment_panel.SegmentPanelLogic`` (``panel``)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self.panel = self._parameterNode = self._gui = None
        self._models = self._download = self._segmentJob = self._deviceLabel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        from HSAMLib.parameters import ParameterGui
        from HSAMLib.segment_panel import SegmentPanelLogic

        self._gui, self.logic, self.panel = ParameterGui(), HSAMSegmentLogic(), SegmentPanelLogic()
        self._models = ModelsSection(self.ui, self.panel, self.onModelChanged, self.showStatus)
        self._download = WeightsDownload(self.ui, self.panel, self.showStatus)
        self._segmentJob = JobRunner(self._onSegmentProgress, self._onSegmentFinished)
        self._deviceLabel = DeviceLabel(self.ui.deviceComboBox, self.ui.deviceInfoLabel)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked()", self.onSegmentButton)
        self.ui.exportSegmentationButton.connect("clicked()", lambda: self.onExport("segmentation"))
        self.ui.exportLabelmapButton.connect("clicked()", lambda: self.onExport("labelmap"))
        self._models.refresh()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for runner in (self._segmentJob, self._download, self._deviceLabel):
            runner.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Developer mode: reload ``HSAMLib`` and the engine too, then this module."""
        reloadHSAMPackages()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self._models.refresh()  # models trained in HSAM Training since the panel was last shown
        self.initializeParameterNode()
        self._deviceLabel.update()

    def exit(self) -> None:
        self._gui.disconnect()
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._segmentJob.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        self.panel.applyDefaults(parameterNode, slicer.mrmlScene, DEVICES)
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode) -> None:
        self.exit()  # the previous node's connection and observer
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._gui.connect(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self._models.show(self._parameterNode.modelPath)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.ui.modelInfoLabel.text = self.panel.modelLine(self._parameterNode)
        state = self.panel.controls(self._parameterNode, self._segmentJob.running)
        self.ui.segmentButton.enabled, self.ui.segmentButton.text = state.segment, state.segmentText
        self.ui.segmentButton.toolTip = state.segmentToolTip
        for widget in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            widget.enabled = state.inputs
        self.ui.exportSegmentationButton.enabled = self.ui.exportLabelmapButton.enabled = state.export
        self.ui.firstSliceSpinBox.enabled = self.ui.lastSliceSpinBox.enabled = state.sliceRange

    def showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def onModelChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path
        self.onParameterNodeModified()

    # --- segmentation and export --------------------------------------------------------------

    def onSegmentButton(self) -> None:
        if self._segmentJob.running:
            self._segmentJob.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            if ensureDependencies():
                self._segmentJob.start(self.panel.startSegmentation(self._parameterNode))
                self.ui.progressBar.value = 0
                self.showStatus("Starting the HSAM worker…")
                self.onParameterNodeModified()

    def _onSegmentProgress(self, events) -> None:
        """Any progress event (loading, atlas registration, slices): its fraction and message."""
        self.ui.progressBar.value = int(100 * events[-1]["fraction"])
        self.showStatus(events[-1]["message"])

    def _onSegmentFinished(self, job) -> None:
        self.onParameterNodeModified()
        with slicer.util.tryWithErrorDisplay("Could not load the segmentation.", waitCursor=True):
            ended = self.panel.segmentationEnded(job, self._parameterNode)
        if ended.volumeNode:
            slicer.util.setSliceViewerLayers(background=ended.volumeNode)
            self.ui.progressBar.value = 100
        showEnded(ended, job, self.showStatus)

    def onExport(self, kind: str) -> None:
        """Export the output segmentation as ``kind`` (``SegmentPanelLogic.export``) to a file the user picks."""
        import qt

        title, filter = EXPORT_DIALOGS[kind]
        start = self.panel.exportStart(self._parameterNode, kind, qt.QDir.homePath())
        path = qt.QFileDialog.getSaveFileName(self.parent, title, start, filter)
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.showStatus(self.panel.export(self._parameterNode, kind, path))


class HSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """The module's parameter node. The panel's decisions and jobs are ``HSAMLib.segment_panel``'s, the
    segmentation itself ``HSAMLib.segment_logic.HSAMSegmentLogic``'s; both also work without Slicer's GUI."""

    def getParameterNode(self):
        return HSAMSegmentParameterNode(super().getParameterNode())


class HSAMSegmentTest(ScriptedLoadableModuleTest):
    """Fine-tune the tiny preset for one epoch on a generated volume, then segment and export it, all
    through worker processes on the CPU. Skipped, with a message, where PyTorch is not installed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_generated_volume()

    def test_segment_generated_volume(self):
        import numpy as np
        from hsam.volumes.segmentation import Segment
        from HSAMLib import dependencies, mrml
        from HSAMLib.segment_logic import HSAMSegmentLogic as Segmenter
        from HSAMLib.training_logic import HSAMTrainingLogic as Trainer

        missing = dependencies.install_plan()
        if not missing.empty:  # build machines without PyTorch: the engine part cannot run
            self.delayDisplay(f"Skipping the segmentation test: {missing.describe()}")
            return
        self.delayDisplay("Building a volume with two painted slices")
        z, y, x = np.mgrid[:8, :40, :48]
        blob = (z - 4) ** 2 / 9 + (y - 20) ** 2 / 144 + (x - 24) ** 2 / 196 < 1
        volumeNode = slicer.util.addVolumeFromArray((1000 * blob).astype(np.int16), name="HSAMTestVolume")
        volumeNode.SetSpacing(0.8, 0.8, 2.5)
        labels = np.zeros(blob.shape, np.uint8)
        labels[[3, 5]] = blob[[3, 5]]
        annotations = mrml.labels_to_segmentation(labels, [Segment("blob", 1, (0.9, 0.4, 0.2), None)], volumeNode)
        with tempfile.TemporaryDirectory() as folder:
            self.delayDisplay("Training a tiny model in a worker process")
            trainer = Trainer()
            config = trainer.makeConfig("tiny", epochs=1, batchSize=2, device="cpu", imageSize=224)
            path = trainer.finetune(volumeNode, annotations, "self-test", config, modelsFolder=Path(folder))
            self.delayDisplay("Segmenting in a worker process")
            events = []
            node = Segmenter().segment(volumeNode, path, device="cpu", batchSize=4, onEvents=events.extend)
            result, segments = mrml.labels_from_segmentation(node, volumeNode)
            self.assertEqual([s.name for s in segments], ["blob"])
            self.assertEqual(result.shape, blob.shape)
            self.assertEqual(events[-1]["fraction"], 1.0)
            segPath, labelmapPath = Segmenter().export(node, volumeNode, folder)
            self.assertTrue(segPath.is_file() and labelmapPath.is_file())
        self.delayDisplay("Test passed")
