"""HSAM fill: a Segment Editor auto-complete effect (Initialize, live preview, Cancel, Apply) whose
fill between the painted slices is learned by H-SAM in guided mode.

Only the GUI is here: ``HSAMLib.fill_logic.HSAMFillLogic`` reads the segments, runs the worker
processes, fills the preview node and applies it; a QTimer polls it, so the GUI never waits. The
preview display, the Initialize/Update button, Cancel and Apply come from Slicer's
``AbstractScriptedSegmentEditorAutoCompleteEffect`` (as in Fill between slices and Grow from seeds,
Slicer 5.8), whose ``onPreview``, ``onApply`` and ``onCancel`` this effect replaces. Auto-update is
off by default (each update trains), Cancel is enabled while the fill runs, and the shared preview
slot is taken only while free: another effect's preview ends HSAM fill.
"""

import logging
import os

import qt
import slicer
import vtk

from SegmentEditorEffects import *  # noqa: F401,F403
from SegmentEditorEffects.AbstractScriptedSegmentEditorAutoCompleteEffect import (
    AbstractScriptedSegmentEditorAutoCompleteEffect,
    ResultPreviewNodeReferenceRole,
)

POLL_INTERVAL_MS = 200
PREVIEW_OWNER = "SegmentationResultPreviewOwnerEffect"  # common parameter: the effect whose preview is shown
PREVIEW_OPACITY = 0.6
AXIS_LABELS = (("auto", "Auto"), ("axial", "Axial"), ("coronal", "Coronal"), ("sagittal", "Sagittal"))


