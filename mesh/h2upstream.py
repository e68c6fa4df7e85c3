"""HTTP/2 upstream connections: requests multiplexed as streams over one connection per endpoint.

Each request is an `H2Exchange`: a stream that speaks the protocol-neutral exchange (mesh.message) directly, as
an HTTP/1.1 upstream connection does (mesh.h1upstream), so that retries, hedging, deadlines and the response
path need no second implementation and no HTTP/1.1 bytes pass in between. Flow control is end to end: the
response's receive window is given back only as the proxy takes the bytes, and a request body is sent only within
the peer's window and while the connection's unwritten bytes are within the write budget (mesh.h2io), however
large a window the peer opened.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from http import HTTPStatus

import h2.exceptions
import structlog
import trio
from h2.errors import ErrorCodes

from mesh import message
from mesh.endpoint import Endpoint
from mesh.errors import UpstreamLost
from mesh.h2io import WRITE_BUDGET, SessionWriter
from mesh.http1 import ProtocolError
from mesh.http2 import (
    ConnectionLost,
    Data,
    GoAway,
    H2Limits,
    H2Session,
    Headers,
    Informational,
    Response,
    StreamEnd,
    StreamReset,
    Trailers,
    WindowOpened,
)
from mesh.message import RequestHead
from mesh.stream import STREAM_ERRORS
from mesh.timers import INF
from mesh.transport import Stream

log = structlog.get_logger("mesh.h2upstream")

_GRPC = b"application/grpc"
_EMPTY_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_READ_SIZE = 65536
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}

# The upstream side's HTTP/2 settings unless configured (`limits.http2`): a 1 MiB window per stream (a 4 MiB gRPC
# message needs no more than a few round trips) and 16 MiB per connection; memory per stream stays bounded by the
# stream window.
UPSTREAM_LIMITS = H2Limits(initial_window_size=1 << 20, connection_window_size=16 << 20)


def _error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Connection(SessionWriter):
    """One HTTP/2 client connection to an endpoint. A reader task feeds the sans-io session and hands each
    stream's events to its `H2Exchange`; a writer task owns the socket's send side. No new stream is started
    after the peer's GOAWAY or once `drain()` was called; the connection closes when its last stream ends, or
    after `idle_timeout` without streams."""

    def __init__(
        self,
        stream: Stream,
        endpoint: Endpoint,
        *,
        scheme: bytes,
        idle_timeout: float,
        on_close: Callable[[H2Connection], None],
        limits: H2Limits = UPSTREAM_LIMITS,
    ) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.scheme = scheme
        self.idle_timeout = idle_timeout
        self.session = H2Session(client_side=True, limits=limits, clock=trio.current_time)
        self.streams: dict[int, H2Exchange] = {}
        self.reserved = 0  # exchanges handed out that have not sent their HEADERS yet
        self.draining = False
        self.closed = False
        self.requests = 0  # streams opened on it, for its repr
        self._on_close = on_close
        self._init_writer()
        self._window = trio.Event()  # set (and replaced) whenever a send window grows
        self._reading = trio.CancelScope()
        self._out = self.session.initiate()

    def __repr__(self) -> str:
        return f"<H2Connection {self.endpoint} streams={len(self.streams)} requests={self.requests}>"

    @property
    def available(self) -> bool:
        """A new request may be started on this connection now."""
        return not self.closed and not self.draining and self.session.stream_capacity > self.reserved

    def open(self) -> H2Exchange:
        """Reserve a stream for one request; it is numbered when its head is sent."""
        self.reserved += 1
        self.requests += 1
        return H2Exchange(self)

    def drain(self) -> None:
        """Start no new stream; close once the open ones have ended."""
        self.draining = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        if (self.draining or self.session.closed) and not self.streams and not self.reserved:
            self._reading.cancel()

    async def run(self) -> None:
        """Serve the connection until it closes; never raises."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                with self._reading:
                    await self._read()
                self.session.goaway(ErrorCodes.NO_ERROR, "")
                await self._flushed(1.0)  # a GOAWAY, a last WINDOW_UPDATE or RST_STREAM
                nursery.cancel_scope.cancel()
        except Exception as exc:  # a bug here must not take the sidecar down
            log.error("HTTP/2 upstream connection failed", endpoint=str(self.endpoint), error=repr(exc))
        finally:
            self._lost("upstream connection closed")
            self.closed = True
            self.stream.close()
            self._on_close(self)

    async def _read(self) -> None:
        while not self.session.closed:
            idle = INF if self.streams or self.reserved else self.idle_timeout
            with trio.move_on_after(idle) as scope:
                try:
                    data = await self.stream.receive_some(_READ_SIZE)
                except STREAM_ERRORS:
                    data = b""
            if scope.cancelled_caught:
                if not self.streams and not self.reserved:
                    self.draining = True
                    return
                continue
            self._handle(self.session.receive(data))
            if not data:
                return
            if self.draining and not self.streams and not self.reserved:
                return

    def _send_failed(self) -> None:
        self._lost("upstream connection lost while sending")
        self._reading.cancel()

    def _handle(self, events: list[object]) -> None:
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is Data:
                exchange = streams.get(event.stream_id)
                if exchange is not None:
                    exchange.on_data(event)
                else:
                    self.session.acknowledge(event.stream_id, event.flow_controlled_length)
            elif kind is Response or kind is Informational:
                exchange = streams.get(event.stream_id)
                if exchange is not None:
                    exchange.on_head(event.headers, kind is Informational, kind is Response and event.end_stream)
            elif kind is Trailers:
                exchange = streams.get(event.stream_id)
                if exchange is not None:
                    exchange.on_trailers(event.headers)
            elif kind is StreamEnd:
                exchange = streams.get(event.stream_id)
                if exchange is not None:
                    exchange.on_end()
            elif kind is StreamReset:
                exchange = streams.get(event.stream_id)
                if exchange is not None:
                    exchange.fail(f"upstream reset the stream ({_error_name(event.error_code)})", event.error_code)
                self._wake_senders()
            elif kind is WindowOpened:
                self._wake_senders()
            elif kind is GoAway:
                self.draining = True
            elif kind is ConnectionLost:
                log.debug("HTTP/2 upstream connection lost", endpoint=str(self.endpoint), reason=event.reason)
                self._lost(f"upstream connection lost: {event.reason}")
        self.flush()

    def _wake_senders(self) -> None:
        self._window.set()
        self._window = trio.Event()

    def _lost(self, reason: str) -> None:
        self.closed = True
        for exchange in list(self.streams.values()):
            exchange.fail(reason, None)
        self._wake_senders()

    async def send(self, exchange: H2Exchange, data: bytes, end_stream: bool) -> None:
        """Send request body bytes within the flow-control windows and the connection's write budget, waiting for
        the peer to open the one and read the other down."""
        session = self.session
        while True:
            if self._writing + session.outbound_pending > WRITE_BUDGET:
                await self._write_room()
            if exchange.error is not None:
                raise trio.BrokenResourceError(exchange.error)
            if self.writer_gone:
                raise trio.BrokenResourceError("upstream connection lost while sending")
            taken = session.send_data(exchange.stream_id, data, end_stream)
            self.flush()
            if taken >= len(data):
                if end_stream:
                    exchange.local_ended = True
                return
            data = data[taken:]
            await self._window.wait()


