"""Sans-io HTTP/2 connection layer: h2 behind a frame pre-scan that adds stream refusal, flood and abuse limits."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import GoAwayFrame

from mesh import hpackcache

Headers = list[tuple[bytes, bytes]]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAM_ID = 2**31 - 1
_DEFAULT_WINDOW = 65535

# Frame types and flags (RFC 9113 6).
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE = 0x0, 0x1, 0x3, 0x4, 0x5
_PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 0x6, 0x7, 0x8, 0x9
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_HEADER_FRAMES = (_HEADERS, _CONTINUATION)


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Per-connection HTTP/2 limits. Rates are counted over fixed windows of `window` seconds."""

    max_concurrent_streams: int = 100  # advertised; the excess stream alone gets REFUSED_STREAM
    initial_window_size: int = _DEFAULT_WINDOW  # per-stream receive window (e.g. 1 MiB on the mesh hop)
    connection_window_size: int = 16 * _DEFAULT_WINDOW  # whole-connection receive window: bounds buffered request bytes
    max_frame_size: int = 16384  # largest frame we accept; a longer frame header → GOAWAY FRAME_SIZE_ERROR
    max_header_list_size: int = 64 * 1024  # advertised; a request above it (or above max_header_count) gets a 431
    max_header_count: int = 100  # fields per header list (Envoy's default) → 431
    max_header_block_bytes: int = 128 * 1024  # compressed HEADERS+CONTINUATION payload → GOAWAY ENHANCE_YOUR_CALM
    max_continuation_frames: int = 32  # CONTINUATION frames after one HEADERS (nghttp2: 8) → GOAWAY ENHANCE_YOUR_CALM
    window: float = 10.0  # seconds over which every rate below is counted
    rapid_reset_floor: int = 200  # premature resets always allowed per window …
    rapid_reset_min_lifetime: float = 1.0  # … a reset is premature when its stream is younger than this (Envoy: 1 s)
    max_pings: int = 1000  # PINGs per window, plus one per DATA frame we sent (BDP estimators ping per data burst)
    max_settings: int = 100  # SETTINGS frames (non-ACK) per window
    max_window_updates: int = 1000  # WINDOW_UPDATEs per window, plus 10 per DATA frame we sent (Envoy's ratio)
    max_other_frames: int = 1000  # PRIORITY, GOAWAY and unknown frames per window, plus 100 per stream opened
    max_consecutive_empty_frames: int = 10  # DATA/HEADERS/CONTINUATION without payload or END_STREAM (Envoy: 1)
    max_unread_control_bytes: int = 16 * 1024  # bytes queued in reply to the peer while it does not read its socket

    def __post_init__(self) -> None:
        if not 1 <= self.max_concurrent_streams <= MAX_STREAM_ID:
            raise ValueError("max_concurrent_streams must be between 1 and 2**31-1")
        # A smaller window could be overrun legitimately by a peer that has not yet seen our SETTINGS.
        if not _DEFAULT_WINDOW <= self.initial_window_size <= MAX_STREAM_ID:
            raise ValueError("initial_window_size must be between 65535 and 2**31-1")
        if not _DEFAULT_WINDOW <= self.connection_window_size <= MAX_STREAM_ID:
            raise ValueError("connection_window_size must be between 65535 and 2**31-1")
        if not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("max_frame_size must be between 16384 and 16777215")
        if self.max_header_block_bytes < self.max_frame_size:
            raise ValueError("max_header_block_bytes must be at least max_frame_size")


# ----------------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request head (server side). `end_stream`: the request has no body (a StreamEnd follows)."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Response:
    """A validated final response head (client side). `end_stream`: no body follows (a StreamEnd follows)."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Informational:
    """A 1xx response head (client side); the final Response follows."""

    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class Data:
    """Body bytes. Hand `flow_controlled_length` to `acknowledge()` once the application has consumed `data`."""

    stream_id: int
    data: bytes
    flow_controlled_length: int
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Trailers:
    """Validated trailer fields; they end the stream (a StreamEnd follows)."""

    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The peer ended its side of the stream: emitted once, after the event that carried END_STREAM."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone. `remote`: the peer reset it (or a GOAWAY excluded it); else this session reset it."""

    stream_id: int
    error_code: int
    remote: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request the application never saw (server side), for logs and metrics. `cause` says why: "refused"
    (RST_STREAM REFUSED_STREAM: over the stream limit, or opened after our GOAWAY), "malformed" (RST_STREAM
    PROTOCOL_ERROR), "answered" (the session answered it itself with `status`, a 431), "client_reset" (the client
    reset it within the read that opened it; `error_code` is the client's) or "connection_lost" (the connection
    ended within that read; `error_code` 0). `headers`: the request head, for the last two."""

    stream_id: int
    error_code: int
    reason: str
    cause: str
    status: int = 0
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The send window grew for `stream_id`, or for every stream when `stream_id` is 0."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer sent GOAWAY: it processes no stream above `last_stream_id` (those were reset as REFUSED_STREAM)."""

    error_code: int
    last_stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The connection is finished: flush `data_to_send()` (it may hold a GOAWAY), then close the transport."""

    reason: str
    error_code: int | None = None


Event = (
    Request
    | Response
    | Informational
    | Data
    | Trailers
    | StreamEnd
    | StreamReset
    | RequestRejected
    | WindowOpened
    | GoAway
    | ConnectionLost
)


# ------------------------------------------------------------------------------------------------ header validation


class HeaderError(ValueError):
    """A header list that must not be forwarded; `too_large` marks a 431 (size or count) rather than malformed."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


