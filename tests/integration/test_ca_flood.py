"""`mesh ca serve` under a flood of connections that never start TLS: the trust bundle is still served at once."""

from __future__ import annotations

import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.authority import CertificateAuthority

from .clients import closed_by_server
from .conftest import Process, free_port

FETCH_TIMEOUT = 2.0


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    CertificateAuthority.init(tmp_path / "ca", "mesh.local")
    return tmp_path / "ca"


@pytest.fixture
def serve(ca_dir: Path) -> Iterator[list[Process]]:
    """Starts `mesh ca serve` processes (the list it yields gets them) and stops them at the end of the test."""
    started: list[Process] = []
    yield started
    for process in started:
        assert process.terminate() == 0


def start(serve: list[Process], ca_dir: Path, *options: str) -> int:
    port = free_port()
    args = ["mesh.cli", "ca", "serve", "--dir", str(ca_dir), "--bind", f"127.0.0.1:{port}", *options]
    process = Process([sys.executable, "-m", *args], name="mesh ca serve")
    serve.append(process)
    process.wait_for('"event": "listening"')
    return port


def fetch_bundle(port: int, bundle: bytes) -> tuple[bytes, float]:
    """(body, seconds) of `GET /v1/bundle` on a new verified TLS connection."""
    ctx = ssl.create_default_context(cadata=bundle.decode())
    ctx.check_hostname = False  # the server is identified by its SPIFFE ID, not a host name
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=FETCH_TIMEOUT) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET /v1/bundle HTTP/1.1\r\nhost: mesh-ca\r\nconnection: close\r\n\r\n")
            data = b""
            while piece := tls.recv(65536):
                data += piece
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    return data.split(b"\r\n\r\n", 1)[1], time.monotonic() - start


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections that never send a byte (not even a TLS ClientHello)."""
    flood: list[socket.socket] = []
    try:
        for _ in range(count):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=FETCH_TIMEOUT))
    except BaseException:
        for sock in flood:
            sock.close()
        raise
    return flood


def test_the_bundle_is_served_while_hundreds_of_connections_sit_idle(serve: list[Process], ca_dir: Path) -> None:
    port = start(serve, ca_dir)
    bundle = CertificateAuthority.load(ca_dir).bundle_pem()
    flood = idle_connections(port, 300)
    try:
        fetches = [fetch_bundle(port, bundle) for _ in range(7)]
    finally:
        for sock in flood:
            sock.close()
    assert [body for body, _ in fetches] == [bundle] * 7
    assert max(seconds for _, seconds in fetches) < 1.0, fetches


def test_a_full_server_closes_the_connection_that_waited_longest(serve: list[Process], ca_dir: Path) -> None:
    port = start(serve, ca_dir, "--max-connections", "64")
    bundle = CertificateAuthority.load(ca_dir).bundle_pem()
    flood = idle_connections(port, 200)
    try:
        body, seconds = fetch_bundle(port, bundle)
        assert body == bundle and seconds < 1.0
        assert closed_by_server(flood[0], FETCH_TIMEOUT)
        flood[-1].setblocking(False)
        with pytest.raises(BlockingIOError):  # the newest is still waiting for its handshake
            flood[-1].recv(1)
    finally:
        for sock in flood:
            sock.close()
    serve[0].wait_for('"event": "connection evicted"')
    assert serve[0].events("connection evicted")[0]["during"] == "handshake"
