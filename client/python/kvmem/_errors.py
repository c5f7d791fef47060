"""kvmem.Error: every failed call raises it, carrying the daemon's status code name."""

from __future__ import annotations


class Error(Exception):
    """A non-OK kvmem Status.

    Attributes:
        code: the status code name, e.g. ``"NOT_FOUND"``, ``"INVALID_ARGUMENT"``,
            ``"UNAVAILABLE"`` (no daemon at the address), ``"DEADLINE_EXCEEDED"``
            (see ``common/status.h`` for the full list).
        message: what was wrong, as the daemon or client library said it.
        value: the numeric code (stable; matches ``kvmem::StatusCode``).
    """

    def __init__(self, code: str, message: str = "", value: int = 2) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.value = value
