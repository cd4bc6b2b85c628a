"""Models as files and objects: presets, building the network, SAM weights, checkpoints, HSAM bundles."""
