"""Registration in Consul against the fake agent (and a real one when CONSUL_HTTP_ADDR is set), on real time."""

from __future__ import annotations

import json
import os
import secrets
import ssl
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import structlog
import trio
from structlog.testing import CapturingLogger

from mesh.config import ConsulSettings, InboundSettings, RegistrationSettings, ServiceSettings, parse_address
from mesh.consul import ConsulAgent, endpoint_from_entry
from mesh.discovery import Endpoint
from mesh.registration import Registration, advertised_address
from tests.consul_fake import FakeConsul

INBOUND_PORT = 15001
INTERVAL = 0.2  # health.interval; the TTL is 1 s


# -- the application, the agent, the registration -------------------------------------------------------------------


class App:
    """The local application: answers every request with `status` (a 2xx passes the health check) and closes."""

    def __init__(self) -> None:
        self.status = 200
        self.port = 0
        self.probes = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                self.probes += 1
                await stream.send_all(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % self.status)
            except trio.BrokenResourceError:
                pass


@pytest.fixture
async def app(nursery: trio.Nursery) -> App:
    app = App()
    listeners = await nursery.start(partial(trio.serve_tcp, app.handle, 0, host="127.0.0.1"))
    app.port = listeners[0].socket.getsockname()[1]
    return app


@dataclass
class Consul:
    """The agent under test: the fake, or a real one (then `fake` is None)."""

    settings: ConsulSettings
    fake: FakeConsul | None = None

    async def get(self, path: str) -> Any:
        return await trio.to_thread.run_sync(self._get, path)

    def _get(self, path: str) -> Any:
        settings = self.settings
        headers = {"X-Consul-Token": settings.token} if settings.token else {}
        context = ssl.create_default_context(cafile=settings.ca_file) if settings.base_url.startswith("https") else None
        request = urllib.request.Request(settings.base_url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return json.load(response)


def fake_settings(fake: FakeConsul, **overrides: Any) -> ConsulSettings:
    values: dict[str, Any] = {"address": fake.url, "token": None, "token_file": None, "ca_file": None, "timeout": 2.0}
    return ConsulSettings(**(values | overrides))


@pytest.fixture
def fake() -> Iterator[FakeConsul]:
    with FakeConsul() as agent:
        yield agent


@pytest.fixture(params=["fake", "real"])
def consul(request: pytest.FixtureRequest) -> Iterator[Consul]:
    """The contract tests run against both; the real agent comes from CONSUL_HTTP_ADDR (and its token, CA)."""
    if request.param == "real":
        if not os.environ.get("CONSUL_HTTP_ADDR"):
            pytest.skip("no real Consul agent: set CONSUL_HTTP_ADDR (e.g. a `consul agent -dev`) to run this contract")
        yield Consul(ConsulSettings(timeout=5.0))
        return
    with FakeConsul() as agent:
        yield Consul(fake_settings(agent), agent)


@pytest.fixture
def capture() -> CapturingLogger:
    return CapturingLogger()


def registration(
    consul: ConsulSettings,
    app: App,
    capture: CapturingLogger | None = None,
    *,
    bind: str = f"127.0.0.1:{INBOUND_PORT}",
    **overrides: Any,
) -> Registration:
    """A registration with short intervals; a unique service name keeps runs apart on a shared real agent."""
    settings = RegistrationSettings.model_validate(
        {
            "tags": ["v1"],
            "meta": {"zone": "a"},
            "health": {"http_path": "/health", "interval": INTERVAL, "timeout": 0.5},
            "ttl": "1s",
        }
        | {key: value for key, value in overrides.items() if key in RegistrationSettings.model_fields}
    )
    options = {key: value for key, value in overrides.items() if key not in RegistrationSettings.model_fields}
    log = None
    if capture is not None:
        log = structlog.wrap_logger(capture, processors=[], wrapper_class=structlog.make_filtering_bound_logger(0))
    return Registration(
        ConsulAgent(consul),
        settings,
        service=ServiceSettings(name=f"web{secrets.token_hex(3)}", app=f"127.0.0.1:{app.port}"),
        inbound=InboundSettings(bind=bind),
        log=log,
        **options,
    )


def events(capture: CapturingLogger, text: str) -> list[dict[str, Any]]:
    return [call.kwargs for call in capture.calls if text in call.kwargs["event"]]


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    """Wait for a condition another thread brings about (the agent runs in its own thread, on real time)."""
    with trio.fail_after(timeout):
        while not await condition():
            await trio.sleep(0.05)


async def probed(app: App, probes: int) -> None:
    async def enough() -> bool:
        return app.probes >= probes

    await eventually(enough)


def connect_path(reg: Registration) -> str:
    return f"/v1/health/connect/{reg.service_name}?passing"


async def passing_proxies(consul: Consul, reg: Registration) -> list[str]:
    return [entry["Service"]["ID"] for entry in await consul.get(connect_path(reg))]


def is_listed(consul: Consul, reg: Registration, expected: list[str] | None = None) -> Callable[[], Awaitable[bool]]:
    """A condition: the connect endpoint lists exactly `expected` passing proxies (default: this one)."""

    async def condition() -> bool:
        return await passing_proxies(consul, reg) == ([reg.proxy_id] if expected is None else expected)

    return condition


async def check(consul: Consul, check_id: str) -> dict[str, Any] | None:
    return (await consul.get("/v1/agent/checks")).get(check_id)


# -- the contract: fake and real agent -------------------------------------------------------------------------------


async def test_registers_the_service_and_this_sidecar_as_its_connect_proxy(
    consul: Consul, app: App, nursery: trio.Nursery
) -> None:
    reg = registration(consul.settings, app)
    name = reg.service_name
    with trio.fail_after(3):
        await nursery.start(reg.run)

    assert reg.service_id == f"{name}-{INBOUND_PORT}"
    assert reg.proxy_id == f"{name}-{INBOUND_PORT}-sidecar-proxy"
    assert reg.state() | {"app_healthy": None} == {
        "service_id": reg.service_id,
        "proxy_id": reg.proxy_id,
        "registered": True,
        "app_healthy": None,
        "last_error": None,
        "registrations": 1,
    }
    services = await consul.get("/v1/agent/services")
    service, proxy = services[reg.service_id], services[reg.proxy_id]
    assert (service["Service"], service["Address"], service["Port"]) == (name, "127.0.0.1", app.port)
    assert service.get("Kind", "") == ""
    assert (proxy["Kind"], proxy["Service"]) == ("connect-proxy", f"{name}-sidecar-proxy")
    assert (proxy["Address"], proxy["Port"]) == ("127.0.0.1", INBOUND_PORT)
    assert {key: proxy["Proxy"][key] for key in ("DestinationServiceName", "DestinationServiceID")} == {
        "DestinationServiceName": name,
        "DestinationServiceID": reg.service_id,
    }
    assert (proxy["Proxy"]["LocalServiceAddress"], proxy["Proxy"]["LocalServicePort"]) == ("127.0.0.1", app.port)
    for registered in (service, proxy):
        assert (registered["Tags"], registered["Meta"]) == (["v1"], {"zone": "a"})

    checks = await consul.get("/v1/agent/checks")
    ttl, alias = checks[f"service:{reg.service_id}"], checks[f"service:{reg.proxy_id}"]
    assert (ttl["ServiceID"], ttl["Name"], ttl["Type"]) == (reg.service_id, "Application health", "ttl")
    assert (alias["ServiceID"], alias["Type"]) == (reg.proxy_id, "alias")


async def test_the_check_passes_after_the_first_probe_and_peers_find_the_inbound_port(
    consul: Consul, app: App, nursery: trio.Nursery
) -> None:
    reg = registration(consul.settings, app)
    await nursery.start(reg.run)

    await eventually(is_listed(consul, reg))
    [entry] = await consul.get(connect_path(reg))
    assert endpoint_from_entry(entry) == Endpoint("127.0.0.1", INBOUND_PORT, tags=("v1",), meta={"zone": "a"})
    assert {c["CheckID"]: c["Status"] for c in entry["Checks"] if c["ServiceID"]} == {
        f"service:{reg.proxy_id}": "passing"
    }
    assert (await check(consul, reg.check_id) or {}).get("Status") == "passing"
    assert reg.state()["app_healthy"] is True


async def test_an_unhealthy_app_drops_the_instance_and_its_recovery_restores_it(
    consul: Consul, app: App, nursery: trio.Nursery, capture: CapturingLogger
) -> None:
    app.status = 503
    reg = registration(consul.settings, app, capture)
    await nursery.start(reg.run)

    async def failing() -> bool:
        return (await check(consul, reg.check_id) or {}).get("Output") == "status 503"

    await eventually(failing)
    assert (await check(consul, reg.check_id) or {})["Status"] == "critical"
    assert (await check(consul, f"service:{reg.proxy_id}") or {})["Status"] == "critical"
    assert await passing_proxies(consul, reg) == []
    assert [entry["Service"]["ID"] for entry in await consul.get(connect_path(reg).removesuffix("?passing"))] == [
        reg.proxy_id
    ]
    await probed(app, app.probes + 2)  # still critical, and not logged again

    app.status = 200

    await eventually(is_listed(consul, reg))
    app.status = 503

    await eventually(is_listed(consul, reg, expected=[]))
    # Logged once per change of state, not once per probe.
    assert [e["reason"] for e in events(capture, "application unhealthy")] == ["status 503", "status 503"]
    assert len(events(capture, "application healthy")) == 1


async def test_deregister_removes_both_and_ends_run(consul: Consul, app: App, capture: CapturingLogger) -> None:
    reg = registration(consul.settings, app, capture)
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            await nursery.start(reg.run)

            await eventually(is_listed(consul, reg))
            await reg.deregister()
        # run() returned by itself: it registers no more.

    services = await consul.get("/v1/agent/services")
    assert reg.service_id not in services and reg.proxy_id not in services
    await eventually(is_listed(consul, reg, expected=[]))  # a real agent syncs the catalog within milliseconds
    assert reg.state()["registered"] is False
    assert len(events(capture, "deregistered from consul")) == 1
    await reg.deregister()  # idempotent: nothing more is sent or logged
    assert len(events(capture, "deregistered from consul")) == 1
    if consul.fake is not None:
        assert consul.fake.requests.count("/v1/agent/service/deregister/") == 2


# -- failures (fake agent only) --------------------------------------------------------------------------------------


async def test_an_agent_that_lost_its_state_is_registered_with_again_within_an_interval(
    fake: FakeConsul, app: App, nursery: trio.Nursery, capture: CapturingLogger
) -> None:
    consul = Consul(fake_settings(fake), fake)
    reg = registration(consul.settings, app, capture)
    await nursery.start(reg.run)

    await eventually(is_listed(consul, reg))

    fake.restart()
    assert await passing_proxies(consul, reg) == []
    await eventually(is_listed(consul, reg), timeout=3 * INTERVAL)  # the next TTL update finds the check gone: 404

    assert reg.state()["registrations"] == 2
    assert len(events(capture, "consul lost this registration")) == 1
    # Registered again as healthy, as it was: no critical flap for peers.
    assert (await check(consul, reg.check_id) or {})["Status"] == "passing"


async def test_an_agent_refusing_at_start_does_not_hold_the_start_and_is_registered_with_once_back(
    fake: FakeConsul, app: App, nursery: trio.Nursery, capture: CapturingLogger
) -> None:
    consul = Consul(fake_settings(fake), fake)
    caps: list[float] = []

    def rng(low: float, high: float) -> float:
        caps.append(high)
        return 0.05

    fake.fault = "refuse"
    reg = registration(consul.settings, app, capture, rng=rng)
    with trio.fail_after(1):
        await nursery.start(reg.run)
    state = reg.state()
    assert (state["registered"], state["registrations"]) == (False, 0)
    assert state["last_error"] == "agent unreachable: connection refused"

    with trio.fail_after(2):
        while len(caps) < 4:
            await trio.sleep(0.05)
    fake.fault = None

    await eventually(is_listed(consul, reg))
    assert caps[:4] == [0.5, 1.0, 2.0, 4.0]  # full jitter under a doubling cap
    assert reg.state()["registered"] is True and reg.state()["last_error"] is None
    assert len(events(capture, "consul registration failing")) == 1  # once for the whole outage, not per attempt
    assert len(events(capture, "registered in consul")) == 1


async def test_a_hung_agent_does_not_hold_the_start(fake: FakeConsul, app: App, nursery: trio.Nursery) -> None:
    consul = Consul(fake_settings(fake, timeout=1.0), fake)
    fake.fault = "hang"
    reg = registration(consul.settings, app, rng=lambda low, high: 0.05, start_timeout=0.2)
    with trio.fail_after(0.8):
        await nursery.start(reg.run)
    assert reg.state()["registered"] is False
    fake.fault = None

    async def registered() -> bool:
        return reg.state()["registered"] and await passing_proxies(consul, reg) == [reg.proxy_id]

    await eventually(registered)


async def test_an_agent_unreachable_for_a_while_is_registered_with_again(
    fake: FakeConsul, app: App, nursery: trio.Nursery, capture: CapturingLogger
) -> None:
    consul = Consul(fake_settings(fake), fake)
    reg = registration(consul.settings, app, capture, rng=lambda low, high: 0.05)
    await nursery.start(reg.run)

    await eventually(is_listed(consul, reg))
    fake.fault = "refuse"

    async def lost() -> bool:
        return reg.state()["last_error"] is not None

    await eventually(lost)
    assert reg.state()["registered"] is False
    fake.fault = None

    async def registered_again() -> bool:
        return reg.state()["registrations"] == 2

    await eventually(registered_again)
    assert await passing_proxies(consul, reg) == [reg.proxy_id]
    assert len(events(capture, "consul registration failing")) == 1


async def test_deregister_with_the_agent_down_is_bounded_and_can_be_retried(
    fake: FakeConsul, app: App, nursery: trio.Nursery, capture: CapturingLogger
) -> None:
    consul = Consul(fake_settings(fake, timeout=0.5), fake)
    reg = registration(consul.settings, app, capture)
    await nursery.start(reg.run)
    fake.fault = "hang"

    with trio.fail_after(1.0):
        await reg.deregister()  # never raises; bounded by the agent's timeout
    [failure] = events(capture, "consul deregistration failed")
    assert failure["errors"]

    fake.fault = None
    await reg.deregister()
    services = await consul.get("/v1/agent/services")
    assert reg.service_id not in services and reg.proxy_id not in services


async def test_deregister_waits_for_a_registration_in_flight(fake: FakeConsul, app: App, nursery: trio.Nursery) -> None:
    """A registration the agent answers after deregister() began must not leave the instance behind."""
    consul = Consul(fake_settings(fake), fake)
    fake.fault = "hang"
    reg = registration(consul.settings, app, start_timeout=0.1)
    await nursery.start(reg.run)  # its registration hangs

    async with trio.open_nursery() as inner:
        inner.start_soon(reg.deregister)
        await trio.sleep(0.1)
        fake.fault = None  # the hung registration lands now, then deregister() runs
    await trio.sleep(3 * INTERVAL)

    services = await consul.get("/v1/agent/services")
    assert reg.service_id not in services and reg.proxy_id not in services
    assert fake.requests.count("/v1/agent/service/register") == 2  # the one in flight (both parts), none after


async def test_the_acl_token_is_never_logged(app: App, nursery: trio.Nursery, capture: CapturingLogger) -> None:
    with FakeConsul(acl_token="right-token-1234") as agent:
        wrong = registration(fake_settings(agent, token="wrong-token-5678"), app, capture, rng=lambda lo, hi: 0.05)
        right = registration(fake_settings(agent, token="right-token-1234"), app, capture)
        await nursery.start(wrong.run)
        await nursery.start(right.run)
        assert wrong.state()["last_error"] == "permission denied (check the ACL token)"
        assert right.state()["registered"] is True
        await wrong.deregister()
        await right.deregister()
    logged = repr([(call.args, call.kwargs) for call in capture.calls])
    assert "consul registration failing" in logged and "deregistered from consul" in logged
    assert "token-" not in logged


# -- addresses and IDs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "bind", "expected"),
    [
        (None, "10.0.0.5:15001", "10.0.0.5"),
        (None, "0.0.0.0:15001", ""),
        (None, "[::]:15001", ""),
        ("mesh-web.internal", "0.0.0.0:15001", "mesh-web.internal"),
    ],
)
def test_advertised_address(address: str | None, bind: str, expected: str) -> None:
    settings = RegistrationSettings(address=address)
    assert advertised_address(settings, InboundSettings(bind=bind)) == expected


