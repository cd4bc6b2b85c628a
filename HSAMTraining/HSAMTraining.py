"""HSAMTraining: fine-tune an HSAM model from a few annotated slices, inside Slicer.

The work is done by ``HSAMLib`` (shipped in the HSAMSegment module folder) and the engine runs in a
worker process; this file only wires the panel: inputs, annotated-slice summary, training options,
a worker job whose progress stream feeds the live curves.
"""

import sys
import tempfile
from pathlib import Path
from typing import Annotated

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

# HSAMLib and the engine live in the HSAMSegment module folder: it is a sibling in the source tree
# and shares the scripted-modules folder once installed.
_SEGMENT_MODULE_DIR = Path(__file__).resolve().parent.parent / "HSAMSegment"
if _SEGMENT_MODULE_DIR.is_dir() and str(_SEGMENT_MODULE_DIR) not in sys.path:
    sys.path.append(str(_SEGMENT_MODULE_DIR))

from HSAMSegment import (  # noqa: E402
    DEVICES,
    DeviceLabel,
    JobRunner,
    ensureDependencies,
    reloadHSAMPackages,
    reportWorkerError,
)

# The annotation summary is counted again once painting has paused this long.
SUMMARY_DELAY_MS = 1500

SLICE_AXES = ("axial", "coronal", "sagittal")


class HSAMTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HSAM Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["HSAMSegment"]
        self.parent.contributors = ["The HSAM authors (hsam-slicer)"]
        self.parent.helpText = (
            "Fine-tune an H-SAM model on a few annotated slices: paint each structure as a segment on some "
            "slices of a volume, choose a base model and train. The new model appears in HSAM Segment."
        )
        self.parent.acknowledgementText = (
            "H-SAM: Cheng Z. et al., Unleashing the Potential of SAM for Medical Adaptation via Hierarchical "
            "Decoding, CVPR 2024."
        )


@parameterNodeWrapper
class HSAMTrainingParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    sliceAxis: Annotated[str, Choice(list(SLICE_AXES))] = "axial"
    baseModel: str = "tiny"
    outputName: str = "my-model"
    useTimeBudget: bool = False
    epochs: Annotated[int, WithinRange(1, 100000)] = 100
    timeBudgetMinutes: Annotated[float, WithinRange(0.5, 1440)] = 10.0
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0  # 0: the engine's default for the preset
    batchSize: Annotated[int, WithinRange(1, 256)] = 2
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    keepAtlas: bool = False  # hsam finetune --atlas


class HSAMTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._gui = None
        self._job = None
        self._jobName = None
        self._curves = None
        self._summaryTimer = None
        self._annotations = None
        self._deviceLabel = None
        self._pairs = None
        self._suggestJob = None
        self._suggestion = None  # (volume node, axis, annotated slices, count) of the running suggestion
        self._suggestionNodes = (None, None)  # uncertainty volume and score table of the last one
        self._gapTable = None  # table of the last suggestion without a model
        self._shownSlices = None  # (volume node, axis, suggested slices) listed in the panel

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HSAMTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        import qt
        from HSAMLib.annotations import AnnotationTracker
        from HSAMLib.parameters import ParameterGui

        self._gui = ParameterGui()
        self.logic = HSAMTrainingLogic()
        self._job = JobRunner(self._onProgress, self._onFinished)
        self._summaryTimer = qt.QTimer()
        self._summaryTimer.setSingleShot(True)
        self._summaryTimer.setInterval(SUMMARY_DELAY_MS)
        self._summaryTimer.connect("timeout()", self.updateAnnotationSummary)
        self._annotations = AnnotationTracker(onChanged=self._summaryTimer.start)
        self._deviceLabel = DeviceLabel(self.ui.deviceComboBox, self.ui.deviceInfoLabel)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.baseModelComboBox.connect("currentIndexChanged(int)", self.onBaseModelChanged)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.showPlotButton.connect("clicked(bool)", self.showPlot)
        self._setupPairsList()
        self._suggestJob = JobRunner(self._onSuggestProgress, self._onSuggestFinished)
        self.setupSuggestionPanel()

        self.refreshBaseModels()
        self.initializeParameterNode()

    def _setupPairsList(self) -> None:
        """Below the inputs: more (volume, segmentation) pairs that the same model trains on."""
        import qt

        from HSAMLib.training_logic import TrainingPairs

        self._pairs = TrainingPairs()
        self.pairsList = qt.QListWidget()
        self.pairsList.toolTip = ("Other annotated (volume, segmentation) pairs, e.g. other patients: one model "
                                  "trains on the annotated slices of all of them and of the pair above.")
        self.pairsList.setMaximumHeight(90)
        addButton = qt.QPushButton("Add pair above")
        addButton.toolTip = "Add the volume and segmentation selected above to the training pairs"
        removeButton = qt.QPushButton("Remove")
        addButton.connect("clicked(bool)", self.onAddPair)
        removeButton.connect("clicked(bool)", self.onRemovePair)
        buttons = qt.QHBoxLayout()
        buttons.addWidget(addButton)
        buttons.addWidget(removeButton)
        form = self.ui.inputsCollapsibleButton.layout()
        form.addRow("More training pairs:", self.pairsList)
        form.addRow("", buttons)

    def onAddPair(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not add the pair."):
            p = self._parameterNode
            self._pairs.add(p.inputVolume, p.segmentation)
            self.updatePairsList()

    def onRemovePair(self) -> None:
        self._pairs.remove(self.pairsList.currentRow)
        self.updatePairsList()

    def updatePairsList(self) -> None:
        self.pairsList.clear()
        for name in self._pairs.names(slicer.mrmlScene):
            self.pairsList.addItem(name)

    def cleanup(self) -> None:
        self._job.stop()
        self._summaryTimer.stop()
        self._annotations.stop()
        self._suggestJob.stop()
        self._deviceLabel.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Developer mode: reload ``HSAMLib`` and the engine too, then this module."""
        reloadHSAMPackages()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.refreshBaseModels()
        self.initializeParameterNode()
        self._deviceLabel.update()

    def exit(self) -> None:
        self._gui.disconnect()
        self._annotations.stop()
        self._summaryTimer.stop()
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job.running and not slicer.util.confirmYesNoDisplay(
            "Fine-tuning is running. It has all it needs outside the scene and saves the model into the models "
            "folder when it ends; only its curves close with the scene.\n\nKeep fine-tuning?"
        ):
            self._job.cancel()
        self._suggestJob.cancel()
        self._suggestionNodes = (None, None)
        self._gapTable = None
        self._shownSlices = None
        self._curves = None
        self._pairs.ids.clear()
        self.updatePairsList()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if parameterNode.device not in DEVICES:  # a scene saved on another platform (e.g. "mps")
            parameterNode.device = "auto"
        self.setParameterNode(parameterNode)
        p = self._parameterNode
        if not p.inputVolume:
            p.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not p.segmentation:
            p.segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def setParameterNode(self, parameterNode) -> None:
        self._gui.disconnect()
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._gui.connect(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.selectBaseModel(self._parameterNode.baseModel)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        tracked = (p.segmentation, p.inputVolume, p.sliceAxis) if p else (None, None, "")
        if self._annotations.follow(*tracked):
            self.updateAnnotationSummary()
        self.updateButtons()

    # --- base model ---------------------------------------------------------------------------

    def refreshBaseModels(self) -> None:
        from HSAMLib import models

        combo = self.ui.baseModelComboBox
        combo.blockSignals(True)
        combo.clear()
        combo.addItem("Tiny preset (trained from scratch; fast, for CPU)", "tiny")
        for name in models.SAM_WEIGHTS_NAMES:
            combo.addItem(f"SAM {name} (official weights)", f"sam:{name}")
        for path in models.bundle_paths():
            combo.addItem(f"HSAM model: {path.stem}", str(path))
        combo.blockSignals(False)
        self.selectBaseModel(self._parameterNode.baseModel if self._parameterNode else "tiny")

    def selectBaseModel(self, value: str) -> None:
        self.ui.baseModelComboBox.setCurrentIndex(max(self.ui.baseModelComboBox.findData(value), 0))
        self.onBaseModelChanged()

    def onBaseModelChanged(self, index: int = -1) -> None:
        value = self.ui.baseModelComboBox.currentData or "tiny"
        if self._parameterNode and self._parameterNode.baseModel != value:
            self._parameterNode.baseModel = value

    # --- annotated slices ---------------------------------------------------------------------

    def updateAnnotationSummary(self) -> None:
        try:
            annotated = self._annotations.summary()
        except Exception as e:  # shown in the panel; the Fine-tune button reports it properly
            self.ui.annotationSummaryLabel.text = f"Cannot read the annotations: {e}"
            return
        if annotated is None:
            self.ui.annotationSummaryLabel.text = "Select a volume and a segmentation painted on a few slices."
            return
        text = annotated.summary().replace("\n", "<br>")
        if annotated.missing:
            text += f"<br><b style='color:#c05000'>Paint at least one slice of: {', '.join(annotated.missing)}</b>"
        self.ui.annotationSummaryLabel.text = text

    # --- training -----------------------------------------------------------------------------

    def updateButtons(self) -> None:
        p = self._parameterNode
        busy = self._job.running
        ready = bool(p and p.inputVolume and p.segmentation and p.outputName.strip())
        self.ui.finetuneButton.enabled = busy or ready
        self.ui.finetuneButton.text = "Cancel" if busy else "Fine-tune"
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton, self.ui.trainingCollapsibleButton):
            widget.enabled = not busy
        self.ui.timeBudgetSpinBox.enabled = bool(p and p.useTimeBudget)
        self.ui.showPlotButton.enabled = self._curves is not None

    def onFinetuneButton(self) -> None:
        if self._job.running:
            self._job.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            if not ensureDependencies():
                return
            from HSAMLib.plots import TrainingCurves

            p = self._parameterNode
            trainer = self.logic.trainer
            pairs = self._pairs.cohort(slicer.mrmlScene, p.inputVolume, p.segmentation)
            config = trainer.makeConfig(
                baseModel=p.baseModel,
                epochs=p.epochs,
                timeBudgetSeconds=60 * p.timeBudgetMinutes if p.useTimeBudget else None,
                learningRate=p.learningRate,
                batchSize=p.batchSize,
                device=p.device,
                sliceAxis=p.sliceAxis,
                atlas=p.keepAtlas,
            )
            if len(pairs) == 1:
                data = [trainer.prepare(p.inputVolume, p.segmentation, p.sliceAxis, config.isGuided())]
            else:
                data = trainer.prepareCohort(pairs, p.sliceAxis, config.isGuided())
            name = self._jobName = p.outputName.strip()
            self._job.start(trainer.startFinetune(data, config))
            self._curves = TrainingCurves(slicer.mrmlScene, f"HSAM training {name}")
            self.showPlot()
            self.ui.progressBar.value = 0
            slices = sum(len(d.annotated.slices) for d in data)
            self.ui.statusLabel.text = f"Training on {slices} slices of {len(data)} volume(s)…"
            self.updateButtons()

    def showPlot(self) -> None:
        if self._curves and slicer.mrmlScene.IsNodePresent(self._curves.chartNode):
            slicer.modules.plots.logic().ShowChartInLayout(self._curves.chartNode)

    def _onProgress(self, events) -> None:
        """Progress events of the worker (``hsam.runtime.progress``); each epoch's loss goes into the curves."""
        self.ui.progressBar.value = int(100 * events[-1]["fraction"])
        self.ui.statusLabel.text = events[-1]["message"]
        for event in events:
            if event.get("loss") is not None and self._curves:
                self._curves.append(event["epoch"], event["loss"], event.get("val_dice"))

    def _onFinished(self, job) -> None:
        from HSAMLib.worker import CANCELLED, SUCCEEDED

        if job.state != SUCCEEDED and self._curves:  # a failed or cancelled run leaves nothing in the scene
            self._curves.remove()
            self._curves = None
        self.updateButtons()
        if job.state == CANCELLED:
            self.ui.statusLabel.text = "Cancelled; no model was saved."
        elif job.state != SUCCEEDED:
            self.ui.statusLabel.text = "Failed."
            reportWorkerError("Fine-tuning failed.", job)
            job.cleanup()
        else:
            with slicer.util.tryWithErrorDisplay("Could not save the model.", waitCursor=True):
                path = self.logic.trainer.saveModel(job, self._jobName)
                self.ui.progressBar.value = 100
                self.refreshBaseModels()
                self.selectBaseModel(str(path))  # the next round continues from it
                self.ui.statusLabel.text = (
                    f"Saved {path}. It is now the base model: Suggest slices, annotate them and Fine-tune "
                    "again to continue from it. Select it in HSAM Segment to segment other volumes. "
                    + self.logic.trainer.atlasSummary(path)
                ).strip()

    # --- suggested slices -----------------------------------------------------------------------

    def setupSuggestionPanel(self) -> None:
        import ctk
        import qt

        section = ctk.ctkCollapsibleButton()
        section.text = "Next slices to annotate"
        form = qt.QFormLayout(section)
        self.suggestRankingComboBox = qt.QComboBox()
        self.suggestRankingComboBox.addItem("Where the flow propagation disagrees (no model)", "flow")
        self.suggestRankingComboBox.addItem("Where the base model is unsure (an HSAM model)", "model")
        self.suggestRankingComboBox.toolTip = (
            "Flow: the gaps between annotated slices where the painting carried from the slice below and from the "
            "slice above disagree most; the middle slice of each (seconds, no model). Model: the slices where the "
            "base model (a fine-tuned HSAM model) is least sure, with its uncertainty as an overlay."
        )
        form.addRow("Rank by:", self.suggestRankingComboBox)
        self.suggestCountSpinBox = qt.QSpinBox()
        self.suggestCountSpinBox.setRange(1, 50)
        self.suggestCountSpinBox.value = 5
        form.addRow("Slices to suggest:", self.suggestCountSpinBox)
        self.suggestButton = qt.QPushButton("Suggest slices")
        self.suggestButton.toolTip = "List the slices to annotate next, skipping annotated slices."
        form.addRow(self.suggestButton)
        self.suggestionList = qt.QListWidget()
        self.suggestionList.toolTip = "Click a slice to show it in the slice views."
        form.addRow(self.suggestionList)
        self.layout.addWidget(section)
        self.suggestButton.connect("clicked(bool)", self.onSuggestButton)
        self.suggestionList.connect("currentRowChanged(int)", self.onSuggestionSelected)

    def onSuggestButton(self) -> None:
        if self._suggestJob.running:
            self._suggestJob.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Could not suggest slices.", waitCursor=True):
            if not ensureDependencies():
                return
            p = self._parameterNode
            suggester = self.logic.suggester
            count = self.suggestCountSpinBox.value
            if self.suggestRankingComboBox.currentData == "flow":
                self._suggestion = (p.inputVolume, p.sliceAxis, None, count)
                self._suggestJob.start(suggester.startGapRanking(p.inputVolume, p.segmentation, p.sliceAxis, count))
            else:
                from hsam.models.bundle import read_bundle_metadata
                from hsam.runtime.errors import InputError

                if not p.baseModel.endswith(".hsam"):
                    raise InputError("choose an HSAM model (a fine-tuned one) as the base model to rank by its uncertainty")
                axis = read_bundle_metadata(p.baseModel).slice_axis  # the axis the model scores slices along
                annotated = suggester.annotatedSlices(p.segmentation, p.inputVolume, axis)
                self._suggestion = (p.inputVolume, axis, annotated, count)
                self._suggestJob.start(suggester.startPrediction(p.inputVolume, p.baseModel, device=p.device))
            self.suggestButton.text = "Cancel"
            self.ui.statusLabel.text = "Scoring the slices…"

    def _onSuggestProgress(self, events) -> None:
        self.ui.progressBar.value = int(100 * events[-1]["fraction"])
        self.ui.statusLabel.text = f"Scoring the slices: {events[-1]['message']}"

    def _onSuggestFinished(self, job) -> None:
        from HSAMLib.worker import CANCELLED, SUCCEEDED

        self.suggestButton.text = "Suggest slices"
        volumeNode, axis, annotated, count = self._suggestion
        if job.state != SUCCEEDED:
            job.cleanup()
            self.ui.statusLabel.text = "Cancelled." if job.state == CANCELLED else "Failed."
            if job.state != CANCELLED:
                reportWorkerError("Could not suggest slices.", job)
            return
        if not slicer.mrmlScene.IsNodePresent(volumeNode):
            job.cleanup()
            self.ui.statusLabel.text = "The volume was removed."
            return
        with slicer.util.tryWithErrorDisplay("Could not read the suggestion.", waitCursor=True):
            lines = self._showGaps(job, volumeNode, axis) if annotated is None else self._showUncertain(
                job, volumeNode, axis, annotated, count)
        self.suggestionList.clear()
        for rank, line in enumerate(lines, start=1):
            self.suggestionList.addItem(f"{rank}. {line}")
        self.ui.progressBar.value = 100
        picks = self._shownSlices[2]
        self.ui.statusLabel.text = (
            f"Annotate {axis} slice {picks[0]} (shown) and the others listed, then Fine-tune."
            if picks else "No slice left to suggest."
        )

    def _showGaps(self, job, volumeNode, axis: str) -> list[str]:
        """The flow ranking's suggestions into the table and the views; the list's lines."""
        suggester = self.logic.suggester
        gaps = suggester.loadGaps(job)
        self._gapTable = suggester.showGaps(gaps, volumeNode, axis, self._gapTable)
        self._shownSlices = (volumeNode, axis, [gap.slice for gap in gaps])
        return [gap.describe(axis) for gap in gaps]

    def _showUncertain(self, job, volumeNode, axis: str, annotated, count: int) -> list[str]:
        """The model's suggestions, overlay and table into the scene; the list's lines."""
        suggester = self.logic.suggester
        prediction = suggester.loadPrediction(job, axis)
        picks = suggester.rank(prediction, count, annotated)
        result = suggester.show(prediction, picks, volumeNode, *self._suggestionNodes)
        self._suggestionNodes = (result.uncertaintyNode, result.tableNode)
        self._shownSlices = (volumeNode, prediction.axis, picks)
        return [f"{prediction.axis} slice {index} (uncertainty {prediction.scores[index]:.3f})" for index in picks]

    def onSuggestionSelected(self, row: int) -> None:
        if row < 0 or self._shownSlices is None:
            return
        volumeNode, axis, picks = self._shownSlices
        if slicer.mrmlScene.IsNodePresent(volumeNode):
            self.logic.suggester.jumpToSlice(volumeNode, axis, picks[row])


class HSAMTrainingLogic(ScriptedLoadableModuleLogic):
    """The module's parameter node; fine-tuning itself is ``HSAMLib.training_logic.HSAMTrainingLogic``
    (``trainer``), which also works without Slicer's GUI."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._trainer = None
        self._suggester = None

    def getParameterNode(self):
        return HSAMTrainingParameterNode(super().getParameterNode())

    @property
    def trainer(self):
        if self._trainer is None:
            from HSAMLib.training_logic import HSAMTrainingLogic as Trainer

            self._trainer = Trainer()
        return self._trainer

    @property
    def suggester(self):
        """``HSAMLib.suggest_logic.HSAMSuggestLogic``: uncertainty, suggested slices, overlay."""
        if self._suggester is None:
            from HSAMLib.suggest_logic import HSAMSuggestLogic

            self._suggester = HSAMSuggestLogic()
        return self._suggester


class HSAMTrainingTest(ScriptedLoadableModuleTest):
    """Fine-tune the tiny preset on two painted slices of a generated volume (worker process, CPU), with
    live curves from its progress stream. Skipped, with a message, where PyTorch is not installed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_finetune_tiny_preset()

    def test_finetune_tiny_preset(self):
        import numpy as np
        from hsam.volumes.segmentation import Segment
        from HSAMLib import dependencies, mrml
        from HSAMLib.segment_logic import HSAMSegmentLogic
        from HSAMLib.plots import TrainingCurves

        z, y, x = np.mgrid[:8, :40, :48]
        blob = (z - 4) ** 2 / 9 + (y - 20) ** 2 / 144 + (x - 24) ** 2 / 196 < 1
        volumeNode = slicer.util.addVolumeFromArray((1000 * blob).astype(np.int16), name="HSAMTrainingVolume")
        labels = np.zeros(blob.shape, np.uint8)
        labels[[3, 5]] = blob[[3, 5]]
        segmentationNode = mrml.labels_to_segmentation(labels, [Segment("blob", 1, (0.9, 0.4, 0.2), None)], volumeNode)
        trainer = HSAMTrainingLogic().trainer
        self.assertEqual(trainer.annotatedSlices(volumeNode, segmentationNode).slices, [3, 5])
        missing = dependencies.install_plan()
        if not missing.empty:  # build machines without PyTorch: the engine part cannot run
            self.delayDisplay(f"Skipping the fine-tuning test: {missing.describe()}")
            return

        self.delayDisplay("Suggesting slices from the flow propagation")
        gaps, _ = HSAMTrainingLogic().suggester.suggestGaps(volumeNode, segmentationNode, "axial", 2)
        self.assertEqual([gap.slice for gap in gaps], [4])  # the middle of the one gap, 3–5

        self.delayDisplay("Fine-tuning in a worker process")
        curves = TrainingCurves(slicer.mrmlScene, "HSAM self-test")

        def feed(events):
            for event in events:
                if event.get("loss") is not None:
                    curves.append(event["epoch"], event["loss"], event.get("val_dice"))

        with tempfile.TemporaryDirectory() as folder:
            config = trainer.makeConfig("tiny", epochs=2, batchSize=2, device="cpu", imageSize=224)
            path = trainer.finetune(volumeNode, segmentationNode, "self-test", config, onEvents=feed, modelsFolder=Path(folder))
            self.assertTrue(path.is_file())
            self.assertGreaterEqual(len(curves.rows()), 2)
            node = HSAMSegmentLogic().segment(volumeNode, path, device="cpu")
            self.assertEqual(node.GetSegmentation().GetNumberOfSegments(), 1)
            self.delayDisplay("Suggesting slices")
            suggestions = HSAMTrainingLogic().suggester.suggest(volumeNode, path, 2, segmentationNode, device="cpu")
            self.assertEqual(len(suggestions.slices), 2)
            self.assertFalse({3, 5} & set(suggestions.slices))
        self.delayDisplay("Test passed")
