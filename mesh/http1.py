"""Sans-io HTTP/1.1 codec: httptools (llhttp) parsing, the mesh's own framing and smuggling checks, serialisation."""

from __future__ import annotations

from collections import deque
from http import HTTPStatus

import httptools

from mesh.message import END, RequestHead, ResponseHead, Trailers

# Hop-by-hop headers (RFC 9110 7.6.1) plus the framing headers we always recompute ourselves.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
MESH_PREFIX = b"x-mesh-"
# Upgrade protocols tunnelled after a 101 unless a listener says otherwise (DESIGN rule 6).
DEFAULT_UPGRADES = frozenset({b"websocket"})
# Connection tokens that only steer this hop and never name another header to strip.
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
# Response statuses that never carry a body, whatever their framing headers say.
_BODYLESS_STATUS = frozenset({204, 304})


# The reason code (mesh.errors.REASON_CODES) of a refused message, by the status it is answered with.
_CODE_BY_STATUS = {
    400: "bad_request",
    405: "method_not_allowed",
    408: "header_timeout",
    413: "body_too_large",
    503: "draining",
    417: "unsupported_expect",
    431: "headers_too_large",
    501: "not_implemented",
    502: "invalid_response",
    505: "version_not_supported",
}


class ProtocolError(Exception):
    """A message that must not be forwarded: answer `status` with `reason` (requests) and close the connection.
    `code` is the reason code for metrics (mesh.errors.REASON_CODES), by default the one of `status`."""

    def __init__(self, status: int, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code or _CODE_BY_STATUS.get(status, "bad_request")


class Http2Preface(ProtocolError):
    """The client opened with the HTTP/2 connection preface (prior knowledge) on an HTTP/1.1 listener."""


_NO_TOKENS: frozenset[bytes] = frozenset()


def _split_headers(
    raw: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], dict[bytes, list[bytes]], frozenset[bytes]]:
    """Split raw (name, value) pairs into end-to-end headers, x-mesh-* headers, the framing headers we read,
    and the lower-cased `Connection` tokens."""
    end_to_end: list[tuple[bytes, bytes]] = []
    mesh: list[tuple[bytes, bytes]] = []
    framing: dict[bytes, list[bytes]] = {}
    for name, value in raw:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == b"host" or lname == b"expect":
            framing.setdefault(lname, []).append(value)
            if lname == b"host":
                end_to_end.append((lname, value))
        elif lname.startswith(MESH_PREFIX):
            mesh.append((lname, value))
        else:
            end_to_end.append((lname, value))
    connection = framing.get(b"connection")
    if not connection:
        return end_to_end, mesh, framing, _NO_TOKENS
    if len(connection) == 1 and (token := connection[0].lower()) in _CONNECTION_OPTIONS:
        return end_to_end, mesh, framing, frozenset((token,))  # the usual case: nothing more to strip
    tokens = frozenset(t.strip().lower() for v in connection for t in v.split(b","))
    named = tokens - _CONNECTION_OPTIONS - {b""}
    if named:
        end_to_end = [(n, v) for n, v in end_to_end if n not in named or n == b"host"]
    return end_to_end, mesh, framing, tokens


def _content_length(values: list[bytes] | None, *, status: int) -> int | None:
    if values is None:
        return None
    if len(values) != 1:
        raise ProtocolError(status, "duplicate Content-Length")
    value = values[0]
    if not value.isdigit() or len(value) > 18:
        raise ProtocolError(status, "malformed Content-Length")
    return int(value)


def _transfer_chunked(values: list[bytes] | None, *, status: int) -> bool:
    """True for exactly `Transfer-Encoding: chunked`; anything else is refused."""
    if values is None:
        return False
    if len(values) != 1 or values[0].strip().lower() != b"chunked":
        raise ProtocolError(status, "unsupported Transfer-Encoding (only 'chunked' is accepted)")
    return True


