"""The values the network's options take: plain data, no torch, so that model files can be checked first."""

CMATTN_MODES = ("reference", "paper")