# Connection-specific fields are forbidden in HTTP/2 (RFC 9113 8.2.2); `te` is allowed only as "trailers".
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # lower-case field names (RFC 9110 5.1, RFC 9113 8.2.1)
# Any control character but HTAB, or whitespace at either end (RFC 9113 8.2.1 names NUL, CR, LF and the whitespace;
# the other controls are rejected too so that no HTTP/1.1 parser downstream can read a value differently).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|\A[ \t]|[ \t]\Z")
_METHOD_CHARS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_SCHEME = re.compile(rb"[a-z][a-z0-9+.\-]*\Z")
_STATUS = re.compile(rb"[1-5][0-9][0-9]\Z")
_DIGITS = re.compile(rb"[0-9]+\Z")


def _split(headers: Headers, limits: H2Limits | None) -> tuple[dict[bytes, bytes], Headers]:
    """Check every field and separate the pseudo-header fields (each at most once, all first) from the rest."""
    if limits is not None:
        if len(headers) > limits.max_header_count:
            raise HeaderError(f"more than {limits.max_header_count} header fields", too_large=True)
        if sum(len(n) + len(v) + 32 for n, v in headers) > limits.max_header_list_size:
            raise HeaderError(f"header list larger than {limits.max_header_list_size} bytes", too_large=True)
    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                raise HeaderError(f"pseudo-header {name!r} after a regular field")
            if name in pseudo:
                raise HeaderError(f"duplicate pseudo-header {name!r}")
            pseudo[name] = value
        else:
            if not _TOKEN.match(name):
                raise HeaderError(f"invalid field name {name!r}")
            if name in CONNECTION_SPECIFIC:
                raise HeaderError(f"connection-specific field {name.decode()!r}")
            if name == b"te" and value != b"trailers":
                raise HeaderError("te other than 'trailers'")
            regular.append((name, value))
        if _BAD_VALUE.search(value):
            raise HeaderError(f"invalid characters or surrounding whitespace in the value of {name!r}")
    return pseudo, regular


def validate_request(headers: Headers, limits: H2Limits | None = None) -> None:
    """Raise HeaderError unless `headers` is a well-formed HTTP/2 request head (RFC 9113 8.2-8.3, 8.5)."""
    pseudo, regular = _split(headers, limits)
    unknown = pseudo.keys() - _REQUEST_PSEUDO
    if unknown:
        raise HeaderError(f"unknown pseudo-header {min(unknown)!r}")
    method = pseudo.get(b":method")
    if not method or not _METHOD_CHARS.match(method):
        raise HeaderError("missing or invalid :method")
    authority = pseudo.get(b":authority")
    if method == b"CONNECT":
        if b":scheme" in pseudo or b":path" in pseudo or not authority:
            raise HeaderError("CONNECT needs :authority and no :scheme or :path")
    else:
        scheme, path = pseudo.get(b":scheme"), pseudo.get(b":path")
        if not scheme or not _SCHEME.match(scheme):
            raise HeaderError("missing or invalid :scheme")
        if not path or not (path[:1] == b"/" or (path == b"*" and method == b"OPTIONS")):
            raise HeaderError("missing or invalid :path")
        if b" " in path or b"#" in path:
            raise HeaderError("invalid :path")
    hosts = [v for n, v in regular if n == b"host"]
    if len(hosts) > 1:
        raise HeaderError("more than one host field")
    if authority is not None:
        if not authority or b"@" in authority or b" " in authority:
            raise HeaderError("invalid :authority")
        if hosts and hosts[0] != authority:
            raise HeaderError(":authority and host differ")
    lengths = {v for n, v in regular if n == b"content-length"}
    if any(not _DIGITS.match(v) for v in lengths) or len({int(v) for v in lengths}) > 1:
        raise HeaderError("invalid or conflicting content-length")


def validate_response(headers: Headers) -> None:
    """Raise HeaderError unless `headers` is a well-formed HTTP/2 response head."""
    pseudo, _ = _split(headers, None)
    if pseudo.keys() != {b":status"} or not _STATUS.match(pseudo[b":status"]):
        raise HeaderError("a response needs exactly one valid :status and no other pseudo-header")


def validate_trailers(headers: Headers) -> None:
    """Raise HeaderError unless `headers` is a well-formed trailer section (no pseudo-header fields)."""
    pseudo, _ = _split(headers, None)
    if pseudo:
        raise HeaderError("pseudo-header in trailers")


_SECRET = frozenset({b"authorization", b"proxy-authorization"})
_WHITESPACE = (b" ", b"\t")


