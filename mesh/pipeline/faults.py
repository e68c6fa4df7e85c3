"""Fault injection: a route delays a share of its requests, and answers a share itself with an error status."""

from __future__ import annotations

import trio

from mesh.errors import MeshError, grpc_error_headers, is_grpc
from mesh.message import RequestHead
from mesh.pipeline.exchange import Downstream, Exchange, Layer
from mesh.pipeline.router import Rng, Route

FAULT_REASON = "fault injected"


class Faults:
    """The route's faults, Envoy's fault filter in small: for `fault.delay.percent` % of the requests a pause of
    `fault.delay.duration` before anything else, then for `fault.abort.percent` % an answer with
    `fault.abort.status` (to gRPC callers, HTTP 200 with `grpc_status` when given, else the status's mapping) and
    `x-mesh-error: fault injected` (the route layer appends the route's name); nothing reaches the destination for
    an aborted request."""

    __slots__ = ("next", "rng", "route")

    def __init__(self, route: Route, next: Layer, *, rng: Rng) -> None:
        self.route = route
        self.next = next
        self.rng = rng

    def __repr__(self) -> str:
        return f"<Faults {self.route.name} → {self.next!r}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        route = self.route
        delay = route.fault_delay(self.rng)
        if delay:
            await trio.sleep(delay)  # bounded by the connection's deadline, as any wait of the exchange
        abort = route.fault_abort(self.rng)
        if abort is None:
            return await self.next(side, head, ex)
        status, grpc_code = abort
        if grpc_code is not None and is_grpc(head.headers):
            ex.mesh_error, ex.error_code = FAULT_REASON, "fault_injected"
            return await side.send_response(200, grpc_error_headers(status, FAULT_REASON, grpc_code), b"", head, ex)
        raise MeshError(status, FAULT_REASON, "fault_injected")
