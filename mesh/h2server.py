"""HTTP/2 downstream connections (h2c with prior knowledge, or ALPN h2): each stream one exchange of the pipeline."""

from __future__ import annotations

from collections import deque

import trio
from h2.errors import ErrorCodes

from mesh import message
from mesh.cluster import Upstream
from mesh.errors import MeshError, UpstreamLost, grpc_error_headers, is_grpc
from mesh.h2io import WRITE_BUDGET, SessionWriter
from mesh.http1 import ProtocolError
from mesh.http2 import (
    ConnectionLost,
    Data,
    H2Session,
    HeaderError,
    Headers,
    Request,
    RequestRejected,
    StreamEnd,
    StreamReset,
    Trailers,
    WindowOpened,
    to_http1_headers,
)
from mesh.message import END, RequestHead, ResponseHead
from mesh.pipeline.exchange import IDLE, STALL, DownstreamGone, Exchange, answer_expired, record, serve_exchange
from mesh.proxy import READ_SIZE, HttpProxy
from mesh.stream import STREAM_ERRORS
from mesh.timers import INF
from mesh.transport import Accepted

_MESH_PREFIX = b"x-mesh-"

# A request stream that ended with no response, by its mesh_requests_unanswered_total reason: its mesh_error, and
# the mesh_errors_total code it counts under (a malformed one's mesh_error is the session's reason).
_GONE = {"client_reset": "client reset the stream", "connection_lost": "client connection lost"}
_GONE_CODES = {"client_reset": "client_gone", "connection_lost": "client_gone", "malformed": "bad_request"}


