"""Volumes and segmentations: files read and written safely, their constants, and slices made network input."""
