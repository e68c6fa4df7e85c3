"""HTTP/2 session: raw frames in, events and frames out — stream refusal, floods, validation, flow control, drain."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.http2 import (
    PREFACE,
    ConnectionLost,
    Data,
    GoAway,
    H2Limits,
    H2Session,
    HeaderError,
    Informational,
    Request,
    RequestRejected,
    Response,
    StreamEnd,
    StreamReset,
    Trailers,
    WindowOpened,
    outbound_headers,
    to_http1_headers,
    validate_request,
)

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"api")]
POST = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/up"), (b":authority", b"api")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def parse(data: bytes) -> list[Frame]:
    frames = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


class Peer:
    """A raw-frame client: hpack-encodes header blocks and serialises frames for the session under test."""

    def __init__(self) -> None:
        self.encoder = Encoder()

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(headers)

    def headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> bytes:
        """HEADERS (+ CONTINUATIONs when the block exceeds the default max frame size)."""
        block = self.block(headers)
        parts = [block[i : i + 16384] for i in range(0, len(block), 16384)]
        first = HeadersFrame(stream_id, data=parts[0], flags=["END_STREAM"] if end_stream else [])
        frames = [first] + [ContinuationFrame(stream_id, data=part) for part in parts[1:]]
        frames[-1].flags.add("END_HEADERS")
        return b"".join(f.serialize() for f in frames)


def body(stream_id: int, size: int) -> bytes:
    return b"".join(DataFrame(stream_id, data=b"z" * min(16384, size - i)).serialize() for i in range(0, size, 16384))


def start(limits: H2Limits | None = None, clock: Clock | None = None) -> tuple[H2Session, Peer]:
    session = H2Session(client_side=False, limits=limits or H2Limits(), clock=clock or Clock())
    session.initiate()
    assert session.receive(PREFACE + SettingsFrame(0).serialize()) == []
    session.data_to_send()
    return session, Peer()


def kinds(frames: list[Frame], kind: type[Frame]) -> list:
    return [f for f in frames if isinstance(f, kind)]


def only(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


# ------------------------------------------------------------------------------------------------ normal exchange


def h2_client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return client


def exchange(client: h2.connection.H2Connection, server: H2Session) -> tuple[list, list]:
    """Move bytes both ways until both sides are quiet; return (server events, client events)."""
    server_events, client_events = [], []
    while True:
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            return server_events, client_events
        if to_server:
            server_events += server.receive(to_server)
        if to_client:
            client_events += client.receive_data(to_client)


def test_request_and_response_with_body_trailers_and_flow_control() -> None:
    server = H2Session(client_side=False, limits=H2Limits(), clock=Clock())
    server.initiate()
    client = h2_client()
    client.send_headers(1, [*POST, (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    client.send_data(1, b"hello")
    client.send_headers(1, [(b"grpc-timeout", b"1S")], end_stream=True)
    events, _ = exchange(client, server)
    assert events == [
        Request(1, [*POST, (b"content-type", b"application/grpc"), (b"te", b"trailers")], False),
        Data(1, b"hello", 5, False),
        Trailers(1, [(b"grpc-timeout", b"1S")]),
        StreamEnd(1),
    ]
    assert server.open_streams == 1

    # The client's default window (65535) limits what send_data takes; the rest waits for WindowOpened.
    server.send_headers(1, [(b":status", b"200")])
    body = b"x" * 100_000
    assert server.window(1) == 65535
    taken = server.send_data(1, body, end_stream=True)
    assert taken == 65535 and server.window(1) == 0
    _, client_events = exchange(client, server)
    received = sum(len(e.data) for e in client_events if isinstance(e, h2.events.DataReceived))
    assert received == 65535 and not any(isinstance(e, h2.events.StreamEnded) for e in client_events)

    client.acknowledge_received_data(received, 1)
    events, _ = exchange(client, server)
    assert WindowOpened(1) in events and WindowOpened(0) in events
    assert server.send_data(1, body[taken:], end_stream=False) == len(body) - taken
    server.send_trailers(1, [(b"grpc-status", b"0")])
    _, client_events = exchange(client, server)
    assert isinstance(client_events[-1], h2.events.StreamEnded)
    assert server.open_streams == 0


def test_acknowledge_gives_window_back_only_when_consumed() -> None:
    server, peer = start(H2Limits(initial_window_size=65535, connection_window_size=65535))
    server.receive(peer.headers(1, POST))
    server.receive(body(1, 40_000))
    assert server.data_to_send() == b""  # nothing is given back before the application consumed the bytes
    server.acknowledge(1, 40_000)
    updates = kinds(parse(server.data_to_send()), WindowUpdateFrame)
    assert {(f.stream_id, f.window_increment) for f in updates} == {(0, 40_000), (1, 40_000)}


def test_initiate_advertises_limits_and_opens_the_connection_window() -> None:
    limits = H2Limits(initial_window_size=1 << 20, connection_window_size=4 << 20)
    frames = parse(H2Session(client_side=False, limits=limits, clock=Clock()).initiate())
    settings_frame = kinds(frames, SettingsFrame)[0]
    assert settings_frame.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 100
    assert settings_frame.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 1 << 20
    assert settings_frame.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == 64 * 1024
    assert kinds(frames, WindowUpdateFrame)[0].window_increment == (4 << 20) - 65535


# ---------------------------------------------------------------------------------------------- stream refusal


def test_the_101st_concurrent_stream_alone_is_refused() -> None:
    server, peer = start()
    events = server.receive(b"".join(peer.headers(2 * i + 1, POST) for i in range(101)))
    assert [e.stream_id for e in only(events, Request)] == [2 * i + 1 for i in range(100)]
    assert only(events, RequestRejected) == [
        RequestRejected(201, ErrorCodes.REFUSED_STREAM, "max concurrent streams exceeded", "refused")
    ]
    frames = parse(server.data_to_send())
    assert [(f.stream_id, f.error_code) for f in frames] == [(201, ErrorCodes.REFUSED_STREAM)]

    # Streams 1..199 stay usable and the connection stays up.
    assert server.receive(DataFrame(1, data=b"body", flags=["END_STREAM"]).serialize()) == [
        Data(1, b"body", 4, True),
        StreamEnd(1),
    ]
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    assert server.open_streams == 99
    assert [f.stream_id for f in parse(server.data_to_send())] == [1]
    # A finished stream makes room for a new one.
    assert only(server.receive(peer.headers(203, GET, end_stream=True)), Request)[0].stream_id == 203


def test_refused_stream_data_in_flight_does_not_stall_the_connection() -> None:
    limits = H2Limits(max_concurrent_streams=1, connection_window_size=65535)
    server, peer = start(limits)
    server.receive(peer.headers(1, POST) + peer.headers(3, POST))
    server.data_to_send()
    events = server.receive(body(3, 65535))
    assert events == []  # the refused stream's body never reaches the application …
    frames = parse(server.data_to_send())
    # … and its bytes are given back to the connection window (h2 returns them in halves of the window) …
    assert sum(f.window_increment for f in kinds(frames, WindowUpdateFrame) if f.stream_id == 0) >= 32768
    # … so the open stream can still send.
    assert sum(len(e.data) for e in server.receive(body(1, 30_000))) == 30_000


# ---------------------------------------------------------------------------------------------------- rapid reset


def pairs(peer: Peer, first: int, count: int) -> bytes:
    return b"".join(
        peer.headers(stream_id, GET, end_stream=True) + RstStreamFrame(stream_id, error_code=8).serialize()
        for stream_id in range(first, first + 2 * count, 2)
    )


def test_rapid_reset_in_one_read_reaches_no_application_and_ends_in_goaway() -> None:
    server, peer = start()
    events = server.receive(pairs(peer, 1, 10_000))
    # Every request opened and reset within one read is dropped: the application sees none of them, only what to
    # count: 200 client resets, then the request whose reset ended the connection.
    assert only(events, Request) == [] and only(events, StreamReset) == []
    rejected = only(events, RequestRejected)
    assert [r.cause for r in rejected] == ["client_reset"] * 200 + ["connection_lost"]
    assert rejected[0] == RequestRejected(1, 8, "reset by the client", "client_reset", 0, GET)
    assert events[-1] == ConnectionLost(events[-1].reason, ErrorCodes.ENHANCE_YOUR_CALM)
    goaway = kinds(parse(server.data_to_send()), GoAwayFrame)[0]
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    # h2 processed only the streams up to the budget (200 premature resets allowed, the 201st ends it).
    assert goaway.last_stream_id == 2 * 201 - 1
    assert server.closed and server.receive(pairs(peer, 403, 1)) == []


def test_rapid_reset_one_pair_per_read() -> None:
    """Exactly what is asserted: GOAWAY ENHANCE_YOUR_CALM comes at the 201st pair; before it, the application got
    200 Request events, each followed by its StreamReset in the next read, and never more than one open at once."""
    server, peer = start()
    requests = 0
    for n in range(10_000):
        events = server.receive(peer.headers(2 * n + 1, GET, end_stream=True))
        events += server.receive(RstStreamFrame(2 * n + 1, error_code=8).serialize())
        requests += len(only(events, Request))
        assert server.open_streams == 0
        if server.closed:
            break
    assert n == 200 and requests == 201
    assert events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_resets_of_older_streams_or_after_completed_ones_are_not_abuse() -> None:
    clock = Clock()
    server, peer = start(clock=clock)
    stream_id = 1
    for _ in range(300):  # 300 completed requests earn 300 premature resets in this window
        server.receive(peer.headers(stream_id, GET, end_stream=True))
        server.send_headers(stream_id, [(b":status", b"204")], end_stream=True)
        stream_id += 2
    server.receive(pairs(peer, stream_id, 300))
    stream_id += 600
    assert not server.closed
    # Streams reset after the premature lifetime (1 s) never count.
    server.receive(b"".join(peer.headers(stream_id + 2 * i, GET) for i in range(100)))
    clock.now += 1.5
    server.receive(b"".join(RstStreamFrame(stream_id + 2 * i, error_code=8).serialize() for i in range(100)))
    assert not server.closed
    # A new window starts from zero.
    clock.now += 10
    server.receive(pairs(peer, stream_id + 200, 200))
    assert not server.closed


# ------------------------------------------------------------------------------------------------------- floods


def test_ping_flood_from_a_client_that_never_reads_is_cut_with_bounded_memory() -> None:
    limits = H2Limits(max_pings=1_000_000)  # only the unread-queue bound applies here
    server, _ = start(limits)
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    sent = 0
    events: list = []
    while sent < 100_000 and not server.closed:
        events = server.receive(ping * 1000)
        sent += 1000
        assert server.outbound_pending <= limits.max_unread_control_bytes
    assert server.closed and sent < 100_000
    assert events[-1] == ConnectionLost(events[-1].reason, ErrorCodes.ENHANCE_YOUR_CALM)
    assert server.data_to_send() == b""  # nothing more is queued for a peer that does not read


def test_ping_flood_from_a_reading_client_ends_in_goaway() -> None:
    server, _ = start()
    acks = 0
    for _ in range(10):
        events = server.receive(PingFrame(0, opaque_data=b"12345678").serialize() * 101)
        frames = parse(server.data_to_send())
        acks += len(kinds(frames, PingFrame))
        if server.closed:
            break
    assert events == [ConnectionLost("PING flood", ErrorCodes.ENHANCE_YOUR_CALM)]
    assert acks == 1000 and kinds(frames, GoAwayFrame)[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    ("frame", "allowed", "reason"),
    [
        (SettingsFrame(0).serialize(), 99, "SETTINGS flood"),  # start() sent one already
        (PriorityFrame(1, depends_on=0, stream_weight=15).serialize(), 1000, "control frame flood"),
        (WindowUpdateFrame(0, window_increment=1).serialize(), 1000, "WINDOW_UPDATE flood"),
    ],
)
def test_control_frame_floods_end_in_goaway(frame: bytes, allowed: int, reason: str) -> None:
    server, _ = start()
    for _ in range(allowed):
        server.receive(frame)
        server.data_to_send()
    assert not server.closed
    assert server.receive(frame) == [ConnectionLost(reason, ErrorCodes.ENHANCE_YOUR_CALM)]
    assert kinds(parse(server.data_to_send()), GoAwayFrame)[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_empty_data_flood_ends_in_goaway_but_empty_end_stream_is_fine() -> None:
    server, peer = start()
    server.receive(peer.headers(1, POST))
    empty = DataFrame(1, data=b"").serialize()
    assert {e.data for e in server.receive(empty * 10)} == {b""} and not server.closed
    assert server.receive(empty) == [ConnectionLost("empty frame flood", ErrorCodes.ENHANCE_YOUR_CALM)]

    server, peer = start()
    for stream_id in range(1, 41, 2):
        server.receive(peer.headers(stream_id, POST) + DataFrame(stream_id, flags=["END_STREAM"]).serialize())
    assert not server.closed


def test_window_updates_are_allowed_in_proportion_to_data_sent() -> None:
    server, peer = start()
    server.receive(peer.headers(1, GET, end_stream=True))
    server.send_headers(1, [(b":status", b"200")])
    for _ in range(100):
        server.send_data(1, b"x")
    server.receive(WindowUpdateFrame(1, window_increment=1).serialize() * 1900)
    assert not server.closed


# ---------------------------------------------------------------------------------------------- header blocks


def test_continuation_flood_is_cut_before_h2_buffers_it() -> None:
    limits = H2Limits()
    server, peer = start(limits)
    block = peer.block(GET)
    flood = HeadersFrame(1, data=block[:1]).serialize()
    flood += b"".join(ContinuationFrame(1, data=b"\x00").serialize() for _ in range(10_000))
    events = server.receive(flood)
    assert events == [ConnectionLost("CONTINUATION flood", ErrorCodes.ENHANCE_YOUR_CALM)]
    assert server.inbound_buffered == 0
    assert kinds(parse(server.data_to_send()), GoAwayFrame)[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_continuation_bytes_are_bounded_frame_by_frame() -> None:
    limits = H2Limits()
    server, _ = start(limits)
    server.receive(HeadersFrame(1, data=b"\x00" * 16384).serialize())
    buffered = []
    for _ in range(20):
        server.receive(ContinuationFrame(1, data=b"\x00" * 16384).serialize()[:-1])  # all but one byte …
        buffered.append(server.inbound_buffered)
        events = server.receive(b"\x00")  # … then the rest of the frame
        if server.closed:
            break
    assert max(buffered) <= limits.max_header_block_bytes + 9 + limits.max_frame_size
    assert events == [ConnectionLost("header block too large", ErrorCodes.ENHANCE_YOUR_CALM)]


def test_a_header_block_split_over_continuations_is_fine() -> None:
    server, peer = start()
    block = peer.block([*GET, (b"x-big", b"v" * 3000)])
    frames = HeadersFrame(1, data=block[:1000], flags=["END_STREAM"]).serialize()
    frames += ContinuationFrame(1, data=block[1000:2000]).serialize()
    frames += ContinuationFrame(1, data=block[2000:], flags=["END_HEADERS"]).serialize()
    assert server.receive(frames) == [Request(1, [*GET, (b"x-big", b"v" * 3000)], True), StreamEnd(1)]


def test_an_unfinished_header_block_is_timed_from_its_first_bytes_until_it_ends() -> None:
    """`header_block_started` covers half a HEADERS frame and a block awaiting CONTINUATION, not body frames."""
    clock = Clock()
    server, peer = start(clock=clock)
    block = peer.block([*POST, (b"x-big", b"v" * 3000)])
    headers = HeadersFrame(1, data=block[:1000]).serialize()
    assert server.header_block_started is None
    server.receive(headers[:3])  # not even the frame type yet
    assert server.header_block_started is None
    clock.now += 1
    server.receive(headers[3:20])
    assert server.header_block_started == clock.now
    started = clock.now
    clock.now += 1
    server.receive(headers[20:])  # the whole HEADERS frame, without END_HEADERS
    clock.now += 1
    server.receive(ContinuationFrame(1, data=block[1000:2000]).serialize())
    assert server.header_block_started == started
    assert only(server.receive(ContinuationFrame(1, data=block[2000:], flags=["END_HEADERS"]).serialize()), Request)
    assert server.header_block_started is None
    server.receive(DataFrame(1, data=b"x" * 100).serialize()[:50])  # half a DATA frame: a body, not a head
    assert server.header_block_started is None


def test_an_interleaved_frame_inside_a_header_block_is_a_protocol_error() -> None:
    server, peer = start()
    events = server.receive(HeadersFrame(1, data=peer.block(GET)[:2]).serialize() + PingFrame(0).serialize())
    assert events[-1].error_code == ErrorCodes.PROTOCOL_ERROR


def test_oversize_header_list_is_answered_431_and_the_connection_stays_up() -> None:
    server, peer = start()
    big = [*POST, (b"x-big", b"v" * (64 * 1024))]
    events = server.receive(peer.headers(1, big))
    assert only(events, Request) == []
    [rejected] = only(events, RequestRejected)
    assert (rejected.cause, rejected.status) == ("answered", 431)
    assert rejected.reason == "header list larger than 65536 bytes"
    frames = parse(server.data_to_send())
    assert [type(f) for f in frames] == [HeadersFrame, RstStreamFrame]
    assert frames[1].error_code == ErrorCodes.NO_ERROR
    # gRPC-shaped for gRPC requests; too many fields is the same answer.
    many = [*POST, (b"content-type", b"application/grpc")] + [(b"x-%d" % i, b"1") for i in range(100)]
    events = server.receive(peer.headers(3, many, end_stream=True))
    assert "more than 100" in only(events, RequestRejected)[0].reason
    assert server.receive(peer.headers(5, GET, end_stream=True))[0] == Request(5, GET, True)


def test_a_header_list_beyond_twice_the_limit_stops_hpack_with_goaway() -> None:
    server, peer = start()
    headers = [*GET] + [(b"x-%d" % i, b"v" * 8000) for i in range(17)]  # ~136 KiB decoded
    block = peer.block(headers)
    frames = HeadersFrame(1, data=block[:16000]).serialize()
    for offset in range(16000, len(block), 16000):
        flags = ["END_HEADERS"] if offset + 16000 >= len(block) else []
        frames += ContinuationFrame(1, data=block[offset : offset + 16000], flags=flags).serialize()
    events = server.receive(frames)
    assert events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert kinds(parse(server.data_to_send()), GoAwayFrame)[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_frame_above_max_frame_size_is_refused_from_its_header() -> None:
    server, _ = start()
    header = (100_000).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
    assert server.receive(header) == [ConnectionLost("frame of 100000 bytes", ErrorCodes.FRAME_SIZE_ERROR)]
    assert server.inbound_buffered == 0


# ------------------------------------------------------------------------------------------------ validation

MALFORMED = {
    "no method": [(b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a")],
    "no scheme": [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")],
    "empty path": [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b""), (b":authority", b"a")],
    "relative path": [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"x"), (b":authority", b"a")],
    "duplicate method": [*GET, (b":method", b"POST")],
    "unknown pseudo": [*GET, (b":protocol", b"websocket")],
    "status in request": [*GET, (b":status", b"200")],
    "pseudo after regular": [(b":method", b"GET"), (b"accept", b"*/*"), (b":scheme", b"https"), (b":path", b"/")],
    "connection": [*GET, (b"connection", b"close")],
    "keep-alive": [*GET, (b"keep-alive", b"timeout=5")],
    "proxy-connection": [*GET, (b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [*POST, (b"transfer-encoding", b"chunked")],
    "upgrade": [*GET, (b"upgrade", b"websocket")],
    "te gzip": [*GET, (b"te", b"gzip")],
    "uppercase name": [*GET, (b"X-Foo", b"1")],
    "space in name": [*GET, (b"x foo", b"1")],
    "CRLF in value": [*GET, (b"x-foo", b"a\r\nx-injected: 1")],
    "LF in value": [*GET, (b"x-foo", b"a\nb")],
    "NUL in value": [*GET, (b"x-foo", b"a\x00b")],
    "leading space": [*GET, (b"x-foo", b" a")],
    "two hosts": [*GET, (b"host", b"api"), (b"host", b"other")],
    "host differs": [*GET, (b"host", b"other")],
    "userinfo": [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"u@api")],
    "connect with path": [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_requests_are_stream_errors(name: str) -> None:
    server, peer = start()
    events = server.receive(peer.headers(1, MALFORMED[name], end_stream=True))
    assert only(events, Request) == [] and only(events, StreamEnd) == []
    assert only(events, RequestRejected)[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert [(f.stream_id, f.error_code) for f in parse(server.data_to_send())] == [(1, ErrorCodes.PROTOCOL_ERROR)]
    assert server.receive(peer.headers(3, GET, end_stream=True))[0] == Request(3, GET, True)


def test_valid_request_shapes() -> None:
    validate_request([(b":method", b"CONNECT"), (b":authority", b"db:5432")])
    validate_request([(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*"), (b":authority", b"a")])
    validate_request([*GET, (b"te", b"trailers"), (b"host", b"api"), (b"x-empty", b"")])


def test_body_longer_or_shorter_than_content_length_resets_only_that_stream() -> None:
    server, peer = start()
    server.receive(peer.headers(1, [*POST, (b"content-length", b"3")]))
    events = server.receive(DataFrame(1, data=b"four").serialize())
    assert events == [StreamReset(1, ErrorCodes.PROTOCOL_ERROR, False, "body length differs from content-length")]
    server.receive(peer.headers(3, [*POST, (b"content-length", b"3")]))
    events = server.receive(DataFrame(3, data=b"ab", flags=["END_STREAM"]).serialize())
    assert events == [StreamReset(3, ErrorCodes.PROTOCOL_ERROR, False, "body length differs from content-length")]
    events = server.receive(peer.headers(5, [*POST, (b"content-length", b"3")], end_stream=True))
    assert only(events, RequestRejected)[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert not server.closed


def test_protocol_errors_become_goaway_and_connection_lost_never_exceptions() -> None:
    server = H2Session(client_side=False, limits=H2Limits(), clock=Clock())
    server.initiate()
    assert server.receive(b"GET / HTTP/1.1\r\n\r\n") == [
        ConnectionLost("not an HTTP/2 connection preface", ErrorCodes.PROTOCOL_ERROR)
    ]
    server, _ = start()
    events = server.receive(DataFrame(1, data=b"x").serialize())  # DATA on an idle stream
    assert isinstance(events[-1], ConnectionLost) and events[-1].error_code == ErrorCodes.PROTOCOL_ERROR
    assert kinds(parse(server.data_to_send()), GoAwayFrame)[0].error_code == ErrorCodes.PROTOCOL_ERROR


def test_eof_is_connection_lost() -> None:
    server, _ = start()
    assert server.receive(b"") == [ConnectionLost("the peer closed the connection")]
    assert server.closed


# ---------------------------------------------------------------------------------------------------- HTTP/1.1


def test_to_http1_headers() -> None:
    headers = [*POST, (b"content-length", b"5"), (b"cookie", b"a=1"), (b"te", b"trailers"), (b"cookie", b"b=2")]
    assert to_http1_headers([*headers, (b"content-length", b"5")]) == (
        b"POST",
        b"/up",
        b"api",
        [(b"cookie", b"a=1; b=2")],
        5,
    )
    no_authority = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]
    assert to_http1_headers([*no_authority, (b"host", b"h")])[2] == b"h"
    assert to_http1_headers([(b":method", b"CONNECT"), (b":authority", b"db:5432")])[:3] == (
        b"CONNECT",
        b"db:5432",
        b"db:5432",
    )
    for bad in (
        no_authority,
        [*POST, (b"content-length", b"5"), (b"content-length", b"6")],
        [*POST, (b"content-length", b"5, 5")],
        [*POST, (b"transfer-encoding", b"chunked")],
        [*GET, (b"x-a", b"1\r\nHost: evil")],
    ):
        with pytest.raises(HeaderError):
            to_http1_headers(bad)


# ------------------------------------------------------------------------------------------------------- GOAWAY


def test_graceful_shutdown_announces_then_names_the_last_stream() -> None:
    server, peer = start()
    server.receive(peer.headers(1, POST))
    server.start_graceful_shutdown()
    notice = parse(server.data_to_send())[0]
    assert (notice.error_code, notice.last_stream_id) == (ErrorCodes.NO_ERROR, 2**31 - 1)
    assert only(server.receive(peer.headers(3, POST)), Request)[0].stream_id == 3  # still accepted

    server.goaway(reason="draining")
    final = parse(server.data_to_send())[0]
    assert (final.error_code, final.last_stream_id) == (ErrorCodes.NO_ERROR, 3)
    events = server.receive(peer.headers(5, GET, end_stream=True))
    assert only(events, RequestRejected)[0].error_code == ErrorCodes.REFUSED_STREAM
    # Open streams finish normally.
    assert server.receive(DataFrame(1, data=b"x", flags=["END_STREAM"]).serialize()) == [
        Data(1, b"x", 1, True),
        StreamEnd(1),
    ]
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    assert server.open_streams == 1 and not server.closed


def test_client_side_goaway_refuses_streams_above_last_and_keeps_the_others() -> None:
    client = H2Session(client_side=True, limits=H2Limits(), clock=Clock())
    client.initiate()
    client.receive(SettingsFrame(0).serialize())
    for _ in range(3):
        client.send_headers(client.next_stream_id(), GET, end_stream=True)
    client.data_to_send()
    events = client.receive(GoAwayFrame(0, last_stream_id=3, error_code=0, additional_data=b"bye").serialize())
    assert events == [
        GoAway(0, 3, "bye"),
        StreamReset(5, ErrorCodes.REFUSED_STREAM, True, "above the peer's GOAWAY"),
    ]
    assert not client.can_open_stream
    server_encoder = Encoder()
    response = HeadersFrame(1, data=server_encoder.encode([(b":status", b"200")]), flags=["END_HEADERS"])
    events = client.receive(response.serialize() + DataFrame(1, data=b"ok", flags=["END_STREAM"]).serialize())
    assert events == [Response(1, [(b":status", b"200")], False), Data(1, b"ok", 2, True), StreamEnd(1)]


def test_client_side_rejects_a_malformed_response_as_a_stream_error() -> None:
    client = H2Session(client_side=True, limits=H2Limits(), clock=Clock())
    client.initiate()
    client.receive(SettingsFrame(0).serialize())
    client.send_headers(1, GET, end_stream=True)
    client.data_to_send()
    block = Encoder().encode([(b":status", b"200"), (b"transfer-encoding", b"chunked")])
    events = client.receive(HeadersFrame(1, data=block, flags=["END_HEADERS"]).serialize())
    assert events[0].stream_id == 1 and events[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert not events[0].remote and not client.closed


def test_a_request_reset_in_a_later_read_is_reported() -> None:
    server, peer = start()
    assert only(server.receive(peer.headers(1, POST)), Request)
    assert server.receive(RstStreamFrame(1, error_code=8).serialize()) == [StreamReset(1, 8, True, "reset by the peer")]
    assert server.send_data(1, b"late") == 0  # the stream is gone: sends are ignored


# ---------------------------------------------------------------------------------------------------- chunking


def valid_frames() -> list[bytes]:
    peer = Peer()
    first = peer.headers(1, [*POST, (b"content-length", b"6")])
    block = peer.block(GET)  # HPACK state: encoded in the order sent
    return [
        PREFACE,
        SettingsFrame(0).serialize(),
        first,
        DataFrame(1, data=b"abc").serialize(),
        PingFrame(0, opaque_data=b"p" * 8).serialize(),
        DataFrame(1, data=b"def", flags=["END_STREAM"]).serialize(),
        HeadersFrame(3, data=block[:3], flags=["END_STREAM"]).serialize(),
        ContinuationFrame(3, data=block[3:], flags=["END_HEADERS"]).serialize(),
        RstStreamFrame(3, error_code=8).serialize(),
    ]


def fresh_server() -> H2Session:
    session = H2Session(client_side=False, limits=H2Limits(), clock=Clock())
    session.initiate()
    return session


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), max_size=40))
def test_any_chunking_of_a_valid_stream_yields_the_same_events(cuts: list[int]) -> None:
    frames = valid_frames()
    one_by_one = fresh_server()
    expected = [event for frame in frames for event in one_by_one.receive(frame)]
    assert [type(e) for e in expected] == [Request, Data, Data, StreamEnd, Request, StreamEnd, StreamReset]

    data = b"".join(frames)
    session = fresh_server()
    events: list = []
    offset = 0
    for cut in [*cuts, len(data)]:
        events += session.receive(data[offset : offset + cut])
        offset += cut
        if offset >= len(data):
            break
    # A request whose HEADERS and RST_STREAM arrive in one read is dropped whole, leaving only a RequestRejected to
    # count; otherwise nothing differs.
    if Request(3, GET, True) not in events:
        expected = [e for e in expected if getattr(e, "stream_id", None) != 3]
        expected.append(RequestRejected(3, 8, "reset by the client", "client_reset", 0, GET))
    assert events == expected


# ---------------------------------------------------------------------------------------------------- client side


def client_session() -> H2Session:
    client = H2Session(client_side=True, limits=H2Limits(), clock=Clock())
    client.initiate()
    client.receive(SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 2}).serialize())
    client.data_to_send()
    return client


def test_client_respects_the_peers_stream_limit_and_sees_informational_responses() -> None:
    client = client_session()
    client.send_headers(client.next_stream_id(), POST)
    client.send_headers(client.next_stream_id(), GET, end_stream=True)
    assert not client.can_open_stream
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_headers(client.next_stream_id(), GET, end_stream=True)
    encoder = Encoder()
    block = encoder.encode([(b":status", b"100")])
    events = client.receive(HeadersFrame(1, data=block, flags=["END_HEADERS"]).serialize())
    assert events == [Informational(1, [(b":status", b"100")])]
    block = encoder.encode([(b":status", b"204")])
    events = client.receive(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert events == [Response(1, [(b":status", b"204")], True), StreamEnd(1)]
    client.send_data(1, b"", end_stream=True)
    assert client.open_streams == 1 and client.can_open_stream


def test_a_larger_initial_window_from_the_peer_opens_every_stream() -> None:
    client = client_session()
    client.send_headers(1, POST)
    events = client.receive(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20}).serialize())
    assert events == [WindowOpened(0)]


def test_goaway_with_an_error_closes_at_once() -> None:
    server, peer = start()
    server.receive(peer.headers(1, POST))
    server.goaway(ErrorCodes.INTERNAL_ERROR, "shutting down")
    goaway = parse(server.data_to_send())[-1]
    assert (goaway.error_code, goaway.last_stream_id, goaway.additional_data) == (2, 1, b"shutting down")
    assert server.closed and server.open_streams == 0 and server.send_data(1, b"x") == 0


def test_a_dropped_request_gives_its_body_window_back() -> None:
    server, peer = start(H2Limits(connection_window_size=65535))
    frames = peer.headers(1, POST) + body(1, 40_000) + RstStreamFrame(1, error_code=8).serialize()
    assert server.receive(frames) == [RequestRejected(1, 8, "reset by the client", "client_reset", 0, POST)]
    increments = [f.window_increment for f in kinds(parse(server.data_to_send()), WindowUpdateFrame)]
    assert sum(increments) >= 32768


def test_outbound_headers_follow_h2s_normalisation_in_one_pass() -> None:
    sent = outbound_headers(
        [
            (b":status", b"200"),
            (b"Content-Type", b" text/plain\t"),
            (b"Connection", b"close"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"te", b"gzip"),
            (b"te", b"trailers"),
            (b"authorization", b"Bearer abc"),
            (b"cookie", b"a=1"),
            (b"cookie", b"session=" + b"x" * 30),
        ]
    )
    assert sent == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"te", b"trailers"),
        (b"authorization", b"Bearer abc"),
        (b"cookie", b"a=1"),
        (b"cookie", b"session=" + b"x" * 30),
    ]
    never = [type(h) is hpack.NeverIndexedHeaderTuple for h in sent]
    assert never == [False, False, False, True, True, False]  # credentials and short cookies stay out of HPACK
