"""Request bodies that take their time: the request timeout starts once the body is through, and slow bodies hold
nothing of the upstream's."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator

from tests.ports import free_port

from .clients import Client
from .conftest import sidecar_config

UPLOAD = 6 * 1024 * 1024
RATE = 1024 * 1024  # bytes per second the client sends
PIECE = 64 * 1024


def paced(total: int, rate: float) -> Iterator[bytes]:
    """`total` bytes in pieces, at about `rate` bytes per second (the pace of a slow client, not a wait for an
    event)."""
    started = time.monotonic()
    sent = 0
    while sent < total:
        piece = b"u" * min(PIECE, total - sent)
        sent += len(piece)
        yield piece
        ahead = sent / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)


def test_an_upload_longer_than_the_request_timeout_succeeds_through_the_pair(mesh, backend) -> None:
    # Both sidecars' request timeouts (2 s) are far shorter than the upload (~6 s): the timeout covers the wait for
    # the response once the body is through, while the body itself only has to keep moving (timeouts.idle).
    short = {"timeouts": {"request": "2s"}}
    port, _, _ = mesh.pair(backend["http"], outbound=short, inbound=short)
    expected = hashlib.sha256(b"u" * UPLOAD).hexdigest()
    started = time.monotonic()
    with Client(port, timeout=30) as client:
        response = client.request(
            "POST", "/consume", headers=[("content-length", str(UPLOAD))], body=paced(UPLOAD, RATE)
        )
    assert time.monotonic() - started > 4  # it did take longer than the request timeout
    assert response.status == 200, response.headers.get("x-mesh-error")
    assert response.json() == {"size": UPLOAD, "sha256": expected}


def test_a_request_body_that_stops_gets_408_after_the_idle_timeout(mesh, backend) -> None:
    port = free_port()
    mesh.sidecar(
        sidecar_config(
            service={"name": "api", "app": f"127.0.0.1:{backend['http']}"},
            inbound={"bind": f"127.0.0.1:{port}", "tls": "off", "timeouts": {"idle": "1s", "request": "30s"}},
        ),
        "inbound",
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /consume HTTP/1.1\r\nhost: api\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 200_000)
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"x-mesh-error: request body stalled past the idle timeout" in answer


SLOW_CLIENTS = 1000
NORMAL = 400
NORMAL_CONCURRENCY = 40


def test_a_thousand_slow_bodies_leave_normal_requests_served(mesh, backend) -> None:
    port = free_port()
    mesh.sidecar(
        sidecar_config(
            service={"name": "api", "app": f"127.0.0.1:{backend['http']}"},
            inbound={"bind": f"127.0.0.1:{port}", "tls": "off"},
            log={"level": "info", "access_log": False},
        ),
        "inbound",
    )
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            # A head promising a large body, then a trickle that never ends (within this test).
            sock.sendall(b"POST /consume HTTP/1.1\r\nhost: api\r\ncontent-length: 10000000\r\n\r\n" + b"x" * 1000)
            slow.append(sock)
        statuses: list[int] = []
        lock = threading.Lock()

        def normal(count: int) -> None:
            with Client(port, timeout=30) as client:
                for _ in range(count):
                    response = client.request("GET", "/status?code=200")
                    with lock:
                        statuses.append(response.status)

        threads = [threading.Thread(target=normal, args=(NORMAL // NORMAL_CONCURRENCY,)) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        served = statuses.count(200)
        assert len(statuses) == NORMAL
        assert served >= 0.99 * NORMAL, json.dumps({s: statuses.count(s) for s in set(statuses)})
    finally:
        for sock in slow:
            sock.close()
