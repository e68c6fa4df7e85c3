"""One exchange through a listener's pipeline: its book-keeping, what a downstream codec offers it, and its outcome."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

from mesh.errors import MeshError, request_timeout
from mesh.http1 import ProtocolError
from mesh.message import Headers, RequestHead, ResponseHead
from mesh.stream import STREAM_ERRORS
from mesh.timers import INF

if TYPE_CHECKING:
    from mesh.cluster import Upstream
    from mesh.config import Limits, Timeouts
    from mesh.proxy import HttpProxy
    from mesh.telemetry.tracer import ExchangeTrace
    from mesh.transport import Accepted

# What a downstream is waiting for, which decides what happens when its deadline passes: the next request, the
# rest of a request head, the response head (timeouts.request), more of a response body (timeouts.idle), progress
# of a request body (timeouts.idle; timeouts.request starts when the body has been forwarded).
IDLE, HEAD, REQUEST, STALL, BODY = range(5)


class DownstreamGone(Exception):
    """The client closed its connection (or reset its stream) before its request was complete."""


class Exchange:
    """Book-keeping for one request: what was sent and received, for the access log and the reuse decision,
    and what the layers decided (route, destination)."""

    __slots__ = (
        "caller_deadline",
        "destination",
        "endpoint",
        "error_code",
        "forwarded",
        "grpc_timeout",
        "head_at",
        "mesh_error",
        "prebuffered",
        "request_done",
        "request_id",
        "response_started",
        "route",
        "rx",
        "status",
        "trace",
        "trailers",
        "tx",
        "upstream_reading",
    )

    def __init__(self) -> None:
        self.caller_deadline = INF  # from grpc-timeout or (inbound) x-mesh-deadline: runs from the request head
        self.destination = ""  # the destination cluster (and subset) the request was sent to
        self.endpoint = ""
        self.error_code = ""  # mesh.errors.REASON_CODES, with mesh_error
        self.forwarded = False  # request bytes were handed to an upstream: the request may have run
        self.grpc_timeout = -1  # index of the request's grpc-timeout header, -1 if none
        self.head_at = 0.0  # when the final response head arrived (trio clock); 0.0 until then
        self.mesh_error = ""
        self.prebuffered: tuple[list[bytes], bool] | None = None  # the body read before the first try, complete?
        self.request_done = False  # the whole request body was read from downstream
        self.request_id = b""
        self.response_started = False  # bytes of the final response went downstream
        self.route = ""  # the route that took the request ("" on a listener without routes)
        self.rx = 0
        self.status = 0
        self.trace: ExchangeTrace | None = None  # the request's spans, when it is traced
        self.trailers: Headers | None = None  # of a request body read whole
        self.tx = 0
        self.upstream_reading = False  # a streaming body waits for the upstream to take it (not for the client)


class BodyReader(Protocol):
    """Request body events already received: bytes, Trailers, END; None when more must be awaited."""

    def next_event(self) -> object | None: ...


class Downstream(Protocol):
    """What a downstream codec (an HTTP/1.1 connection, an HTTP/2 stream) offers the pipeline for one exchange.

    `deadline` (trio clock) and `waiting_for` are the coarse timer of mesh.timers: the layers set them on the
    hot path and the codec answers when the deadline passes (`answer_expired`)."""

    proxy: HttpProxy
    accepted: Accepted
    peer_ip: bytes
    limits: Limits
    timeouts: Timeouts
    deadline: float
    waiting_for: int
    upstream: Upstream | None  # the upstream held by the exchange: closed if the exchange fails while holding it
    reader: BodyReader
    exchange: tuple[RequestHead, Exchange, float] | None

    async def body_event(self) -> object:
        """The next request body event, waiting for it; DownstreamGone if the client left."""
        ...

    async def send_informational(self, response: ResponseHead) -> None:
        """Pass a 1xx head on (HTTP/1.1) or drop it (HTTP/2)."""
        ...

    async def stream_response(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        """Write `response` and its body from `conn` downstream; True if the connection may carry another
        request (always False for an HTTP/2 stream)."""
        ...

    async def upgraded(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        """After a 101: splice the two connections until either ends (HTTP/1.1 only)."""
        ...

    async def send_mesh_error(self, status: int, reason: str, head: RequestHead, ex: Exchange) -> bool:
        """Answer a mesh error for `head`; True if the connection may carry another request."""
        ...

    async def send_response(self, status: int, headers: Headers, body: bytes, head: RequestHead, ex: Exchange) -> bool:
        """Answer with a complete response the mesh makes (a direct response, a redirect); True if the
        connection may carry another request."""
        ...

    def response_begins(self, ex: Exchange) -> None:
        """The response is going downstream: from now on nothing else may answer the request."""
        ...

    def client_left(self) -> bool:
        """The client ended the exchange itself (an HTTP/2 stream reset)."""
        ...

    def finish(self, head: RequestHead, ex: Exchange, start: float) -> None:
        """Record the exchange's outcome once (metrics, access log)."""
        ...


