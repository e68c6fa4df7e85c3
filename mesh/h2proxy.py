"""HTTP/2 downstream connections (h2c with prior knowledge): each stream one exchange of the HTTP proxy."""

from __future__ import annotations

from collections import deque

import structlog
import trio
from h2.errors import ErrorCodes

from mesh import http1
from mesh.cluster import UpstreamConnection
from mesh.errors import grpc_error_headers
from mesh.h2io import SessionWriter
from mesh.http1 import END, ProtocolError, RequestHead, ResponseHead, ResponseReader
from mesh.http2 import (
    ConnectionLost,
    Data,
    H2Session,
    HeaderError,
    Headers,
    Request,
    StreamEnd,
    StreamReset,
    Trailers,
    WindowOpened,
    to_http1_headers,
)
from mesh.proxy import (
    _STALL,
    _STREAM_ERRORS,
    READ_SIZE,
    DownstreamGone,
    HttpProxy,
    _BodyPump,
    _Downstream,
    _Exchange,
    _read_more,
)
from mesh.timers import INF
from mesh.transport import Accepted

log = structlog.get_logger("mesh.proxy")

_MESH_PREFIX = b"x-mesh-"


class H2Downstream(SessionWriter):
    """One HTTP/2 client connection. A reader task feeds the sans-io `H2Session`; each request becomes an
    `_H2Stream` task that runs the same exchange as an HTTP/1.1 request (authorisation, deadlines, balancing,
    retries, the HTTP/1.1 upstream pool), then writes the response as HTTP/2 frames within the stream's flow-control
    window. One writer task owns the socket's send side. A drain sends GOAWAY and lets open streams finish."""

    def __init__(self, proxy: HttpProxy, accepted: Accepted, initial: bytes) -> None:
        self.proxy = proxy
        self.accepted = accepted
        self.stream = accepted.stream
        self.initial = initial
        self.session = H2Session(client_side=False, limits=proxy.h2_limits, clock=trio.current_time)
        self.streams: dict[int, _H2Stream] = {}
        self._init_writer()
        self._window = trio.Event()  # set (and replaced) whenever a send window grows
        self._streams_done = trio.Event()  # set while no stream is open
        self._streams_done.set()
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
            idle = self.proxy.settings.timeouts.idle
            with self._reading:
                await self._read(idle)
            await self._flushed(1.0)  # let the writer send what is queued (the last response, a GOAWAY)
            nursery.cancel_scope.cancel()

    async def _read(self, idle: float) -> None:
        """Feed what the client sends into the session until it closes, errs, idles with no stream, or a drain ends."""
        while not self.session.closed:
            with trio.move_on_after(idle) as scope:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except _STREAM_ERRORS:
                    data = b""
            if scope.cancelled_caught:
                if self.streams:
                    continue
                self.session.goaway(ErrorCodes.NO_ERROR, "idle")
                break
            self._handle(self.session.receive(data))
            if not data:
                break

    async def _drain_watch(self) -> None:
        await self.proxy.drain.started.wait()
        self.session.start_graceful_shutdown()
        self.flush()
        await trio.sleep(1.0)  # about one round trip for requests already on the wire (Envoy waits 5 s)
        self.session.goaway(ErrorCodes.NO_ERROR, "draining")
        self.flush()
        while self.streams:
            await self._streams_done.wait()
        self._reading.cancel()  # streams are done: stop reading; `serve` sends what is queued and closes

    def _send_failed(self) -> None:
        for stream in list(self.streams.values()):
            stream.cancel.cancel()

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
                    stream.reset = True
                    stream.cancel.cancel()
            elif kind is ConnectionLost:
                for stream in list(self.streams.values()):
                    stream.cancel.cancel()
        self.flush()

    def _open(self, request: Request) -> None:
        try:
            method, target, authority, fields, content_length = to_http1_headers(request.headers, validated=True)
        except HeaderError as exc:
            self.session.reset(request.stream_id, ErrorCodes.PROTOCOL_ERROR)
            log.info("request rejected", direction=self.proxy.settings.direction, reason=str(exc))
            return
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
        if self._streams_done.is_set():
            self._streams_done = trio.Event()
        if request.end_stream:
            stream.body.push(StreamEnd(request.stream_id))
        self.nursery.start_soon(stream.run)

    async def send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Send body bytes within the stream's flow-control window, waiting for the peer to open it."""
        session = self.session
        while True:
            taken = session.send_data(stream_id, data, end_stream)
            self.flush()
            if taken >= len(data):
                return
            data = data[taken:]
            if session.closed or stream_id not in self.streams or self.streams[stream_id].reset:
                raise DownstreamGone("client went away mid-response")
            await self._window.wait()


class _H2Body:
    """The request body of one stream, as the HTTP/1.1 exchange reads it (`next_event`): bytes, Trailers, END.
    Flow-control credit goes back to the client as the exchange takes each piece (it then writes it upstream
    before taking the next), so a slow upstream slows the client end to end."""

    __slots__ = ("arrived", "chunked", "events", "owner", "upgraded_data")

    def __init__(self, owner: H2Downstream, chunked: bool) -> None:
        self.owner = owner
        self.chunked = chunked
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
                if self.chunked:
                    return http1.Trailers(list(event.headers))
                continue  # a Content-Length body cannot carry trailers on HTTP/1.1
            if kind is StreamEnd:
                return END
        return None


