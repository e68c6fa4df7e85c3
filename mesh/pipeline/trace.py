"""Tracing: the listener layer that starts a request's trace (or lets an unsampled one pass untouched)."""

from __future__ import annotations

from mesh.message import RequestHead
from mesh.pipeline.exchange import Downstream, Exchange, Layer
from mesh.telemetry.tracer import Tracer


class Trace:
    """Reads the trace context the request arrived with (W3C, B3 multi, B3 single), decides whether it is
    recorded, and keeps its spans in `ex.trace`: the destination layer writes the context into every try, and
    the exchange's record hands the spans to the exporter. Present only on listeners of a sidecar with tracing."""

    __slots__ = ("inbound", "next", "tracer")

    def __init__(self, next: Layer, tracer: Tracer, *, inbound: bool) -> None:
        self.next = next
        self.tracer = tracer
        self.inbound = inbound

    def __repr__(self) -> str:
        return f"<Trace {self.tracer!r} → {self.next!r}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        ex.trace = self.tracer.start(head.headers, inbound=self.inbound)
        return await self.next(side, head, ex)