class Layer(Protocol):
    """One step of a pipeline: handles the exchange (usually by calling the next layer) and returns whether the
    downstream connection may carry another request. Layers are built once, when a config is compiled."""

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool: ...


async def serve_exchange(side: Downstream, head: RequestHead) -> bool:
    """Run one request through the listener's current pipeline and give it exactly one outcome: the upstream's
    response, a mesh error, or (a response already begun and then cut) an aborted connection. A reload that
    swaps the pipeline meanwhile does not touch this request. True if the connection stays open."""
    proxy = side.proxy
    pipeline = proxy.pipeline
    start = trio.current_time()
    ex = Exchange()
    side.exchange = (head, ex, start)
    keep_alive = False
    drain = proxy.drain
    drain.active(side)  # the drain deadline answers it (see answer_expired) rather than dropping it
    try:
        keep_alive = await pipeline(side, head, ex)
    except MeshError as exc:
        ex.mesh_error = exc.reason
        ex.error_code = exc.code
        if ex.response_started:
            keep_alive = False
        else:
            keep_alive = await side.send_mesh_error(exc.status, exc.reason, head, ex)
    except ProtocolError as exc:  # the request body broke its framing or a limit mid-stream
        ex.mesh_error = exc.reason
        ex.error_code = exc.code
        if not ex.response_started:
            ex.request_done = False  # the connection closes: what remains of the body is not read
            await side.send_mesh_error(exc.status, exc.reason, head, ex)
    except DownstreamGone as exc:
        ex.mesh_error = str(exc)
        ex.error_code = "client_gone"
    except STREAM_ERRORS:
        if not ex.mesh_error:
            ex.mesh_error = "downstream connection lost"
            ex.error_code = "client_gone"
    finally:
        drain.finished(side)
    if side.upstream is not None:  # the exchange failed while holding it: its state is unknown
        side.upstream.close()
        side.upstream = None
    side.finish(head, ex, start)
    return keep_alive


async def answer_expired(side: Downstream) -> None:
    """The exchange's deadline passed, or the drain deadline cut it: answer what is due. A request that may have
    reached the upstream is never answered with a timeout it did not have."""
    assert side.exchange is not None
    head, ex, start = side.exchange
    if side.proxy.drain.cutting:
        error = drain_error(ex)
    elif side.waiting_for == BODY:
        error = body_stalled(ex)
    elif side.waiting_for == STALL:
        error = MeshError(504, "upstream response stalled past the idle timeout", "response_stalled")
    else:
        error = request_timeout()
    ex.mesh_error = error.reason
    ex.error_code = error.code
    if not ex.response_started:
        ex.request_done = False  # whatever remains of the request body is abandoned with the connection
        await side.send_mesh_error(error.status, error.reason, head, ex)
    side.finish(head, ex, start)


def body_stalled(ex: Exchange) -> MeshError:
    """The error for a request body that made no progress for timeouts.idle (or outlived the caller's deadline
    while it streamed)."""
    if trio.current_time() >= ex.caller_deadline:
        return request_timeout()
    if ex.upstream_reading:
        return MeshError(504, "upstream stopped reading the request body", "response_stalled")
    return MeshError(408, "request body stalled past the idle timeout", "body_stalled")


def drain_error(ex: Exchange) -> MeshError:
    """The answer to an exchange the drain deadline cut before its response began."""
    if ex.forwarded:
        return MeshError(
            503,
            "draining: cut by the drain deadline before the upstream answered (the request may have run)",
            "drain_cut",
        )
    return MeshError(503, "draining", "draining")


def record(side: Downstream, head: RequestHead, ex: Exchange, start: float) -> None:
    """Record one exchange's outcome: metrics and the access-log event."""
    side.exchange = None
    proxy = side.proxy
    duration = trio.current_time() - start
    settings = proxy.settings
    upstream = ex.destination or settings.upstream
    if ex.status:
        proxy.metrics.request_done(settings.direction, upstream, ex.status, duration, ex.rx, ex.tx)
    if ex.mesh_error:
        proxy.metrics.error(settings.direction, upstream, ex.error_code or "other")
    if ex.route:
        proxy.metrics.route_done(settings.direction, settings.upstream, ex.route, ex.destination, ex.status)
    trace = ex.trace
    if trace is not None:
        trace.finish(head, ex, settings.direction)
    if not proxy.access_log.enabled:
        return
    proxy.access_log.request(
        direction=settings.direction,
        upstream=upstream,
        method=head.method.decode("latin-1"),
        authority=head.authority.decode("latin-1"),
        path=head.target.decode("latin-1"),
        status=ex.status,
        duration_s=duration,
        endpoint=ex.endpoint,
        rx=ex.rx,
        tx=ex.tx,
        mesh_error=ex.mesh_error,
        request_id=ex.request_id.decode("latin-1"),
        route=ex.route,
        trace_id=trace.trace_id.hex() if trace is not None else "",
    )
