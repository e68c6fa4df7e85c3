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
