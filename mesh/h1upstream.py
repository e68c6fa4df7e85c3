"""HTTP/1.1 upstream connections: one request at a time in the neutral exchange's terms, framed on the wire here."""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

from mesh.breaker import CircuitBreaker
from mesh.endpoint import Endpoint
from mesh.errors import UpstreamLost
from mesh.http1 import ProtocolError, ResponseReader, chunk_bytes, last_chunk_bytes, serialize_headers
from mesh.message import Headers, RequestHead
from mesh.stream import STREAM_ERRORS
from mesh.transport import Stream

READ_SIZE = 65536


def _nothing() -> None:
    return None


_EMPTY_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class UpstreamConnection:
    """One HTTP/1.1 transport connection to an endpoint, owned by whoever holds it (the pool while idle).

    It speaks the protocol-neutral exchange, as an HTTP/2 stream (mesh.h2upstream.H2Exchange) does:
    `send_request`, `send_body` and `send_end` take a request head, its end-to-end headers and raw body pieces
    and frame them for HTTP/1.1 (Content-Length or chunked, trailers, Expect, Upgrade); `next_event` and
    `read_more` give the response as heads, body bytes, Trailers and END. Send failures raise what a broken
    stream raises (mesh.stream.STREAM_ERRORS); `read_more` raises UpstreamLost when the connection ended
    before any byte of the response, ProtocolError (code `upstream_reset` for a cut, `invalid_response` for
    bytes that are not HTTP) after."""

    __slots__ = (
        "_chunked",
        "_max_header_bytes",
        "_max_header_count",
        "_poller",
        "_received",
        "_response",
        "breaker",
        "endpoint",
        "fd",
        "next_event",
        "reader",
        "requests",
        "stream",
    )

    multiplexed = False  # an HTTP/2 stream (H2Exchange) is never pooled

    def __init__(
        self,
        stream: Stream,
        endpoint: Endpoint,
        breaker: CircuitBreaker,
        *,
        max_header_bytes: int = 65536,
        max_header_count: int = 100,
    ) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.breaker: CircuitBreaker | None = breaker  # None once closed, so a second close counts nothing
        self.fd = stream.socket.fileno()
        self.requests = 0
        self.reader: ResponseReader | None = None  # the response parser of the current request
        # The next response event already received (a head, body bytes, Trailers, END), or None: the current
        # reader's own method, so that the hot path makes one call per event.
        self.next_event: Callable[[], object | None] = _nothing
        self._response: ResponseReader | None = None  # kept across keep-alive requests (HEAD gets its own)
        self._max_header_bytes = max_header_bytes
        self._max_header_count = max_header_count
        self._chunked = False
        self._received = 0  # response bytes of the current request
        self._poller: Any = None  # select.poll for idle_and_open, made on first use

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.endpoint} fd={self.fd} requests={self.requests}>"

    def close(self) -> None:
        """Close at once, without a TLS or HTTP goodbye (the connection carries no request)."""
        self.stream.close()
        if self.breaker is not None:
            self.breaker.connection_closed()
            self.breaker = None

    def idle_and_open(self) -> bool:
        """False if the upstream closed the connection (or sent unsolicited bytes) while it sat idle."""
        # A poll object kept per connection: one poll(2) of one fd (0.7 µs here); select.select builds fd sets
        # as large as the highest fd on every call (1.9 µs at fd 1000).
        poller = self._poller
        try:
            if poller is None:
                poller = self._poller = select.poll()
                poller.register(self.fd, select.POLLIN)
            return not poller.poll(0)  # readable, hung up, in error or not a valid fd any more: not reusable
        except (OSError, ValueError):
            return False

    # -- the request ---------------------------------------------------------------------------------------
    async def send_request(
        self, head: RequestHead, headers: Headers, body: list[bytes], end: bool, trailers: Headers | None = None
    ) -> None:
        """Write the request head with `headers` (end-to-end ones; the framing is added here), the body pieces
        given, and the end of the body (with `trailers`) if `end`."""
        method = head.method
        if method == b"HEAD":
            # llhttp cannot be told that a response answers HEAD: such a response gets a reader of its own.
            self.reader = ResponseReader(
                request_method=method,
                max_header_bytes=self._max_header_bytes,
                max_header_count=self._max_header_count,
            )
        else:
            reader = self._response
            if reader is None:
                reader = self._response = ResponseReader(
                    request_method=method,
                    max_header_bytes=self._max_header_bytes,
                    max_header_count=self._max_header_count,
                )
            self.reader = reader
        self.next_event = self.reader.next_event  # type: ignore[union-attr]
        self._received = 0
        chunked = self._chunked = head.chunked
        if chunked:
            framing = b"transfer-encoding: chunked\r\n"
        elif head.content_length is not None:
            framing = b"content-length: %d\r\n" % head.content_length
        elif method in _EMPTY_BODY_METHODS:
            framing = b"content-length: 0\r\n"
        else:
            framing = b""
        if not head.authority:  # HTTP/1.0 without Host: this hop is HTTP/1.1, which requires one
            framing += b"host: %s\r\n" % str(self.endpoint).encode()
        if head.expect_continue:
            framing += b"expect: 100-continue\r\n"
        if head.upgrade is not None:
            framing += b"connection: upgrade\r\nupgrade: %s\r\n" % head.upgrade
        out = [b"%s %s HTTP/1.1\r\n%s%s\r\n" % (method, head.target, serialize_headers(headers), framing)]
        if chunked:
            out += [chunk_bytes(piece) for piece in body if piece]
            if end:
                out.append(last_chunk_bytes(trailers))
        else:
            out += body
        await self.stream.send_all(b"".join(out))

    async def send_body(self, data: bytes) -> None:
        """Write one more piece of the request body."""
        if data:
            await self.stream.send_all(chunk_bytes(data) if self._chunked else data)

    async def send_end(self, trailers: Headers | None = None) -> None:
        """End the request body: the last chunk and its trailers (a body with a Content-Length has ended when
        its length was sent, and cannot carry trailers in HTTP/1.1)."""
        if self._chunked:
            await self.stream.send_all(last_chunk_bytes(trailers))

    # -- the response --------------------------------------------------------------------------------------
    async def read_more(self) -> None:
        """Receive more of the response; see the class for what it raises."""
        reader = self.reader
        assert reader is not None, "read_more before send_request"
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except STREAM_ERRORS:
            data = b""
        if data:
            self._received += len(data)
            try:
                reader.feed(data)
            except ProtocolError as exc:
                raise ProtocolError(502, exc.reason, "invalid_response") from None
            return
        if not self._received:
            raise UpstreamLost("upstream closed the connection before responding")
        try:
            reader.feed_eof()
        except ProtocolError as exc:
            raise ProtocolError(502, exc.reason, "upstream_reset") from None

    @property
    def upgraded_data(self) -> bytes:
        """Bytes that followed a 101 response head (the first of the upgraded protocol)."""
        reader = self.reader
        return (reader.upgraded_data or b"") if reader is not None else b""
