"""The admin operations on a real sidecar process: POST /log-level shows debug lines at once, POST /drain stops the
listeners and keeps the process (and its Consul registration), POST /shutdown deregisters, drains and exits 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..consul_fake import FakeConsul
from .clients import Client, Response, backend_stats, request
from .conftest import Mesh, Process, free_port, sidecar_config

DRAIN_TIMEOUT = 5.0


def admin_call(address: str, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON or text body) of one admin request."""
    req = urllib.request.Request(f"http://{address}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            status, data, kind = response.status, response.read(), response.headers.get("content-type")
    except urllib.error.HTTPError as error:
        status, data, kind = error.code, error.read(), error.headers.get("content-type")
    return status, json.loads(data) if kind == "application/json" else data


def consul_services(consul: FakeConsul) -> Any:
    with urllib.request.urlopen(f"http://{consul.address}/v1/agent/services", timeout=5) as response:
        return json.loads(response.read())


def refused(port: int) -> bool:
    """Nothing listens on `port` any more. A connection that the kernel had queued for a listener closing at that
    moment is reset instead: not yet the answer, ask again."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


def eventually(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class InFlight:
    """A slow request through the sidecar's listener, in a thread, until it has reached the backend."""

    def __init__(self, port: int, backend_port: int, seconds: float) -> None:
        self.response: Response | Exception | None = None
        before = backend_stats(backend_port)["paths"].count("/slow")
        self.client = Client(port)
        self.thread = threading.Thread(target=self._call, args=(seconds,))
        self.thread.start()
        eventually(lambda: backend_stats(backend_port)["paths"].count("/slow") > before)

    def _call(self, seconds: float) -> None:
        try:
            self.response = self.client.request("GET", f"/slow?s={seconds}")
        except Exception as exc:  # asserted by the test
            self.response = exc

    def result(self) -> tuple[int, bytes, str | None]:
        self.close()
        assert isinstance(self.response, Response), self.response
        return self.response.status, self.response.body, self.response.headers.get("connection")

    def close(self) -> None:
        self.thread.join(30)
        self.client.close()


@pytest.fixture
def in_flight() -> Iterator[Callable[[int, int, float], InFlight]]:
    """Starts InFlight requests, each closed at the end of the test even if it fails first."""
    started: list[InFlight] = []

    def start(port: int, backend_port: int, seconds: float) -> InFlight:
        started.append(InFlight(port, backend_port, seconds))
        return started[-1]

    yield start
    for one in started:
        one.close()


def inbound_sidecar(mesh: Mesh, backend_port: int, **overrides: Any) -> tuple[Process, int, str]:
    """A sidecar in front of the backend: (process, inbound port, admin address)."""
    port = free_port()
    config = sidecar_config(
        service={"name": "api", "app": f"127.0.0.1:{backend_port}"},
        inbound={"bind": f"127.0.0.1:{port}", "tls": "off"},
        shutdown={"drain_timeout": f"{DRAIN_TIMEOUT}s"},
        **overrides,
    )
    return mesh.sidecar(config), port, config["admin"]["bind"]


def test_log_level_debug_shows_debug_lines_from_the_next_request(mesh: Mesh) -> None:
    port = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off"}],
        discovery={"static": {"api": ["127.0.0.1:1", "127.0.0.1:2"]}},  # refused: each request is retried
    )
    proc = mesh.sidecar(config)
    admin = config["admin"]["bind"]

    def served(count: int) -> None:  # the request is in the access log (written within 200 ms)
        proc.wait_for_count('"event":"request"', count)

    assert request(port, "GET", "/").status >= 500
    served(1)
    assert proc.events("retrying") == []  # a debug line: not shown at info

    assert admin_call(admin, "POST", "/log-level", b"level=debug") == (200, {"level": "debug", "was": "info"})
    proc.wait_for('"event": "log level changed"')
    [changed] = proc.events("log level changed")
    assert (changed["level"], changed["to"], changed["was"], changed["peer"]) == (
        "warning",
        "debug",
        "info",
        "127.0.0.1",
    )
    request(port, "GET", "/")
    proc.wait_for('"event": "retrying"')
    assert proc.events("retrying")[0]["level"] == "debug"

    assert admin_call(admin, "POST", "/log-level?level=info") == (200, {"level": "info", "was": "debug"})
    retried = len(proc.events("retrying"))
    request(port, "GET", "/")
    served(3)
    assert len(proc.events("retrying")) == retried

    status, answer = admin_call(admin, "POST", "/log-level", b"level=verbose")
    assert status == 400 and answer["allowed"] == ["debug", "info", "warning", "error"]
    assert admin_call(admin, "GET", "/log-level")[0] == 405


