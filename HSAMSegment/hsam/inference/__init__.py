"""Segmenting a volume with a model: the slices through the network, its uncertainty, the slices to paint next."""
