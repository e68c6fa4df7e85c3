"""HTTP/1.1 through a real sidecar pair (outbound → inbound → app): bodies, framing, keep-alive, upgrades."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest
from websockets.sync.client import connect as ws_connect

from .clients import Client, backend_stats, raw_exchange, request, status_of


@pytest.fixture
def port(http_pair) -> int:
    return http_pair[0]


def test_get_and_post_reach_the_app_with_forwarding_headers(port: int) -> None:
    response = request(port, "GET", "/headers", headers=[("x-mesh-evil", "1"), ("x-custom", "kept")])
    assert response.status == 200
    seen = json.loads(response.body)
    names = [k for k, _ in seen["headers"]]
    values = dict(seen["headers"])
    assert "x-mesh-evil" not in names, "app-sent x-mesh-* must be stripped"
    assert values["x-custom"] == "kept"
    assert values["x-forwarded-for"].startswith("127.0.0.1")
    assert values["x-forwarded-proto"] == "http"
    assert len(values["x-request-id"]) == 36
    post = request(port, "POST", "/consume", body=b"hello world")
    assert post.json() == {"size": 11, "sha256": hashlib.sha256(b"hello world").hexdigest()}


def test_one_access_log_event_per_request(backend, mesh) -> None:
    port, outbound, inbound = mesh.pair(backend["http"])
    assert request(port, "GET", "/status?code=201", headers=[("x-request-id", "log-me")]).status == 201
    for proc, direction in ((outbound, "outbound"), (inbound, "inbound")):
        proc.wait_for('"request_id":"log-me"')  # access lines are written in batches
        (event,) = [e for e in proc.events("request") if e["request_id"] == "log-me"]
        assert event["direction"] == direction and event["status"] == 201
        assert event["method"] == "GET" and event["path"] == "/status?code=201"
        assert event["endpoint"] and event["duration_s"] >= 0 and event["mesh_error"] == ""


def test_request_id_is_kept_when_present(port: int) -> None:
    seen = request(port, "GET", "/headers", headers=[("x-request-id", "abc-1")]).json()
    assert dict(seen["headers"])["x-request-id"] == "abc-1"


def test_chunked_both_ways_with_trailers(port: int) -> None:
    with Client(port) as client:
        response = client.request(
            "POST", "/echo", body=[b"part one, ", b"part two"], chunked=True, trailers=[("x-sum", "42")]
        )
        assert response.status == 200
        assert response.headers.get("transfer-encoding") == "chunked"
        assert response.body == b"part one, part two"
        assert response.trailers == {"x-sum": "42"}
        trailers = client.request("GET", "/trailers")
        assert trailers.body == b"hello world" and trailers.trailers == {"x-checksum": "abc123"}


def test_hundred_keepalive_requests_use_one_upstream_connection(http_pair, backend) -> None:
    # A fresh pair, so that no idle connection from another test can be chosen.
    m = http_pair[1]
    port, _, _ = m.pair(backend["http"])
    before = backend_stats(backend["http"])
    with Client(port) as client:
        for i in range(100):
            assert client.request("GET", f"/status?code=200&i={i}").status == 200
    after = backend_stats(backend["http"])
    assert after["requests"] - before["requests"] == 100
    # /__stats itself opens one backend connection per call (it is not proxied).
    assert after["connections"] - before["connections"] == 1 + 1


def test_head_204_304_framing(port: int) -> None:
    with Client(port) as client:
        head = client.request("HEAD", "/bytes?n=5000")
        assert head.status == 200 and head.headers["content-length"] == "5000" and head.body == b""
        assert client.request("GET", "/status?code=204").status == 204
        not_modified = client.request("GET", "/status?code=304")
        assert not_modified.status == 304 and not_modified.body == b""
        assert client.request("GET", "/bytes?n=10").body == b"x" * 10  # the connection is still in sync


def test_expect_100_continue(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /consume HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 100"), first
        sock.sendall(b"hello")
        data = first.split(b"\r\n\r\n", 1)[1]
        while b"sha256" not in data:
            data += sock.recv(65536)
        assert b"HTTP/1.1 200" in data and b'"size": 5' in data


def test_truncated_response_is_never_passed_on_as_complete(port: int) -> None:
    with Client(port) as client:
        with pytest.raises((ConnectionError, OSError, Exception)) as info:
            client.request("GET", "/truncate")
        assert "RemoteProtocolError" in type(info.value).__name__ or isinstance(info.value, ConnectionError)


def test_websocket_echo_through_the_pair(port: int, backend, mesh) -> None:
    ws_port, _, _ = mesh.pair(backend["ws"])
    with ws_connect(f"ws://127.0.0.1:{ws_port}/") as ws:
        for message in ("hello", "x" * 100_000, b"\x00\x01binary"):
            ws.send(message)
            assert ws.recv() == message


def test_connect_is_refused_with_405(port: int, backend) -> None:
    before = backend_stats(backend["http"])["requests"]
    raw = raw_exchange(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert status_of(raw) == 405
    assert backend_stats(backend["http"])["requests"] == before
