"""`mesh ca serve`'s limits over real TLS on loopback: one deadline from accept to a complete head, eviction of the
connection that has waited longest, and 429 for addresses that keep failing token checks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from ca import tokens
from ca.authority import CertificateAuthority
from ca.commands import build_parser
from ca.server import ServerLimits, serve_ca
from mesh.listener import Drain

from .test_ca_server import TD, TIMEOUT, Server, connect, new_csr, read_response, request_bytes

Start = Callable[[ServerLimits], Awaitable[Server]]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    CertificateAuthority.init(tmp_path / "ca", TD)
    return tmp_path / "ca"


@pytest.fixture
async def start(nursery: trio.Nursery, ca_dir: Path) -> AsyncIterator[Start]:
    """Starts a CA server with the given limits; its log lines are captured. Drained at the end of the test."""
    drains: list[Drain] = []

    async def start_server(limits: ServerLimits) -> Server:
        drain = Drain()
        drains.append(drain)
        address = await nursery.start(partial(serve_ca, ca_dir, "127.0.0.1:0", limits=limits, drain=drain))
        return Server(address, ca_dir, logs, drain)

    with structlog.testing.capture_logs() as logs:
        yield start_server
        for drain in drains:
            drain.start()


async def test_the_head_deadline_counts_from_accept_and_covers_the_handshake(start: Start) -> None:
    server = await start(ServerLimits(handshake_timeout=5, head_timeout=1.5))
    tcp = await trio.open_tcp_stream(server.address.host, server.address.port)
    accepted = trio.current_time()
    await trio.sleep(1)  # a slow client: a second before its handshake, then a head that never ends
    tls = trio.SSLStream(tcp, server.context(), server_hostname="mesh-ca", https_compatible=True)
    try:
        with trio.fail_after(TIMEOUT):
            await tls.do_handshake()
            await tls.send_all(b"GET /v1/bundle HTTP/1.1\r\nhost: mes")
            response = await read_response(tls)
    finally:
        await trio.aclose_forcefully(tls)
    assert response.status == 408 and "did not arrive within 1.5s" in response.error
    assert trio.current_time() - accepted < 2.2  # 1.5 s from accept, not from the end of the handshake


async def test_a_full_server_closes_the_connections_that_waited_longest(start: Start) -> None:
    server = await start(ServerLimits(max_connections=8, max_waiting=4))
    address, ctx = server.address, server.context()
    head = request_bytes("POST", "/v1/certificate", body=b"{" * 100, headers=[("content-type", "application/json")])
    streams: list[trio.abc.Stream] = []
    with trio.fail_after(TIMEOUT):
        slow_body = await connect(address, ctx)
        streams.append(slow_body)
        await slow_body.send_all(head[:-50])  # the head and half the body
        idle = await connect(address, ctx)
        streams.append(idle)
        await idle.send_all(b"GET /v1/bundle HTTP/1.1\r\nhost: mesh-ca\r\n\r\n")
        assert (await read_response(idle)).status == 200  # and then it stays open, idle
        await trio.testing.wait_all_tasks_blocked()  # the server is waiting for its next request
        streams.append(await trio.open_tcp_stream(address.host, address.port))  # no TLS handshake, ever
        for oldest in streams[:3]:
            streams.append(await trio.open_tcp_stream(address.host, address.port))
            await trio.testing.wait_all_tasks_blocked()  # the server has accepted it: four wait
            assert (await server.get("/v1/bundle")).status == 200
            assert await oldest.receive_some() == b""  # closed without an answer, to make room
    for stream in streams:
        await trio.aclose_forcefully(stream)
    evicted = [entry for entry in server.logs if entry["event"] == "connection evicted"]
    assert [entry["during"] for entry in evicted] == ["request", "idle", "handshake"]


async def test_failed_token_attempts_get_429_with_retry_after_per_address(start: Start, ca_dir: Path) -> None:
    server = await start(ServerLimits(token_failures=3, token_failure_interval=0.5))
    _, csr = new_csr("web")
    for _ in range(3):
        assert (await server.post({"csr": csr}, token="guessed")).status == 401
    limited = await server.post({"csr": csr}, token="guessed")
    assert limited.status == 429 and limited.headers["retry-after"] == "1"
    assert "too many failed token attempts from 127.0.0.1; try again in 1s" in limited.error
    assert server.last_request()["status"] == 429
    # While limited, a token is not even looked up: a valid one is refused too, and a damaged store is not read.
    valid = tokens.create(ca_dir, "web")
    store = ca_dir / "tokens.json"
    saved = store.read_bytes()
    store.write_bytes(b"{")
    assert (await server.post({"csr": csr}, token=valid)).status == 429
    store.write_bytes(saved)
    assert (await server.get("/v1/bundle")).status == 200  # only token attempts are limited
    await trio.sleep(0.5)  # one failure's worth has refilled
    assert (await server.post({"csr": csr}, token=valid)).status == 200


def test_mesh_ca_serve_max_connections_is_checked(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.cli import main

    assert main(["ca", "serve", "--dir", str(ca_dir), "--max-connections", "1"]) == 2
    assert "--max-connections: expected a whole number of at least 2, got '1'" in capsys.readouterr().err
    # the command's default is the server's, with three quarters of the connections allowed to wait
    default = build_parser().parse_args(["serve", "--dir", str(ca_dir)]).max_connections
    assert (default, default * 3 // 4) == (ServerLimits().max_connections, ServerLimits().max_waiting)
    with pytest.raises(ValueError, match=r"max_waiting \(64\) must be positive and below max_connections \(64\)"):
        ServerLimits(max_connections=64, max_waiting=64)
