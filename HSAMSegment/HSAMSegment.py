"""HSAMSegment: segment a volume with an HSAM (hierarchical decoding SAM) model.

The work is done by ``HSAMLib`` (no Qt; usable from scripts and tests). This file only wires the
panel: selectors, a background job polled by a timer, progress, cancel and export.
"""

import logging
import os
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEVICES = ("auto", "cuda", "cpu", "mps")
POLL_INTERVAL_MS = 200


class HSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HSAM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["HSAM contributors"]
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


def ensureDependencies() -> bool:
    """Check the engine's Python packages; offer to install missing ones. True when all present."""
    from HSAMLib import dependencies

    plan = dependencies.install_plan(dependencies.missing_requirements())
    if plan.empty:
        return True
    if plan.unavailable:
        slicer.util.errorDisplay(f"{', '.join(plan.unavailable)} is missing from this Slicer: reinstall Slicer.")
        return False
    if not slicer.util.confirmOkCancelDisplay(plan.describe() + "\n\nInstall them now? This may take several minutes."):
        return False

    def installTorch() -> bool:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager, restart Slicer, then try again.")
            return False
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None

    dependencies.install(plan, installTorch, slicer.util.pip_install)
    return not dependencies.missing_requirements()


def reportJobError(title: str, error: BaseException) -> None:
    """One readable line for HSAM errors; the traceback goes to the details and the log."""
    from hsam.errors import HSAMError

    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logging.error("%s\n%s", title, details)
    message = str(error) if isinstance(error, HSAMError) else f"{type(error).__name__}: {error}"
    slicer.util.errorDisplay(f"{title}\n{message}", detailedText=details)


class JobRunner:
    """Runs an ``HSAMLib.worker.BackgroundJob`` and polls it from a QTimer on the main thread."""

    def __init__(self, onProgress: Callable, onFinished: Callable):
        import qt

        self.job = None
        self._onProgress = onProgress
        self._onFinished = onFinished
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)

    @property
    def running(self) -> bool:
        return self.job is not None

    def start(self, function) -> None:
        from HSAMLib.worker import BackgroundJob

        self.job = BackgroundJob(function).start()
        self._timer.start()

    def cancel(self) -> None:
        if self.job:
            self.job.cancel()

    def _poll(self) -> None:
        for item in self.job.poll():
            self._onProgress(item)
        if not self.job.running:
            self._timer.stop()
            job, self.job = self.job, None
            self._onFinished(job)


class HSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._segmentJob = None
        self._downloadJob = None
        self._jobVolume = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HSAMSegmentLogic()

        from HSAMLib.models import SAM_WEIGHTS_NAMES

        self.ui.samWeightsComboBox.addItems(list(SAM_WEIGHTS_NAMES))
        self._segmentJob = JobRunner(self._onSegmentProgress, self._onSegmentFinished)
        self._downloadJob = JobRunner(self._onDownloadProgress, self._onDownloadFinished)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", self.updateDeviceInfo)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.exportSegmentationButton.connect("clicked(bool)", self.onExportSegmentation)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)

        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._segmentJob.cancel()
        self._downloadJob.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.refreshModels()  # models trained in HSAM Training since the panel was last shown
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._segmentJob.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.selectModel(self._parameterNode.modelPath)
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
        self.updateButtons()

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
        if not ensureDependencies():
            return
        from hsam.download import download_sam_weights

        name = self.ui.samWeightsComboBox.currentText
        self._downloadJob.start(lambda progress, cancel: download_sam_weights(name, progress=progress, cancel=cancel))
        self.ui.downloadWeightsButton.text = "Cancel download"
        self.ui.downloadProgressBar.value = 0
        self.ui.downloadProgressBar.visible = True

    def _onDownloadProgress(self, item) -> None:
        fraction, message = item
        self.ui.downloadProgressBar.value = int(100 * fraction)
        self.ui.downloadProgressBar.toolTip = message

    def _onDownloadFinished(self, job) -> None:
        self.ui.downloadWeightsButton.text = "Download"
        self.ui.downloadProgressBar.visible = False
        if job.cancelled:
            self.ui.statusLabel.text = "Download cancelled."
        elif job.error:
            reportJobError("Downloading the SAM weights failed.", job.error)
        else:
            self.ui.statusLabel.text = f"SAM weights saved to {job.result}"

    def updateDeviceInfo(self, name: str = "") -> None:
        from HSAMLib import dependencies

        if not dependencies.is_installed("torch"):
            self.ui.deviceInfoLabel.text = "PyTorch is not installed yet."
            return
        try:
            from hsam.inference import describe_device, select_device

            self.ui.deviceInfoLabel.text = describe_device(select_device(self.ui.deviceComboBox.currentText))
        except Exception as e:  # an unavailable device is reported, not raised
            self.ui.deviceInfoLabel.text = str(e)

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
            self.ui.statusLabel.text = "Cancelling after the current batch…"
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            if not ensureDependencies():
                return
            self.updateDeviceInfo()
            from HSAMLib import mrml

            p = self._parameterNode
            volume = mrml.volume_from_node(p.inputVolume)
            sliceRange = (p.firstSlice, p.lastSlice) if p.useSliceRange else None
            options = dict(device=p.device, batchSize=p.batchSize, sliceRange=sliceRange)
            segmenter, modelPath = self.logic.segmenter, p.modelPath
            self._jobVolume = p.inputVolume
            self._segmentJob.start(
                lambda progress, cancel: segmenter.predict(volume, modelPath, progress=progress, cancel=cancel, **options)
            )
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Loading the model…"
            self.updateButtons()

    def _onSegmentProgress(self, item) -> None:
        fraction, message = item
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.statusLabel.text = message

    def _onSegmentFinished(self, job) -> None:
        self.updateButtons()
        if job.cancelled:
            self.ui.statusLabel.text = "Cancelled; the scene was not changed."
            return
        if job.error:
            self.ui.statusLabel.text = "Failed."
            reportJobError("Segmentation failed.", job.error)
            return
        volumeNode = self._jobVolume
        if not slicer.mrmlScene.IsNodePresent(volumeNode):
            self.ui.statusLabel.text = "The input volume was removed; the result was discarded."
            return
        labels, metadata = job.result
        with slicer.util.tryWithErrorDisplay("Could not write the segmentation.", waitCursor=True):
            p = self._parameterNode
            node = self.logic.segmenter.writeResult(labels, metadata, volumeNode, p.outputSegmentation)
            p.outputSegmentation = node
            node.CreateClosedSurfaceRepresentation()
            slicer.util.setSliceViewerLayers(background=volumeNode)
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = f"Done: {len(metadata.class_names)} segment(s) in '{node.GetName()}'."

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
        """Created on first use, once the engine's dependencies are installed."""
        if self._segmenter is None:
            from HSAMLib.segment_logic import HSAMSegmentLogic as Segmenter

            self._segmenter = Segmenter()
        return self._segmenter


class HSAMSegmentTest(ScriptedLoadableModuleTest):
    """Segment a generated volume with a small untrained model (the ``tiny`` preset) on the CPU."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_generated_volume()

    def test_segment_generated_volume(self):
        import numpy as np
        from hsam.build import build_hsam
        from hsam.bundle import BundleMetadata, save_bundle
        from hsam.preprocess import IntensityPreprocessing
        from HSAMLib import mrml

        self.delayDisplay("Building a volume and a tiny model")
        z, y, x = np.mgrid[:8, :40, :48]
        array = (1000 * ((z - 4) ** 2 / 9 + (y - 20) ** 2 / 144 + (x - 24) ** 2 / 196 < 1)).astype(np.int16)
        volumeNode = slicer.util.addVolumeFromArray(array, name="HSAMTestVolume")
        volumeNode.SetSpacing(0.8, 0.8, 2.5)
        metadata = BundleMetadata(
            preset="tiny", img_size=224, num_classes=1, class_names=["blob"], class_colors=[(0.9, 0.4, 0.2)],
            label_values=[1], preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
        )
        with tempfile.TemporaryDirectory() as folder:
            path = save_bundle(Path(folder) / "tiny.hsam", build_hsam("tiny", num_classes=1, img_size=224).eval(), metadata)
            self.delayDisplay("Segmenting")
            logic = HSAMSegmentLogic().segmenter
            progress = []
            node = logic.segment(volumeNode, path, device="cpu", batchSize=4, progress=lambda f, m: progress.append(f))
            labels, segments = mrml.labels_from_segmentation(node, volumeNode)
            self.assertEqual([s.name for s in segments], ["blob"])
            self.assertEqual(labels.shape, array.shape)
            self.assertTrue(progress)
            segPath, labelmapPath = logic.export(node, volumeNode, folder)
            self.assertTrue(segPath.is_file() and labelmapPath.is_file())
        self.delayDisplay("Test passed")