async def test_a_wildcard_bind_is_advertised_at_the_node_address(
    fake: FakeConsul, app: App, nursery: trio.Nursery
) -> None:
    consul = Consul(fake_settings(fake), fake)
    reg = registration(consul.settings, app, bind=f"0.0.0.0:{INBOUND_PORT}", id="web-a")
    assert (reg.service_id, reg.check_id, reg.proxy_id) == ("web-a", "service:web-a", "web-a-sidecar-proxy")
    await nursery.start(reg.run)

    await eventually(is_listed(consul, reg))
    [entry] = await consul.get(connect_path(reg))
    assert entry["Service"]["Address"] == ""
    assert endpoint_from_entry(entry) == Endpoint(fake.node_address, INBOUND_PORT, tags=("v1",), meta={"zone": "a"})


@pytest.mark.parametrize(
    ("inbound", "telemetry", "advertised"),
    [
        ("10.0.0.5:15001", "0.0.0.0:9902", "10.0.0.5:9902"),  # a wildcard: where peers reach this instance
        ("0.0.0.0:15001", "[::]:9902", ":9902"),  # ... the node's own address, as Consul reports it
        ("0.0.0.0:15001", "10.0.0.7:9902", "10.0.0.7:9902"),  # a bound address as it is
    ],
)
def test_the_telemetry_listener_is_advertised_in_both_registrations_meta(
    inbound: str, telemetry: str, advertised: str
) -> None:
    settings = RegistrationSettings(meta={"zone": "a"})
    reg = Registration(
        ConsulAgent(ConsulSettings(address="127.0.0.1:8500")),
        settings,
        service=ServiceSettings(name="web", app="127.0.0.1:8080"),
        inbound=InboundSettings(bind=inbound),
        telemetry=parse_address(telemetry),
    )
    for definition in (reg.service_definition(), reg.proxy_definition()):
        assert definition["meta"] == {"zone": "a", "mesh-telemetry": advertised}
    plain = Registration(
        ConsulAgent(ConsulSettings(address="127.0.0.1:8500")),
        settings,
        service=ServiceSettings(name="web", app="127.0.0.1:8080"),
        inbound=InboundSettings(bind=inbound),
    )
    assert plain.service_definition()["meta"] == {"zone": "a"}  # without a telemetry listener, nothing added