class H2Downstream(SessionWriter):
    """One HTTP/2 client connection. A reader task feeds the sans-io `H2Session`; each request becomes an
    `_H2Stream` task that runs the listener's pipeline, as an HTTP/1.1 request does (authorisation, routes,
    deadlines, balancing, retries, the upstream pool), then writes the response as HTTP/2 frames within the
    stream's flow-control window and the connection's write budget. One writer task owns the socket's send side.
    The first request head must be complete by `head_deadline` (trio clock: `timeouts.request_headers` after the
    connection was accepted, preface included), and every later header block within `timeouts.request_headers` of
    its first byte; else GOAWAY and close. A drain sends GOAWAY and lets open streams finish. Every request stream
    is recorded once: answered, or counted in `mesh_requests_unanswered_total` and logged. The caller closes the
    stream."""

    def __init__(self, proxy: HttpProxy, accepted: Accepted, initial: bytes, head_deadline: float) -> None:
        self.proxy = proxy
        self.accepted = accepted
        self.stream = accepted.stream
        self.initial = initial
        self.head_deadline = head_deadline
        self._requested = False  # a complete request head has arrived
        self.session = H2Session(client_side=False, limits=proxy.h2_limits, clock=trio.current_time)
        self.streams: dict[int, _H2Stream] = {}
        self._init_writer()
        self._window = trio.Event()  # set (and replaced) whenever a send window grows
        self.streams_done = trio.Event()  # set while no stream is open
        self.streams_done.set()
        self._reading = trio.CancelScope()  # the reader loop, ended by a finished drain
        self._out = b""  # our connection preface, for the writer
        try:
            self.peer_ip = self.stream.socket.getpeername()[0].encode()
        except OSError:
            self.peer_ip = b""

    def __repr__(self) -> str:
        return f"<H2Downstream streams={len(self.streams)}>"

    async def serve(self) -> None:
        self._out = self.session.initiate()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            nursery.start_soon(self._drain_watch)
            if self.initial:  # what protocol detection read (plaintext); over TLS, ALPN chose HTTP/2
                self._handle(self.session.receive(self.initial))
            with self._reading:
                await self._read()
            await self._flushed(1.0)  # let the writer send what is queued (the last response, a GOAWAY)
            nursery.cancel_scope.cancel()  # streams still open are cut: they record themselves as connection_lost

    async def _read(self) -> None:
        """Feed what the client sends into the session until it closes, errs, is late with a request head, idles
        with no stream, or a drain ends."""
        session = self.session
        timeouts = self.proxy.settings.timeouts
        while not session.closed:
            block = session.header_block_started
            if not self._requested:
                deadline = self.head_deadline  # covers the preface and any header block of the first request
            elif block is not None:
                deadline = block + timeouts.request_headers
            else:
                deadline = trio.current_time() + timeouts.idle
            with trio.move_on_at(deadline) as scope:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except STREAM_ERRORS:
                    data = b""
            if scope.cancelled_caught:
                if not self._requested or block is not None:
                    self._head_timed_out(block is not None)
                    break
                if self.streams:
                    continue
                session.goaway(ErrorCodes.NO_ERROR, "idle")
                break
            self._handle(session.receive(data))
            if not data:
                break

    def _head_timed_out(self, block_open: bool) -> None:
        """No request head in time: queue GOAWAY for `serve` to write before it closes. NO_ERROR when no header
        block was begun (nothing was processed, as when an idle connection closes: the client may retry anywhere);
        PROTOCOL_ERROR when one was left unfinished, which no other frame may follow and whose HPACK state is lost
        (Traffic Server closes the same way, with COMPRESSION_ERROR)."""
        reason = "request header timeout"
        self.session.goaway(ErrorCodes.PROTOCOL_ERROR if block_open else ErrorCodes.NO_ERROR, reason)
        settings = self.proxy.settings
        self.proxy.metrics.error(settings.direction, settings.upstream, "header_timeout")
        self.proxy.log_rejected(0, reason, self.peer_ip)

    async def _drain_watch(self) -> None:
        await self.proxy.drain.started.wait()
        self.session.start_graceful_shutdown()
        self.flush()
        await trio.sleep(1.0)  # about one round trip for requests already on the wire (Envoy waits 5 s)
        self.session.goaway(ErrorCodes.NO_ERROR, "draining")
        self.flush()
        while self.streams:
            await self.streams_done.wait()
        self._reading.cancel()  # streams are done: stop reading; `serve` sends what is queued and closes

    def _send_failed(self) -> None:
        for stream in list(self.streams.values()):
            stream.gone("connection_lost")

    def _handle(self, events: list[object]) -> None:
        for event in events:
            kind = type(event)
            if kind is Data:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.body.push(event)
                else:
                    self.session.acknowledge(event.stream_id, event.flow_controlled_length)
            elif kind is Request:
                self._open(event)
            elif kind is RequestRejected:
                self._rejected(event)
            elif kind is StreamEnd or kind is Trailers:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.body.push(event)
            elif kind is WindowOpened:
                self._window.set()
                self._window = trio.Event()
            elif kind is StreamReset:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    if event.remote:
                        stream.gone("client_reset")
                    else:  # the session found the rest of the request malformed, e.g. longer than its content-length
                        stream.gone("malformed", event.reason)
            elif kind is ConnectionLost:
                for stream in list(self.streams.values()):
                    stream.gone("connection_lost")
        self.flush()

    def _rejected(self, event: RequestRejected) -> None:
        """Record a request no stream task will: refused, malformed or answered by the session ("request rejected",
        as on HTTP/1.1), or reset by the client (or cut by the connection's end) in the read that opened it (an
        access-log event with status 0, as for a stream reset mid-exchange)."""
        self._requested = True
        proxy = self.proxy
        settings = proxy.settings
        if event.status:  # the session answers only a header list over the limits: 431
            proxy.metrics.request_done(settings.direction, settings.upstream, event.status, 0.0, 0, 0)
            proxy.metrics.error(settings.direction, settings.upstream, "headers_too_large")
        else:
            proxy.metrics.request_unanswered(settings.direction, settings.upstream, event.cause)
        if event.headers is None:
            proxy.log_rejected(event.status, event.reason, self.peer_ip, stream=event.stream_id)
            return
        if not proxy.access_log.enabled:
            return
        fields = dict(event.headers)
        proxy.access_log.request(
            direction=settings.direction,
            upstream=settings.upstream,
            method=fields.get(b":method", b"").decode("latin-1"),
            authority=fields.get(b":authority", fields.get(b"host", b"")).decode("latin-1"),
            path=fields.get(b":path", b"").decode("latin-1"),
            status=0,
            duration_s=0.0,
            endpoint="",
            rx=0,
            tx=0,
            mesh_error=_GONE[event.cause],
            request_id=fields.get(b"x-request-id", b"").decode("latin-1"),
        )

    def _open(self, request: Request) -> None:
        try:
            method, target, authority, fields, content_length = to_http1_headers(request.headers, validated=True)
        except HeaderError as exc:
            self.session.reset(request.stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._rejected(RequestRejected(request.stream_id, ErrorCodes.PROTOCOL_ERROR, exc.reason, "malformed"))
            return
        self._requested = True
        headers: Headers = [(b"host", authority)]
        mesh_headers: Headers = []
        for name, value in fields:
            (mesh_headers if name.startswith(_MESH_PREFIX) else headers).append((name, value))
        has_body = not request.end_stream
        head = RequestHead(
            method=method,
            target=target,
            http10=False,
            headers=headers,
            mesh_headers=mesh_headers,
            keep_alive=True,
            has_body=has_body and content_length != 0,
            chunked=has_body and content_length is None,
            content_length=content_length,
            expect_continue=False,
            upgrade=None,
            authority=authority,
        )
        stream = _H2Stream(self, request.stream_id, head)
        self.streams[request.stream_id] = stream
        if self.streams_done.is_set():
            self.streams_done = trio.Event()
        if request.end_stream:
            stream.body.push(StreamEnd(request.stream_id))
        self.nursery.start_soon(stream.run)

    async def send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Send body bytes within the stream's flow-control window and the connection's write budget, waiting for
        the client to open the one and read the other down; DownstreamGone once the stream or connection is gone."""
        session = self.session
        while True:
            if self._writing + session.outbound_pending > WRITE_BUDGET:
                await self._write_room()
            if self.writer_gone:
                raise DownstreamGone(_GONE["connection_lost"])
            taken = session.send_data(stream_id, data, end_stream)
            self.flush()
            if taken >= len(data):
                return
            data = data[taken:]
            stream = self.streams.get(stream_id)
            if session.closed or stream is None or stream.ended:
                raise DownstreamGone((stream and stream.ended) or _GONE["connection_lost"])
            await self._window.wait()


class _H2Body:
    """The request body of one stream, as the HTTP/1.1 exchange reads it (`next_event`): bytes, Trailers, END.
    Flow-control credit goes back to the client as the exchange takes each piece (it then writes it upstream
    before taking the next), so a slow upstream slows the client end to end."""

    __slots__ = ("arrived", "events", "owner", "upgraded_data")

    def __init__(self, owner: H2Downstream) -> None:
        self.owner = owner
        self.events: deque[object] = deque()
        self.arrived = trio.Event()
        self.upgraded_data = None

    def push(self, event: object) -> None:
        self.events.append(event)
        self.arrived.set()

    def next_event(self) -> object | None:
        while self.events:
            event = self.events.popleft()
            kind = type(event)
            if kind is Data:
                self.owner.session.acknowledge(event.stream_id, event.flow_controlled_length)
                self.owner.flush()  # a WINDOW_UPDATE may be due
                if event.data:
                    return event.data
                continue
            if kind is Trailers:
                return message.Trailers(list(event.headers))
            if kind is StreamEnd:
                return END
        return None


class _H2Stream:
    """One HTTP/2 stream: one exchange through the listener's pipeline, whose `Downstream` (mesh.pipeline.exchange)
    it is: it reads the request body from the stream's DATA frames and writes the response as HEADERS, DATA and
    trailers within the stream's flow-control window and the connection's write budget. A stream that ends
    before any response (`gone`) is recorded by `finish`: status 0, its reason in the access log's mesh_error and
    in mesh_requests_unanswered_total."""

    __slots__ = (
        "accepted",
        "body",
        "cancel",
        "conn",
        "deadline",
        "ended",
        "ended_as",
        "exchange",
        "expired",
        "head",
        "limits",
        "peer_ip",
        "proxy",
        "reader",
        "responded",
        "stream",
        "stream_id",
        "timeouts",
        "upstream",
        "waiting_for",
    )

    def __init__(self, conn: H2Downstream, stream_id: int, head: RequestHead) -> None:
        proxy = conn.proxy
        self.proxy = proxy
        self.conn = conn
        self.stream_id = stream_id
        self.head = head
        self.stream = conn.stream
        self.accepted = conn.accepted
        self.deadline = INF
        self.waiting_for = IDLE
        self.cancel = trio.CancelScope()  # one scope per stream (each costs microseconds): reset, loss, timeout
        self.expired = False  # … and this tells a timeout (the sweeper's `expire`) from the others
        self.exchange: tuple[RequestHead, Exchange, float] | None = None
        self.upstream: Upstream | None = None
        self.timeouts = proxy.settings.timeouts
        self.limits = proxy.settings.limits
        self.body = _H2Body(conn)
        self.reader = self.body  # what the exchange reads the request body from
        self.peer_ip = conn.peer_ip
        self.ended = ""  # why the stream can no longer be answered (a mesh_error), once it cannot
        self.ended_as = ""  # … and its mesh_requests_unanswered_total reason
        self.responded = False  # a response head went to the session

    def __repr__(self) -> str:
        return f"<H2Stream {self.stream_id} {self.head.method.decode()} {self.head.target.decode()!r}>"

    def expire(self) -> None:
        self.expired = True
        self.cancel.cancel()

    def client_left(self) -> bool:
        return bool(self.ended)

    def gone(self, cause: str, why: str = "") -> None:
        """The client reset the stream, the session found it malformed ("malformed", `why`) or the connection
        ended: cancel the exchange; `run` records it. The first cause counts."""
        if not self.ended:
            self.ended = why or _GONE[cause]
            self.ended_as = cause
        self.cancel.cancel()

    async def run(self) -> None:
        sweeper = self.proxy.sweeper
        sweeper.add(self)
        try:
            with self.cancel:
                await serve_exchange(self, self.head)
            if self.cancel.cancelled_caught and self.expired and not self.ended and self.exchange is not None:
                self.cancel = trio.CancelScope()  # the deadline ended it: answer for it
                with self.cancel:
                    await answer_expired(self)
        finally:
            sweeper.discard(self)
            if self.upstream is not None:
                self.upstream.close()
            conn = self.conn
            conn.session.abandon(self.stream_id)  # e.g. a request body stalled: the client learns it is over
            conn.flush()
            conn.streams.pop(self.stream_id, None)
            if not conn.streams:
                conn.streams_done.set()
            if self.exchange is not None:  # cancelled mid-exchange (by `gone`, or with the connection): record it
                if not self.ended:
                    self.ended, self.ended_as = _GONE["connection_lost"], "connection_lost"
                head, ex, start = self.exchange
                if not ex.mesh_error:
                    ex.mesh_error, ex.error_code = self.ended, _GONE_CODES[self.ended_as]
                self.finish(head, ex, start)

    async def body_event(self) -> object:
        """The next request body event; the caller keeps the stream's deadline (waiting_for BODY), so a body
        that stalls is answered 408 as on HTTP/1.1 (as Envoy's stream idle timeout does)."""
        body = self.body
        while True:
            event = body.next_event()
            if event is not None:
                return event
            if self.ended:
                raise DownstreamGone(self.ended)
            body.arrived = trio.Event()
            await body.arrived.wait()

    def response_begins(self, ex: Exchange) -> None:
        ex.response_started = True
        self.waiting_for = STALL

    async def send_informational(self, response: ResponseHead) -> None:
        pass  # 1xx heads are not passed on over HTTP/2 (no Expect: 100-continue is forwarded from it)

    async def upgraded(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        raise MeshError(502, "upstream switched protocols on an HTTP/2 stream", "invalid_response")

    async def send_mesh_error(self, status: int, reason: str, head: RequestHead, ex: Exchange) -> bool:
        ex.status = status
        self.response_begins(ex)  # whatever happens next, this request has had its one answer
        self.deadline = trio.current_time() + self.timeouts.idle
        if is_grpc(head.headers):  # "trailers-only": one HEADERS frame that ends the stream
            await self._respond([(b":status", b"200"), *grpc_error_headers(status, reason)], b"")
            return False
        body = f"{reason}\n".encode()
        headers: Headers = [
            (b":status", b"%d" % status),
            (b"x-mesh-error", reason.encode()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
        ]
        await self._respond(headers, body)
        return False

    async def send_response(self, status: int, headers: Headers, body: bytes, head: RequestHead, ex: Exchange) -> bool:
        ex.status = status
        ex.tx += len(body)
        self.response_begins(ex)
        self.deadline = trio.current_time() + self.timeouts.idle
        fields: Headers = [(b":status", b"%d" % status), *headers, (b"content-length", b"%d" % len(body))]
        await self._respond(fields, b"" if head.method == b"HEAD" else body)
        return False

    def finish(self, head: RequestHead, ex: Exchange, start: float) -> None:
        """Record the exchange; one whose stream ended before a response head was sent counts as unanswered."""
        if self.ended_as and not self.responded:  # the client got nothing: not a response of the mesh's either
            ex.status = 0
            ex.mesh_error, ex.error_code = self.ended, _GONE_CODES[self.ended_as]
            settings = self.proxy.settings
            upstream = ex.destination or settings.upstream
            self.proxy.metrics.request_unanswered(settings.direction, upstream, self.ended_as)
        record(self, head, ex, start)

    async def _respond(self, headers: Headers, body: bytes) -> bool:
        conn = self.conn
        if self.ended or conn.session.closed:
            return False
        self.responded = True
        conn.session.send_headers(self.stream_id, headers, end_stream=not body)
        conn.flush()
        if body:
            try:
                await conn.send(self.stream_id, body, True)
            except DownstreamGone:
                return False
        return True

    async def stream_response(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        h2 = self.conn
        headers: Headers = [(b":status", b"%d" % response.status), *response.headers]
        if response.content_length is not None and response.has_body:
            headers.append((b"content-length", b"%d" % response.content_length))
        complete = not response.has_body
        if complete:
            conn.next_event()  # END
        if self.ended or h2.session.closed:
            raise DownstreamGone(self.ended or _GONE["connection_lost"])
        self.response_begins(ex)
        self.responded = True
        h2.session.send_headers(self.stream_id, headers, end_stream=complete)
        h2.flush()
        idle = self.timeouts.idle
        event = None
        while not complete:
            if event is None:
                event = conn.next_event()
            if event is None:
                self.deadline = trio.current_time() + idle
                try:
                    await conn.read_more()
                except (ProtocolError, UpstreamLost) as exc:
                    conn.close()
                    h2.session.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)  # a cut response is never complete
                    h2.flush()
                    raise DownstreamGone(exc.reason) from None
                continue
            if event is END:
                await h2.send(self.stream_id, b"", True)
                complete = True
            elif type(event) is message.Trailers:
                h2.session.send_trailers(self.stream_id, list(event.headers))
                h2.flush()
                conn.next_event()  # END follows trailers
                complete = True
            else:
                ex.tx += len(event)
                self.deadline = trio.current_time() + idle
                following = conn.next_event()  # END already read: the last DATA frame carries END_STREAM
                await h2.send(self.stream_id, event, following is END)
                complete = following is END
                event = following
                continue
            event = None
        return False
