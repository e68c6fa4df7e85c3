"""Consul discovery's blocking-query loop against a scripted agent, under trio's mock clock."""

from __future__ import annotations

import ipaddress
import itertools
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config import ConsulDiscoverySettings, ConsulSettings
from mesh.consul import ConsulAgent, ConsulDiscovery, ConsulUnavailable, endpoint_from_entry
from mesh.discovery import Endpoint

from ..consul_fake import FakeConsul


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **kw: self.events.append((level, event, kw))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for _, e, kw in self.events if e == event]


def entry(port: int, *, address: str = "10.0.0.1", node: str = "10.9.9.9", **service: Any) -> dict[str, Any]:
    return {"Node": {"Node": "n1", "Address": node}, "Service": {"Address": address, "Port": port, **service}}


class ScriptedAgent:
    """Answers each health call with the next scripted step: (index, entries), an exception, or "block"."""

    def __init__(self, steps: list[object]) -> None:
        self.steps = list(steps)
        self.calls: list[tuple[str, int, float, trio.Nursery | None]] = []
        self.address = "http://scripted"
        self.more = trio.Event()

    async def health(self, service: str, *, connect: bool, tags: list[str], index: int, wait: float) -> Any:
        self.calls.append((service, index, trio.current_time(), None))
        if not self.steps:
            await trio.sleep_forever()
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        if isinstance(step, tuple) and step[0] == "sleep":
            await trio.sleep(step[1])
            step = step[2]
        return step


def discovery(agent: ScriptedAgent, log: Log, **settings: Any) -> ConsulDiscovery:
    return ConsulDiscovery(
        agent,  # type: ignore[arg-type]
        ConsulDiscoverySettings(**settings),
        log=log,
        rng=lambda low, high: high,
    )


