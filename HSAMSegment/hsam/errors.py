"""Errors that HSAM reports to users: one readable line each, never a traceback."""


class HSAMError(Exception):
    """Base class of the errors HSAM raises for bad input or an impossible request."""


class InputError(HSAMError):
    """A volume, labelmap or option that HSAM cannot work with (wrong dimensions, NaN, ...)."""


class CheckpointError(HSAMError):
    """A model file that is missing, truncated, corrupt, unsafe or made for another model."""


class Cancelled(HSAMError):
    """The user cancelled a running job; nothing was written."""
