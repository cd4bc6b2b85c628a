"""What guided mode may be asked for: plain data, no torch, so that model files can be checked first."""

# How annotated slices are interpolated into a prior (see hsam.guidance.priors).
PRIOR_KINDS = ("flow", "linear", "nearest", "fill", "distance")
DEFAULT_PRIOR = "flow"
# What a guided model keeps per class: its prior, its guided output or its prompt-free output.
CHOICE_SOURCES = ("prior", "guided", "prompt-free")
# How atlases are registered onto a new volume (hsam.guidance.atlas).
REGISTRATION_MODES = ("deformable", "affine", "none")
