"""The reject link for transports with a data model the PLC reads (Modbus, OPC UA)."""
from __future__ import annotations

from musc_edge.edge.links.base import RejectLink
from musc_edge.edge.links.register_transport import RegisterTransport


class PlantLink(RejectLink):
    """A :class:`RejectLink` that also shows the calibration version in every published verdict."""

    _transport: RegisterTransport

    def set_calibration_version(self, version: str | int) -> None:
        """Stamp ``version`` into the verdicts published from now on (CALIBRATION / CalibrationVersion)."""
        self._transport.set_calibration_version(version)
