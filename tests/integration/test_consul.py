"""Consul discovery and registration with real sidecar processes and the stateful fake Consul agent.

Timing here is the real thing: a sidecar process follows the agent with blocking queries, so "routable within
1 s" is measured on the wall clock, with bounded waits for conditions.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from ca.authority import CertificateAuthority

from ..consul_fake import FakeConsul
from .clients import Client, request
from .conftest import free_port, sidecar_config
from .scripted import ScriptedEndpoint
from .test_mtls import write_identity

FAST = {"wait": "5s", "retry_max": "300ms"}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", "mesh.local")


@pytest.fixture
def consul() -> Iterator[FakeConsul]:
    with FakeConsul() as fake:
        yield fake


@pytest.fixture
def endpoints() -> Iterator[list[ScriptedEndpoint]]:
    made: list[ScriptedEndpoint] = []
    yield made
    for endpoint in made:
        endpoint.close()


def put(consul: FakeConsul, path: str, body: object = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(f"http://{consul.address}{path}", data=data, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as response:
        assert response.status == 200


def get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def register_proxy(consul: FakeConsul, service: str, endpoint: ScriptedEndpoint, *, status: str = "critical") -> str:
    """A peer's sidecar as Consul sees it: a connect-proxy for `service` at the endpoint, with a TTL check."""
    proxy_id = f"{service}-{endpoint.port}-sidecar-proxy"
    put(
        consul,
        "/v1/agent/service/register",
        {
            "ID": proxy_id,
            "Name": f"{service}-sidecar-proxy",
            "Kind": "connect-proxy",
            "Address": "127.0.0.1",
            "Port": endpoint.port,
            "Proxy": {"DestinationServiceName": service},
            "Check": {"CheckID": f"check:{proxy_id}", "TTL": "60s", "Status": status},
        },
    )
    return f"check:{proxy_id}"


