"""The values volumes and labelmaps may take: plain data, no torch, shared with the Slicer side."""

# Slice axis name -> axis of a (z, y, x) array.
SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
MAX_LABEL_VALUE = 2**16 - 1
# How intensities are scaled to the network's [0, 1] (hsam.volumes.preprocess).
INTENSITY_MODES = ("ct", "percentile")