def test_post_drain_stops_the_listener_and_the_process_stays_up_until_post_shutdown(
    mesh: Mesh, backend: dict[str, int], in_flight: Callable[[int, int, float], InFlight]
) -> None:
    proc, port, admin = inbound_sidecar(mesh, backend["http"])
    assert request(port, "GET", "/echo").status == 200
    slow = in_flight(port, backend["http"], 1.5)

    assert admin_call(admin, "POST", "/drain") == (202, {"result": "draining", "already": False})
    assert admin_call(admin, "GET", "/ready") == (503, b"draining\n")
    eventually(lambda: refused(port))  # the listener closes as soon as its task runs
    assert slow.result() == (200, b"slow done", "close")  # in-flight work finishes, within the drain timeout
    proc.wait_for("draining the listeners")

    time.sleep(1.0)  # the listener has drained: the process stays up, with its admin listener
    assert proc.proc.poll() is None
    assert admin_call(admin, "GET", "/live") == (200, b"live\n")
    assert admin_call(admin, "GET", "/ready") == (503, b"draining\n")
    assert refused(port)
    assert admin_call(admin, "POST", "/drain") == (202, {"result": "draining", "already": True})
    status, answer = admin_call(admin, "POST", "/reload")
    assert status == 400 and answer["result"] == "refused"
    proc.proc.send_signal(signal.SIGHUP)  # a reload by signal is refused too: nothing listens again
    proc.wait_for("the listeners were drained (POST /drain)")
    assert refused(port)
    assert proc.events("drained") == []

    start = time.monotonic()
    assert admin_call(admin, "POST", "/shutdown") == (202, {"result": "shutting down", "already": False})
    assert proc.proc.wait(DRAIN_TIMEOUT) == 0
    assert time.monotonic() - start < DRAIN_TIMEOUT
    proc.wait_for('"event": "drained"')


@pytest.mark.parametrize("drain_first", [False, True], ids=["shutdown", "drain-then-shutdown"])
def test_post_shutdown_deregisters_drains_and_exits_0_within_the_drain_timeout(
    mesh: Mesh, backend: dict[str, int], in_flight: Callable[[int, int, float], InFlight], drain_first: bool
) -> None:
    with FakeConsul() as consul:
        registration = {"health": {"http_path": "/status?code=200", "interval": "200ms"}, "ttl": "5s"}
        proc, port, admin = inbound_sidecar(
            mesh, backend["http"], consul={"address": consul.address}, registration=registration
        )
        eventually(lambda: admin_call(admin, "GET", "/registration")[1].get("registered") is True)
        registered = consul_services(consul)
        assert registered != {}
        slow = in_flight(port, backend["http"], 2.0)
        if drain_first:
            assert admin_call(admin, "POST", "/drain")[0] == 202
            eventually(lambda: refused(port))
            time.sleep(0.5)  # more than two health intervals: the registration is kept up to date, not removed
            assert consul_services(consul) == registered
            assert admin_call(admin, "GET", "/registration")[1]["registered"] is True

        start = time.monotonic()
        assert admin_call(admin, "POST", "/shutdown") == (202, {"result": "shutting down", "already": False})
        eventually(lambda: consul_services(consul) == {})
        assert admin_call(admin, "GET", "/ready") == (503, b"draining\n")
        eventually(lambda: refused(port))
        # the process is draining the slow request: a repeated shutdown answers and changes nothing
        assert admin_call(admin, "POST", "/shutdown") == (202, {"result": "shutting down", "already": True})
        assert slow.result() == (200, b"slow done", "close")
        assert proc.proc.wait(DRAIN_TIMEOUT) == 0
        assert time.monotonic() - start < DRAIN_TIMEOUT
        proc.wait_for('"event": "shutting down"')
        [shutting_down] = proc.events("shutting down")
        assert shutting_down["request"] == "POST /shutdown"
        proc.wait_for("deregistered")


@pytest.mark.parametrize("path", ["/drain", "/shutdown", "/log-level?level=debug", "/reload"])
def test_operations_from_a_non_loopback_client_get_403(mesh: Mesh, path: str) -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            own = probe.getsockname()[0]
    except OSError:
        own = "127.0.0.1"
    if own.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    admin_port = free_port()
    proc = mesh.sidecar(sidecar_config(admin={"bind": f"0.0.0.0:{admin_port}"}))
    assert admin_call(f"{own}:{admin_port}", "POST", path) == (
        403,
        {"error": "admin operations are answered to loopback clients only"},
    )
    assert admin_call(f"{own}:{admin_port}", "GET", "/ready")[0] == 200
    assert proc.proc.poll() is None and proc.events("shutting down") == []
    assert admin_call(f"127.0.0.1:{admin_port}", "POST", "/shutdown")[0] == 202
    assert proc.proc.wait(DRAIN_TIMEOUT) == 0
