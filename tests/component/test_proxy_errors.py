"""The HTTP proxy in-process on loopback sockets: mesh errors keep nothing alive, and are counted by reason code."""

from __future__ import annotations

import gc
import socket
import time

import pytest
import structlog
import trio

from mesh.cluster import Cluster
from mesh.config import BalancerSettings, Limits, PoolSettings, Timeouts
from mesh.discovery import Endpoint, EndpointSet
from mesh.h1server import H1Downstream
from mesh.h1upstream import UpstreamConnection
from mesh.httpserver import HttpServer
from mesh.listener import Drain
from mesh.log import AccessLog
from mesh.metrics import Metrics
from mesh.pipeline.exchange import Exchange
from mesh.proxy import HttpProxy, HttpProxySettings
from mesh.timers import Sweeper
from mesh.watch import Watch

REQUESTS = 10_000
BATCH = 200  # requests pipelined per write: the proxy answers each in turn on one keep-alive connection


def closed_port() -> int:
    """A loopback port nothing listens on (connect refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proxy_for(endpoints: EndpointSet | None) -> tuple[HttpProxy, Metrics]:
    metrics = Metrics()
    cluster = Cluster(
        "api", Watch(endpoints), balancer=BalancerSettings(), pool=PoolSettings(), connect_timeout=1.0, metrics=metrics
    )
    settings = HttpProxySettings("outbound", "api", Timeouts(), Limits())
    proxy = HttpProxy(
        settings,
        cluster,
        metrics=metrics,
        access_log=AccessLog(False, structlog.get_logger("test")),
        drain=Drain(),
        sweeper=Sweeper(),
    )
    return proxy, metrics


def live(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


async def run_requests(proxy: HttpProxy, request: bytes, expect: bytes) -> None:
    """Send REQUESTS copies of `request` through `proxy`, pipelined in batches on one connection each, and check
    that every answer carries `expect`."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, HttpServer(proxy).handle, listeners)
        for _ in range(REQUESTS // BATCH):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                await client.send_all(request * BATCH)
                received = b""
                while received.count(b"HTTP/1.1 ") < BATCH or not received.endswith(b"\n"):
                    chunk = await client.receive_some(1 << 20)
                    assert chunk, received[-300:]
                    received += chunk
            assert received.count(expect) == BATCH, received[:300]
        nursery.cancel_scope.cancel()


GET = b"GET /x HTTP/1.1\r\nHost: api\r\n\r\n"
CASES = {
    "deadline_expired": (
        EndpointSet((Endpoint("127.0.0.1", 1),), updated_at=0.0, source="static"),
        b"GET /x HTTP/1.1\r\nHost: api\r\ngrpc-timeout: 0m\r\n\r\n",
        b"x-mesh-error: deadline expired before forwarding",
    ),
    "no_healthy_endpoints": (
        EndpointSet((), updated_at=0.0, source="static"),
        GET,
        b"x-mesh-error: no healthy endpoints",
    ),
    "discovery_unavailable": (None, GET, b"x-mesh-error: discovery unavailable"),
    "connect_refused": (
        "refused",
        GET,
        b"x-mesh-error: upstream connect refused",
    ),
}


@pytest.mark.parametrize("code", list(CASES))
async def test_ten_thousand_mesh_errors_leave_no_proxy_objects_alive(code: str) -> None:
    endpoints, request, expect = CASES[code]
    if endpoints == "refused":
        endpoints = EndpointSet((Endpoint("127.0.0.1", closed_port()),), updated_at=time.time(), source="static")
    proxy, metrics = proxy_for(endpoints)
    before = {kind: live(kind) for kind in (H1Downstream, Exchange, UpstreamConnection)}
    await run_requests(proxy, request, expect)
    after = {kind: live(kind) for kind in (H1Downstream, Exchange, UpstreamConnection)}
    assert after == before  # each failure raised its own exception: no shared traceback holds their frames
    errors = [
        line
        for line in metrics.render()[0].decode().splitlines()
        if line.startswith("mesh_errors_total{") and f'reason="{code}"' in line
    ]
    assert errors == [f'mesh_errors_total{{direction="outbound",reason="{code}",upstream="api"}} {REQUESTS}.0']