class _H2Stream(_Downstream):
    """One HTTP/2 stream served by the HTTP/1.1 exchange of `_Downstream`; only reading the body and writing the
    response differ."""

    __slots__ = ("body", "cancel", "conn", "expired", "head", "reset", "stream_id")

    def __init__(self, conn: H2Downstream, stream_id: int, head: RequestHead) -> None:
        proxy = conn.proxy
        self.proxy = proxy
        self.conn = conn
        self.stream_id = stream_id
        self.head = head
        self.stream = conn.stream
        self.accepted = conn.accepted
        self.deadline = INF
        self.waiting_for = 0
        self.cancel = trio.CancelScope()  # one scope per stream (each costs microseconds): reset, loss, timeout
        self.expired = False  # … and this tells a timeout (the sweeper's `expire`) from the others
        self.exchange = None
        self.upstream: UpstreamConnection | None = None
        self.timeouts = proxy.settings.timeouts
        self.limits = proxy.settings.limits
        self.body = _H2Body(conn, head.chunked)
        self.reader = self.body  # what the exchange reads the request body from
        self.peer_ip = conn.peer_ip
        self.reset = False

    def expire(self) -> None:
        self.expired = True
        self.cancel.cancel()

    async def run(self) -> None:
        sweeper = self.proxy.sweeper
        sweeper.add(self)
        try:
            with self.cancel:
                await self._exchange(self.head)
            if self.cancel.cancelled_caught and self.expired and not self.reset:  # the deadline ended it
                self.cancel = trio.CancelScope()
                with self.cancel:
                    await self._timed_out()
        finally:
            sweeper.discard(self)
            if self.upstream is not None:
                self.upstream.close()
            conn = self.conn
            conn.session.abandon(self.stream_id)  # e.g. a request body stalled: the client learns it is over
            conn.flush()
            conn.streams.pop(self.stream_id, None)
            if not conn.streams:
                conn._streams_done.set()

    async def _body_event(self) -> object:
        body = self.body
        while True:
            event = body.next_event()
            if event is not None:
                return event
            if self.reset:
                raise DownstreamGone("client reset the stream")
            body.arrived = trio.Event()
            with trio.move_on_after(self.timeouts.idle) as scope:
                await body.arrived.wait()
            if scope.cancelled_caught:
                raise DownstreamGone("request body stalled past the idle timeout")

    async def _send_informational(self, event: ResponseHead) -> None:
        pass  # 1xx heads are not passed on over HTTP/2 (no Expect: 100-continue is forwarded from it)

    async def _send_error(self, status: int, reason: str, *, close: bool, grpc: bool = False) -> bool:
        if grpc:  # "trailers-only": one HEADERS frame that ends the stream
            return await self._respond([(b":status", b"200"), *grpc_error_headers(status, reason)], b"")
        body = f"{reason}\n".encode()
        headers: Headers = [
            (b":status", b"%d" % status),
            (b"x-mesh-error", reason.encode()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
        ]
        return await self._respond(headers, body)

    async def _respond(self, headers: Headers, body: bytes) -> bool:
        conn = self.conn
        if self.reset or conn.session.closed:
            return False
        conn.session.send_headers(self.stream_id, headers, end_stream=not body)
        conn.flush()
        if body:
            try:
                await conn.send(self.stream_id, body, True)
            except DownstreamGone:
                return False
        return True

    async def _stream_response(
        self,
        head: RequestHead,
        response: ResponseHead,
        reader: ResponseReader,
        conn: UpstreamConnection,
        ex: _Exchange,
        pump: _BodyPump | None,
    ) -> bool:
        h2 = self.conn
        headers: Headers = [(b":status", b"%d" % response.status), *response.headers]
        if response.content_length is not None and response.has_body:
            headers.append((b"content-length", b"%d" % response.content_length))
        complete = not response.has_body
        if complete:
            reader.next_event()  # END
        ex.response_started = True
        self.waiting_for = _STALL
        if self.reset or h2.session.closed:
            raise DownstreamGone("client reset the stream")
        h2.session.send_headers(self.stream_id, headers, end_stream=complete)
        h2.flush()
        upstream = conn.stream
        idle = self.timeouts.idle
        event = None
        while not complete:
            if event is None:
                event = reader.next_event()
            if event is None:
                self.deadline = trio.current_time() + idle
                try:
                    await _read_more(reader, upstream)
                except ProtocolError as exc:
                    conn.close()
                    h2.session.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)  # a cut response is never complete
                    h2.flush()
                    raise DownstreamGone(exc.reason) from None
                continue
            if event is END:
                await h2.send(self.stream_id, b"", True)
                complete = True
            elif type(event) is http1.Trailers:
                h2.session.send_trailers(self.stream_id, list(event.headers))
                h2.flush()
                reader.next_event()  # END follows trailers
                complete = True
            else:
                ex.tx += len(event)
                self.deadline = trio.current_time() + idle
                following = reader.next_event()  # END already read: the last DATA frame carries END_STREAM
                await h2.send(self.stream_id, event, following is END)
                complete = following is END
                event = following
                continue
            event = None
        await self._hand_back(head, response, conn, ex, pump)
        return False
