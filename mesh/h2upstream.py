"""HTTP/2 upstream connections: requests multiplexed as streams over one connection per endpoint.

The HTTP proxy speaks HTTP/1.1 to its upstreams: it writes a request head and body as HTTP/1.1 bytes and parses
the response with the HTTP/1.1 reader. An `H2Exchange` is the upstream "connection" of one such request on an
HTTP/2 connection: it reads the request bytes it is given (the mesh's own, already validated serialisation) and
sends them as HEADERS, DATA and trailers, and it presents the HTTP/2 response as an HTTP/1.1 response (chunked,
with trailers), so that retries, hedging, deadlines and the response path need no second implementation. Flow
control is end to end: the response's receive window is given back only as the proxy takes the bytes, and a
request body is sent only within the peer's window and while the connection's unwritten bytes are within the
write budget (mesh.h2io), however large a window the peer opened.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from http import HTTPStatus

import h2.exceptions
import structlog
import trio
from h2.errors import ErrorCodes

from mesh import http1
from mesh.discovery import Endpoint
from mesh.h2io import WRITE_BUDGET, SessionWriter
from mesh.http1 import END, ProtocolError, RequestHead, RequestReader
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
from mesh.stream import STREAM_ERRORS
from mesh.timers import INF
from mesh.transport import Stream

log = structlog.get_logger("mesh.h2upstream")

_GRPC = b"application/grpc"
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
    """One request on an `H2Connection`, presented to the proxy as an HTTP/1.1 upstream connection: `send_all`
    takes HTTP/1.1 request bytes, `receive_some` gives HTTP/1.1 response bytes. Never pooled: `close()` ends it,
    resetting the stream (CANCEL) if either direction is unfinished."""

    __slots__ = (
        "_arrived",
        "_chunked",
        "_delivered",
        "_eof",
        "_head_only",
        "_parser",
        "_pending",
        "_reserved",
        "breaker",
        "conn",
        "endpoint",
        "error",
        "error_code",
        "local_ended",
        "reader",
        "remote_ended",
        "requests",
        "stream",
        "stream_id",
    )

    multiplexed = True

    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.stream = self  # the proxy sends and receives through `stream`, as on an HTTP/1.1 connection
        self.endpoint = conn.endpoint
        self.breaker = None  # the connection, not each stream, counts against the circuit breaker
        self.requests = 0
        self.reader = None
        self.stream_id = 0
        self.error: str | None = None
        self.error_code: int | None = None
        self.local_ended = False
        self.remote_ended = False
        self._parser: RequestReader | None = RequestReader(max_header_bytes=1 << 20, max_header_count=100_000)
        self._pending: deque[tuple[bytes, int]] = deque()  # response bytes for the proxy, and their window
        self._arrived = trio.Event()
        self._eof = False
        self._delivered = 0
        self._head_only = False
        self._chunked = False
        self._reserved = True  # counted in conn.reserved until the head is sent or the exchange closes

    def __repr__(self) -> str:
        return f"<H2Exchange {self.endpoint} stream={self.stream_id}>"

    # -- the request: HTTP/1.1 bytes in, frames out ------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.error is not None:
            raise trio.BrokenResourceError(self.error)
        parser = self._parser
        if parser is None:
            raise trio.ClosedResourceError("the request was already sent")
        try:
            parser.feed(bytes(data))
        except ProtocolError as exc:
            raise trio.BrokenResourceError(f"request not expressible in HTTP/2: {exc.reason}") from None
        conn = self.conn
        while (event := parser.next_event()) is not None:
            if type(event) is RequestHead:
                self._send_head(event)
            elif event is END:
                self._parser = None
                if not self.local_ended:
                    await conn.send(self, b"", True)
            elif type(event) is http1.Trailers:
                if self.error is not None:
                    raise trio.BrokenResourceError(self.error)
                self._parser = None
                conn.session.send_trailers(self.stream_id, list(event.headers))
                self.local_ended = True
                conn.flush()
            else:
                await conn.send(self, event, False)

    def _unreserve(self) -> None:
        """Give back the stream this exchange reserved on its connection (once)."""
        if self._reserved:
            self._reserved = False
            self.conn.reserved -= 1
            self.conn._maybe_done()

    def _send_head(self, head: RequestHead) -> None:
        conn = self.conn
        session = conn.session
        self._unreserve()
        if head.upgrade is not None:
            raise trio.BrokenResourceError("an upgrade cannot be sent over HTTP/2")
        if session.stream_capacity <= 0 or conn.closed:
            self.error = "no stream available on the upstream connection"
            self.error_code = ErrorCodes.REFUSED_STREAM  # nothing was sent
            raise trio.BrokenResourceError(self.error)
        authority = head.authority or str(self.endpoint).encode()
        headers: Headers = [
            (b":method", head.method),
            (b":scheme", conn.scheme),
            (b":authority", authority),
            (b":path", head.target),
        ]
        grpc = False
        for name, value in head.headers:
            if name == b"host":
                continue
            if name == b"content-type" and value.startswith(_GRPC):
                grpc = True
            headers.append((name, value))
        headers += head.mesh_headers
        if grpc:
            headers.append((b"te", b"trailers"))  # gRPC servers require it (RFC 9113 8.2.2 allows only this value)
        if head.content_length is not None:
            headers.append((b"content-length", b"%d" % head.content_length))
        end = not head.has_body
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
            self._parser = None
        conn.flush()

    # -- the response: events in, HTTP/1.1 bytes out ---------------------------------------------------------
    def on_head(self, headers: Headers, informational: bool, end_stream: bool) -> None:
        status = int(headers[0][1])  # validated by the session: the only pseudo-header, and first
        fields = headers[1:]
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
        if informational or self._head_only:
            self._push(line + http1.serialize_headers(fields) + b"\r\n", 0)
            return
        if end_stream:
            fields = [(n, v) for n, v in fields if n != b"content-length"]
            if status not in (204, 304):
                fields.append((b"content-length", b"0"))
        elif not any(n == b"content-length" for n, _ in fields) and status not in (204, 304):
            fields.append((b"transfer-encoding", b"chunked"))
            self._chunked = True
        self._push(line + http1.serialize_headers(fields) + b"\r\n", 0)

    def on_data(self, event: Data) -> None:
        data = event.data
        if not data:
            self.conn.session.acknowledge(self.stream_id, event.flow_controlled_length)
            return
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._push(data, event.flow_controlled_length)

    def on_trailers(self, headers: Headers) -> None:
        if self._chunked:
            self._push(http1.last_chunk_bytes(headers), 0)
            self._chunked = False
        # A Content-Length response cannot carry trailers on HTTP/1.1: they are dropped.

    def on_end(self) -> None:
        if self._chunked:
            self._push(http1.last_chunk_bytes(), 0)
            self._chunked = False
        self.remote_ended = True
        self._eof = True
        self._arrived.set()
        if self.local_ended:
            self._forget()

    def fail(self, reason: str, code: int | None) -> None:
        if self.error is None:
            self.error = reason
            self.error_code = code
        self._arrived.set()
        self.conn.streams.pop(self.stream_id, None)
        self.conn._maybe_done()

    def _push(self, data: bytes, window: int) -> None:
        self._pending.append((data, window))
        self._arrived.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            pending = self._pending
            if pending:
                if len(pending) == 1:
                    data, window = pending.popleft()
                else:
                    parts = []
                    window = 0
                    while pending:
                        piece, credit = pending.popleft()
                        parts.append(piece)
                        window += credit
                    data = b"".join(parts)
                if window and self.error is None:
                    self.conn.session.acknowledge(self.stream_id, window)
                    self.conn.flush()
                self._delivered += len(data)
                return data
            if self._eof:
                return b""
            if self.error is not None:
                if not self._delivered:
                    raise trio.BrokenResourceError(self.error)
                return b""  # a cut response: the HTTP/1.1 reader sees it end early
            self._arrived = trio.Event()
            await self._arrived.wait()

    # -- the end -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        conn = self.conn
        if self.stream_id == 0:
            self._parser = None
            self._unreserve()
            return
        if self.error is None and not (self.local_ended and self.remote_ended):
            window = sum(credit for _, credit in self._pending)
            if window:
                conn.session.acknowledge(self.stream_id, window)
            conn.session.reset(self.stream_id, ErrorCodes.CANCEL)
            self.error = "closed"
            conn.flush()
        self._pending.clear()
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
