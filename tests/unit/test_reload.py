"""Config reload decisions: file versions, listener and cluster diffs, and the settings only a restart changes."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mesh.config import Address, SidecarConfig, UpstreamSettings
from mesh.reload import (
    RESTART_SETTINGS,
    ConfigVersion,
    ListenerDiff,
    ReloadRefused,
    diff_listeners,
    file_digest,
    inbound_cluster_unchanged,
    listener_name,
    sections_needing_restart,
    unchanged_clusters,
)

BASE: dict[str, Any] = {
    "service": {"name": "web", "app": "127.0.0.1:8080"},
    "inbound": {"bind": "0.0.0.0:15000", "tls": "off"},
    "upstreams": [
        {"service": "api", "bind": "127.0.0.1:9001", "tls": "off"},
        {"service": "db", "bind": "127.0.0.1:9002", "protocol": "tcp", "tls": "off"},
    ],
    "discovery": {"static": {"api": ["127.0.0.1:15001"], "db": ["127.0.0.1:15002"]}},
}


def config(change: Callable[[dict[str, Any]], object] | None = None) -> SidecarConfig:
    """BASE, changed in place by `change` first."""
    data = copy.deepcopy(BASE)
    if change is not None:
        change(data)
    return SidecarConfig.model_validate(data, context={"base_dir": Path("/etc/mesh")})


def upstream(data: dict[str, Any], service: str) -> dict[str, Any]:
    return next(u for u in data["upstreams"] if u["service"] == service)


# --- versions ------------------------------------------------------------------------------------------------------


def test_the_first_version_is_one_with_the_files_digest() -> None:
    data = b"service: {name: web, app: 127.0.0.1:8080}\n"
    version = ConfigVersion.first(data, source="/etc/mesh/sidecar.yaml", loaded_at=1_700_000_000.0)
    assert version == ConfigVersion(1, 1_700_000_000.0, hashlib.sha256(data).hexdigest(), "/etc/mesh/sidecar.yaml")
    assert file_digest(data) == version.digest
    assert version.same_file(data)
    assert not version.same_file(data + b"\n")


def test_each_applied_reload_is_the_next_version() -> None:
    first = ConfigVersion.first(b"a", source="sidecar.yaml", loaded_at=100.0)
    second = first.next(b"b", loaded_at=160.5)
    assert (second.version, second.loaded_at, second.digest, second.source) == (
        2,
        160.5,
        file_digest(b"b"),
        "sidecar.yaml",
    )
    assert second.next(b"c", loaded_at=200.0, source="other.yaml").source == "other.yaml"
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.version = 5  # type: ignore[misc]


def test_a_version_as_shown_by_the_admin_listener() -> None:
    version = ConfigVersion(3, 1_700_000_000.25, "ab" * 32, "sidecar.yaml")
    assert version.as_dict() == {
        "version": 3,
        "loaded_at": 1_700_000_000.25,
        "loaded_at_utc": "2023-11-14T22:13:20+00:00",
        "digest": "ab" * 32,
        "source": "sidecar.yaml",
    }


def test_a_refused_reload_carries_one_error_per_line() -> None:
    refused = ReloadRefused(line for line in ["sidecar.yaml: upstreams[0].bind: bad", "sidecar.yaml: x: bad"])
    assert refused.errors == ["sidecar.yaml: upstreams[0].bind: bad", "sidecar.yaml: x: bad"]
    assert str(refused) == "sidecar.yaml: upstreams[0].bind: bad\nsidecar.yaml: x: bad"


# --- listeners -----------------------------------------------------------------------------------------------------


def test_the_same_config_keeps_every_listener() -> None:
    assert diff_listeners(config(), config()) == ListenerDiff(
        added=[], removed=[], changed_bind=[], kept=["inbound", "api", "db"]
    )


def test_listeners_added_and_removed() -> None:
    def change(data: dict[str, Any]) -> None:
        data["upstreams"][1] = {"service": "cache", "bind": "127.0.0.1:9003", "tls": "off"}
        data["discovery"]["static"]["cache"] = ["127.0.0.1:15003"]
        del data["inbound"]

    diff = diff_listeners(config(), config(change))
    assert diff == ListenerDiff(added=["cache"], removed=["inbound", "db"], changed_bind=[], kept=["api"])


@pytest.mark.parametrize(
    "change",
    [
        lambda data: upstream(data, "api").update(bind="127.0.0.1:9101"),
        lambda data: upstream(data, "api").update(protocol="http2"),
        lambda data: (
            upstream(data, "api").update(tls="mutual", identity=None)
            or data.update(identity={"files": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem"}})
        ),
    ],
    ids=["bind", "protocol", "tls"],
)
def test_a_listener_on_another_address_protocol_or_tls_mode_is_rebound(change: Callable[[dict], object]) -> None:
    diff = diff_listeners(config(), config(change))
    assert (diff.changed_bind, diff.kept) == (["api"], ["inbound", "db"])


def test_the_inbound_is_rebound_when_the_applications_protocol_changes() -> None:
    diff = diff_listeners(config(), config(lambda data: data["service"].update(protocol="http2")))
    assert diff.changed_bind == ["inbound"]


def test_settings_behind_the_socket_keep_it() -> None:
    def change(data: dict[str, Any]) -> None:
        upstream(data, "api").update(
            timeouts={"request": "2s"}, limits={"max_connections": 10}, retries={"attempts": 0}
        )
        data["inbound"]["allow"] = ["frontend"]

    diff = diff_listeners(config(), config(change))
    assert (diff.changed_bind, diff.kept) == ([], ["inbound", "api", "db"])


def test_an_upstream_without_a_service_is_named_by_its_address() -> None:
    """An upstream that only routes (no `service` of its own) is known by its bind address."""
    routing = SimpleNamespace(service=None, bind=Address("127.0.0.1", 9005), protocol="http", tls="off")
    assert listener_name(routing) == "127.0.0.1:9005"
    assert listener_name(SimpleNamespace(service="api", bind=Address("127.0.0.1", 9001))) == "api"
    old = config()
    new = old.model_copy(update={"upstreams": [*old.upstreams, routing]})
    assert diff_listeners(old, new).added == ["127.0.0.1:9005"]
    assert diff_listeners(new, old).removed == ["127.0.0.1:9005"]


# --- clusters ------------------------------------------------------------------------------------------------------


def test_the_same_config_keeps_every_cluster() -> None:
    assert unchanged_clusters(config(), config()) == {"api", "db"}


@pytest.mark.parametrize(
    "settings",
    [
        {"protocol": "http2"},
        {"mesh_http2": True},
        {"timeouts": {"connect": "2s"}},
        {"pool": {"idle_timeout": "5s"}},
        {"balancer": {"policy": "round_robin"}},
        {"outlier": {"consecutive_failures": 3}},
        {"circuit_breakers": {"max_requests": 10}},
        {"retries": {"attempts": 0}},
        {"hedging": {"delay": "50ms"}},
        {"health_check": {"interval": "1s"}},
        {"limits": {"http2": {"max_concurrent_streams": 10}}},
        {"identity": "spiffe://other.domain/ns/default/dc/dc1/svc/api"},
    ],
    ids=lambda settings: next(iter(settings)),
)
def test_a_cluster_whose_settings_change_is_rebuilt(settings: dict[str, Any]) -> None:
    assert unchanged_clusters(config(), config(lambda data: upstream(data, "api").update(settings))) == {"db"}


def test_listener_only_settings_keep_the_cluster() -> None:
    def change(data: dict[str, Any]) -> None:
        upstream(data, "api").update(
            bind="127.0.0.1:9101",
            timeouts={"connect": "1s", "request": "3s", "idle": "1m"},
            limits={"max_connections": 5, "max_body_bytes": "1MiB"},
            upgrades=[],
        )

    assert unchanged_clusters(config(), config(change)) == {"api", "db"}


def test_clusters_only_in_one_config_are_not_kept() -> None:
    def change(data: dict[str, Any]) -> None:
        data["upstreams"][1] = {"service": "cache", "bind": "127.0.0.1:9003", "tls": "off"}
        data["discovery"]["static"]["cache"] = ["127.0.0.1:15003"]

    assert unchanged_clusters(config(), config(change)) == {"api"}


def test_top_level_clusters_are_compared_too() -> None:
    """Clusters without a listener of their own (a route's destination), listed or keyed by service."""
    old = config()
    api, db = old.upstreams
    reviews = UpstreamSettings(service="reviews", bind=Address("127.0.0.1", 0), tls="off")
    slower = reviews.model_copy(update={"retries": reviews.retries.model_copy(update={"attempts": 5})})

    def with_clusters(clusters: object) -> SimpleNamespace:
        return SimpleNamespace(upstreams=[api], clusters=clusters)

    assert unchanged_clusters(with_clusters([reviews]), with_clusters([reviews])) == {"api", "reviews"}
    assert unchanged_clusters(with_clusters([reviews]), with_clusters([slower])) == {"api"}
    assert unchanged_clusters(with_clusters({"reviews": reviews}), with_clusters({"reviews": reviews})) == {
        "api",
        "reviews",
    }
    assert unchanged_clusters(with_clusters({"db": db}), old) == {"api", "db"}


def test_the_local_applications_cluster() -> None:
    assert inbound_cluster_unchanged(config(), config(lambda data: data["inbound"].update(allow=["frontend"])))
    assert not inbound_cluster_unchanged(config(), config(lambda data: data["service"].update(app="127.0.0.1:8081")))
    assert not inbound_cluster_unchanged(
        config(), config(lambda data: data["inbound"].update(pool={"idle_timeout": 1}))
    )
    assert not inbound_cluster_unchanged(config(), config(lambda data: data.pop("inbound")))


# --- restart -------------------------------------------------------------------------------------------------------


def test_no_restart_needed_for_the_same_config_or_reloadable_settings() -> None:
    def change(data: dict[str, Any]) -> None:
        data["mesh"] = {"default_policy": "deny"}
        data["service"]["app"] = "127.0.0.1:8081"
        upstream(data, "api")["retries"] = {"attempts": 0}

    assert sections_needing_restart(config(), config()) == []
    assert sections_needing_restart(config(), config(change)) == []


def test_settings_only_a_restart_changes_are_named() -> None:
    def change(data: dict[str, Any]) -> None:
        data["mesh"] = {"trust_domain": "other.local", "datacenter": "dc2"}
        data["service"]["name"] = "shop"
        data["admin"] = {"bind": "127.0.0.1:9902"}
        data["log"] = {"level": "debug"}
        data["shutdown"] = {"drain_timeout": "1s"}
        data["discovery"]["static"]["api"] = ["127.0.0.1:15011"]
        data["identity"] = {"files": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem"}}

    assert sections_needing_restart(config(), config(change)) == [
        "mesh.trust_domain",
        "mesh.datacenter",
        "service.name",
        "identity",
        "discovery.static",
        "admin.bind",
        "log.level",
        "shutdown.drain_timeout",
    ]


def test_a_discovery_source_switched_or_dropped_is_named() -> None:
    def to_file(data: dict[str, Any]) -> None:
        data["discovery"] = {"file": "registry.yaml"}

    def client_only(data: dict[str, Any]) -> None:
        data["upstreams"] = []
        del data["discovery"]

    assert sections_needing_restart(config(), config(to_file)) == ["discovery.static", "discovery.file"]
    assert sections_needing_restart(config(), config(client_only)) == ["discovery.static"]
    assert set(sections_needing_restart(config(), config(client_only))) <= set(RESTART_SETTINGS)
