"""The admin listener of a running sidecar under a flood of slow connections: `/live` and `/ready` keep answering."""

from __future__ import annotations

import socket
import time

from .clients import closed_by_server, status_of
from .conftest import free_port, sidecar_config

FLOOD = 300
PROBE_TIMEOUT = 2.0


def probe(port: int, path: str) -> tuple[int, float]:
    """(status, seconds) of one GET on a new connection, as a liveness probe makes it."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while piece := sock.recv(65536):
            data += piece
    return status_of(data), time.monotonic() - start


def test_live_and_ready_answer_under_a_flood_of_slow_connections(mesh) -> None:
    admin = free_port()
    config = sidecar_config(
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{free_port()}", "tls": "off"}],
        discovery={"static": {"api": [f"127.0.0.1:{free_port()}"]}},
        admin={"bind": f"127.0.0.1:{admin}"},
    )
    mesh.sidecar(config)
    flood: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            sock = socket.create_connection(("127.0.0.1", admin), timeout=PROBE_TIMEOUT)
            flood.append(sock)
            sock.sendall(b"GET /live HTTP/1.1\r\nHost: admin\r\nX-Slow: ")  # a head that is never finished
        answers = [probe(admin, path) for _ in range(10) for path in ("/live", "/ready")]
        assert [status for status, _ in answers] == [200] * 20
        assert max(seconds for _, seconds in answers) < 1.0, answers
        # room was made by closing the connections that had waited longest; the newest still wait
        assert closed_by_server(flood[0], PROBE_TIMEOUT)
        flood[-1].setblocking(False)
        try:
            assert flood[-1].recv(1) == b"unreachable: the newest slow connection is still open"
        except BlockingIOError:
            pass
    finally:
        for sock in flood:
            sock.close()
