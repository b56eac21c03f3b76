"""On-device runtime of musc-edge: frames -> rolling unlabeled pools -> MuSc / MuSc-V2 scoring -> verdicts
-> reject link, with a ledger, an archive and a technician control socket (``musc-edge``)."""

__version__ = "0.1.0"
