"""SIGTERM drains: in-flight requests complete, new connections are refused, the process exits 0."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from .clients import Client, backend_stats


def test_sigterm_with_20_in_flight_slow_requests(mesh, backend) -> None:
    port, outbound, inbound = mesh.pair(backend["http"])
    before = backend_stats(backend["http"])["paths"].count("/slow")
    results: list[object] = []
    clients = [Client(port) for _ in range(20)]

    def call(client: Client) -> None:
        try:
            response = client.request("GET", "/slow?s=2")
            results.append((response.status, response.body, response.headers.get("connection")))
        except Exception as exc:  # recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=call, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    # Wait until all 20 have reached the app, so they are truly in flight through both sidecars.
    arrived = threading.Event()
    for _ in range(400):
        if backend_stats(backend["http"])["paths"].count("/slow") - before >= 20:
            arrived.set()
            break
        arrived.wait(0.05)
    assert arrived.is_set(), "the slow requests never reached the app"

    outbound.proc.send_signal(signal.SIGTERM)
    inbound.proc.send_signal(signal.SIGTERM)
    outbound.wait_for('"draining"')
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    assert results == [(200, b"slow done", "close")] * 20
    assert outbound.proc.wait(30) == 0
    assert inbound.proc.wait(30) == 0
