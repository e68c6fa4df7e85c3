"""Active health checks over real loopback sockets: probe outcomes, and the runner driving the tracker (mock clock)."""

from __future__ import annotations

import itertools
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from types import SimpleNamespace

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import CapturingLogger

from mesh.config import HealthCheckSettings
from mesh.discovery import Endpoint, EndpointSet
from mesh.health import HealthTracker, probe, run_health_checks
from mesh.transport import UpstreamTls
from mesh.watch import Watch

HTTP = HealthCheckSettings(interval=10.0, timeout=1.0, http_path="/healthz")
TCP = HealthCheckSettings(interval=10.0, timeout=1.0)

Handler = Callable[[trio.SocketStream], Awaitable[None]]


class Backend:
    """A minimal HTTP server: answers every request with `status` and closes; keeps the request heads."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[bytes] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return  # a TCP probe: connected and left
                    data += chunk
                self.requests.append(data)
                await stream.send_all(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % self.status)
            except trio.BrokenResourceError:
                pass


async def serve(nursery: trio.Nursery, handler: Handler) -> Endpoint:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return Endpoint("127.0.0.1", listeners[0].socket.getsockname()[1])


@pytest.fixture
async def backend(nursery: trio.Nursery) -> tuple[Backend, Endpoint]:
    server = Backend()
    return server, await serve(nursery, server.handle)


@pytest.fixture
def refused() -> Endpoint:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return Endpoint("127.0.0.1", sock.getsockname()[1])


async def silent(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


async def hang_up(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def read_and_hang_up(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(4096)


def answer(response: bytes) -> Handler:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(response)

    return handle


# -- probe() -----------------------------------------------------------------------------------------------


async def test_http_probe_passes_on_2xx_and_sends_a_closing_get(backend: tuple[Backend, Endpoint]) -> None:
    server, endpoint = backend
    assert await probe(endpoint, settings=HTTP, tls=None, host_header="api") is None
    [request] = server.requests
    head = request.decode().split("\r\n")
    assert head[0] == "GET /healthz HTTP/1.1"
    assert {"host: api", "user-agent: triomesh-health-check", "connection: close"} <= set(head[1:])


async def test_http_probe_fails_on_503(backend: tuple[Backend, Endpoint]) -> None:
    server, endpoint = backend
    server.status = 503
    assert await probe(endpoint, settings=HTTP, tls=None, host_header="api") == "status 503"
    server.status = 204
    assert await probe(endpoint, settings=HTTP, tls=None, host_header="api") is None


async def test_host_header_defaults_to_the_endpoint_address(backend: tuple[Backend, Endpoint]) -> None:
    server, endpoint = backend
    assert await probe(endpoint, settings=HTTP, tls=None) is None
    assert f"host: {endpoint}\r\n".encode() in server.requests[0]


async def test_probes_of_a_refused_port_say_so(refused: Endpoint) -> None:
    assert await probe(refused, settings=HTTP, tls=None, host_header="api") == "connect refused"
    assert await probe(refused, settings=TCP, tls=None) == "connect refused"


async def test_tcp_probe_passes_on_connect_without_sending(backend: tuple[Backend, Endpoint]) -> None:
    server, endpoint = backend
    assert await probe(endpoint, settings=TCP, tls=None) is None
    assert server.requests == []


async def test_http_probe_times_out_when_the_server_never_answers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = await serve(nursery, silent)
    start = trio.current_time()
    assert await probe(endpoint, settings=HTTP, tls=None, host_header="api") == "timeout"
    assert trio.current_time() - start == pytest.approx(HTTP.timeout)


async def test_http_probe_reports_a_hang_up_and_garbage(nursery: trio.Nursery) -> None:
    closing = await serve(nursery, read_and_hang_up)
    resetting = await serve(nursery, hang_up)  # closes with our request unread: the kernel sends a reset
    garbage = await serve(nursery, answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    informational = await serve(
        nursery, answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    )
    assert await probe(closing, settings=HTTP, tls=None, host_header="api") == "closed before responding"
    assert await probe(resetting, settings=HTTP, tls=None, host_header="api") in (
        "connection lost",
        "closed before responding",
    )
    assert await probe(garbage, settings=HTTP, tls=None, host_header="api") == "invalid response"
    assert await probe(informational, settings=HTTP, tls=None, host_header="api") is None


async def test_tls_probe_failures_are_reported_as_tls(nursery: trio.Nursery) -> None:
    endpoint = await serve(nursery, hang_up)
    spiffe = "spiffe://mesh.local/ns/default/dc/dc1/svc/api"
    no_certificate = UpstreamTls(SimpleNamespace(current=None), spiffe, "api")  # type: ignore[arg-type]
    assert await probe(endpoint, settings=TCP, tls=no_certificate) == "tls: no usable certificate for mutual TLS"
    identity = SimpleNamespace(current=SimpleNamespace(client_context_http1=ssl.create_default_context()))
    handshake = UpstreamTls(identity, spiffe, "api")  # type: ignore[arg-type]
    reason = await probe(endpoint, settings=HTTP, tls=handshake, host_header="api")
    assert reason is not None
    assert reason.startswith("tls: TLS handshake failed: ")


# -- run_health_checks() -----------------------------------------------------------------------------------


def endpoint_set(*endpoints: Endpoint) -> EndpointSet:
    return EndpointSet(endpoints, 0.0, "static")


def capturing() -> tuple[CapturingLogger, object]:
    capture = CapturingLogger()
    return capture, structlog.wrap_logger(
        capture, processors=[], wrapper_class=structlog.make_filtering_bound_logger(0)
    )


async def test_runner_marks_a_failing_endpoint_unhealthy_and_back(
    nursery: trio.Nursery, backend: tuple[Backend, Endpoint], refused: Endpoint, autojump_clock: trio.testing.MockClock
) -> None:
    server, good = backend
    watch = Watch[EndpointSet | None](endpoint_set(good, refused))
    tracker = HealthTracker(HTTP)
    capture, log = capturing()
    changes: list[tuple[Endpoint, bool]] = []
    send, receive = trio.open_memory_channel[None](10)

    def on_change(endpoint: Endpoint, healthy: bool) -> None:
        changes.append((endpoint, healthy))
        send.send_nowait(None)

    start = trio.current_time()
    run = partial(
        run_health_checks, settings=HTTP, tls=None, host_header="api", on_change=on_change, rng=lambda: 0.5, log=log
    )
    nursery.start_soon(partial(run, tracker, watch))
    with trio.fail_after(100):
        await receive.receive()
    # Probes at 5, 15, 25 s: the third failure in a row marks it unhealthy.
    assert trio.current_time() - start == pytest.approx(25, abs=HTTP.timeout)
    assert changes == [(refused, False)]
    current = watch.value
    assert current is not None
    assert tracker.usable(current.endpoints) == (good,)
    assert tracker.state(refused) == {
        "health_check": "unhealthy",
        "health_check_failures": 3,
        "last_probe": "connect refused",
    }
    assert tracker.state(good)["health_check"] == "healthy"

    server.status = 503
    with trio.fail_after(100):
        await receive.receive()
    assert changes[-1] == (good, False)
    assert tracker.usable(current.endpoints) == ()
    server.status = 200
    with trio.fail_after(100):
        await receive.receive()
    assert changes[-1] == (good, True)
    assert tracker.usable(current.endpoints) == (good,)

    # One log event per change, however many probes failed.
    events = [(call.method_name, call.kwargs["event"], call.kwargs["endpoint"]) for call in capture.calls]
    assert events == [
        ("warning", "endpoint unhealthy", str(refused)),
        ("warning", "endpoint unhealthy", str(good)),
        ("info", "endpoint healthy again", str(good)),
    ]
    assert capture.calls[0].kwargs["reason"] == "connect refused"
    assert capture.calls[1].kwargs["reason"] == "status 503"
    assert tracker.changes_total == 3


class FakeProbe:
    """Records when each endpoint is probed; an endpoint in `hang` is probed until cancelled."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []
        self.failing: set[int] = set()
        self.hang: set[int] = set()
        self.cancelled: list[int] = []

    async def __call__(self, endpoint: Endpoint, *, settings: object, tls: object, host_header: str) -> str | None:
        self.calls.append((endpoint.port, trio.current_time()))
        if endpoint.port in self.hang:
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.append(endpoint.port)
        await trio.sleep(0.1)
        return "status 500" if endpoint.port in self.failing else None

    def times(self, port: int) -> list[int]:
        return [round(at) for p, at in self.calls if p == port]


