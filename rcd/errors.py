"""The one error type users see: every refusal of rcd is an :class:`RcdError` (or a subclass).

``rcd.run`` and ``rcd.build`` print it as ``[rcd] error: <message>`` and exit with
:data:`EXIT_CODE`; messages name the file, row or key at fault and what to do.
"""
from __future__ import annotations

EXIT_CODE = 2


class RcdError(ValueError):
    """A bad input or configuration, refused with a message that says what to change."""


class ConfigError(RcdError):
    """A configuration key with a value that cannot work (named as a dotted key)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
