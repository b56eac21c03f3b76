"""Errors the command lines (``musc-edge``, ``musc-calibrate``) print as one line with exit code 2."""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input or an impossible request from the user: printed as one line, exit code 2, nothing changed.

    A ``ValueError``, so library callers that catch bad values (a per-category evaluation, a reseed request)
    still do; the command lines catch only this and the other input errors they name, so an internal bug
    (a plain ``ValueError`` included) ends with its traceback."""
