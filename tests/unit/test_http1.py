"""The HTTP/1.1 codec: parsing, smuggling checks, limits, response framing and serialisation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import http1
from mesh.http1 import (
    END,
    Http2Preface,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    Trailers,
)


def parse_request(data: bytes, **limits: int) -> list[object]:
    reader = RequestReader(**limits)
    reader.feed(data)
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


def parse_response(data: bytes, method: bytes = b"GET", eof: bool = False) -> list[object]:
    reader = ResponseReader(request_method=method)
    reader.feed(data)
    if eof:
        reader.feed_eof()
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


def test_simple_get() -> None:
    head, end = parse_request(b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\n\r\n")
    assert isinstance(head, RequestHead)
    assert head.method == b"GET" and head.target == b"/a?b=1" and head.authority == b"svc"
    assert head.headers == [(b"host", b"svc"), (b"accept", b"*/*")]
    assert head.keep_alive and not head.has_body and end is END


def test_hop_by_hop_and_connection_named_headers_are_stripped() -> None:
    (head, _) = parse_request(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nProxy-Connection: x\r\nX-Mesh-Deadline: 5\r\nX-Other: ok\r\n\r\n"
    )
    assert head.headers == [(b"host", b"a"), (b"x-other", b"ok")]
    assert head.mesh_headers == [(b"x-mesh-deadline", b"5")]


def test_chunked_body_with_trailers() -> None:
    events = parse_request(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    )
    head, *rest = events
    assert head.chunked and head.has_body
    assert rest == [b"abc", b"de", Trailers([(b"x-t", b"1")]), END]


SMUGGLING = [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
]


@pytest.mark.parametrize(("raw", "status"), SMUGGLING, ids=[r[0][:40].decode("latin-1") for r in SMUGGLING])
def test_smuggling_rejected(raw: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(raw)
    assert info.value.status == status


def test_header_limits_431() -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(101))
    with pytest.raises(ProtocolError) as info:
        parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
    assert info.value.status == 431
    big = b"X-Big: " + b"v" * 70000 + b"\r\n"
    with pytest.raises(ProtocolError) as info:
        parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    assert info.value.status == 431


def test_unterminated_huge_head_is_refused_while_it_streams() -> None:
    reader = RequestReader(max_header_bytes=1024)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ")
    with pytest.raises(ProtocolError) as info:
        for _ in range(10):
            reader.feed(b"v" * 512)
    assert info.value.status == 431


def test_body_limit_413_by_content_length_and_by_chunks() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", max_body_bytes=10)
    assert info.value.status == 413
    with pytest.raises(ProtocolError) as info:
        parse_request(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nabcdef\r\n",
            max_body_bytes=10,
        )
    assert info.value.status == 413


def test_http10_keepalive_and_expect() -> None:
    (head, _) = parse_request(b"GET / HTTP/1.0\r\n\r\n")
    assert head.http10 and not head.keep_alive
    (head, _) = parse_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert head.keep_alive
    (head,) = parse_request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert head.expect_continue and head.content_length == 5
    with pytest.raises(ProtocolError) as info:
        parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n")
    assert info.value.status == 417


def test_upgrade_request_keeps_following_bytes() -> None:
    reader = RequestReader()
    reader.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00")
    head = reader.next_event()
    assert head.upgrade == b"websocket"
    assert reader.upgraded_data == b"\x81\x00"


DECLINED_UPGRADES = [
    # (what the client sends, the request targets and bodies it must parse into)
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n", []),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        [b"abc"],
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        [b"abc"],
    ),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket, h2c\r\n\r\n", []),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nab",
        [b"ab"],
    ),
    (b"GET / HTTP/1.0\r\nHost: a\r\nConnection: upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n", []),
]


@pytest.mark.parametrize(("raw", "body"), DECLINED_UPGRADES, ids=range(len(DECLINED_UPGRADES)))
@pytest.mark.parametrize("split", [None, 7, 60])
def test_an_upgrade_not_allowed_is_dropped_and_what_follows_is_parsed(
    raw: bytes, body: list, split: int | None
) -> None:
    """h2c (never allowed), several protocols at once, an upgrade with a body and HTTP/1.0 are ordinary requests: no
    Upgrade header, their bodies their own, and a pipelined request after them is read (llhttp stops at any
    upgrade; the reader makes it go on)."""
    data = raw + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    reader = RequestReader()
    for piece in [data] if split is None else [data[:split], data[split : 2 * split], data[2 * split :]]:
        reader.feed(piece)
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    head, *rest = events
    assert head.upgrade is None and not any(name == b"upgrade" for name, _ in head.headers)
    assert b"".join(e for e in rest if isinstance(e, bytes)) == b"".join(body)
    assert [e.target for e in rest if isinstance(e, RequestHead)] == [b"/next"]
    assert reader.upgraded_data is None


def test_an_upgrade_the_upstream_declines_resumes_the_connection() -> None:
    reader = RequestReader()
    reader.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /n HTTP/1.1\r\n")
    assert reader.next_event().upgrade == b"websocket"
    assert reader.next_event() is END
    rest = reader.resume()  # no 101 came: the bytes after the request are HTTP/1.1 again
    reader.feed(rest + b"Host: a\r\n\r\n")
    assert reader.next_event().target == b"/n"


def test_pipelined_requests_parse_in_order() -> None:
    events = parse_request(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [e.target for e in events if isinstance(e, RequestHead)] == [b"/1", b"/2"]


def test_response_head_framing() -> None:
    head, body, end = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert head.status == 200 and head.content_length == 2 and body == b"hi" and end is END
    # HEAD: Content-Length is kept, no body is expected
    head, end = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", method=b"HEAD")
    assert not head.has_body and (b"content-length", b"1000") in head.headers and end is END
    # 204 and 304 never have a body
    head, end = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert not head.has_body
    head, end = parse_response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")
    assert not head.has_body and (b"content-length", b"50") in head.headers


def test_response_informational_then_final() -> None:
    cont, final, body, end = parse_response(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"
    )
    assert cont.informational and cont.status == 100
    assert final.status == 201 and body == b"x" and end is END


def test_response_close_delimited_and_truncated() -> None:
    head, body, end = parse_response(b"HTTP/1.1 200 OK\r\n\r\nabc", eof=True)
    assert head.until_close and not head.keep_alive and body == b"abc" and end is END
    with pytest.raises(ProtocolError):
        parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    with pytest.raises(ProtocolError):
        parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", eof=True)


def test_response_smuggling_is_a_502() -> None:
    for raw in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ):
        with pytest.raises(ProtocolError) as info:
            parse_response(raw)
        assert info.value.status == 502


def test_response_switching_protocols() -> None:
    reader = ResponseReader(request_method=b"GET")
    reader.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nxyz")
    head = reader.next_event()
    assert isinstance(head, ResponseHead) and head.upgrade
    assert (b"upgrade", b"websocket") in head.headers
    assert reader.upgraded_data == b"xyz"


def test_serialisation() -> None:
    assert http1.request_head_bytes(b"GET", b"/", [(b"host", b"a")]) == b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    assert http1.chunk_bytes(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert http1.last_chunk_bytes([(b"x-t", b"1")]) == b"0\r\nx-t: 1\r\n\r\n"


@given(st.lists(st.binary(min_size=1, max_size=50), min_size=0, max_size=10), st.integers(1, 7))
def test_chunked_round_trip_in_any_split(pieces: list[bytes], split: int) -> None:
    wire = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire += b"".join(http1.chunk_bytes(p) for p in pieces) + http1.last_chunk_bytes()
    reader = RequestReader()
    for i in range(0, len(wire), split):
        reader.feed(wire[i : i + split])
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"".join(pieces)
    assert events[-1] is END


def test_the_http2_preface_is_recognised_not_taken_for_a_broken_http1_request() -> None:
    reader = RequestReader(max_header_bytes=65536, max_header_count=100, max_body_bytes=None)
    with pytest.raises(Http2Preface) as caught:
        reader.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    assert "offer h2 in ALPN" in caught.value.reason