async def test_runner_follows_the_endpoint_set(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    a, b, c = (Endpoint("10.0.0.1", port) for port in (1, 2, 3))
    watch = Watch[EndpointSet | None](None)
    tracker = HealthTracker(HTTP)
    fake = FakeProbe()
    fake.failing = {2}
    offsets = iter([0.1, 0.7, 0.3])
    nursery.start_soon(
        partial(
            run_health_checks,
            tracker,
            watch,
            settings=HTTP,
            tls=None,
            host_header="api",
            probe_fn=fake,
            rng=lambda: next(offsets),
        )
    )
    await trio.sleep(50)
    assert fake.calls == []  # unresolved: nothing to probe

    start = trio.current_time()
    watch.set(endpoint_set(a, b))
    await trio.sleep(35)
    # First probe at a jittered offset within the first interval (which task draws which offset is up to
    # trio's scheduling), then every interval.
    first = sorted(fake.times(port)[0] - round(start) for port in (1, 2))
    assert first == [1, 7]
    for port in (1, 2):
        times = fake.times(port)
        assert [later - earlier for earlier, later in itertools.pairwise(times)] == [10] * (len(times) - 1)
        assert times[-1] + 10 > start + 35
    assert tracker.usable((a, b)) == (a,)

    changed_at = trio.current_time()
    watch.set(endpoint_set(a, c))
    await trio.sleep(35)
    assert max(at for port, at in fake.calls if port == 2) < changed_at  # b's task stopped
    assert fake.times(3)[0] == round(changed_at + 3)
    assert len(fake.times(1)) == 7  # a kept its own schedule across the change
    assert tracker.state(b)["health_check"] == "unknown"  # forgotten
    assert tracker.usable((a, b, c)) == (a, b, c)


async def test_runner_cancels_a_probe_in_flight_when_its_endpoint_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.1", 2)
    watch = Watch[EndpointSet | None](endpoint_set(a, b))
    fake = FakeProbe()
    fake.hang = {2}
    runner = partial(run_health_checks, settings=HTTP, tls=None, host_header="api", probe_fn=fake, rng=lambda: 0.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(runner, HealthTracker(HTTP), watch))
        await trio.sleep(5)
        assert fake.times(2) == [round(trio.current_time() - 5)]
        watch.set(endpoint_set(a))
        await trio.testing.wait_all_tasks_blocked()
        assert fake.cancelled == [2]

        watch.set(endpoint_set(a, b))
        await trio.sleep(1)
        assert fake.cancelled == [2]
        nursery.cancel_scope.cancel()  # cancelling the runner stops every task, mid-probe or not
    assert fake.cancelled == [2, 2]