async def run_for(disco: ConsulDiscovery, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await disco.run()


def test_entries_become_endpoints_with_node_address_fallback_weights_tags_meta() -> None:
    assert endpoint_from_entry(entry(15000)) == Endpoint("10.0.0.1", 15000)
    assert endpoint_from_entry(entry(15000, address="")) == Endpoint("10.9.9.9", 15000)
    weighted = entry(15001, Weights={"Passing": 3, "Warning": 1}, Tags=["v2"], Meta={"zone": "a", "version": "2"})
    assert endpoint_from_entry(weighted) == Endpoint("10.0.0.1", 15001, 3, ("v2",), {"zone": "a", "version": "2"})
    assert endpoint_from_entry({"Service": {"Port": 1}}) is None  # no address anywhere
    assert endpoint_from_entry(entry(0)) is None


async def test_follows_the_index_and_publishes_changes(autojump_clock: trio.testing.MockClock) -> None:
    agent = ScriptedAgent([(5, [entry(1)]), (7, [entry(1), entry(2)]), (7, [entry(1), entry(2)])])
    log = Log()
    disco = discovery(agent, log)
    watch = disco.watch("api")
    await run_for(disco, 10)
    assert [index for _, index, _, _ in agent.calls] == [0, 5, 7, 7]  # each query passes the last X-Consul-Index
    assert watch.value is not None
    assert [e.port for e in watch.value.endpoints] == [1, 2]
    assert watch.value.source == "consul:connect/api" and watch.value.error is None
    assert len(log.named("endpoints changed")) == 1


async def test_an_index_going_backwards_starts_over_and_below_one_counts_as_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = ScriptedAgent([(50, [entry(1)]), (3, [entry(1)]), (0, [entry(1)])])
    disco = discovery(agent, Log())
    disco.watch("api")
    await run_for(disco, 10)
    assert [index for _, index, _, _ in agent.calls] == [0, 50, 0, 1]


async def test_queries_are_rate_limited(autojump_clock: trio.testing.MockClock) -> None:
    agent = ScriptedAgent([(i + 1, [entry(1)]) for i in range(50)])
    disco = discovery(agent, Log(), min_interval="1s")
    disco.watch("api")
    await run_for(disco, 10.5)
    times = [t for _, _, t, _ in agent.calls]
    assert len(times) == 11  # one query per second, although every answer came back at once
    assert all(later - earlier >= 1 for earlier, later in itertools.pairwise(times))


async def test_fails_static_and_logs_once_per_state_change(autojump_clock: trio.testing.MockClock) -> None:
    down = ConsulUnavailable("agent unreachable: connection refused")
    agent = ScriptedAgent([(5, [entry(1), entry(2)]), down, down, down, down, (9, [entry(1), entry(2)])])
    log = Log()
    disco = discovery(agent, log, retry_max="2s")
    watch = disco.watch("api")
    seen = []

    async def observe() -> None:
        version = 0
        while True:
            value, version = await watch.wait_changed(version)
            seen.append(value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(observe)
        await run_for(disco, 30)
        nursery.cancel_scope.cancel()
    learned, stale, fresh = seen[0], seen[1], seen[-1]
    assert stale.endpoints is learned.endpoints  # the last known endpoints, untouched
    assert stale.updated_at == learned.updated_at and stale.error == "agent unreachable: connection refused"
    assert fresh.error is None and fresh.endpoints is learned.endpoints
    assert len(log.named("consul unavailable; keeping the last known endpoints")) == 1  # not one per attempt
    assert len(log.named("consul answers again")) == 1
    # Backoff between failed attempts: jittered, capped at retry_max.
    times = [t for _, _, t, _ in agent.calls]
    assert all(0 < later - earlier <= 2 for earlier, later in itertools.pairwise(times[1:6]))


async def test_never_resolved_stays_none_until_consul_answers(autojump_clock: trio.testing.MockClock) -> None:
    refused = ConsulUnavailable("agent unreachable: connection refused")
    agent = ScriptedAgent([refused, refused, (4, [entry(1)])])
    log = Log()
    disco = discovery(agent, log)
    watch = disco.watch("api")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_for, disco, 30)
        await trio.sleep(0.1)
        assert watch.value is None  # 503 discovery unavailable meanwhile
        await trio.sleep(10)
        assert watch.value is not None and [e.port for e in watch.value.endpoints] == [1]
    assert len(log.named("consul unavailable; the service stays unresolved")) == 1


async def test_an_empty_answer_is_no_healthy_endpoints(autojump_clock: trio.testing.MockClock) -> None:
    agent = ScriptedAgent([(5, [entry(1)]), (6, [])])
    disco = discovery(agent, Log())
    watch = disco.watch("api")
    await run_for(disco, 5)
    assert watch.value is not None and watch.value.endpoints == () and watch.value.error is None


async def test_a_hung_agent_does_not_hold_the_start(autojump_clock: trio.testing.MockClock) -> None:
    agent = ScriptedAgent([("sleep", 1000, (5, [entry(1)]))])
    disco = discovery(agent, Log())
    disco.watch("api")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(disco.run)  # started after the start timeout, not after the hang
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("connect", [True, False])
async def test_passes_connect_tags_and_wait(autojump_clock: trio.testing.MockClock, connect: bool) -> None:
    received: list[dict[str, Any]] = []

    class Recording(ScriptedAgent):
        async def health(self, service: str, **kwargs: Any) -> Any:
            received.append(kwargs)
            return await super().health(service, **kwargs)

    agent = Recording([(5, [entry(1)])])
    disco = discovery(agent, Log(), connect=connect, tags=["v2", "blue"], wait="30s")
    disco.watch("api")
    await run_for(disco, 1)
    assert received[0] == {"connect": connect, "tags": ["v2", "blue"], "index": 0, "wait": 30.0}


async def test_the_agent_client_sends_the_acl_token_and_reports_a_bad_one() -> None:
    with FakeConsul(acl_token="s3cret") as fake:
        good = ConsulAgent(ConsulSettings(address=fake.address, token="s3cret"))
        await good.register_service(name="api", service_id="api-1", address="127.0.0.1", port=15000)
        index, entries = await good.health("api", connect=False, tags=[], index=0, wait=1)
        assert index >= 1 and [endpoint_from_entry(e) for e in entries] == [Endpoint("127.0.0.1", 15000)]
        bad = ConsulAgent(ConsulSettings(address=fake.address, token="wrong"))
        with pytest.raises(ConsulUnavailable) as refused:
            await bad.health("api", connect=False, tags=[], index=0, wait=1)
        assert refused.value.status == 403 and "s3cret" not in refused.value.reason
        fake.fault = "refuse"
        with pytest.raises(ConsulUnavailable, match="agent unreachable"):
            await good.health("api", connect=False, tags=[], index=0, wait=1)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (an IP SAN, as an agent's `https` listener needs) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consul-agent")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "agent.pem", tmp_path / "agent.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_an_https_agent_is_verified_with_consul_ca_file(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    with FakeConsul(tls=server) as fake:
        trusting = ConsulAgent(ConsulSettings(address=fake.url, ca_file=cert))
        index, entries = await trusting.health("api", connect=True, tags=[], index=0, wait=1)
        assert index >= 1 and entries == []
        untrusting = ConsulAgent(ConsulSettings(address=fake.url))  # the system's CAs do not know this agent
        with pytest.raises(ConsulUnavailable) as refused:
            await untrusting.health("api", connect=True, tags=[], index=0, wait=1)
        assert refused.value.reason == "agent TLS certificate not trusted (check consul.ca_file)"
