"""The operator view: a read-only web page beside the line (``musc-edge view``).

It runs in its own process and only reads what the runtime already keeps: the ledger (SQLite, opened
``mode=ro``), the reject archive's files, and the live state the control socket's read-only ``status``
command answers. No endpoint changes anything; changes stay in ``musc-calibrate``.
"""
