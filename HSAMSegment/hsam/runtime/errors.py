"""Errors that HSAM reports to users: one readable line each, never a traceback."""


class HSAMError(Exception):
    """Base class of the errors HSAM raises for bad input or an impossible request."""


class InputError(HSAMError):
    """A volume, labelmap or option that HSAM cannot work with (wrong dimensions, NaN, ...)."""


class CheckpointError(HSAMError):
    """A model file that is missing, truncated, corrupt, unsafe or made for another model."""


class Cancelled(HSAMError):
    """The user cancelled a running job; nothing was written."""


class HSAMWarning(UserWarning):
    """Something HSAM did with the input that the user should know about (a choice, an overlap)."""


# Bidirectional-text controls that can make printed text read differently from what it is.
_BIDI_CONTROLS = {*range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def printable(text: object, limit: int = 200) -> str:
    """``text`` from a file made safe to print: control characters escaped, at most ``limit`` characters."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "".join(
        f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 else f"\\u{ord(c):04x}" if ord(c) in _BIDI_CONTROLS else c
        for c in text
    )