def outbound_headers(headers: Headers) -> Headers:
    """What we send: names lower-cased, connection-specific fields and `te` other than "trailers" dropped, values
    without surrounding whitespace, credentials and short cookies never indexed (h2's own normalisation rules,
    in one pass instead of h2's chain of generators). Pseudo-header fields are ours and already first."""
    out: Headers = []
    for name, value in headers:
        name = name.lower()
        if name in CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            continue
        if value[:1] in _WHITESPACE or value[-1:] in _WHITESPACE:
            value = value.strip(b" \t")
        if name in _SECRET or (name == b"cookie" and len(value) < 20):
            out.append(hpack.NeverIndexedHeaderTuple(name, value))
        else:
            out.append((name, value))
    return out


def to_http1_headers(headers: Headers, *, validated: bool = False) -> tuple[bytes, bytes, bytes, Headers, int | None]:
    """Translate an HTTP/2 request head into (method, target, authority, fields, content_length) for HTTP/1.1.

    The result is unambiguous by construction: it is validated again here, `fields` never holds a pseudo-header,
    Host, Content-Length, Transfer-Encoding or another connection-specific field (the HTTP/1.1 side writes Host from
    `authority` and chooses its own framing from `content_length`), and cookie crumbs are joined with "; "
    (RFC 9113 8.2.3). Raises HeaderError: malformed, no authority at all (HTTP/1.1 needs Host), or
    Content-Length values that differ (equal duplicates collapse to one). `validated`: the session's Request
    event already passed `validate_request`, which is not run twice.
    """
    if not validated:
        validate_request(headers)
    pseudo = {n: v for n, v in headers if n[:1] == b":"}
    method = pseudo[b":method"]
    host = next((v for n, v in headers if n == b"host"), None)
    authority = pseudo.get(b":authority", host)
    if not authority:
        raise HeaderError("no :authority or host")
    target = authority if method == b"CONNECT" else pseudo[b":path"]
    fields: Headers = []
    cookies: list[bytes] = []
    content_length: int | None = None
    for name, value in headers:
        if name[:1] == b":" or name in (b"host", b"te"):
            continue
        if name == b"content-length":
            content_length = int(value)
        elif name == b"cookie":
            cookies.append(value)
        else:
            fields.append((name, value))
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    return method, target, authority, fields, content_length


# --------------------------------------------------------------------------------------------------------- session


class _Stream:
    """What the session tracks for a stream the application knows about."""

    __slots__ = ("expected", "local_ended", "received", "remote_ended", "started")

    def __init__(self, started: float, expected: int | None) -> None:
        self.started = started
        self.expected = expected  # declared content-length of the inbound body, if any
        self.received = 0
        self.local_ended = False
        self.remote_ended = False