class H2Exchange:
    """One request on an `H2Connection`, in the neutral exchange's terms (as mesh.h1upstream.UpstreamConnection):
    `send_request`, `send_body` and `send_end` send HEADERS, DATA and trailers; `next_event` and `read_more`
    give the response as a ResponseHead, body bytes, Trailers and END. Flow-control credit for response bytes
    goes back to the peer once the proxy has taken them. Never pooled: `close()` ends it, resetting the stream
    (CANCEL) if either direction is unfinished."""

    __slots__ = (
        "_arrived",
        "_credit",
        "_delivered",
        "_events",
        "_head_only",
        "_reserved",
        "breaker",
        "conn",
        "endpoint",
        "error",
        "error_code",
        "local_ended",
        "remote_ended",
        "requests",
        "stream_id",
    )

    multiplexed = True

    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.endpoint = conn.endpoint
        self.breaker = None  # the connection, not each stream, counts against the circuit breaker
        self.requests = 0
        self.stream_id = 0
        self.error: str | None = None
        self.error_code: int | None = None
        self.local_ended = False
        self.remote_ended = False
        self._events: deque[tuple[object, int]] = deque()  # response events for the proxy, and their window
        self._credit = 0  # window of events taken, not yet given back
        self._arrived = trio.Event()
        self._delivered = False  # an event of the response went to the proxy
        self._head_only = False  # the request is a HEAD
        self._reserved = True  # counted in conn.reserved until the head is sent or the exchange closes

    def __repr__(self) -> str:
        return f"<H2Exchange {self.endpoint} stream={self.stream_id}>"

    # -- the request ---------------------------------------------------------------------------------------------
    async def send_request(
        self, head: RequestHead, headers: Headers, body: list[bytes], end: bool, trailers: Headers | None = None
    ) -> None:
        """Send the request head with `headers` (end-to-end ones, plus the mesh's), the body pieces given and, if
        `end`, the end of the body (with `trailers`)."""
        pieces = [piece for piece in body if piece]
        bodyless = not head.has_body or (end and not pieces and not trailers)
        self._send_head(head, headers, bodyless)
        if bodyless:
            return
        conn = self.conn
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            await conn.send(self, piece, end and not trailers and i == last)
        if end and (trailers or not pieces):
            await self.send_end(trailers)

    async def send_body(self, data: bytes) -> None:
        """Send one more piece of the request body."""
        if data:
            await self.conn.send(self, data, False)

    async def send_end(self, trailers: Headers | None = None) -> None:
        """End the request body, with trailers if given."""
        if self.local_ended:
            return
        if not trailers:
            await self.conn.send(self, b"", True)
            return
        if self.error is not None:
            raise trio.BrokenResourceError(self.error)
        conn = self.conn
        conn.session.send_trailers(self.stream_id, list(trailers))
        self.local_ended = True
        conn.flush()

    def _unreserve(self) -> None:
        """Give back the stream this exchange reserved on its connection (once)."""
        if self._reserved:
            self._reserved = False
            self.conn.reserved -= 1
            self.conn._maybe_done()

    def _send_head(self, head: RequestHead, fields: Headers, end: bool) -> None:
        conn = self.conn
        session = conn.session
        self._unreserve()
        if self.error is not None:
            raise trio.BrokenResourceError(self.error)
        if head.upgrade is not None:
            raise trio.BrokenResourceError("an upgrade cannot be sent over HTTP/2")
        if session.stream_capacity <= 0 or conn.closed:
            self.error = "no stream available on the upstream connection"
            self.error_code = ErrorCodes.REFUSED_STREAM  # nothing was sent
            raise UpstreamLost(self.error, never_ran=True)
        authority = head.authority or str(self.endpoint).encode()
        headers: Headers = [
            (b":method", head.method),
            (b":scheme", conn.scheme),
            (b":authority", authority),
            (b":path", head.target),
        ]
        grpc = False
        for name, value in fields:
            if name == b"host":
                continue
            if name == b"content-type" and value.startswith(_GRPC):
                grpc = True
            headers.append((name, value))
        if grpc:
            headers.append((b"te", b"trailers"))  # gRPC servers require it (RFC 9113 8.2.2 allows only this value)
        if head.content_length is not None:
            headers.append((b"content-length", b"%d" % head.content_length))
        elif not head.has_body and head.method in _EMPTY_BODY_METHODS:
            headers.append((b"content-length", b"0"))
        self._head_only = head.method == b"HEAD"
        self.stream_id = stream_id = session.next_stream_id()
        try:
            session.send_headers(stream_id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            self.error = f"request not expressible in HTTP/2: {exc}"
            raise trio.BrokenResourceError(self.error) from None
        conn.streams[stream_id] = self
        if end:
            self.local_ended = True
        conn.flush()

    # -- the response: session events in, neutral events out -------------------------------------------------
    def on_head(self, headers: Headers, informational: bool, end_stream: bool) -> None:
        head_only = self._head_only
        status = int(headers[0][1])  # validated by the session: the only pseudo-header, and first
        fields = headers[1:]
        content_length = None
        if informational or head_only or status == 304:
            has_body = False  # a Content-Length here describes another body: passed on as a header
        else:
            length = None
            kept: Headers = []
            for name, value in fields:
                if name == b"content-length":
                    length = value
                else:
                    kept.append((name, value))
            fields = kept
            if status == 204:
                has_body = False
            elif end_stream:
                has_body = False
                content_length = 0
            else:
                content_length = int(length) if length is not None else None  # validated by the session
                has_body = content_length != 0
        response = message.ResponseHead(
            status=status,
            reason=_REASONS.get(status, b""),
            headers=fields,
            keep_alive=True,
            chunked=has_body and content_length is None,
            content_length=content_length,
            until_close=False,
            has_body=has_body,
            informational=informational,
            upgrade=False,
        )
        self._push(response, 0)

    def on_data(self, event: Data) -> None:
        if event.data and not self._head_only:  # a response to HEAD has no body, whatever the peer sends
            self._push(event.data, event.flow_controlled_length)
        else:
            self.conn.session.acknowledge(self.stream_id, event.flow_controlled_length)

    def on_trailers(self, headers: Headers) -> None:
        self._push(message.Trailers(list(headers)), 0)

    def on_end(self) -> None:
        self.remote_ended = True
        self._push(message.END, 0)
        if self.local_ended:
            self._forget()

    def fail(self, reason: str, code: int | None) -> None:
        if self.error is None:
            self.error = reason
            self.error_code = code
        self._arrived.set()
        self.conn.streams.pop(self.stream_id, None)
        self.conn._maybe_done()

    def _push(self, event: object, window: int) -> None:
        self._events.append((event, window))
        self._arrived.set()

    def next_event(self) -> object | None:
        """The next response event already received, or None (after giving back the credit of those taken)."""
        events = self._events
        if events:
            event, window = events.popleft()
            self._credit += window
            self._delivered = True
            return event
        if self._credit:
            if self.error is None and not self.remote_ended:
                self.conn.session.acknowledge(self.stream_id, self._credit)
                self.conn.flush()
            self._credit = 0
        return None

    async def read_more(self) -> None:
        """Wait for more of the response: UpstreamLost if the stream failed before any of it arrived,
        ProtocolError (`upstream_reset`) if it failed part way."""
        while not self._events:
            if self.error is not None:
                if not self._delivered:
                    raise UpstreamLost(self.error, never_ran=self.error_code == ErrorCodes.REFUSED_STREAM)
                raise ProtocolError(502, self.error, "upstream_reset")
            self._arrived = trio.Event()
            await self._arrived.wait()

    # -- the end -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        conn = self.conn
        if self.stream_id == 0:
            self._unreserve()
            return
        if self.error is None and not (self.local_ended and self.remote_ended):
            window = self._credit + sum(credit for _, credit in self._events)
            if window:
                conn.session.acknowledge(self.stream_id, window)
            conn.session.reset(self.stream_id, ErrorCodes.CANCEL)
            self.error = "closed"
            conn.flush()
        self._events.clear()
        self._forget()

    def _forget(self) -> None:
        conn = self.conn
        if conn.streams.get(self.stream_id) is self:
            del conn.streams[self.stream_id]
            conn._maybe_done()


class H2Pool:
    """The HTTP/2 connections of one cluster, by endpoint: a request takes a stream on the first connection with
    room. While a connection to an endpoint known to speak HTTP/2 is being opened, other requests wait for it
    rather than opening their own."""

    def __init__(self) -> None:
        self.connections: dict[object, list[H2Connection]] = {}
        self.connecting: dict[object, trio.Event] = {}
        self.speaks_h2: set[object] = set()
        self.known: set[object] = set()  # endpoints whose protocol a handshake has shown

    def __repr__(self) -> str:
        return f"<H2Pool connections={sum(len(c) for c in self.connections.values())}>"

    def take(self, key: object) -> H2Exchange | None:
        for conn in self.connections.get(key, ()):
            if conn.available:
                return conn.open()
        return None

    def add(self, key: object, conn: H2Connection) -> None:
        self.connections.setdefault(key, []).append(conn)

    def remove(self, conn: H2Connection) -> None:
        key = conn.endpoint.key
        conns = self.connections.get(key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.connections[key]

    def drain(self, keep: Callable[[object], bool]) -> None:
        """Drain the connections to endpoints `keep` rejects (they left discovery)."""
        for key, conns in list(self.connections.items()):
            if not keep(key):
                for conn in conns:
                    conn.drain()
