"""Errors the command lines (``musc-edge``, ``musc-calibrate``) print as one line with exit code 2."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input or an impossible request from the user: printed as one line, exit code 2, nothing changed."""