def outbound(mesh, consul: FakeConsul | str, timeout: str = "10s", **discovery: object) -> tuple[int, str, object]:
    port, admin = free_port(), free_port()
    address = consul if isinstance(consul, str) else consul.address
    upstream = {"retries": {"attempts": 0}, "balancer": {"policy": "round_robin"}}  # every endpoint gets requests
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", **upstream}],
        consul={"address": address, "timeout": timeout},
        discovery={"consul": {**FAST, **discovery}},
        admin={"bind": f"127.0.0.1:{admin}"},
    )
    return port, f"127.0.0.1:{admin}", mesh.sidecar(config, "outbound")


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def eventually(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition()` held, polling every 20 ms; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def status(port: int) -> int:
    return request(port, "GET", "/").status


def cluster(admin: str) -> dict:
    return get(f"http://{admin}/clusters")["api"]  # type: ignore[index]


def test_an_instance_is_routable_within_1s_of_passing_and_gone_within_1s_of_critical(mesh, consul, endpoints) -> None:
    a, b = ScriptedEndpoint(), ScriptedEndpoint()
    endpoints += [a, b]
    check_a = register_proxy(consul, "api", a, status="passing")
    check_b = register_proxy(consul, "api", b)  # critical until its first pass
    port, admin, _ = outbound(mesh, consul)
    eventually(lambda: status(port) == 200, 5)
    assert [e["address"] for e in cluster(admin)["endpoints"]] == [a.address]
    put(consul, f"/v1/agent/check/pass/{check_b}")
    assert eventually(lambda: len(cluster(admin)["endpoints"]) == 2, 1.0) <= 1.0
    with Client(port) as client:
        assert [client.request("GET", f"/{i}").status for i in range(20)] == [200] * 20
    assert b.count() > 0
    put(consul, f"/v1/agent/check/fail/{check_a}")
    assert eventually(lambda: [e["address"] for e in cluster(admin)["endpoints"]] == [b.address], 1.0) <= 1.0
    before = a.count()
    with Client(port) as client:
        assert [client.request("GET", f"/{i}").status for i in range(20)] == [200] * 20
    assert a.count() == before


@pytest.mark.parametrize("fault", ["refuse", "500", "hang", "index_backwards"])
def test_traffic_keeps_flowing_to_the_last_known_endpoints_when_consul_fails(mesh, consul, endpoints, fault) -> None:
    a = ScriptedEndpoint()
    endpoints.append(a)
    register_proxy(consul, "api", a, status="passing")
    # A hung query is given up after wait + wait/16 + timeout: about 2 s here.
    port, admin, sidecar = outbound(mesh, consul, wait="1s", timeout="1s")
    eventually(lambda: status(port) == 200, 5)
    threads_before = sidecar.memory_kib("Threads")
    consul.fault = fault
    statuses = []
    deadline = time.monotonic() + 3  # several blocking-query rounds (wait 1 s) under the fault
    with Client(port) as client:
        while time.monotonic() < deadline:
            statuses.append(client.request("GET", "/").status)
            time.sleep(0.02)
    assert set(statuses) == {200}, statuses  # zero failed requests
    # Each query thread ends with its call's timeout: a hanging agent does not pile up threads.
    assert sidecar.memory_kib("Threads") <= threads_before + 1
    if fault != "index_backwards":  # Consul still answers then: nothing is stale
        eventually(lambda: cluster(admin)["stale_reason"] is not None, 5)  # a hang shows once its query times out
        assert cluster(admin)["age_s"] >= 1.0
        assert 'mesh_discovery_stale{upstream="api"} 1.0' in get_text(f"http://{admin}/metrics")
    consul.fault = None
    eventually(lambda: cluster(admin)["stale_reason"] is None, 5)


def test_an_empty_answer_for_a_known_service_is_no_healthy_endpoints(mesh, consul, endpoints) -> None:
    a = ScriptedEndpoint()
    endpoints.append(a)
    register_proxy(consul, "api", a, status="passing")
    port, _, _ = outbound(mesh, consul)
    eventually(lambda: status(port) == 200, 5)
    consul.fault = "empty"
    eventually(lambda: request(port, "GET", "/").headers.get("x-mesh-error") == "no healthy endpoints", 5)


def test_consul_down_at_start_then_up(mesh, endpoints) -> None:
    a = ScriptedEndpoint()
    endpoints.append(a)
    consul_port = free_port()  # nothing listens there yet
    port, _, _ = outbound(mesh, f"127.0.0.1:{consul_port}")
    response = request(port, "GET", "/")
    assert response.status == 503 and response.headers["x-mesh-error"] == "discovery unavailable"
    with FakeConsul().start(port=consul_port) as fake:  # Consul comes up
        register_proxy(fake, "api", a, status="passing")
        eventually(lambda: status(port) == 200, 5)  # without a restart of the sidecar


def test_sidecars_register_find_each_other_carry_mtls_and_deregister_on_sigterm(
    mesh, consul, tmp_path, ca: CertificateAuthority, endpoints
) -> None:
    app = ScriptedEndpoint(paths={"/healthz": "ok"})
    endpoints.append(app)
    in_port, out_port, admin_port = free_port(), free_port(), free_port()
    server_admin = f"127.0.0.1:{admin_port}"
    registration = {"health": {"http_path": "/healthz", "interval": "200ms"}, "ttl": "2s", "meta": {"zone": "a"}}
    server = mesh.sidecar(
        sidecar_config(
            service={"name": "api", "app": app.address},
            inbound={"bind": f"127.0.0.1:{in_port}", "allow": ["web"]},
            identity=write_identity(tmp_path / "api", ca.issue("api")),
            consul={"address": consul.address},
            registration=registration,
            admin={"bind": server_admin},
        ),
        "api",
    )
    mesh.sidecar(
        sidecar_config(
            service={"name": "web", "app": "127.0.0.1:1"},
            upstreams=[{"service": "api", "bind": f"127.0.0.1:{out_port}"}],
            consul={"address": consul.address},
            discovery={"consul": FAST},
            identity=write_identity(tmp_path / "web", ca.issue("web")),
        ),
        "web",
    )
    eventually(lambda: status(out_port) == 200, 5)
    work = [a for a in app.arrivals if a.path == "/"]
    assert work and work[-1].headers["x-mesh-peer-identity"] == "spiffe://mesh.local/ns/default/dc/dc1/svc/web"
    state = get(f"http://{server_admin}/registration")
    assert state["registered"] is True and state["app_healthy"] is True  # type: ignore[index]
    services = get(f"http://{consul.address}/v1/agent/services")
    assert set(services) == {f"api-{in_port}", f"api-{in_port}-sidecar-proxy"}  # type: ignore[arg-type]
    assert services[f"api-{in_port}-sidecar-proxy"]["Meta"] == {"zone": "a"}  # type: ignore[index]
    assert server.terminate() == 0
    assert get(f"http://{consul.address}/v1/agent/services") == {}
    server.wait_for("deregistered")


def test_an_app_failing_its_health_check_is_dropped_by_peers(mesh, consul, endpoints) -> None:
    sick = ScriptedEndpoint(paths={"/healthz": "ok"})
    well = ScriptedEndpoint(paths={"/healthz": "ok"})
    endpoints += [sick, well]
    registration = {"health": {"http_path": "/healthz", "interval": "200ms"}, "ttl": "2s"}
    ports = {}
    for name, app in (("a", sick), ("b", well)):
        ports[name] = free_port()
        mesh.sidecar(
            sidecar_config(
                service={"name": "api", "app": app.address},
                inbound={"bind": f"127.0.0.1:{ports[name]}", "tls": "off"},
                consul={"address": consul.address},
                registration=registration,
            ),
            f"api-{name}",
        )
    port, admin, _ = outbound(mesh, consul)
    eventually(lambda: len(cluster(admin)["endpoints"]) == 2, 5)
    sick.paths["/healthz"] = "status:503"
    eventually(lambda: len(cluster(admin)["endpoints"]) == 1, 5)
    before = len([a for a in sick.arrivals if a.path == "/"])
    with Client(port) as client:
        assert [client.request("GET", "/").status for _ in range(10)] == [200] * 10
    assert len([a for a in sick.arrivals if a.path == "/"]) == before


@pytest.mark.skipif(not os.environ.get("CONSUL_HTTP_ADDR"), reason="CONSUL_HTTP_ADDR not set: no real agent to test")
def test_against_a_real_agent_an_instance_becomes_routable(mesh, endpoints) -> None:
    a = ScriptedEndpoint()
    endpoints.append(a)
    address = os.environ["CONSUL_HTTP_ADDR"].removeprefix("http://")
    proxy_id = f"api-{a.port}-sidecar-proxy"
    body = {
        "ID": proxy_id,
        "Name": "api-sidecar-proxy",
        "Kind": "connect-proxy",
        "Address": "127.0.0.1",
        "Port": a.port,
        "Proxy": {"DestinationServiceName": "api"},
        "Check": {"CheckID": f"check:{proxy_id}", "TTL": "60s", "Status": "passing"},
    }
    req = urllib.request.Request(
        f"http://{address}/v1/agent/service/register", data=json.dumps(body).encode(), method="PUT"
    )
    urllib.request.urlopen(req, timeout=5).close()
    try:
        port, _, _ = outbound(mesh, address)
        eventually(lambda: status(port) == 200, 5)
    finally:
        req = urllib.request.Request(f"http://{address}/v1/agent/service/deregister/{proxy_id}", method="PUT")
        urllib.request.urlopen(req, timeout=5).close()