class SegmentEditorEffect(AbstractScriptedSegmentEditorAutoCompleteEffect):
    """Learned fill between painted slices (HSAM guided mode)."""

    def __init__(self, scriptedEffect):
        AbstractScriptedSegmentEditorAutoCompleteEffect.__init__(self, scriptedEffect)
        scriptedEffect.name = "HSAM fill"  # modules find effects by this name: not translated
        scriptedEffect.title = "HSAM fill"
        self.fillLogic = None
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)
        self.sceneObserverTag = None  # observers of the scene and the application, while a fill exists

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Fill the slices between painted ones with a model learned from them (H-SAM, guided mode).<br>
<p><ul>
<li>Paint a few whole slices of each visible segment in one view, leaving unpainted slices between them.
<li>Click <b>Initialize</b>: a small model trains in the background on the painted slices; the preview starts as the
interpolation of the painted slices and improves as the model learns. Cancel stops it.
<li>Paint more slices where the preview is wrong and click <b>Update</b>: training continues from the model.
<li><b>Apply</b> writes the preview into the segments in one undoable step; painted slices stay exactly as painted.
<li><b>Save model…</b> keeps the model for the HSAM Segment module (other volumes, without painting).
</ul><p>Segments with nothing painted are left alone. As in Fill between slices, Apply respects the editable area and overwrite settings.</html>"""

    # --- options ----------------------------------------------------------------------------------

    def setupOptionsFrame(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.setupOptionsFrame(self)
        self.axisComboBox = qt.QComboBox()
        for value, label in AXIS_LABELS:
            self.axisComboBox.addItem(label, value)
        self.axisComboBox.setToolTip("Slice direction of the painted slices (Auto: the one they lie along)")
        self.scriptedEffect.addLabeledOptionsWidget("Painted slices:", self.axisComboBox)

        self.modelComboBox = qt.QComboBox()
        self.modelComboBox.setToolTip("tiny trains from scratch, fast on a CPU; SAM ViT-B (downloaded in the HSAM "
                                      "Segment module) starts from Segment Anything, best on a GPU")
        self.betterCheckBox = qt.QCheckBox("Better")
        self.betterCheckBox.setToolTip("Train longer: a better fill, later")
        trainingFrame = qt.QHBoxLayout()
        trainingFrame.addWidget(self.modelComboBox)
        trainingFrame.addWidget(self.betterCheckBox)
        self.scriptedEffect.addLabeledOptionsWidget("Model:", trainingFrame)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 1000)
        self.progressBar.setVisible(False)
        self.statusLabel = qt.QLabel()
        self.statusLabel.setWordWrap(True)
        self.saveModelButton = qt.QPushButton("Save model…")
        self.saveModelButton.objectName = self.__class__.__name__ + "SaveModel"
        self.saveModelButton.setToolTip("Keep the trained model for the HSAM Segment module")
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.scriptedEffect.addOptionsWidget(self.saveModelButton)

        self.axisComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.modelComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.betterCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.saveModelButton.connect("clicked()", self.onSaveModel)

    def setMRMLDefaults(self):
        # Not the base class's: it defines AutoUpdate as "1", and a default never replaces a defined parameter.
        self.scriptedEffect.setParameterDefault("AutoUpdate", "0")  # each update trains: only when asked
        self.scriptedEffect.setParameterDefault("HSAMAxis", "auto")
        self.scriptedEffect.setParameterDefault("HSAMModel", "tiny")
        self.scriptedEffect.setParameterDefault("HSAMBetter", "0")

    def updateGUIFromMRML(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateGUIFromMRML(self)
        from HSAMLib import models

        choices = [("tiny", "tiny")] + [(f"sam:{name}", f"SAM {name}") for name in models.available_sam_weights()]
        if [self.modelComboBox.itemData(i) for i in range(self.modelComboBox.count)] != [v for v, _ in choices]:
            wasBlocked = self.modelComboBox.blockSignals(True)
            self.modelComboBox.clear()
            for value, label in choices:
                self.modelComboBox.addItem(label, value)
            self.modelComboBox.blockSignals(wasBlocked)
        self._selectData(self.axisComboBox, self.scriptedEffect.parameter("HSAMAxis"))
        self._selectData(self.modelComboBox, self.scriptedEffect.parameter("HSAMModel"))
        wasBlocked = self.betterCheckBox.blockSignals(True)
        self.betterCheckBox.checked = self.scriptedEffect.integerParameter("HSAMBetter") != 0
        self.betterCheckBox.blockSignals(wasBlocked)
        logic = self.fillLogic
        running = logic is not None and logic.running
        self.cancelButton.setEnabled(running or self.getPreviewNode() is not None)  # from the click on
        self.saveModelButton.enabled = logic is not None and logic.modelPath is not None
        self.progressBar.visible = running

    def getPreviewNode(self):
        """The shared preview node while HSAM fill owns it. (The base class looks for the owner under the
        effect's own parameter name, which is never set, so it takes any effect's preview for its own.)"""
        previewNode = self.scriptedEffect.nodeReference(ResultPreviewNodeReferenceRole)
        return previewNode if previewNode is not None and self._previewOwner() == self.scriptedEffect.name else None

    def _previewOwner(self) -> str:
        defined = self.scriptedEffect.commonParameterDefined(PREVIEW_OWNER)
        return self.scriptedEffect.parameter(PREVIEW_OWNER) if defined else ""

    @staticmethod
    def _selectData(comboBox, value):
        index = comboBox.findData(value)
        wasBlocked = comboBox.blockSignals(True)
        comboBox.currentIndex = max(index, 0)
        comboBox.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateMRMLFromGUI(self)
        self.scriptedEffect.setParameter("HSAMAxis", self.axisComboBox.currentData or "auto")
        self.scriptedEffect.setParameter("HSAMModel", self.modelComboBox.currentData or "tiny")
        self.scriptedEffect.setParameter("HSAMBetter", 1 if self.betterCheckBox.checked else 0)

    def fillOptions(self):
        from HSAMLib.fill_logic import BETTER_BUDGET_SECONDS, FAST_BUDGET_SECONDS, FillOptions

        better = self.scriptedEffect.integerParameter("HSAMBetter") != 0
        return FillOptions(
            axis=self.scriptedEffect.parameter("HSAMAxis") or "auto",
            baseModel=self.scriptedEffect.parameter("HSAMModel") or "tiny",
            timeBudgetSeconds=BETTER_BUDGET_SECONDS if better else FAST_BUDGET_SECONDS,
        )

    # --- Initialize / Update ------------------------------------------------------------------------

    def onPreview(self):
        """Initialize (a new model) or Update (continue from the model), without waiting."""
        import HSAMSegment

        if self.previewComputationInProgress or not HSAMSegment.ensureDependencies():  # may ask to install
            return
        self.previewComputationInProgress = True
        try:
            self._run("HSAM fill failed:", self._startOrUpdate)
        finally:
            self.previewComputationInProgress = False

    def _run(self, failure, action) -> bool:
        """Run ``action`` under the wait cursor; an HSAM error (bad input) is shown as one line, any other
        error with its details (and raised again). Returns whether it succeeded."""
        from hsam.runtime.errors import HSAMError

        message = None
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            try:
                action()
            except HSAMError as error:
                message = str(error)
        if message is not None:
            slicer.util.errorDisplay(f"HSAM fill: {message}")
        return message is None

    def _startOrUpdate(self):
        from HSAMLib.fill_logic import HSAMFillLogic

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        visible = vtk.vtkStringArray()
        segmentationNode.GetDisplayNode().GetVisibleSegmentIDs(visible)
        segmentIDs = [visible.GetValue(i) for i in range(visible.GetNumberOfValues())]
        if self._previewOwner() not in ("", self.scriptedEffect.name):
            self.reset()  # another effect's preview goes, as the auto-complete effects' own previews replace it
        if self.fillLogic is None:
            self.fillLogic = HSAMFillLogic()
            self._observeSceneAndApplication()
        updating = self.getPreviewNode() is not None and self.fillLogic.input is not None
        start = self.fillLogic.update if updating else self.fillLogic.start
        painted = start(parameterSetNode.GetSourceVolumeNode(), segmentationNode, segmentIDs, self.fillOptions(),
                        self.scriptedEffect.sourceVolumeImageData())
        self.selectedSegmentIds = vtk.vtkStringArray()  # what the base class's auto-update watches
        for segmentID in painted.segmentIDs:
            self.selectedSegmentIds.InsertNextValue(segmentID)
        self.statusLabel.text = painted.summary()
        self.progressBar.value = 0
        self.pollTimer.start()
        self.updateGUIFromMRML()

    def onPollTimer(self):
        logic = self.fillLogic
        if logic is None:
            self.pollTimer.stop()
            return
        owner = self._previewOwner()
        if owner not in ("", self.scriptedEffect.name):  # another effect's preview took the shared slot
            logic.cancel()
            logic.message = f"stopped: {owner} shows its preview"
        try:
            events = logic.poll()
        except Exception as error:  # a preview that cannot be read: end the fill, say why once
            logic.cancel()
            logging.exception("HSAM fill failed")
            slicer.util.errorDisplay(f"HSAM fill failed:\n{error}")
            events = []
        for event in events:
            if event["event"] == "preview":
                self._showPreviewNode()
            elif event["event"] == "failed":
                details = "\n".join(event.get("details", []))
                logging.error("HSAM fill failed: %s\n%s", event["message"], details)
                slicer.util.errorDisplay(f"HSAM fill failed:\n{event['message']}", detailedText=details)
        self.progressBar.value = int(1000 * logic.fraction)
        self.statusLabel.text = logic.message
        if not logic.running:
            self.pollTimer.stop()
        self.updateGUIFromMRML()

    def _showPreviewNode(self):
        """The logic's preview node becomes the effect's result preview, as the auto-complete effects show it,
        while the shared slot is free or HSAM fill's."""
        previewNode = self.fillLogic.previewNode
        current = self.scriptedEffect.nodeReference(ResultPreviewNodeReferenceRole)
        if previewNode is None or current is previewNode or (current is not None and self.getPreviewNode() is None):
            return
        self.scriptedEffect.setCommonNodeReference(ResultPreviewNodeReferenceRole, previewNode)
        self.scriptedEffect.setCommonParameter(PREVIEW_OWNER, self.scriptedEffect.name)
        self.setPreviewOpacity(PREVIEW_OPACITY)

    # --- Cancel / Apply / Save model -----------------------------------------------------------------

    def onCancel(self):
        self.pollTimer.stop()
        if self.fillLogic is not None:
            self.fillLogic.cancel()
        self.statusLabel.text = ""
        self.reset()

    def onApply(self):
        logic = self.fillLogic
        if logic is None or not logic.hasPreview:
            return
        self.delayedAutoUpdateTimer.stop()
        self.observeSegmentation(False)
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        closedSurface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
        show3D = logic.previewNode.GetSegmentation().ContainsRepresentation(closedSurface)

        def modifySegment(segmentID, labelmap):
            self.scriptedEffect.modifySegmentByLabelmap(
                segmentationNode, segmentID, labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

        # the logic refuses another segmentation than the preview's (the user switched): nothing changes
        if not self._run("Could not apply HSAM fill:",
                         lambda: logic.apply(self.scriptedEffect.saveStateForUndo, modifySegment, segmentationNode)):
            return
        self.pollTimer.stop()
        if show3D:
            segmentationNode.CreateClosedSurfaceRepresentation()
        self.statusLabel.text = logic.message
        self.reset()

    def onSaveModel(self):
        if self.fillLogic is None or self.fillLogic.modelPath is None:
            return
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        name = qt.QInputDialog.getText(slicer.util.mainWindow(), "Save model", "Model name:", qt.QLineEdit.Normal,
                                       f"{segmentationNode.GetName()} HSAM fill")
        if not name:
            return
        with slicer.util.tryWithErrorDisplay("Could not save the model:", waitCursor=True):
            path = self.fillLogic.saveModel(name)
            slicer.util.showStatusMessage(f"Saved {path.name}: the HSAM Segment module lists it", 5000)

    # --- leaving ----------------------------------------------------------------------------------------

    def _observeSceneAndApplication(self):
        """End the fill when the scene closes or Slicer quits (released by ``cleanupFill``)."""
        self.sceneObserverTag = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        slicer.app.connect("aboutToQuit()", self.cleanupFill)

    def onSceneStartClose(self, caller=None, event=None):
        self.cleanupFill()

    def cleanupFill(self):
        """End the worker, remove the files and the observers (the scene closes, or Slicer quits)."""
        self.pollTimer.stop()
        if self.sceneObserverTag is not None:
            slicer.mrmlScene.RemoveObserver(self.sceneObserverTag)
            slicer.app.disconnect("aboutToQuit()", self.cleanupFill)
            self.sceneObserverTag = None
        if self.fillLogic is not None:
            self.fillLogic.cleanup()
            self.fillLogic = None

    def cleanup(self):
        """Before the effect is deleted (Slicer 5.10 calls it; 5.8 never deletes effects before quitting):
        the fill, its observers and the timers' connections go."""
        self.cleanupFill()
        self.pollTimer.disconnect("timeout()", self.onPollTimer)
        baseCleanup = getattr(AbstractScriptedSegmentEditorAutoCompleteEffect, "cleanup", None)  # 5.10 and later
        if baseCleanup is not None:
            baseCleanup(self)
