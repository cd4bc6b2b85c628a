"""The engine's version: written into model bundles and training states, sent with downloads."""

__version__ = "0.1.0"