class _Reader:
    """Shared httptools callback plumbing: collects events into a queue, enforces header limits."""

    __slots__ = (
        "_body_limit",
        "_body_seen",
        "_error_status",
        "_feeding",
        "_head_fed",
        "_max_header_bytes",
        "_max_header_count",
        "_parser",
        "_raw_headers",
        "_resume",
        "_url",
        "events",
        "in_head",
        "upgraded_data",
    )

    def __init__(self, max_header_bytes: int, max_header_count: int, error_status: int) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_header_count = max_header_count
        self._error_status = error_status
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._url = b""
        self.in_head = False
        self._feeding = 0
        self._head_fed = 0
        self._body_limit: int | None = None
        self._body_seen = 0
        self.events: deque[object] = deque()
        self.upgraded_data: bytes | None = None
        self._resume: bytes | None = None  # see RequestReader: a declined upgrade's body framing

    # -- httptools callbacks -------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._raw_headers = []
        self._url = b""
        self.in_head = True
        self._head_fed = 0
        self._body_seen = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._raw_headers
        headers.append((name, value))
        if len(headers) > self._max_header_count:
            raise ProtocolError(431 if self._error_status == 400 else 502, "too many header fields")

    def _check_head_size(self) -> None:
        """Called when a head is complete; only a head that arrived in many bytes needs adding up."""
        if self._head_fed + self._feeding > self._max_header_bytes:
            size = len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._raw_headers)
            if size > self._max_header_bytes:
                raise ProtocolError(431 if self._error_status == 400 else 502, "header block too large")

    def on_body(self, body: bytes) -> None:
        if self._body_limit is not None:
            self._body_seen += len(body)
            if self._body_seen > self._body_limit:
                raise ProtocolError(413, "request body too large")
        self.events.append(body)

    def on_message_complete(self) -> None:
        if self._raw_headers and not self.in_head:
            self.events.append(Trailers(_split_headers(self._raw_headers)[0]))
        self.events.append(END)

    # -- feeding -------------------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._feeding = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProtocolError):
                raise cause from None
            raise
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if self._resume is None:
                self.upgraded_data = rest
            else:  # an upgrade the request reader declined: what follows is still HTTP/1.1 (see RequestReader)
                self._continue(rest)
                return
        except httptools.HttpParserError as exc:
            message = str(exc)
            if self._error_status == 400:
                if "Pause on PRI" in message:  # llhttp stops at the HTTP/2 preface
                    raise Http2Preface(
                        505, "HTTP/2 preface on a TLS connection that agreed on http/1.1: offer h2 in ALPN"
                    ) from None
                if "Invalid `Transfer-Encoding`" in message:
                    raise ProtocolError(501, "unsupported Transfer-Encoding (only 'chunked' is accepted)") from None
                if "can't be present with" in message:  # llhttp's own CL+TE check comes before ours
                    raise ProtocolError(400, "both Content-Length and Transfer-Encoding") from None
            raise ProtocolError(self._error_status, f"malformed HTTP/1.1: {message}") from None
        if self.in_head:
            # llhttp buffers a header it has not finished yet; a head that never ends is refused here.
            self._head_fed += len(data)
            if self._head_fed > self._max_header_bytes * 2:
                raise ProtocolError(431 if self._error_status == 400 else 502, "header block too large")

    def next_event(self) -> object | None:
        """The next parsed event (a head, body `bytes`, Trailers, END), or None when more data is needed."""
        events = self.events
        return events.popleft() if events else None

    def _continue(self, rest: bytes) -> None:
        """Go on parsing after llhttp stopped at an upgrade nobody takes: a new parser, first fed a made-up head
        with the declined request's body framing (its events are dropped) so that its body is parsed as a body,
        then `rest`."""
        framing, self._resume = self._resume, None
        self._parser = httptools.HttpRequestParser(self)
        if framing:
            events = self.events
            if events and events[-1] is END:
                events.pop()  # llhttp ended the request at its head; its body follows
            before = len(events)
            self._feed(framing)
            del events[before]  # the made-up head; its body and END follow as the declined request's own
        if rest:
            self._feed(rest)


