"""Guided mode: the user's annotated slices, interpolated through the volume, become H-SAM's dense
mask prompt and the prior its output corrects (``flow``: propagation along the optical flow;
``priors``: building them; ``fill``: Fill between slices; ``augment``: perturbing them in training;
``gaps``: where to paint next; ``atlas``: training volumes registered onto a new one; ``kinds``: the
names these take)."""
