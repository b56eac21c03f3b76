"""The reject link for transports with a data model the PLC reads (Modbus, OPC UA)."""
from __future__ import annotations

from edge_app.links.base import LinkClosedError, RejectLink
from edge_app.links.register_transport import RegisterTransport


class PlantLink(RejectLink):
    """A :class:`RejectLink` that also shows the calibration version in every published verdict."""

    _transport: RegisterTransport

    def set_calibration_version(self, version: str | int) -> None:
        """Stamp ``version`` into the verdicts published from now on (CALIBRATION / CalibrationVersion)."""
        self._transport.set_calibration_version(version)

    if not hasattr(RejectLink, "send_stop_line"):
        # Until the framed links' stop-line primitive is merged (issue #8, RejectLink.send_stop_line,
        # which delivers it through Transport.send_stop_line and waits for STOP_ACK), raise it directly.
        def send_stop_line(self, reason: str) -> None:
            """Ask the PLC to stop the line: STOP_LINE / StopLine with ``reason``; returns at once."""
            if self._closing:
                raise LinkClosedError(f"reject link {self._transport.description} is closed")
            self._transport.raise_stop_line(reason)      # thread-safe; no ACK tracking until then