class RequestReader(_Reader):
    """Parses a stream of requests from one downstream connection and validates each head.

    Raises ProtocolError from `feed` for anything that must not be forwarded; the caller answers
    `exc.status` and closes the connection, because the stream can no longer be framed safely.

    Upgrades (DESIGN rule 6): a request is an upgrade (`RequestHead.upgrade`) only when it names exactly one
    protocol of `upgrades` (compared without case and version), has no body, and is HTTP/1.1 with `Connection:
    upgrade`. Any other `Upgrade` (`h2c` above all) is dropped with the other hop-by-hop headers and the request
    is an ordinary one: llhttp, which stops parsing at any upgrade, is made to go on (`_continue`). When an upgrade
    was forwarded and the upstream declined it (no 101), `resume()` does the same, so that the connection
    carries its next request."""

    __slots__ = ("_upgrades",)

    def __init__(
        self,
        *,
        max_header_bytes: int = 65536,
        max_header_count: int = 100,
        max_body_bytes: int | None = None,
        upgrades: frozenset[bytes] = DEFAULT_UPGRADES,
    ) -> None:
        super().__init__(max_header_bytes, max_header_count, 400)
        self._body_limit = max_body_bytes
        self._upgrades = upgrades
        self._parser = httptools.HttpRequestParser(self)

    def resume(self) -> bytes:
        """The upgrade of the last request was declined (the upstream did not answer 101): parse HTTP/1.1 requests
        again from here. Returns the bytes that followed the request, for the caller to feed again."""
        rest = self.upgraded_data or b""
        self.upgraded_data = None
        self._parser = httptools.HttpRequestParser(self)
        return rest

    def feed(self, data: bytes) -> None:
        self._feed(data)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._check_head_size()
        parser = self._parser
        version = parser.get_http_version()
        http10 = version == "1.0"
        if not http10 and version != "1.1":
            raise ProtocolError(505, f"HTTP version {version} is not supported")
        method = parser.get_method()
        if method == b"CONNECT":
            raise ProtocolError(405, "CONNECT is not supported")
        headers, mesh, framing, tokens = _split_headers(self._raw_headers)
        self._raw_headers = []  # what arrives from now on are trailers
        hosts = framing.get(b"host")
        if hosts is None:
            if not http10:
                raise ProtocolError(400, "missing Host header")
            authority = b""
        elif len(hosts) > 1:
            raise ProtocolError(400, "duplicate Host header")
        else:
            authority = hosts[0]
        content_length = _content_length(framing.get(b"content-length"), status=400)
        te = framing.get(b"transfer-encoding")
        if te is not None:
            if content_length is not None:
                raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
            if http10:
                raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if len(te) != 1 or te[0].strip().lower() != b"chunked":
                raise ProtocolError(501, "unsupported Transfer-Encoding (only 'chunked' is accepted)")
        chunked = te is not None
        if content_length is not None and self._body_limit is not None and content_length > self._body_limit:
            raise ProtocolError(413, "request body too large")
        keep_alive = (b"keep-alive" in tokens) if http10 else (b"close" not in tokens)
        expect = framing.get(b"expect")
        expect_continue = False
        if expect is not None:
            if len(expect) != 1 or expect[0].strip().lower() != b"100-continue":
                raise ProtocolError(417, "unsupported Expect")
            expect_continue = not http10
        upgrade = None
        upgrades = framing.get(b"upgrade")
        if upgrades and b"upgrade" in tokens:
            offered = [t.strip() for v in upgrades for t in v.split(b",") if t.strip()]
            name = offered[0].split(b"/", 1)[0].lower() if len(offered) == 1 else b""
            if name in self._upgrades and not chunked and not content_length and not http10:
                upgrade = offered[0]
            elif chunked:  # declined here: llhttp will still stop at the head, and must be made to go on
                self._resume = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            elif content_length:
                self._resume = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % content_length
            else:
                self._resume = b""
        self.events.append(
            RequestHead(
                method=method,
                target=self._url,
                http10=http10,
                headers=headers,
                mesh_headers=mesh,
                keep_alive=keep_alive,
                has_body=chunked or bool(content_length),
                chunked=chunked,
                content_length=content_length,
                expect_continue=expect_continue,
                upgrade=upgrade,
                authority=authority,
            )
        )


