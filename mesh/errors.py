"""Errors the mesh answers itself: an HTTP status, the reason carried in `x-mesh-error`, and a reason code."""

from __future__ import annotations

# Reason codes: the bounded set that labels `mesh_errors_total` (docs/operations.md lists them). The free-text
# reason (which may name a caller, an endpoint or a parser message) goes to `x-mesh-error` and the logs only.
REASON_CODES = frozenset(
    {
        "bad_request",  # 400: the request cannot be framed safely (smuggling checks, malformed HTTP, a refused path)
        "denied",  # 403: the caller's identity is not allowed
        "no_route",  # 404: no route of the listener takes the request
        "fault_injected",  # a route's fault injection answered the request itself
        "method_not_allowed",  # 405
        "header_timeout",  # 408: the request head did not arrive in time
        "body_too_large",  # 413
        "unsupported_expect",  # 417
        "headers_too_large",  # 431
        "not_implemented",  # 501: a Transfer-Encoding other than chunked
        "version_not_supported",  # 505
        "connect_refused",  # 502: the endpoint refused the connection
        "connect_failed",  # 502: another connect error (unreachable, reset during connect, ...)
        "connect_timeout",  # 504
        "tls_failed",  # 502: the mesh hop's TLS handshake failed (chain, protocol, cipher)
        "tls_identity",  # 502: the peer's certificate is not the expected identity (or not an X.509-SVID)
        "no_certificate",  # 502: this sidecar has no usable certificate
        "upstream_reset",  # 502: the upstream closed, reset or refused before or while answering
        "invalid_response",  # 502: the upstream's response could not be framed
        "no_healthy_endpoints",  # 503
        "discovery_unavailable",  # 503
        "circuit_open",  # 503
        "draining",  # 503: the sidecar is shutting down and did not forward the request
        "request_timeout",  # 504: timeouts.request (or a caller's deadline) passed
        "per_try_timeout",  # 504
        "deadline_expired",  # 504: the request arrived with its deadline spent
        "response_stalled",  # 504 / abort: the response stopped past timeouts.idle
        "body_stalled",  # the request body stopped past timeouts.idle
        "drain_cut",  # the drain deadline cut a request that had reached the upstream (it may have run)
        "client_gone",  # the client went away mid-exchange
        "other",
    }
)


class MeshError(Exception):
    """The mesh could not get a response from the upstream; answer `status` with `x-mesh-error: reason`.

    `code` is one of REASON_CODES. Raise a new instance for every failure: a shared instance would collect the
    traceback of every raise (and the frames and connections it references)."""

    def __init__(self, status: int, reason: str, code: str = "other") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code if code in REASON_CODES else "other"


class UpstreamLost(Exception):
    """The upstream connection (or HTTP/2 stream) ended before any byte of the response arrived. The request may
    have run, unless `never_ran` (an HTTP/2 REFUSED_STREAM, or no stream was available to send it on)."""

    def __init__(self, reason: str, *, never_ran: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.never_ran = never_ran


def no_endpoints(resolved: bool) -> MeshError:
    if not resolved:
        return MeshError(503, "discovery unavailable", "discovery_unavailable")
    return MeshError(503, "no healthy endpoints", "no_healthy_endpoints")


def connect_timeout() -> MeshError:
    return MeshError(504, "upstream connect timeout", "connect_timeout")


def request_timeout() -> MeshError:
    return MeshError(504, "upstream request timeout", "request_timeout")


def deadline_expired() -> MeshError:
    return MeshError(504, "deadline expired before forwarding", "deadline_expired")


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


def grpc_error_headers(status: int, reason: str, code: int | None = None) -> list[tuple[bytes, bytes]]:
    """The fields of a gRPC "trailers-only" answer to a mesh error (sent with HTTP status 200); `code` overrides
    the gRPC status `status` maps to."""
    return [
        (b"content-type", GRPC_CONTENT_TYPE),
        (b"grpc-status", b"%d" % (grpc_status(status, reason) if code is None else code)),
        (b"grpc-message", grpc_message(reason)),
        (b"x-mesh-error", reason.encode()),
    ]
