"""HSAMSegment: segment a volume with an HSAM (hierarchical decoding SAM) model.

The work is done by ``HSAMLib`` (no Qt; usable from scripts and tests) and the engine runs in a
worker process (``python -m hsam``), so Slicer's own process never imports torch. This file only
wires the panel: selectors, a worker job polled by a timer, progress, cancel and export.
"""

import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Callable, Optional

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


class HSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._gui = None
        self._segmentJob = None
        self._downloadJob = None
        self._deviceLabel = None
        self._jobVolume = None
        self._jobMode = "prompt-free"

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        from HSAMLib.parameters import ParameterGui

        self._gui = ParameterGui()
        self.logic = HSAMSegmentLogic()

        from HSAMLib.models import SAM_WEIGHTS_NAMES

        self.ui.samWeightsComboBox.addItems(list(SAM_WEIGHTS_NAMES))
        self._segmentJob = JobRunner(self._onSegmentProgress, self._onSegmentFinished)
        self._downloadJob = JobRunner(self._onDownloadProgress, self._onDownloadFinished)
        self._deviceLabel = DeviceLabel(self.ui.deviceComboBox, self.ui.deviceInfoLabel)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.exportSegmentationButton.connect("clicked(bool)", self.onExportSegmentation)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)

        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for runner in (self._segmentJob, self._downloadJob, self._deviceLabel):
            runner.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Developer mode: reload ``HSAMLib`` and the engine too, then this module."""
        reloadHSAMPackages()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.refreshModels()  # models trained in HSAM Training since the panel was last shown
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
        if parameterNode.device not in DEVICES:  # a scene saved on another platform (e.g. "mps")
            parameterNode.device = "auto"
        self.setParameterNode(parameterNode)
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode) -> None:
        self._gui.disconnect()
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._gui.connect(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.selectModel(self._parameterNode.modelPath)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.updateModelInfo()
        self.updateButtons()

    # --- models -------------------------------------------------------------------------------

    def refreshModels(self) -> None:
        from HSAMLib import models

        current = self.ui.modelComboBox.currentData
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for path in models.bundle_paths():
            self.ui.modelComboBox.addItem(path.stem, str(path))
        self.ui.modelComboBox.blockSignals(False)
        self.selectModel(current or (self._parameterNode.modelPath if self._parameterNode else ""))
        self.ui.modelsFolderLabel.text = str(models.models_dir())

    def selectModel(self, path: str) -> None:
        index = self.ui.modelComboBox.findData(path) if path else -1
        if index < 0 and path and Path(path).is_file():
            self.ui.modelComboBox.addItem(Path(path).stem, path)
            index = self.ui.modelComboBox.count - 1
        self.ui.modelComboBox.setCurrentIndex(max(index, 0) if self.ui.modelComboBox.count else -1)
        self.onModelChanged()

    def onModelChanged(self, index: int = -1) -> None:
        path = self.ui.modelComboBox.currentData or ""
        if self._parameterNode and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path
        self.ui.modelComboBox.toolTip = path
        self.onParameterNodeModified()

    def updateModelInfo(self) -> None:
        """The line under the model: what it corrects on the input volume (``HSAMLib.segment_logic.Prior``)."""
        p = self._parameterNode
        if not (p and p.modelPath):
            self.ui.modelInfoLabel.text = ""
            return
        try:
            self.ui.modelInfoLabel.text = self.logic.segmenter.prior(p.inputVolume, p.modelPath).summary()
        except Exception as e:  # shown in the panel; the Segment button reports it properly
            self.ui.modelInfoLabel.text = f"Cannot read the model: {e}"

    def onImportModel(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(self.parent, "Import HSAM model", "", "HSAM model (*.hsam)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not import the model.", waitCursor=True):
            if not ensureDependencies():
                return
            from HSAMLib import models

            entry = models.import_model_file(path)
            self.refreshModels()
            self.selectModel(str(entry.path))
            self.ui.statusLabel.text = f"Imported {entry.describe()}"

    def onOpenModelsFolder(self) -> None:
        import qt
        from HSAMLib import models

        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(models.models_dir())))

    def onDownloadWeights(self) -> None:
        if self._downloadJob.running:
            self._downloadJob.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Could not start the download.", waitCursor=True):
            if not ensureDependencies():
                return
            from HSAMLib.worker import WorkerJob

            name = self.ui.samWeightsComboBox.currentText
            self._downloadJob.start(WorkerJob(name="hsam-download").start(["download", name, "--progress", "json"]))
            self.ui.downloadWeightsButton.text = "Cancel download"
            self.ui.downloadProgressBar.value = 0
            self.ui.downloadProgressBar.visible = True

    def _onDownloadProgress(self, events) -> None:
        self.ui.downloadProgressBar.value = int(100 * events[-1]["fraction"])
        self.ui.downloadProgressBar.toolTip = events[-1]["message"]

    def _onDownloadFinished(self, job) -> None:
        from HSAMLib.worker import CANCELLED, SUCCEEDED

        self.ui.downloadWeightsButton.text = "Download"
        self.ui.downloadProgressBar.visible = False
        if job.state == CANCELLED:
            self.ui.statusLabel.text = "Download cancelled; the next download resumes it."
        elif job.state != SUCCEEDED:
            reportWorkerError("Downloading the SAM weights failed.", job)
        else:
            self.ui.statusLabel.text = f"SAM weights saved to {job.result['output']}"
        job.cleanup()

    # --- segmentation -------------------------------------------------------------------------

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self._segmentJob.running
        ready = bool(p and p.inputVolume and p.modelPath)
        self.ui.segmentButton.enabled = busy or ready
        self.ui.segmentButton.text = "Cancel" if busy else "Segment"
        self.ui.segmentButton.toolTip = "" if ready else "Select an input volume and a model."
        for widget in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            widget.enabled = not busy
        hasOutput = bool(p and p.outputSegmentation and p.inputVolume)
        self.ui.exportSegmentationButton.enabled = hasOutput and not busy
        self.ui.exportLabelmapButton.enabled = hasOutput and not busy
        self.ui.firstSliceSpinBox.enabled = self.ui.lastSliceSpinBox.enabled = bool(p and p.useSliceRange)

    def onSegmentButton(self) -> None:
        if self._segmentJob.running:
            self._segmentJob.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            if not ensureDependencies():
                return
            p = self._parameterNode
            sliceRange = (p.firstSlice, p.lastSlice) if p.useSliceRange else None
            prior = self.logic.segmenter.prior(p.inputVolume, p.modelPath)
            job = self.logic.segmenter.startSegmentation(p.inputVolume, p.modelPath, p.device, p.batchSize, sliceRange,
                                                         prior.annotationsNode)
            self._jobVolume = p.inputVolume
            self._jobMode = prior.description
            self._segmentJob.start(job)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting the HSAM worker…"
            self.updateButtons()

    def _onSegmentProgress(self, events) -> None:
        """Any progress event (loading, atlas registration, slices): its fraction and message."""
        self.ui.progressBar.value = int(100 * events[-1]["fraction"])
        self.ui.statusLabel.text = events[-1]["message"]

    def _onSegmentFinished(self, job) -> None:
        from HSAMLib.worker import CANCELLED, SUCCEEDED

        self.updateButtons()
        if job.state == CANCELLED:
            self.ui.statusLabel.text = "Cancelled; the scene was not changed."
            return
        if job.state != SUCCEEDED:
            self.ui.statusLabel.text = "Failed."
            reportWorkerError("Segmentation failed.", job)
            job.cleanup()
            return
        volumeNode = self._jobVolume
        if not slicer.mrmlScene.IsNodePresent(volumeNode):
            self.ui.statusLabel.text = "The input volume was removed; the result was discarded."
            job.cleanup()
            return
        with slicer.util.tryWithErrorDisplay("Could not load the segmentation.", waitCursor=True):
            p = self._parameterNode
            node = self.logic.segmenter.loadResult(job, volumeNode, p.outputSegmentation)
            p.outputSegmentation = node
            if p.show3D:
                node.CreateClosedSurfaceRepresentation()
            slicer.util.setSliceViewerLayers(background=volumeNode)
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = self.logic.segmenter.finishedMessage(self._jobMode, node, job.warnings)

    # --- export -------------------------------------------------------------------------------

    def _exportPath(self, title: str, suffix: str, filter: str) -> Optional[str]:
        import qt

        name = self._parameterNode.outputSegmentation.GetName()
        start = os.path.join(qt.QDir.homePath(), f"{name}{suffix}")
        path = qt.QFileDialog.getSaveFileName(self.parent, title, start, filter)
        if path and not path.endswith(suffix):
            path += suffix
        return path or None

    def onExportSegmentation(self) -> None:
        path = self._exportPath("Export segmentation", ".seg.nrrd", "Segmentation (*.seg.nrrd)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.segmenter.exportSegmentation(self._parameterNode.outputSegmentation, path)
                self.ui.statusLabel.text = f"Saved {path}"

    def onExportLabelmap(self) -> None:
        path = self._exportPath("Export labelmap", ".nrrd", "Labelmap (*.nrrd)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                p = self._parameterNode
                self.logic.segmenter.exportLabelmap(p.outputSegmentation, p.inputVolume, path)
                self.ui.statusLabel.text = f"Saved {path}"


class HSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """The module's parameter node; the segmentation itself is ``HSAMLib.segment_logic.HSAMSegmentLogic``
    (``segmenter``), which also works without Slicer's GUI."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenter = None

    def getParameterNode(self):
        return HSAMSegmentParameterNode(super().getParameterNode())

    @property
    def segmenter(self):
        """Created on first use; it needs no torch (the model line reads bundles before any install)."""
        if self._segmenter is None:
            from HSAMLib.segment_logic import HSAMSegmentLogic as Segmenter

            self._segmenter = Segmenter()
        return self._segmenter


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