class ResponseReader(_Reader):
    """Parses the response(s) to one request from an upstream connection (1xx heads, then the final response).

    A new reader is made per request because llhttp cannot be told that a response answers HEAD
    (MagicStack/httptools#47): for HEAD only the head is fed, and the body framing is decided here."""

    __slots__ = ("_head_buffer", "_head_only", "_informational", "_until_close_open")

    def __init__(self, *, request_method: bytes, max_header_bytes: int = 65536, max_header_count: int = 100) -> None:
        super().__init__(max_header_bytes, max_header_count, 502)
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = request_method == b"HEAD"
        self._head_buffer = b""
        self._until_close_open = False
        self._informational = False

    def feed(self, data: bytes) -> None:
        if not self._head_only:
            self._feed(data)
            return
        # HEAD: feed heads only, up to and including the blank line of the final (non-1xx) head.
        buffer = self._head_buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > self._max_header_bytes:
                    raise ProtocolError(502, "header block too large")
                self._head_buffer = buffer
                return
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            before = len(self.events)
            self._feed(head)
            last = self.events[-1] if len(self.events) > before else None
            if isinstance(last, ResponseHead) and not last.informational:
                if buffer:
                    raise ProtocolError(502, "unexpected bytes after a response to HEAD")
                self.events.append(END)
                self._head_only = False
                self._head_buffer = b""
                self._parser = None  # nothing may follow on this reader
                return

    def feed_eof(self) -> None:
        """The upstream closed the connection: completes a close-delimited body, else the response is truncated."""
        if not self._until_close_open:
            raise ProtocolError(502, "upstream closed the connection mid-response")
        self._until_close_open = False
        self.events.append(END)

    def on_status(self, status: bytes) -> None:
        self._url += status

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._check_head_size()
        parser = self._parser
        status = parser.get_status_code()
        headers, mesh, framing, tokens = _split_headers(self._raw_headers)
        self._raw_headers = []  # what arrives from now on are trailers
        # x-mesh-* on a response travel back to the caller: they carry the far side's mesh errors.
        headers += mesh
        informational = 100 <= status < 200 and status != 101
        self._informational = informational
        upgrade = status == 101
        content_length = _content_length(framing.get(b"content-length"), status=502)
        chunked = _transfer_chunked(framing.get(b"transfer-encoding"), status=502)
        if chunked and content_length is not None:
            raise ProtocolError(502, "both Content-Length and Transfer-Encoding in a response")
        version = parser.get_http_version()
        keep_alive = (b"keep-alive" in tokens) if version == "1.0" else (b"close" not in tokens)
        if self._head_only or informational or upgrade or status in _BODYLESS_STATUS:
            has_body = False
            until_close = False
        else:
            until_close = not chunked and content_length is None
            has_body = chunked or until_close or bool(content_length)
        if until_close:
            keep_alive = False
            self._until_close_open = True
        if upgrade and framing.get(b"upgrade"):
            headers.append((b"connection", b"upgrade"))
            headers.append((b"upgrade", framing[b"upgrade"][0]))
        if self._head_only and content_length is not None:
            # A HEAD response's Content-Length describes the body a GET would get: pass it on as is.
            headers.append((b"content-length", framing[b"content-length"][0]))
        elif status == 304 and content_length is not None:
            headers.append((b"content-length", framing[b"content-length"][0]))
        self.events.append(
            ResponseHead(
                status=status,
                reason=self._url,
                headers=headers,
                keep_alive=keep_alive,
                chunked=chunked,
                content_length=None if self._head_only or status == 304 else content_length,
                until_close=until_close,
                has_body=has_body,
                informational=informational,
                upgrade=upgrade,
            )
        )
        self._url = b""

    def on_message_complete(self) -> None:
        self._until_close_open = False
        if self._informational:
            self._informational = False  # a 1xx is followed by the final response on the same reader
            return
        super().on_message_complete()


# -- serialisation ---------------------------------------------------------------------------------------------


def serialize_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Header lines, each `name: value\\r\\n`, from already validated pairs (parsed input is CR/LF/NUL-free)."""
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])


def request_head_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, serialize_headers(headers))


def response_head_bytes(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, serialize_headers(headers))


def chunk_bytes(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk_bytes(trailers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + serialize_headers(trailers) + b"\r\n"


def simple_response(
    status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, *, close: bool = False
) -> bytes:
    """A complete response with a Content-Length body, used for responses the mesh makes itself."""
    all_headers = list(headers or ())
    all_headers.append((b"content-length", b"%d" % len(body)))
    if close:
        all_headers.append((b"connection", b"close"))
    return response_head_bytes(status, REASONS.get(status, "").encode("latin-1"), all_headers) + body


# Reason phrases of the responses the mesh makes itself (any status a route's direct response or redirect may use).
# RFC 9110's names where they differ from Python's older ones (413, 422).
REASONS = {status.value: status.phrase for status in HTTPStatus}
REASONS |= {413: "Content Too Large", 422: "Unprocessable Content"}
