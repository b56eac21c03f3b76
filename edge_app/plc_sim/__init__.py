"""PLC simulators: the other end of every reject link, for tests, benches and ``musc-edge plc-sim``.

Mirrors ``links/``: ``base.py`` (what every simulator shares: counters, controls, (epoch, seq) de-duplication),
``framed.py`` (serial and ZeroMQ: answers the runtime's messages), ``polling.py`` (a PLC scan loop) with
``modbus.py`` and ``opcua.py`` (clients of the runtime's server), ``cli.py`` (the command).
"""
from musc_edge.edge.plc_sim.base import (
    FRAMED_LINKS,
    PLANT_LINKS,
    ReceivedVerdict,
    SimControls,
    SimCounters,
    serve_and_report,
    utc_now,
)
from musc_edge.edge.plc_sim.cli import main
from musc_edge.edge.plc_sim.framed import PlcSimulator, PtySimPort, SerialSimPort, SimPort, ZmqSimPort

__all__ = ["FRAMED_LINKS", "PLANT_LINKS", "PlcSimulator", "PtySimPort", "ReceivedVerdict", "SerialSimPort",
           "SimControls", "SimCounters", "SimPort", "ZmqSimPort", "main", "serve_and_report", "utc_now"]
