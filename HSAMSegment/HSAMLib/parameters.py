"""Connecting a ``parameterNodeWrapper`` to a panel's widgets so that it also disconnects on Slicer 5.8.

In Slicer 5.8.1 the wrapper's ``connectGui`` returns None (``Base/Python/slicer/parameterNodeWrapper/
wrapper.py``: ``_connectGui`` drops the tag of ``_connectParametersToGui``; fixed in 5.10.0 by commit
b5a65a4), so ``disconnectGui(tag)`` does nothing. The next connection builds new combo-box connectors,
which clear and refill the combo boxes while the old connector still listens: it writes the last
choice, then the first, into the parameter node (a slice axis falls back to "axial").
``connectParametersToGui`` returns its tag on both versions.
"""

from __future__ import annotations

from typing import Any, Optional

PARAMETER_PROPERTY = "SlicerParameterName"  # the widgets' dynamic property in the .ui file


def parameter_widgets(ui: Any) -> dict[str, Any]:
    """{parameter name: widget} for the widgets of ``ui`` (``slicer.util.childWidgetVariables``) that
    name a parameter, as ``connectGui`` finds them."""
    widgets = {}
    for widget in vars(ui).values():
        name = widget.property(PARAMETER_PROPERTY)
        if name:
            widgets[str(name)] = widget
    return widgets


class ParameterGui:
    """One panel's connection to its parameter node."""

    def __init__(self) -> None:
        self._parameterNode = None
        self._tag: Optional[int] = None

    def connect(self, parameterNode, ui: Any) -> None:
        """Show ``parameterNode`` in ``ui``'s widgets (ending the previous connection first)."""
        self.disconnect()
        self._tag = parameterNode.connectParametersToGui(parameter_widgets(ui))
        self._parameterNode = parameterNode

    def disconnect(self) -> None:
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._tag)
        self._parameterNode, self._tag = None, None
