"""Spans of one sidecar (sans-io): the sampling decision per request, a server span on the inbound, a client span
per try on the outbound, and the trace context each hop forwards."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mesh.message import Headers, RequestHead
from mesh.telemetry.spans import CLIENT, ERROR, OK, SERVER, UNSET, AttributeValue, SpanRecord
from mesh.telemetry.tracecontext import (
    RandomSource,
    SamplingHint,
    TraceContext,
    extract,
    inject,
    new_span_id,
    new_trace_id,
    sample,
)

if TYPE_CHECKING:
    from mesh.pipeline.exchange import Exchange


class Tracer:
    """Decides which requests are traced and hands their finished spans to `submit` (the exporter's queue).

    Parent-based sampling: a request that arrives with a decision keeps it; a new trace is recorded with
    probability `sampling`. A request not sampled passes through untouched: its trace headers travel on as they
    came, and nothing is recorded. `service` names the spans' `mesh.service` attribute."""

    __slots__ = ("rng", "sampling", "service", "submit")

    def __init__(
        self,
        *,
        service: str,
        sampling: float,
        submit: Callable[[SpanRecord], None],
        rng: RandomSource | None = None,
    ) -> None:
        self.service = service
        self.sampling = sampling
        self.submit = submit
        self.rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"<Tracer {self.service} sampling={self.sampling}>"

    def start(self, headers: Headers, *, inbound: bool) -> ExchangeTrace | None:
        """The trace of a request with these headers, or None when it is not sampled."""
        parent = extract(headers)
        if not sample(parent, self.sampling, self.rng):
            return None
        rng = self.rng
        if isinstance(parent, TraceContext):
            return ExchangeTrace(self, parent.trace_id, parent.span_id, parent.tracestate, parent.formats, inbound)
        formats = parent.formats if isinstance(parent, SamplingHint) else frozenset()
        return ExchangeTrace(self, new_trace_id(rng), b"", b"", formats, inbound)


class TrySpan:
    """One try of an outbound request: its client span, until the request's trace finishes."""

    __slots__ = ("end_ns", "ended", "endpoint", "error", "index", "span_id", "start_ns", "status")

    def __init__(self, span_id: bytes, index: int) -> None:
        self.span_id = span_id
        self.index = index  # 0 for the first try, then the retry (or hedge) number
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.ended = False
        self.endpoint = ""
        self.status = 0
        self.error = ""


class ExchangeTrace:
    """The spans of one traced request at this hop. Inbound: a server span (child of the caller's span), whose id
    the application receives as its parent. Outbound: a client span per try (child of the application's span, or
    a root when the application sent none), each try forwarding its own span id; the try that answered is
    marked `mesh.winner`. Records go to the tracer when the request is recorded (`finish`)."""

    __slots__ = (
        "formats",
        "inbound",
        "injected",
        "parent_id",
        "server_id",
        "start_ns",
        "trace_id",
        "tracer",
        "tracestate",
        "tries",
    )

    def __init__(
        self,
        tracer: Tracer,
        trace_id: bytes,
        parent_id: bytes,
        tracestate: bytes,
        formats: frozenset[str],
        inbound: bool,
    ) -> None:
        self.tracer = tracer
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.tracestate = tracestate
        self.formats = formats  # the formats it arrived in: it leaves in them too, and in W3C always
        self.inbound = inbound
        self.server_id = new_span_id(tracer.rng) if inbound else b""
        self.start_ns = time.time_ns()
        self.tries: list[TrySpan] = []
        self.injected = False

    def start_try(self, headers: Headers, index: int) -> TrySpan | None:
        """Write the trace context into one try's headers: outbound, a new client span (returned); inbound, the
        server span, once (None: the application's request is not a span of this hop)."""
        if self.inbound:
            if not self.injected:
                context = TraceContext(self.trace_id, self.server_id, True, self.tracestate)
                inject(headers, context, formats=self.formats)
                self.injected = True
            return None
        span = TrySpan(new_span_id(self.tracer.rng), index)
        inject(headers, TraceContext(self.trace_id, span.span_id, True, self.tracestate), formats=self.formats)
        self.tries.append(span)
        return span

    def end_try(self, span: TrySpan, endpoint: str, status: int, error: str) -> None:
        """A try ended: with `status` (0: no response) and, for a failed or abandoned try, why."""
        span.ended = True
        span.end_ns = time.time_ns()
        span.endpoint = endpoint
        span.status = status
        span.error = error

    def finish(self, head: RequestHead, ex: Exchange, direction: str) -> None:
        """Hand the request's spans to the tracer: the server span (inbound) and every try's client span."""
        tracer = self.tracer
        now = time.time_ns()
        method = _METHODS.get(head.method) or head.method.decode("latin-1")
        target = head.target
        mark = target.find(b"?")
        status = ex.status
        mesh_error = ex.mesh_error
        route = ex.route
        common: dict[str, AttributeValue] = {
            "http.request.method": method,
            "url.path": (target if mark < 0 else target[:mark]).decode("latin-1"),
            "server.address": head.authority.decode("latin-1"),
            "mesh.service": tracer.service,
            "mesh.direction": direction,
        }
        if mark >= 0:
            common["url.query"] = target[mark + 1 :].decode("latin-1")
        if route:
            common["mesh.route"] = common["http.route"] = route
        if ex.destination:
            common["mesh.destination"] = ex.destination
        if ex.request_id:
            common["mesh.request_id"] = ex.request_id.decode("latin-1")
        submit = tracer.submit
        if self.inbound:
            if status:
                common["http.response.status_code"] = status
            if mesh_error:
                common["mesh.error"] = mesh_error
            if ex.endpoint:
                common["mesh.upstream_endpoint"] = ex.endpoint
            failed = status >= 500 or not status
            name = f"{method} {route}" if route else method
            submit(
                SpanRecord(
                    self.trace_id,
                    self.server_id,
                    self.parent_id,
                    name,
                    SERVER,
                    self.start_ns,
                    now,
                    common,
                    ERROR if failed else UNSET,
                    mesh_error if failed else "",
                )
            )
            return
        tries = self.tries
        winner = None
        for one in reversed(tries):
            if one.ended and not one.error:
                winner = one
                break
        retries = len(tries) - 1
        for one in tries:
            attributes = common.copy() if retries else common
            attributes["mesh.try"] = one.index
            attributes["mesh.retries"] = retries
            if one.index:
                attributes["http.request.resend_count"] = one.index
            attributes["mesh.winner"] = one is winner
            if one.endpoint:
                attributes["mesh.upstream_endpoint"] = one.endpoint
            try_status = one.status if one.ended else status
            if try_status:
                attributes["http.response.status_code"] = try_status
            error = one.error if one.ended else mesh_error
            if one is winner and mesh_error:
                error = mesh_error
            if error:
                attributes["mesh.error"] = error
            failed = bool(error) or not try_status or try_status >= 400
            submit(
                SpanRecord(
                    self.trace_id,
                    one.span_id,
                    self.parent_id,
                    method,
                    CLIENT,
                    one.start_ns,
                    one.end_ns or now,
                    attributes,
                    ERROR if failed else OK,
                    error if failed else "",
                )
            )


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")}
