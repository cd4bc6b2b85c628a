"""Slicer-side logic of the HSAM extension, shared by the HSAMSegment and HSAMTraining modules.

Imports MRML (``slicer``), vtk, numpy and ``hsam`` only, never Qt, so it runs on a bare
``vtkMRMLScene`` (tests use PyPI's ``slicer-core``).
"""
