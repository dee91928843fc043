"""Bounded rendering of values a client sent, for error messages and log lines.

A request may carry a 16 MiB string or an array nested a thousand deep; `repr`
would echo the first whole and overflow the stack on the second. `quote` never
looks inside a container and cuts long strings, so what it returns is short
whatever it is given.
"""

from typing import Any

MAX_QUOTED_CHARS = 64


def quote(value: Any, limit: int = MAX_QUOTED_CHARS) -> str:
    """A short, printable rendering of `value`: strings cut at `limit` characters, containers by size."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        # Python refuses to print ints of over 4300 digits, and JSON can carry them.
        return str(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (bytes, bytearray)):
        if len(value) <= limit:
            return repr(bytes(value))
        return f"{bytes(value[:limit])!r}... ({len(value)} bytes)"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"a map of {len(value)} entries"
    return f"a value of type {type(value).__name__}"
