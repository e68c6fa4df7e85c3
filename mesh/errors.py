"""Errors the mesh answers itself: an HTTP status plus the reason carried in `x-mesh-error`."""

from __future__ import annotations


class MeshError(Exception):
    """The mesh could not get a response from the upstream; answer `status` with `x-mesh-error: reason`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def no_endpoints(resolved: bool) -> MeshError:
    if not resolved:
        return MeshError(503, "discovery unavailable")
    return MeshError(503, "no healthy endpoints")


CONNECT_TIMEOUT = MeshError(504, "upstream connect timeout")
REQUEST_TIMEOUT = MeshError(504, "upstream request timeout")
DEADLINE_EXPIRED = MeshError(504, "deadline expired before forwarding")


# gRPC status codes of the errors the mesh makes itself (DESIGN: connect/io → UNAVAILABLE, timeouts →
# DEADLINE_EXCEEDED, authz → PERMISSION_DENIED; local limits → RESOURCE_EXHAUSTED).
GRPC_INTERNAL, GRPC_UNIMPLEMENTED, GRPC_UNKNOWN = 13, 12, 2
_GRPC_BY_STATUS = {
    400: GRPC_INTERNAL,
    403: 7,  # PERMISSION_DENIED
    404: GRPC_UNIMPLEMENTED,
    408: 4,  # DEADLINE_EXCEEDED
    413: 8,  # RESOURCE_EXHAUSTED
    429: 8,
    431: 8,
    502: 14,  # UNAVAILABLE
    503: 14,
    504: 4,
}
GRPC_CONTENT_TYPE = b"application/grpc"


def is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request is gRPC: its content-type is application/grpc or application/grpc+<codec>."""
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(GRPC_CONTENT_TYPE)
    return False


def grpc_status(status: int, reason: str) -> int:
    """The gRPC status code for a mesh error answered with HTTP `status`; a circuit breaker's overflow is
    RESOURCE_EXHAUSTED (a local limit), any other 503 UNAVAILABLE."""
    if status == 503 and reason.startswith("circuit open"):
        return 8
    return _GRPC_BY_STATUS.get(status, GRPC_UNKNOWN)


def grpc_message(reason: str) -> bytes:
    """`reason` as a grpc-message value: UTF-8, percent-encoded outside printable ASCII and for '%'."""
    return b"".join(
        bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte for byte in reason.encode()
    )


def grpc_error_headers(status: int, reason: str) -> list[tuple[bytes, bytes]]:
    """The fields of a gRPC "trailers-only" answer to a mesh error (sent with HTTP status 200)."""
    return [
        (b"content-type", GRPC_CONTENT_TYPE),
        (b"grpc-status", b"%d" % grpc_status(status, reason)),
        (b"grpc-message", grpc_message(reason)),
        (b"x-mesh-error", reason.encode()),
    ]
