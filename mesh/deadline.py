"""Deadline propagation (sans-io): the mesh deadline header and gRPC's `grpc-timeout`, read and written."""

from __future__ import annotations

DEADLINE_HEADER = b"x-mesh-deadline"
"""Milliseconds left of the caller's request budget when the outbound sent the request (relative, so the two
sidecars' clocks need not agree); the inbound answers 504 at once when it is 0 and forwards within it otherwise."""

GRPC_TIMEOUT = b"grpc-timeout"

_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_MAX_DIGITS = 8  # the gRPC spec allows at most 8 digits


def parse_deadline_ms(value: bytes) -> float | None:
    """Seconds from an `x-mesh-deadline` value; None if it is not a whole number of milliseconds."""
    value = value.strip()
    if not value.isdigit() or len(value) > 12:
        return None
    return int(value) / 1000


def format_deadline_ms(seconds: float) -> bytes:
    """An `x-mesh-deadline` value for `seconds` left, rounded down (0 when nothing is left)."""
    return b"%d" % (seconds * 1000) if seconds > 0 else b"0"


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds from a `grpc-timeout` value such as `100m` or `5S`; None if malformed (then it is ignored)."""
    value = value.strip()
    unit = _GRPC_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > _MAX_DIGITS:
        return None
    return int(digits) * unit


def format_grpc_timeout(seconds: float) -> bytes:
    """The finest `grpc-timeout` value that fits 8 digits, rounded down so the budget only ever shrinks."""
    seconds = max(0.0, seconds)
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        amount = int(seconds * scale)
        if amount < 10**_MAX_DIGITS:
            return b"%d%s" % (amount, unit)
    return b"99999999H"
