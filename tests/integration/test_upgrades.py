"""Upgrades through the mesh: only allowed protocols are tunnelled; a declined upgrade keeps both connections."""

from __future__ import annotations

import json
import socket

from .clients import backend_stats


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """`count` responses with Content-Length bodies, read in order from one connection."""
    data = b""
    out = []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            assert piece, f"connection closed after {len(out)} responses: {data!r}"
            data += piece
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(data) < length:
            piece = sock.recv(65536)
            assert piece
            data += piece
        out.append((int(lines[0].split()[1]), headers, data[:length]))
        data = data[length:]
    return out


def test_h2c_is_never_forwarded_and_the_connection_carries_the_next_request(http_pair) -> None:
    port, _ = http_pair
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # An h2c upgrade with a body, and a second request pipelined behind it: the body stays this request's body,
        # the Upgrade goes nowhere, and the second request is read as a request.
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nhost: api\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
            b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\ncontent-length: 5\r\n\r\nhello"
            b"GET /headers HTTP/1.1\r\nhost: api\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n"
        )
        (status1, headers1, body1), (status2, _, body2) = read_responses(sock, 2)
    assert (status1, body1) == (200, b"hello")
    assert "upgrade" not in headers1
    assert status2 == 200
    seen = {name for name, _ in json.loads(body2)["headers"]}
    assert not seen & {"upgrade", "connection", "http2-settings"}


def test_an_upgrade_not_allowed_is_stripped(http_pair) -> None:
    port, _ = http_pair
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /headers HTTP/1.1\r\nhost: api\r\nconnection: upgrade\r\nupgrade: tls/1.3\r\n\r\n")
        [(status, _, body)] = read_responses(sock, 1)
    assert status == 200
    assert not {name for name, _ in json.loads(body)["headers"]} & {"upgrade", "connection"}


def test_a_declined_websocket_upgrade_keeps_both_connections(http_pair, backend) -> None:
    port, _ = http_pair
    before = backend_stats(backend["http"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The app answers a WebSocket handshake with an ordinary 200 (it declines); the pipelined request after
        # it must be served on the same client connection, and the upstream connection must go back to the pool.
        sock.sendall(
            b"GET /headers HTTP/1.1\r\nhost: api\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
            b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            b"GET /status?code=204 HTTP/1.1\r\nhost: api\r\n\r\n"
        )
        (status1, headers1, body1), (status2, headers2, _) = read_responses(sock, 2)
        assert (status1, status2) == (200, 204)
        assert headers1.get("connection") != "close" and headers2.get("connection") != "close"
        forwarded = {name: value for name, value in json.loads(body1)["headers"]}
        assert forwarded["upgrade"] == "websocket"  # it was offered to the app
        sock.sendall(b"GET /status?code=200 HTTP/1.1\r\nhost: api\r\n\r\n")
        [(status3, _, _)] = read_responses(sock, 1)
        assert status3 == 200
    after = backend_stats(backend["http"])
    assert after["requests"] - before["requests"] == 3
    assert after["connections"] - before["connections"] <= 1  # one upstream connection for all three
