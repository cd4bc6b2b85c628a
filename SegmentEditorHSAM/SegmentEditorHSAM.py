"""SegmentEditorHSAM: a hidden module that registers the "HSAM fill" Segment Editor effect.

Laid out as Slicer's extension wizard makes scripted effects (Utilities/Templates/Modules/
ScriptedSegmentEditorEffect, Slicer 5.8): the module registers ``SegmentEditorHSAMLib/SegmentEditorEffect.py``
through ``qSlicerSegmentEditorScriptedEffect`` once Slicer has started. The effect's logic is
``HSAMLib.fill_logic`` (in the HSAMSegment module, with the engine), which runs without Qt.
"""

import logging
import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

EFFECT_FILE = "SegmentEditorHSAMLib/SegmentEditorEffect.py"


class SegmentEditorHSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorHSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "HSAMSegment"]  # HSAMSegment ships HSAMLib and the engine
        self.parent.contributors = ["The HSAM authors (hsam-slicer)"]
        self.parent.hidden = True
        self.parent.helpText = (
            "This hidden module registers the HSAM fill effect of the Segment Editor: paint a few slices, "
            "preview the fill that H-SAM learns from them, apply. See the "
            "<a href='https://github.com/hsam-slicer/HSAM/blob/main/docs/slicer.md'>documentation</a>."
        )
        self.parent.acknowledgementText = (
            "H-SAM: Cheng Z. et al., Unleashing the Potential of SAM for Medical Adaptation via Hierarchical "
            "Decoding, CVPR 2024."
        )
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        from HSAMLib.compatibility import unsupported_slicer_message

        message = unsupported_slicer_message(slicer.app.majorVersion, slicer.app.minorVersion)
        if message:
            logging.warning("HSAM fill is not available: %s", message)
            return
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), EFFECT_FILE)
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


class SegmentEditorHSAMTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the effect is registered, activates on a segmentation with a source volume and
    starts with auto-update off. The logic's tests run outside Slicer (Testing/test_hsam_fill.py)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_effect_is_registered()

    def test_effect_is_registered(self):
        import vtk

        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "HSAM fill test volume")
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(16, 16, 8)
        imageData.AllocateScalars(vtk.VTK_SHORT, 1)
        volumeNode.SetAndObserveImageData(imageData)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentationNode.GetSegmentation().AddEmptySegment("structure")

        # An effect activates only with a segmentation (5.10.0 dereferences a missing one)
        segmentEditorWidget = slicer.qMRMLSegmentEditorWidget()
        segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        segmentEditorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        segmentEditorWidget.setMRMLSegmentEditorNode(segmentEditorNode)
        segmentEditorWidget.setSegmentationNode(segmentationNode)
        segmentEditorWidget.setSourceVolumeNode(volumeNode)
        segmentEditorWidget.setActiveEffectByName("HSAM fill")
        effect = segmentEditorWidget.activeEffect()
        self.assertIsNotNone(effect)
        self.assertEqual(effect.name, "HSAM fill")
        self.assertEqual(effect.parameter("AutoUpdate"), "0")
        self.assertFalse(effect.self().autoUpdateCheckBox.checked)
        segmentEditorWidget.setActiveEffect(None)
        self.delayDisplay("HSAM fill effect registered")
