"""Scoring segmentations: metrics, the baselines a Slicer user has without a model, MNI template and synthetic subjects."""
