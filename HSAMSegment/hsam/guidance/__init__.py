"""Guided mode: the user's annotated slices, interpolated through the volume, become H-SAM's dense
mask prompt and the prior its output corrects (``priors``: building them; ``augment``: perturbing
them in training)."""
