"""Which Slicer versions HSAM supports: 5.8 (Python 3.9) and later."""

from typing import Optional

MINIMUM_SLICER = (5, 8)


def unsupported_slicer_message(major: int, minor: int) -> Optional[str]:
    """One sentence for an unsupported Slicer ``major.minor``; None when it is supported."""
    if (major, minor) >= MINIMUM_SLICER:
        return None
    return (
        f"HSAM needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or later and this is Slicer {major}.{minor}: "
        "please install a recent Slicer from https://download.slicer.org."
    )