class _Fail(Exception):
    """Internal: stop reading and close the connection with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if _DIGITS.match(value) else None
    return None


def _goaway_frame(code: int, last_stream_id: int, reason: str) -> bytes:
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code, additional_data=reason.encode()).serialize()


class H2Session:
    """One HTTP/2 connection, either side: bytes in → events out; calls → bytes out. Never imports trio.

    `receive()` parses frame headers itself (keeping a partial frame, at most 9 + max_frame_size bytes) and hands h2
    one complete frame at a time, so every defence below acts before h2 buffers or processes more:

    - Excess streams (RFC 9113 5.1.2): a HEADERS opening stream number max_concurrent_streams+1 gets
      RST_STREAM(REFUSED_STREAM) for that stream only. h2 would raise TooManyStreamsError, a connection error, so h2
      is given a private copy of our settings whose MAX_CONCURRENT_STREAMS is 2**31-1 (the advertised value is
      `limits.max_concurrent_streams`); the HEADERS is still fed to h2, which keeps HPACK state and stream-id
      bookkeeping exact, and the new stream is then reset through h2, whose closed-by-reset handling refunds the
      connection window for any DATA still in flight on it.
    - Rapid reset (CVE-2023-44487), Envoy's rule: a reset is premature when the client resets a stream younger than
      `rapid_reset_min_lifetime` (1 s) or a stream we do not know, or when we refuse or reject a new stream (an
      error-eliciting request is the same attack). Within a window, premature resets above
      max(rapid_reset_floor, streams completed) → GOAWAY ENHANCE_YOUR_CALM; Envoy closes when over 50 % of at least
      500 streams were premature. A request that is opened and reset within one `receive()` call is dropped
      entirely: the application sees neither its Request nor its StreamReset, only a RequestRejected to count.
    - CONTINUATION flood (CVE-2024-27316, CVE-2023-45288): more than `max_continuation_frames` after a HEADERS, or
      more than `max_header_block_bytes` of block → GOAWAY ENHANCE_YOUR_CALM before h2 buffers them. A decoded
      header list above `max_header_list_size` or `max_header_count` is answered 431 (gRPC: 200 with grpc-status
      RESOURCE_EXHAUSTED) and an unfinished request body refused with RST_STREAM(NO_ERROR); above twice the size,
      HPACK decoding itself stops and h2 sends GOAWAY ENHANCE_YOUR_CALM.
    - PING flood (CVE-2019-9512), SETTINGS flood (CVE-2019-9515), PRIORITY and unknown frames (CVE-2019-9513),
      WINDOW_UPDATE floods: per-window rates (see H2Limits) → GOAWAY ENHANCE_YOUR_CALM.
    - Empty frames (CVE-2019-9518): more than `max_consecutive_empty_frames` DATA/HEADERS/CONTINUATION frames in a
      row without payload or END_STREAM → GOAWAY ENHANCE_YOUR_CALM.
    - Unread outbound queue (CVE-2019-9512, 9514, 9515): bytes queued in reply to the peer (PING/SETTINGS ACKs,
      RST_STREAMs) since the driver last took `data_to_send()` may not exceed `max_unread_control_bytes` (Envoy and
      nghttp2 allow about 1000 queued control frames): the session then drops its queue — the peer is not reading,
      so not even a GOAWAY would arrive — and reports ConnectionLost.
    - Malformed messages (RFC 9113 8.1.1, 8.2): h2's own inbound validation is off because h2 makes it a connection
      error; `validate_request/response/trailers` make each a stream error PROTOCOL_ERROR instead, and a body that
      disagrees with its content-length resets the stream before h2 (which would close the connection) sees it.
      Content-length values that conflict or are not digits are still connection errors: h2 checks them while
      decoding, before we see the headers.

    GOAWAY frames are read and written here, not by h2, because h2 closes the connection on either: a GOAWAY
    NO_ERROR lets the streams at or below its last stream id finish, in both directions. Graceful shutdown is
    Envoy's (nghttp2's shutdown notice): `start_graceful_shutdown()` sends GOAWAY(NO_ERROR, 2**31-1); after a
    delay covering one round trip the driver calls `goaway(NO_ERROR)`, which names the real last stream; streams
    opened after it are refused, and the driver closes once `open_streams` is 0 (or a drain deadline passes).
    """

    def __init__(self, client_side: bool, limits: H2Limits, clock: Callable[[], float]) -> None:
        self.client_side = client_side
        self.limits = limits
        self._clock = clock
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=False,  # ours, as stream errors
            normalize_inbound_headers=True,  # joins cookie crumbs
            validate_outbound_headers=False,  # outbound_headers(), cheaper, on every head we send
            normalize_outbound_headers=False,
        )
        self._conn = h2.connection.H2Connection(config)
        self._conn.encoder = hpackcache.Encoder()  # reuses indexed fields; per-request ids never indexed
        self._conn.decoder = hpackcache.Decoder()
        self._settings = {
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_window_size,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        }
        self._conn.local_settings = h2.settings.Settings(client=client_side, initial_values=self._settings)
        self._conn.max_inbound_frame_size = limits.max_frame_size
        # Above the advertised size we still decode and answer 431; only twice that stops HPACK (GOAWAY).
        self._conn.decoder.max_header_list_size = 2 * limits.max_header_list_size
        self._inbuf = bytearray()
        self._out = bytearray()
        self._preface_pending = not client_side
        self._streams: dict[int, _Stream] = {}
        self._closed = False
        self._goaway_sent_last: int | None = None  # last stream id of our final GOAWAY NO_ERROR
        self._goaway_received_last: int | None = None
        # header block in progress (HEADERS without END_HEADERS)
        self._block_stream = 0
        self._block_frames = 0
        self._block_bytes = 0
        self._empty_frames = 0
        self._unread_control = 0
        self._head_started: float | None = None  # when the unfinished header block began
        # per-window counters
        self._window_start = clock()
        self._pings = self._settings_frames = self._window_updates = self._other_frames = 0
        self._premature_resets = self._completed = self._data_frames_sent = self._streams_opened = 0

    def __repr__(self) -> str:
        side = "client" if self.client_side else "server"
        state = "closed" if self._closed else "open"
        return f"<H2Session {side} {state} streams={len(self._streams)} pending={len(self._out)}>"

    # ---------------------------------------------------------------------------------------------------- state

    @property
    def closed(self) -> bool:
        """The connection is finished (error, peer EOF or unread queue); only `data_to_send()` still matters."""
        return self._closed

    @property
    def open_streams(self) -> int:
        """Streams the application knows about that are not finished in both directions."""
        return len(self._streams)

    @property
    def outbound_pending(self) -> int:
        """Bytes queued for the peer that `data_to_send()` has not yet handed out."""
        return len(self._out)

    @property
    def inbound_buffered(self) -> int:
        """Bytes of inbound frames held here: a partial frame plus an unfinished header block."""
        return len(self._inbuf) + self._block_bytes

    @property
    def header_block_started(self) -> float | None:
        """When (the clock's time) the header block being received began, while one is unfinished: a HEADERS or
        CONTINUATION frame partly received, or a HEADERS without END_HEADERS. None otherwise. No other frame may
        come until it ends, so a driver bounds it with its request-head timeout."""
        return self._head_started

    @property
    def can_open_stream(self) -> bool:
        """Client side: a new request may be started now (connection up, no GOAWAY, below the peer's limit)."""
        return (
            not self._closed
            and self._goaway_received_last is None
            and len(self._streams) < self._conn.remote_settings.max_concurrent_streams
        )

    @property
    def stream_capacity(self) -> int:
        """Client side: how many more requests may be started now (0 after a GOAWAY or once closed)."""
        if self._closed or self._goaway_received_last is not None:
            return 0
        # Our own count: h2's open_outbound_streams walks every stream it knows on each call.
        return max(0, self._conn.remote_settings.max_concurrent_streams - len(self._streams))

    def window(self, stream_id: int) -> int:
        """How many body bytes `send_data` would take now on `stream_id` (stream and connection windows)."""
        if self._closed or stream_id not in self._streams:
            return 0
        return self._conn.local_flow_control_window(stream_id)

    def next_stream_id(self) -> int:
        """Client side: the id to pass to `send_headers` for the next request."""
        return self._conn.get_next_available_stream_id()

    # ------------------------------------------------------------------------------------------------- output

    def initiate(self) -> bytes:
        """Start the connection: the client preface (client side) and our SETTINGS, plus the connection window."""
        self._conn.initiate_connection()
        # h2 enforces MAX_CONCURRENT_STREAMS as a connection error; we enforce it per stream before h2 sees an
        # excess stream, so h2 keeps a private copy of the (already advertised) settings without that limit.
        private = dict(self._settings)
        private[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_STREAM_ID
        self._conn.local_settings = h2.settings.Settings(client=self.client_side, initial_values=private)
        if self.limits.connection_window_size > _DEFAULT_WINDOW:
            self._conn.increment_flow_control_window(self.limits.connection_window_size - _DEFAULT_WINDOW)
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        """Take every byte queued for the peer. Write them before producing more (one writer, no second queue)."""
        self._pull()
        data = bytes(self._out)
        self._out.clear()
        self._unread_control = 0
        return data

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """Send a request (client side: `stream_id` from `next_stream_id()`) or a response head.

        A response on a stream that is already gone (its StreamReset was reported) is ignored.
        """
        if self._closed:
            return
        if self.client_side and stream_id not in self._streams:
            if not self.can_open_stream:
                raise h2.exceptions.TooManyStreamsError("no new stream may be opened on this connection now")
            head = any(n == b":method" and v == b"HEAD" for n, v in headers)
            self._streams[stream_id] = _Stream(self._clock(), 0 if head else None)
        elif stream_id not in self._streams:
            return
        self._conn.send_headers(stream_id, outbound_headers(headers), end_stream=end_stream)
        if end_stream:
            self._local_end(stream_id)
        self._pull()

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        """Send as much of `data` as the flow-control windows allow and return how much that was.

        END_STREAM is sent only with the last byte, so call again with the rest (and `end_stream`) after a
        WindowOpened for this stream or for 0. A stream that is gone takes nothing (returns 0).
        """
        if self._closed or stream_id not in self._streams:
            return 0
        taken = min(len(data), self._conn.local_flow_control_window(stream_id))
        finish = end_stream and taken == len(data)
        if taken == 0 and finish:
            self._conn.end_stream(stream_id)
        step = self._conn.max_outbound_frame_size
        for offset in range(0, taken, step):
            chunk = data[offset : min(offset + step, taken)]
            self._conn.send_data(stream_id, chunk, end_stream=finish and offset + len(chunk) == taken)
            self._data_frames_sent += 1
        if finish:
            self._local_end(stream_id)
        self._pull()
        return taken

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        """Send trailer fields, ending the stream."""
        self.send_headers(stream_id, headers, end_stream=True)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort a stream (RST_STREAM). No StreamReset event follows for it."""
        if self._closed or self._streams.pop(stream_id, None) is None:
            return
        self._conn.reset_stream(stream_id, error_code)
        self._pull()

    def abandon(self, stream_id: int) -> None:
        """The application is done with `stream_id`. If the stream is still open, reset it: NO_ERROR when our side
        has ended (the rest of the request body is not wanted, RFC 9113 8.1), CANCEL when it has not (the peer
        must not wait for an answer that will not come)."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            self.reset(stream_id, ErrorCodes.NO_ERROR if stream.local_ended else ErrorCodes.CANCEL)

    def acknowledge(self, stream_id: int, length: int) -> None:
        """Return `length` bytes of receive window (a Data event's flow_controlled_length) once they are consumed.

        This is how a slow reader slows its sender end to end: until then the peer's window stays spent.
        """
        if self._closed or length <= 0:
            return
        try:
            self._conn.acknowledge_received_data(length, stream_id)
        except h2.exceptions.NoSuchStreamError:
            pass
        self._pull()

    def goaway(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY naming the last stream we accept.

        NO_ERROR keeps serving the streams at or below it (refusing newer ones) until the driver closes; any other
        code ends the connection now (`closed` becomes true; flush `data_to_send()` and close).
        """
        if self._closed:
            return
        last = self._conn.highest_inbound_stream_id
        if error_code == ErrorCodes.NO_ERROR:
            self._goaway_sent_last = last
            self._pull()
            self._out += _goaway_frame(error_code, last, reason)
        else:
            self._finish(error_code, reason)

    def start_graceful_shutdown(self) -> None:
        """Announce a drain: GOAWAY(NO_ERROR, 2**31-1). Call `goaway()` about one round trip later."""
        if not self._closed and self._goaway_sent_last is None:
            self._pull()
            self._out += _goaway_frame(ErrorCodes.NO_ERROR, MAX_STREAM_ID, "draining")

    # -------------------------------------------------------------------------------------------------- input

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes read from the transport (b"" at EOF) and return the events they caused. Never raises for
        anything the peer sends: protocol errors and abuse end in ConnectionLost (after queueing a GOAWAY)."""
        if self._closed:
            return []
        if not data:
            self._shut()
            self._out.clear()
            return [ConnectionLost("the peer closed the connection")]
        self._inbuf += data
        now = self._clock()
        if now - self._window_start >= self.limits.window:
            self._window_start = now
            self._pings = self._settings_frames = self._window_updates = self._other_frames = 0
            self._premature_resets = self._completed = self._data_frames_sent = self._streams_opened = 0
        events: list[Event] = []
        fresh: set[int] = set()  # requests delivered in this call
        dropped: dict[int, int | None] = {}  # … and reset by the peer in this call too: its code (None: cut)
        try:
            self._read_frames(now, events, fresh, dropped)
        except _Fail as fail:
            self._finish(fail.code, fail.reason)
            events.append(ConnectionLost(fail.reason, fail.code))
        except h2.exceptions.ProtocolError as exc:
            self._pull()  # h2 queued its own GOAWAY with the matching code; it accepts nothing more
            self._shut()
            events.append(ConnectionLost(f"protocol error: {exc}", int(exc.error_code)))
        except HyperframeError as exc:
            self._finish(ErrorCodes.PROTOCOL_ERROR, f"invalid frame: {exc}")
            events.append(ConnectionLost(f"invalid frame: {exc}", ErrorCodes.PROTOCOL_ERROR))
        if self._block_stream or (len(self._inbuf) >= 4 and self._inbuf[3] in _HEADER_FRAMES):
            if self._head_started is None:
                self._head_started = now
        else:
            self._head_started = None
        if self._closed:  # requests that arrived in the read that ended the connection could never be answered
            for stream_id in fresh:
                dropped.setdefault(stream_id, None)
        if dropped:
            events = self._drop(events, dropped)
        return events

    def _read_frames(self, now: float, events: list[Event], fresh: set[int], dropped: dict[int, int | None]) -> None:
        buf = self._inbuf
        pos = 0
        if self._preface_pending:
            if buf[: len(PREFACE)] != PREFACE[: len(buf)]:
                raise _Fail(ErrorCodes.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            if len(buf) < len(PREFACE):
                return
            self._conn.receive_data(PREFACE)
            self._preface_pending = False
            pos = len(PREFACE)
        try:
            while len(buf) - pos >= 9:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if length > self.limits.max_frame_size:
                    raise _Fail(ErrorCodes.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = pos + 9 + length
                if len(buf) < end:
                    break
                frame_type, flags = buf[pos + 3], buf[pos + 4]
                stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & MAX_STREAM_ID
                frame = bytes(buf[pos:end])
                pos = end
                self._frame(now, frame_type, flags, stream_id, frame, events, fresh, dropped)
                if self._closed:
                    return
        finally:
            del buf[:pos]

    def _frame(
        self,
        now: float,
        frame_type: int,
        flags: int,
        stream_id: int,
        frame: bytes,
        events: list[Event],
        fresh: set[int],
        dropped: dict[int, int | None],
    ) -> None:
        limits = self.limits
        length = len(frame) - 9
        if self._block_stream:
            if frame_type != _CONTINUATION or stream_id != self._block_stream:
                raise _Fail(ErrorCodes.PROTOCOL_ERROR, f"expected CONTINUATION on stream {self._block_stream}")
            self._block_frames += 1
            self._block_bytes += length
            if self._block_frames > limits.max_continuation_frames:
                raise _Fail(ErrorCodes.ENHANCE_YOUR_CALM, "CONTINUATION flood")
            if self._block_bytes > limits.max_header_block_bytes:
                raise _Fail(ErrorCodes.ENHANCE_YOUR_CALM, "header block too large")
            self._count_empty(length == 0)
            if flags & _END_HEADERS:
                self._block_stream = self._block_frames = self._block_bytes = 0
        elif frame_type == _DATA:
            padding = frame[9] + 1 if flags & _PADDED and length else 0
            size = length - padding
            self._count_empty(size <= 0 and not flags & _END_STREAM)
            self._check_body_length(stream_id, max(size, 0), bool(flags & _END_STREAM), events)
        elif frame_type == _HEADERS:
            self._count_empty(length == 0 and not flags & _END_STREAM)
            if not flags & _END_HEADERS:
                self._block_stream, self._block_frames, self._block_bytes = stream_id, 0, length
        elif frame_type == _RST_STREAM:
            if not self.client_side:
                stream = self._streams.get(stream_id)
                if stream is None or now - stream.started < limits.rapid_reset_min_lifetime:
                    self._premature_reset()
        elif frame_type == _SETTINGS:
            if not flags & _ACK:
                self._settings_frames += 1
                if self._settings_frames > limits.max_settings:
                    raise _Fail(ErrorCodes.ENHANCE_YOUR_CALM, "SETTINGS flood")
        elif frame_type == _PING:
            if not flags & _ACK:
                self._pings += 1
                if self._pings > limits.max_pings + self._data_frames_sent:
                    raise _Fail(ErrorCodes.ENHANCE_YOUR_CALM, "PING flood")
        elif frame_type == _WINDOW_UPDATE:
            self._window_updates += 1
            if self._window_updates > limits.max_window_updates + 10 * self._data_frames_sent:
                raise _Fail(ErrorCodes.ENHANCE_YOUR_CALM, "WINDOW_UPDATE flood")
        elif frame_type == _PUSH_PROMISE:  # never enabled; rejected here so no CONTINUATION can follow it
            raise _Fail(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE while push is disabled")
        elif frame_type != _CONTINUATION:  # h2 rejects a CONTINUATION outside a header block
            self._other_frames += 1
            if self._other_frames > limits.max_other_frames + 100 * self._streams_opened:
                raise _Fail(ErrorCodes.ENHANCE_YOUR_CALM, "control frame flood")
            if frame_type == _GOAWAY:
                self._receive_goaway(frame, events)
                return
        before = len(self._out)
        h2_events = self._conn.receive_data(frame)
        self._pull()
        for event in h2_events:
            self._translate(now, event, events, fresh, dropped)
        self._unread_control += len(self._out) - before
        if self._unread_control > limits.max_unread_control_bytes:
            self._out.clear()  # the peer is not reading: nothing queued would reach it
            self._shut()
            events.append(ConnectionLost("the peer does not read what it makes us send", ErrorCodes.ENHANCE_YOUR_CALM))

    def _count_empty(self, empty: bool) -> None:
        self._empty_frames = self._empty_frames + 1 if empty else 0
        if self._empty_frames > self.limits.max_consecutive_empty_frames:
            raise _Fail(ErrorCodes.ENHANCE_YOUR_CALM, "empty frame flood")

    def _premature_reset(self) -> None:
        self._premature_resets += 1
        if self._premature_resets > max(self.limits.rapid_reset_floor, self._completed):
            raise _Fail(ErrorCodes.ENHANCE_YOUR_CALM, "too many streams reset early (rapid reset)")

    def _check_body_length(self, stream_id: int, size: int, end: bool, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.expected is None:
            return
        stream.received += size
        if stream.received > stream.expected or (end and stream.received != stream.expected):
            self._reset_known(stream_id, ErrorCodes.PROTOCOL_ERROR, "body length differs from content-length", events)

    def _translate(
        self, now: float, event: object, events: list[Event], fresh: set[int], dropped: dict[int, int | None]
    ) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._new_request(now, event, events, fresh)
        elif isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            if event.stream_id not in self._streams:
                return
            headers = [(n, v) for n, v in event.headers]
            try:
                validate_response(headers)
            except HeaderError as exc:
                self._reset_known(event.stream_id, ErrorCodes.PROTOCOL_ERROR, f"malformed response: {exc}", events)
                return
            stream = self._streams[event.stream_id]
            if isinstance(event, h2.events.InformationalResponseReceived):
                events.append(Informational(event.stream_id, headers))
                return
            status = int(headers[0][1])  # validated: the only pseudo-header, and first
            if stream.expected is None and status not in (204, 304):
                stream.expected = _content_length(headers)
            elif status in (204, 304):
                stream.expected = None
            events.append(Response(event.stream_id, headers, event.stream_ended is not None))
        elif isinstance(event, h2.events.DataReceived):
            if event.stream_id in self._streams:
                ended = event.stream_ended is not None
                events.append(Data(event.stream_id, event.data, event.flow_controlled_length, ended))
            else:  # no application will acknowledge these bytes: give the window back now
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            if event.stream_id not in self._streams:
                return
            headers = [(n, v) for n, v in event.headers]
            stream = self._streams[event.stream_id]
            try:
                validate_trailers(headers)
                if stream.expected is not None and stream.received != stream.expected:
                    raise HeaderError("body length differs from content-length")
            except HeaderError as exc:
                self._reset_known(event.stream_id, ErrorCodes.PROTOCOL_ERROR, f"malformed trailers: {exc}", events)
                return
            events.append(Trailers(event.stream_id, headers))
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                return
            events.append(StreamEnd(event.stream_id))
            stream.remote_ended = True
            if stream.local_ended:
                self._complete(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            if self._streams.pop(event.stream_id, None) is None:
                return
            if event.stream_id in fresh:
                dropped[event.stream_id] = int(event.error_code)
            else:
                events.append(StreamReset(event.stream_id, int(event.error_code), True, "reset by the peer"))
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0 or event.stream_id in self._streams:
                events.append(WindowOpened(event.stream_id))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            change = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if change is not None and change.new_value > (change.original_value or 0):
                events.append(WindowOpened(0))
        # PING, SETTINGS ACK, PRIORITY and unknown frames need nothing from the application.

    def _new_request(self, now: float, event: h2.events.RequestReceived, events: list[Event], fresh: set[int]) -> None:
        stream_id = event.stream_id
        ended = event.stream_ended is not None
        self._streams_opened += 1
        if self._goaway_sent_last is not None and stream_id > self._goaway_sent_last:
            # The client may not have seen our GOAWAY yet: not abuse.
            self._refuse(stream_id, ErrorCodes.REFUSED_STREAM, "stream opened after GOAWAY", events, premature=False)
            return
        # Streams we refused or rejected are not among `_streams`.
        if len(self._streams) >= self.limits.max_concurrent_streams:  # the new stream is not among them yet
            self._refuse(stream_id, ErrorCodes.REFUSED_STREAM, "max concurrent streams exceeded", events)
            return
        headers = [(n, v) for n, v in event.headers]
        try:
            validate_request(headers, self.limits)
            expected = _content_length(headers)
            if ended and expected:
                raise HeaderError("content-length without a body")
        except HeaderError as exc:
            if exc.too_large:
                self._answer_431(stream_id, headers, ended, exc.reason, events)
            else:
                self._refuse(stream_id, ErrorCodes.PROTOCOL_ERROR, f"malformed request: {exc.reason}", events)
            return
        self._streams[stream_id] = _Stream(now, expected)
        fresh.add(stream_id)
        events.append(Request(stream_id, headers, ended))

    def _refuse(self, stream_id: int, code: int, reason: str, events: list[Event], premature: bool = True) -> None:
        self._conn.reset_stream(stream_id, code)
        cause = "refused" if code == ErrorCodes.REFUSED_STREAM else "malformed"
        events.append(RequestRejected(stream_id, int(code), reason, cause))
        if premature:
            self._premature_reset()

    def _answer_431(self, stream_id: int, headers: Headers, ended: bool, reason: str, events: list[Event]) -> None:
        grpc = any(n == b"content-type" and v.startswith(b"application/grpc") for n, v in headers)
        mesh_error = (b"x-mesh-error", reason.encode())
        if grpc:
            answer = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"8")]
            answer += [(b"grpc-message", reason.encode()), mesh_error]
        else:
            answer = [(b":status", b"431"), mesh_error]
        self._conn.send_headers(stream_id, answer, end_stream=True)
        if not ended:  # the response is complete; the request body is not wanted (RFC 9113 8.1)
            self._conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        events.append(RequestRejected(stream_id, ErrorCodes.NO_ERROR, reason, "answered", 431))
        self._premature_reset()

    def _reset_known(self, stream_id: int, code: int, reason: str, events: list[Event]) -> None:
        """Reset a stream the application knows about and tell it why."""
        if self._streams.pop(stream_id, None) is None:
            return
        self._conn.reset_stream(stream_id, code)
        events.append(StreamReset(stream_id, int(code), False, reason))

    def _receive_goaway(self, frame: bytes, events: list[Event]) -> None:
        if len(frame) < 9 + 8:
            raise _Fail(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY frame too short")
        if int.from_bytes(frame[5:9], "big") & MAX_STREAM_ID:
            raise _Fail(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")
        last = int.from_bytes(frame[9:13], "big") & MAX_STREAM_ID
        code = int.from_bytes(frame[13:17], "big")
        reason = frame[17:273].decode("utf-8", "replace")
        if self._goaway_received_last is not None:
            last = min(last, self._goaway_received_last)
        self._goaway_received_last = last
        events.append(GoAway(code, last, reason))
        if self.client_side:
            # Streams above `last` were never processed: report them refused, so that they may be retried.
            for stream_id in [s for s in self._streams if s > last]:
                del self._streams[stream_id]
                self._conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
                events.append(StreamReset(stream_id, ErrorCodes.REFUSED_STREAM, True, "above the peer's GOAWAY"))
            self._pull()

    def _drop(self, events: list[Event], dropped: dict[int, int | None]) -> list[Event]:
        """Replace requests opened and reset (or cut by the connection's end) within one `receive()` by a
        RequestRejected each; give back their window."""
        kept: list[Event] = []
        for event in events:
            if getattr(event, "stream_id", None) not in dropped:
                kept.append(event)
            elif isinstance(event, Request):
                code = dropped[event.stream_id]
                if code is None:
                    reason, cause, code = "connection lost", "connection_lost", 0
                else:
                    reason, cause = "reset by the client", "client_reset"
                kept.append(RequestRejected(event.stream_id, code, reason, cause, 0, event.headers))
            elif isinstance(event, Data) and not self._closed:
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._pull()
        return kept

    # ---------------------------------------------------------------------------------------------- internals

    def _local_end(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.local_ended = True
        if stream.remote_ended:
            self._complete(stream_id)

    def _complete(self, stream_id: int) -> None:
        del self._streams[stream_id]
        self._completed += 1

    def _pull(self) -> None:
        self._out += self._conn.data_to_send()

    def _finish(self, code: int, reason: str) -> None:
        """Close with GOAWAY(code) naming the last stream h2 processed; read nothing more."""
        self._pull()
        self._out += _goaway_frame(code, self._conn.highest_inbound_stream_id, reason)
        self._shut()

    def _shut(self) -> None:
        """Read nothing more; every stream is gone with the connection."""
        self._closed = True
        self._streams.clear()
        self._inbuf.clear()
        self._block_bytes = 0
