"""The fake Consul agent (tests/consul_fake.py) against Consul's HTTP API contract.

Tests taking the `agent` fixture are contract tests: they run against the fake and, when CONSUL_HTTP_ADDR is set
(CONSUL_HTTP_TOKEN optional), against that real agent too, so that the fake can be checked against the real thing;
otherwise the "real" case is reported as skipped. Tests taking the `fake` fixture exercise what only the fake can do
(faults, its clock, restarts, node checks, ACLs) and run on the fake only.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tests.consul_fake import FakeConsul, parse_duration


class Reply:
    def __init__(self, status: int, headers: Message, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def index(self) -> int:
        return int(self.headers["X-Consul-Index"])


class Agent:
    """Just enough of a Consul HTTP client, over urllib, for the fake or a real agent."""

    def __init__(self, base: str, token: str | None = None, fake: FakeConsul | None = None) -> None:
        self.base, self.token, self.fake = base.rstrip("/"), token, fake
        self.prefix = f"tm-{uuid.uuid4().hex[:8]}"  # everything a test creates is named under it
        self.services: list[str] = []

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=dict(headers or {}))
        if self.token and not request.has_header("X-consul-token"):
            request.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return Reply(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            with error:
                return Reply(error.code, error.headers, error.read())

    def get(self, path: str, **kw: Any) -> Reply:
        return self.call("GET", path, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.call("PUT", path, body, **kw)

    def register(self, definition: dict[str, Any], query: str = "") -> None:
        reply = self.put(f"/v1/agent/service/register{query}", definition)
        assert reply.status == 200, reply.text
        keys = {k.lower(): v for k, v in definition.items()}
        self.services.append(keys.get("id") or keys["name"])

    def health(self, name: str, query: str = "") -> list[dict[str, Any]]:
        reply = self.get(f"/v1/health/service/{name}{query}")
        assert reply.status == 200, reply.text
        return reply.json()

    def check(self, check_id: str) -> dict[str, Any]:
        return self.get("/v1/agent/checks").json()[check_id]

    def elapse(self, seconds: float) -> None:
        """Let time pass: the fake's clock moves at once, a real agent's clock by sleeping."""
        if self.fake is not None:
            self.fake.advance(seconds)
        else:
            time.sleep(seconds)

    def eventually(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """A real agent applies some changes asynchronously (alias checks, TTL timers): poll, bounded."""
        deadline = time.monotonic() + timeout
        while not (result := predicate()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert result, "condition not reached in time"
        return result

    def cleanup(self) -> None:
        for service_id in self.services:
            self.put(f"/v1/agent/service/deregister/{service_id}")
        self.call("DELETE", f"/v1/kv/{self.prefix}?recurse")


@pytest.fixture(params=["fake", "real"])
def agent(request: pytest.FixtureRequest) -> Iterator[Agent]:
    if request.param == "fake":
        with FakeConsul() as fake:
            yield Agent(fake.url, fake=fake)
        return
    address = os.environ.get("CONSUL_HTTP_ADDR")
    if not address:
        pytest.skip("CONSUL_HTTP_ADDR not set: contract test against a real agent skipped")
    real = Agent(address if "://" in address else f"http://{address}", token=os.environ.get("CONSUL_HTTP_TOKEN"))
    try:
        yield real
    finally:
        real.cleanup()


@pytest.fixture
def fake() -> Iterator[FakeConsul]:
    with FakeConsul() as consul:
        yield consul


class Background:
    """Run a call in a thread (a blocked query, a hanging request); keep its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        self.elapsed = time.monotonic() - self.started

    def join(self, timeout: float = 10.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call still running"
        return self.result

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def web(agent: Agent, suffix: str = "1", port: int = 8080, tags: list[str] | None = None, **check: Any) -> str:
    """Register one instance of the test's web service with a TTL check; returns the service ID."""
    service_id = f"{agent.prefix}-web-{suffix}"
    check = {"CheckID": f"{service_id}-ttl", "TTL": "30s"} | check
    agent.register({"Name": f"{agent.prefix}-web", "ID": service_id, "Port": port, "Tags": tags or [], "Check": check})
    return service_id


# ---- contract tests: the fake, and a real agent when CONSUL_HTTP_ADDR is set -----------------------------------------


def test_registered_service_is_critical_until_its_ttl_check_passes(agent: Agent) -> None:
    service_id = web(agent)
    name = f"{agent.prefix}-web"
    [entry] = agent.health(name)
    assert entry["Service"]["ID"] == service_id
    assert entry["Service"]["Port"] == 8080
    assert entry["Service"]["Address"] == ""  # clients fall back to the node's address
    assert entry["Node"]["Address"]
    assert entry["Service"]["Weights"] == {"Passing": 1, "Warning": 1}
    statuses = {c["CheckID"]: c["Status"] for c in entry["Checks"]}
    assert statuses[f"{service_id}-ttl"] == "critical"  # Consul's default for a new check
    assert statuses["serfHealth"] == "passing"  # node checks come with every entry
    assert agent.health(name, "?passing") == []
    assert agent.put(f"/v1/agent/check/pass/{service_id}-ttl?note=ready").status == 200
    [entry] = agent.health(name, "?passing=true")
    assert agent.health(name, "?passing=1") == [entry]
    assert agent.put(f"/v1/agent/check/warn/{service_id}-ttl").status == 200
    assert agent.health(name, "?passing") == []  # warning is not passing
    assert len(agent.health(name, "?passing=false")) == 1
    assert agent.get(f"/v1/health/service/{name}?passing=maybe").status == 400


def test_checks_start_critical_unless_given_a_status(agent: Agent) -> None:
    service_id = web(agent)
    for check_id, extra in [("plain", {}), ("born-passing", {"Status": "passing"})]:
        body = {"ID": f"{agent.prefix}-{check_id}", "Name": check_id, "ServiceID": service_id, "TTL": "30s"} | extra
        assert agent.put("/v1/agent/check/register", body).status == 200
    assert agent.check(f"{agent.prefix}-plain")["Status"] == "critical"
    assert agent.check(f"{agent.prefix}-born-passing")["Status"] == "passing"
    assert agent.check(f"{agent.prefix}-plain")["ServiceName"] == f"{agent.prefix}-web"


def test_ttl_check_passes_then_expires(agent: Agent) -> None:
    service_id = web(agent, TTL="1s")
    check_id = f"{service_id}-ttl"
    assert agent.put(f"/v1/agent/check/update/{check_id}", {"Status": "passing", "Output": "fine"}).status == 200
    assert agent.check(check_id)["Status"] == "passing"
    assert agent.check(check_id)["Output"] == "fine"
    agent.elapse(1.2)
    expired = agent.eventually(lambda: (c := agent.check(check_id))["Status"] == "critical" and c, timeout=3)
    assert expired["Output"].startswith("TTL expired")


def test_updating_an_unknown_or_non_ttl_check_fails_as_consul_does(agent: Agent) -> None:
    reply = agent.put(f"/v1/agent/check/pass/{agent.prefix}-nope")
    assert reply.status == 404
    assert f'Unknown check ID "{agent.prefix}-nope"' in reply.text
    service_id = web(agent)
    check_id = f"{agent.prefix}-tcp"
    body = {"ID": check_id, "Name": "tcp", "ServiceID": service_id, "TCP": "127.0.0.1:9", "Interval": "30s"}
    assert agent.put("/v1/agent/check/register", body).status == 200
    reply = agent.put(f"/v1/agent/check/update/{check_id}", {"Status": "passing"})
    assert reply.status == 500
    assert reply.text == f'CheckID "{check_id}" does not have associated TTL'
    assert agent.put(f"/v1/agent/check/update/{service_id}-ttl", {"Status": "bogus"}).status == 400


def test_blocking_query_returns_when_the_service_changes(agent: Agent) -> None:
    web(agent, "1")
    name = f"{agent.prefix}-web"
    first = agent.get(f"/v1/health/service/{name}")
    blocked = Background(lambda: agent.get(f"/v1/health/service/{name}?index={first.index}&wait=5s"))
    time.sleep(0.2)
    assert blocked.running
    web(agent, "2", port=8081)
    reply = blocked.join()
    assert blocked.elapsed < 3
    assert reply.index > first.index
    assert sorted(e["Service"]["Port"] for e in reply.json()) == [8080, 8081]


def test_blocking_query_returns_unchanged_after_wait(agent: Agent) -> None:
    web(agent)
    name = f"{agent.prefix}-web"
    first = agent.get(f"/v1/health/service/{name}")
    wait = "300ms" if agent.fake else "1s"
    started = time.monotonic()
    reply = agent.get(f"/v1/health/service/{name}?index={first.index}&wait={wait}")
    elapsed = time.monotonic() - started
    assert parse_duration(wait) * 0.9 <= elapsed < parse_duration(wait) * 1.0625 + 1.0
    assert reply.index == first.index
    assert reply.json() == first.json()
    assert agent.get(f"/v1/health/service/{name}?index=1&wait=nonsense").status == 400


def test_consul_index_only_grows_and_is_always_present(agent: Agent) -> None:
    name = f"{agent.prefix}-web"
    seen = [agent.get(f"/v1/health/service/{name}").index]
    service_id = web(agent)
    seen.append(agent.get(f"/v1/health/service/{name}").index)
    agent.put(f"/v1/agent/check/pass/{service_id}-ttl")
    seen.append(agent.get(f"/v1/health/service/{name}").index)
    agent.put(f"/v1/agent/service/deregister/{service_id}")
    seen.append(agent.get(f"/v1/health/service/{name}").index)
    seen.append(agent.get("/v1/catalog/services").index)
    reply = agent.get(f"/v1/health/service/{name}")
    assert reply.headers["X-Consul-KnownLeader"] == "true"
    assert reply.headers["X-Consul-LastContact"] is not None
    assert all(i >= 1 for i in seen)
    assert seen[0] < seen[1] < seen[2] < seen[3] <= seen[4]


def test_identical_reregistration_does_not_wake_watchers(agent: Agent) -> None:
    web(agent)
    name = f"{agent.prefix}-web"
    first = agent.get(f"/v1/health/service/{name}")
    web(agent)  # what a sidecar re-registering on a timer does
    again = agent.get(f"/v1/health/service/{name}?index={first.index}&wait=200ms")
    assert again.index == first.index
    assert again.json() == first.json()


def test_tag_filter_is_repeatable_and_all_must_match(agent: Agent) -> None:
    web(agent, "blue", tags=["v1", "blue"])
    web(agent, "green", port=8081, tags=["v1", "green"])
    name = f"{agent.prefix}-web"
    assert len(agent.health(name, "?tag=v1")) == 2
    [blue] = agent.health(name, "?tag=v1&tag=blue")
    assert blue["Service"]["ID"] == f"{agent.prefix}-web-blue"
    assert agent.health(name, "?tag=blue&tag=green") == []
    assert agent.health(name, "?tag=v2") == []
    assert sorted(agent.get("/v1/catalog/services").json()[name]) == ["blue", "green", "v1"]


def test_connect_endpoint_returns_the_sidecar_proxy_with_its_own_port(agent: Agent) -> None:
    app_id = web(agent)
    name = f"{agent.prefix}-web"
    proxy = {
        "name": f"{name}-sidecar-proxy",
        "id": f"{app_id}-sidecar-proxy",
        "kind": "connect-proxy",
        "port": 21000,
        "address": "127.0.0.2",
        "proxy": {"destination_service_name": name, "destination_service_id": app_id, "local_service_port": 8080},
        "check": {"name": "proxy alive", "ttl": "30s", "status": "passing"},
    }
    agent.register(proxy)
    [entry] = agent.get(f"/v1/health/connect/{name}").json()
    assert entry["Service"]["Kind"] == "connect-proxy"
    assert entry["Service"]["Port"] == 21000
    assert entry["Service"]["Address"] == "127.0.0.2"
    assert entry["Service"]["Proxy"]["DestinationServiceName"] == name
    assert entry["Service"]["Proxy"]["DestinationServiceID"] == app_id
    assert entry["Service"]["Proxy"]["LocalServicePort"] == 8080
    assert entry["Node"]["Address"]
    assert [e["Service"]["Port"] for e in agent.health(name)] == [8080]
    assert agent.get(f"/v1/health/connect/{name}?passing").json() == [entry]
    assert agent.get(f"/v1/health/connect/{agent.prefix}-other").json() == []
    bad = proxy | {"id": "x", "proxy": {"local_service_port": 1}}
    assert agent.put("/v1/agent/service/register", bad).status == 400


def test_alias_check_follows_the_app_service(agent: Agent) -> None:
    app_id = web(agent)
    proxy_id = f"{app_id}-sidecar-proxy"
    agent.register(
        {
            "Name": f"{agent.prefix}-web-sidecar-proxy",
            "ID": proxy_id,
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": f"{agent.prefix}-web", "DestinationServiceID": app_id},
            "Checks": [{"CheckID": f"{proxy_id}-alias", "Name": "app alive", "AliasService": app_id}],
        }
    )
    alias = f"{proxy_id}-alias"

    def status_is(status: str) -> bool:
        return agent.check(alias)["Status"] == status

    agent.eventually(lambda: status_is("critical"))
    agent.put(f"/v1/agent/check/pass/{app_id}-ttl")
    agent.eventually(lambda: status_is("passing"))
    agent.put(f"/v1/agent/check/warn/{app_id}-ttl")
    agent.eventually(lambda: status_is("warning"))
    agent.put(f"/v1/agent/check/pass/{app_id}-ttl")
    agent.eventually(lambda: status_is("passing"))
    agent.put(f"/v1/agent/service/deregister/{app_id}")
    agent.eventually(lambda: status_is("critical"))


def test_deregister_removes_the_service_and_its_checks(agent: Agent) -> None:
    service_id = web(agent)
    assert agent.get(f"/v1/agent/service/{service_id}").json()["Service"] == f"{agent.prefix}-web"
    assert f"{service_id}-ttl" in agent.get("/v1/agent/checks").json()
    assert agent.put(f"/v1/agent/service/deregister/{service_id}").status == 200
    assert service_id not in agent.get("/v1/agent/services").json()
    assert f"{service_id}-ttl" not in agent.get("/v1/agent/checks").json()
    assert agent.get(f"/v1/agent/service/{service_id}").status == 404
    assert agent.health(f"{agent.prefix}-web") == []
    assert f"{agent.prefix}-web" not in agent.get("/v1/catalog/services").json()


def test_service_definition_keys_are_case_insensitive(agent: Agent) -> None:
    agent.register(
        {
            "name": f"{agent.prefix}-api",
            "id": f"{agent.prefix}-api-1",
            "address": "10.1.2.3",
            "port": 9000,
            "tags": ["a"],
            "meta": {"zone": "z1"},
            "weights": {"passing": 5, "warning": 2},
            "checks": [{"name": "one", "ttl": "30s"}, {"name": "two", "ttl": "30s", "notes": "second"}],
        }
    )
    service = agent.get("/v1/agent/services").json()[f"{agent.prefix}-api-1"]
    assert service["Service"] == f"{agent.prefix}-api"
    assert (service["Address"], service["Port"], service["Tags"]) == ("10.1.2.3", 9000, ["a"])
    assert service["Meta"] == {"zone": "z1"}
    assert service["Weights"] == {"Passing": 5, "Warning": 2}
    checks = agent.get("/v1/agent/checks").json()
    # Several checks in one definition get numbered IDs, as Consul names them.
    assert checks[f"service:{agent.prefix}-api-1:2"]["Notes"] == "second"
    assert checks[f"service:{agent.prefix}-api-1:1"]["Name"] == "one"


def test_replace_existing_checks(agent: Agent) -> None:
    service_id = f"{agent.prefix}-svc"
    both = [
        {"CheckID": f"{service_id}-a", "Name": "a", "TTL": "30s"},
        {"CheckID": f"{service_id}-b", "Name": "b", "TTL": "30s"},
    ]
    agent.register({"Name": service_id, "Checks": both})
    agent.register({"Name": service_id, "Checks": both[:1]})
    assert {f"{service_id}-a", f"{service_id}-b"} <= set(agent.get("/v1/agent/checks").json())
    agent.register({"Name": service_id, "Checks": both[:1]}, query="?replace-existing-checks")
    checks = agent.get("/v1/agent/checks").json()
    assert f"{service_id}-a" in checks
    assert f"{service_id}-b" not in checks


def test_kv_round_trips_bytes_in_base64(agent: Agent) -> None:
    key, value = f"{agent.prefix}/config/blob", b"\x00\xffbinary\n"
    missing = agent.get(f"/v1/kv/{key}")
    assert missing.status == 404
    assert missing.index >= 1
    assert agent.put(f"/v1/kv/{key}", value).json() is True
    [entry] = agent.get(f"/v1/kv/{key}").json()
    assert base64.b64decode(entry["Value"]) == value
    assert entry["Key"] == key
    assert entry["CreateIndex"] == entry["ModifyIndex"] >= 1
    assert agent.get(f"/v1/kv/{key}?raw").body == value
    assert agent.put(f"/v1/kv/{key}?cas=1", b"lost").json() is False
    assert agent.put(f"/v1/kv/{key}?cas={entry['ModifyIndex']}", b"won").json() is True
    assert agent.put(f"/v1/kv/{agent.prefix}/config/other", b"").status == 200
    listing = agent.get(f"/v1/kv/{agent.prefix}/config?recurse").json()
    assert [(e["Key"], e["Value"]) for e in listing] == [
        (key, base64.b64encode(b"won").decode()),
        (f"{agent.prefix}/config/other", None),
    ]
    assert agent.get(f"/v1/kv/{agent.prefix}/?keys&separator=/").json() == [f"{agent.prefix}/config/"]
    assert agent.call("DELETE", f"/v1/kv/{key}").status == 200
    assert agent.get(f"/v1/kv/{key}").status == 404
    agent.put(f"/v1/kv/{key}", b"again")
    assert agent.call("DELETE", f"/v1/kv/{agent.prefix}/config?recurse").status == 200
    assert agent.get(f"/v1/kv/{agent.prefix}/config?recurse").status == 404


def test_agent_self_status_and_unknown_datacenter(agent: Agent) -> None:
    me = agent.get("/v1/agent/self").json()
    datacenter = me["Config"]["Datacenter"]
    assert me["Config"]["NodeName"]
    assert me["Member"]["Addr"]
    leader = agent.get("/v1/status/leader")
    assert isinstance(leader.json(), str)
    assert leader.json()
    assert agent.get(f"/v1/catalog/services?dc={datacenter}").status == 200
    reply = agent.get(f"/v1/health/service/{agent.prefix}-web?dc={agent.prefix}-nowhere")
    assert reply.status == 500
    assert "No path to datacenter" in reply.text


# ---- the fake only: its clock, node checks, ACLs, faults, restarts -------------------------------------------------


def test_critical_node_check_hides_every_service_from_passing(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    service_id = web(agent, Status="passing")
    assert len(agent.health(f"{agent.prefix}-web", "?passing")) == 1
    fake.set_node_check("critical", "Agent not live or unreachable")
    assert agent.health(f"{agent.prefix}-web", "?passing") == []
    [entry] = agent.health(f"{agent.prefix}-web")
    assert {c["CheckID"]: c["Status"] for c in entry["Checks"]} == {
        "serfHealth": "critical",
        f"{service_id}-ttl": "passing",
    }
    fake.set_node_check("passing")
    assert len(agent.health(f"{agent.prefix}-web", "?passing")) == 1


def test_service_critical_too_long_is_deregistered(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    service_id = web(agent, TTL="10s", DeregisterCriticalServiceAfter="30s", Status="passing")
    fake.advance(15)  # TTL expired: critical since t=10
    assert agent.check(f"{service_id}-ttl")["Status"] == "critical"
    fake.advance(40)  # critical for 45 s > 30 s, but Consul never reaps before one minute
    assert service_id in agent.get("/v1/agent/services").json()
    fake.advance(20)  # critical for 65 s
    assert service_id not in agent.get("/v1/agent/services").json()
    assert agent.put(f"/v1/agent/check/pass/{service_id}-ttl").status == 404  # how a sidecar learns it is gone


def test_fake_clock_ends_a_blocking_wait(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    first = agent.get("/v1/catalog/services")
    blocked = Background(lambda: agent.get(f"/v1/catalog/services?index={first.index}&wait=2m"))
    time.sleep(0.1)
    assert blocked.running
    fake.advance(130)  # past wait plus the most jitter (wait/16)
    assert blocked.join(5).index == first.index
    assert blocked.elapsed < 2


def test_acl_token_is_required_when_configured() -> None:
    with FakeConsul(acl_token="s3cret") as fake:
        agent = Agent(fake.url)
        assert (r := agent.get("/v1/agent/services")).status == 403 and r.text == "Permission denied"
        assert (r := agent.get("/v1/agent/services", headers={"X-Consul-Token": "wrong"})).status == 403
        assert r.text == "ACL not found"
        assert agent.get("/v1/agent/services", headers={"X-Consul-Token": "s3cret"}).status == 200
        assert agent.get("/v1/agent/services?token=s3cret").status == 200
        assert agent.get("/v1/agent/services", headers={"Authorization": "Bearer s3cret"}).status == 200
        assert agent.put("/v1/agent/service/register", {"Name": "x"}).status == 403
        assert agent.get("/v1/status/leader").status == 200  # Consul's status endpoints need no token


def test_fault_refuse_closes_the_port_and_reopens_the_same_one(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    port = fake.port
    first = agent.get("/v1/catalog/services")
    blocked = Background(lambda: agent.get(f"/v1/catalog/services?index={first.index}&wait=30s"))
    time.sleep(0.1)
    fake.fault = "refuse"
    blocked.join(5)
    assert isinstance(blocked.error, http.client.RemoteDisconnected | ConnectionError)  # the long poll was cut
    with pytest.raises(urllib.error.URLError) as refused:
        agent.get("/v1/agent/self")
    assert isinstance(refused.value.reason, ConnectionRefusedError)
    fake.fault = None
    assert fake.port == port
    assert agent.get("/v1/agent/self").status == 200


def test_fault_500_answers_every_api_call(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    fake.fault = "500"
    for reply in (agent.get("/v1/catalog/services"), agent.put("/v1/agent/service/register", {"Name": "x"})):
        assert reply.status == 500
        assert "No cluster leader" in reply.text
    fake.fault = None
    assert agent.get("/v1/catalog/services").json() == {}  # the register above never happened


def test_fault_hang_holds_requests_until_cleared_and_does_not_wedge_stop() -> None:
    fake = FakeConsul().start()
    try:
        agent = Agent(fake.url, fake=fake)
        fake.fault = "hang"
        held = Background(lambda: agent.get("/v1/agent/self"))
        time.sleep(0.3)
        assert held.running
        fake.fault = None
        assert held.join(5).status == 200
        fake.fault = "hang"
        stuck = Background(lambda: agent.get("/v1/agent/self"))
        time.sleep(0.1)
        started = time.monotonic()
    finally:
        fake.stop()
    assert time.monotonic() - started < 2
    stuck.join(5)
    assert isinstance(stuck.error, http.client.RemoteDisconnected | ConnectionError)


def test_fault_index_backwards_keeps_the_data(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    web(agent)
    name = f"{agent.prefix}-web"
    before = agent.get(f"/v1/health/service/{name}")
    fake.fault = "index_backwards"
    after = agent.get(f"/v1/health/service/{name}")
    assert 1 <= after.index < before.index
    assert after.json() == before.json()
    # As on a server whose Raft index was reset: a client still holding the old index waits out its whole `wait`.
    started = time.monotonic()
    assert agent.get(f"/v1/health/service/{name}?index={before.index}&wait=200ms").index == after.index
    assert time.monotonic() - started >= 0.18
    # A client that reset to the new index blocks and wakes normally.
    blocked = Background(lambda: agent.get(f"/v1/health/service/{name}?index={after.index}&wait=5s"))
    time.sleep(0.1)
    web(agent, "2", port=8081)
    assert after.index < blocked.join().index < before.index
    fake.fault = None
    assert agent.get(f"/v1/health/service/{name}").index > before.index


def test_fault_empty_makes_health_endpoints_answer_nothing_with_a_higher_index(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    web(agent, Status="passing")
    name = f"{agent.prefix}-web"
    before = agent.get(f"/v1/health/service/{name}")
    blocked = Background(lambda: agent.get(f"/v1/health/service/{name}?index={before.index}&wait=5s"))
    time.sleep(0.1)
    fake.fault = "empty"
    emptied = blocked.join()
    assert emptied.json() == []
    assert emptied.index > before.index
    assert agent.get(f"/v1/health/connect/{name}").json() == []
    assert name in agent.get("/v1/catalog/services").json()  # the catalog itself still has it
    fake.fault = None
    restored = agent.get(f"/v1/health/service/{name}")
    assert len(restored.json()) == 1
    assert restored.index > emptied.index


def test_restart_loses_services_checks_and_kv_but_not_the_index(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    service_id = web(agent)
    agent.put(f"/v1/kv/{agent.prefix}/k", b"v")
    before = agent.get("/v1/catalog/services")
    blocked = Background(lambda: agent.get(f"/v1/catalog/services?index={before.index}&wait=30s"))
    time.sleep(0.1)
    fake.restart()
    blocked.join(5)
    assert isinstance(blocked.error, http.client.RemoteDisconnected | ConnectionError)  # connections die with it
    assert agent.get("/v1/agent/services").json() == {}
    assert agent.get("/v1/agent/checks").json() == {}
    assert agent.get(f"/v1/kv/{agent.prefix}/k").status == 404
    assert agent.get("/v1/catalog/services").index > before.index
    assert agent.put(f"/v1/agent/check/pass/{service_id}-ttl").status == 404


def test_request_log_counts_blocking_queries(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    index = agent.get("/v1/catalog/services").index
    agent.get(f"/v1/catalog/services?index={index}&wait=10ms")
    agent.put("/_fake/advance?seconds=1")  # control requests are not logged
    assert fake.requests.count("/v1/catalog/services") == 2
    assert fake.requests.count("/v1/catalog/services", blocking=True) == 1
    assert fake.requests[1].query["wait"] == ["10ms"]
    method, path, query = fake.requests[0]
    assert (method, path, query) == ("GET", "/v1/catalog/services", {})
    fake.requests.clear()
    assert len(fake.requests) == 0


def test_http_control_endpoints_drive_the_fake(fake: FakeConsul) -> None:
    agent = Agent(fake.url, fake=fake)
    service_id = web(agent, Status="passing", TTL="10s")
    assert agent.put("/_fake/fault?mode=500").json()["Fault"] == "500"
    assert agent.get("/v1/agent/self").status == 500
    assert agent.put("/_fake/fault?mode=").status == 200
    assert fake.fault is None
    agent.put("/_fake/advance?seconds=11")
    assert agent.check(f"{service_id}-ttl")["Status"] == "critical"
    agent.put(f"/_fake/check/{service_id}-ttl?status=warning&output=slow")
    assert agent.check(f"{service_id}-ttl")["Output"] == "slow"
    agent.put("/_fake/node_check?status=critical")
    assert agent.health(f"{agent.prefix}-web")[0]["Checks"][0]["Status"] == "critical"
    assert agent.put("/_fake/restart").status == 200
    assert agent.get("/v1/agent/services").json() == {}
    assert agent.put("/_fake/fault?mode=bogus").status == 400


def test_runs_standalone() -> None:
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "tests.consul_fake", "--port", "0"]
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            address = process.stdout.readline().strip()
            assert address.startswith("127.0.0.1:")
            assert Agent(f"http://{address}").get("/v1/status/leader").status == 200
        finally:
            process.terminate()
            process.wait(5)
