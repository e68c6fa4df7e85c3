"""Config reload decisions (sans-io): versions of the loaded file, and what a new config keeps, re-binds or ignores."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesh.config import SidecarConfig

__all__ = [
    "CLUSTER_FIELDS",
    "RESTART_SETTINGS",
    "ConfigVersion",
    "ListenerDiff",
    "ReloadRefused",
    "diff_listeners",
    "file_digest",
    "inbound_cluster_unchanged",
    "keep_settings",
    "listener_name",
    "sections_needing_restart",
    "unchanged_clusters",
]


class ReloadRefused(Exception):
    """A reload that was not applied: the old config keeps serving. `errors` holds one line per problem, in the
    config checker's `file: path: error` form."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


def file_digest(data: bytes) -> str:
    """The SHA-256 of a config file's bytes, in hex: a reload of identical bytes changes nothing."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    """One loaded config: its number (1 for the config the process started with, then one more per applied reload),
    when it was loaded (unix time), the SHA-256 of the file's bytes and the file's path."""

    version: int
    loaded_at: float
    digest: str
    source: str

    @classmethod
    def first(cls, data: bytes, *, source: str, loaded_at: float) -> ConfigVersion:
        """The version of the config the process started with."""
        return cls(1, loaded_at, file_digest(data), source)

    def same_file(self, data: bytes) -> bool:
        """True if `data` is the file this version was loaded from, byte for byte (a reload is then "unchanged")."""
        return file_digest(data) == self.digest

    def next(self, data: bytes, *, loaded_at: float, source: str | None = None) -> ConfigVersion:
        """The version of a reloaded config that was applied."""
        return ConfigVersion(self.version + 1, loaded_at, file_digest(data), self.source if source is None else source)

    def as_dict(self) -> dict[str, Any]:
        """The admin view: the fields, and `loaded_at` also as ISO 8601 UTC (`loaded_at_utc`)."""
        return {
            "version": self.version,
            "loaded_at": self.loaded_at,
            "loaded_at_utc": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(timespec="seconds"),
            "digest": self.digest,
            "source": self.source,
        }


# --- listeners -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerDiff:
    """What a reload does to the listeners, each named as in `listener_name`.

    `added`: bind a new socket; `removed`: stop accepting and drain; `changed_bind`: the same listener on another
    address, protocol or TLS mode, so it is re-bound (the old socket drains); `kept`: the same socket, serving the new
    settings. A renamed listener is one removed and one added that may share an address: close the removed ones
    before binding the added ones. Lists follow the order of the config that has the listener (the old one for
    `removed`)."""

    added: list[str]
    removed: list[str]
    changed_bind: list[str]
    kept: list[str]


def _listeners(cfg: SidecarConfig) -> Iterator[tuple[str, tuple[object, ...]]]:
    """(name, what its socket is) of every listener but admin: the address, the protocol and the TLS mode."""
    inbound = cfg.inbound
    if inbound is not None:
        yield "inbound", (str(inbound.bind), cfg.service.protocol, inbound.tls)
    for upstream in cfg.upstreams:
        yield listener_name(upstream), (str(upstream.bind), upstream.protocol, upstream.tls)


def listener_name(upstream: Any) -> str:
    """An upstream listener's name: its `service`, or, for one without (an upstream that only routes), its bind
    address "host:port"."""
    service = getattr(upstream, "service", None)
    return service if service else str(upstream.bind)


def diff_listeners(old: SidecarConfig, new: SidecarConfig) -> ListenerDiff:
    """Which listeners a reload from `old` to `new` adds, removes, re-binds and keeps."""
    before, after = dict(_listeners(old)), dict(_listeners(new))
    return ListenerDiff(
        added=[name for name in after if name not in before],
        removed=[name for name in before if name not in after],
        changed_bind=[name for name, socket in after.items() if name in before and before[name] != socket],
        kept=[name for name, socket in after.items() if before.get(name) == socket],
    )


# --- clusters ------------------------------------------------------------------------------------------------------

CLUSTER_FIELDS = (
    "protocol",
    "mesh_http2",
    "tls",
    "identity",
    "timeouts.connect",
    "pool",
    "balancer",
    "outlier",
    "circuit_breakers",
    "retries",
    "hedging",
    "health_check",
    "limits.http2",
)
"""The settings that shape a service's cluster (mesh.cluster.Cluster): equal in both configs, the cluster is kept
with its connection pool, outlier state and retry budget."""


def _get(settings: object, dotted: str) -> object:
    """The setting at `dotted`; None if it, or a section on the way to it, is unset or does not exist."""
    value = settings
    for part in dotted.split("."):
        value = getattr(value, part, None)
        if value is None:
            break
    return value


def _cluster_settings(cfg: SidecarConfig) -> dict[str, list[tuple[object, ...]]]:
    """{service: the cluster-shaping settings of each entry that defines its cluster}: upstreams with a `service`,
    and the entries of a top-level `clusters` (a list of entries with `service` or `name`, or a mapping by name)."""
    found: dict[str, list[tuple[object, ...]]] = {}

    def add(name: object, settings: object) -> None:
        if isinstance(name, str) and name:
            found.setdefault(name, []).append(tuple(_get(settings, dotted) for dotted in CLUSTER_FIELDS))

    for upstream in cfg.upstreams:
        add(getattr(upstream, "service", None), upstream)
    clusters = getattr(cfg, "clusters", None) or ()
    if isinstance(clusters, dict):
        for name, settings in clusters.items():
            add(name, settings)
    else:
        for settings in clusters:
            add(getattr(settings, "service", None) or getattr(settings, "name", None), settings)
    return found


def unchanged_clusters(old: SidecarConfig, new: SidecarConfig) -> set[str]:
    """The services whose clusters a reload keeps: present in both configs with equal CLUSTER_FIELDS. A service
    added, removed or changed gets a new cluster (a removed one's connections close once its requests finish).

    Not included: the inbound's cluster of the local application, see inbound_cluster_unchanged."""
    before, after = _cluster_settings(old), _cluster_settings(new)
    return {name for name, settings in after.items() if before.get(name) == settings}


def inbound_cluster_unchanged(old: SidecarConfig, new: SidecarConfig) -> bool:
    """True if both configs have an inbound and its cluster of the local application is shaped the same: the
    application's address and protocol, and the inbound's pool, connect timeout and HTTP/2 limits."""
    if old.inbound is None or new.inbound is None:
        return False

    def shape(cfg: SidecarConfig) -> tuple[object, ...]:
        inbound = cfg.inbound
        assert inbound is not None
        return (cfg.service.app, cfg.service.protocol, inbound.pool, inbound.timeouts.connect, inbound.limits.http2)

    return shape(old) == shape(new)


# --- what only a restart changes -----------------------------------------------------------------------------------

RESTART_SETTINGS = (
    "mesh.trust_domain",
    "mesh.namespace",
    "mesh.datacenter",
    "service.name",
    "identity",
    "discovery.static",
    "discovery.file",
    "discovery.consul",
    "consul",
    "registration",
    "admin.bind",
    "log.level",
    "log.access_log",
    "telemetry",
    "shutdown.drain_timeout",
)
"""Settings a reload cannot change; a reload that changes them keeps their old values and warns.

- mesh.trust_domain, mesh.namespace, mesh.datacenter and service.name form this sidecar's SPIFFE ID: its
  certificate, the peers' expected identities and its Consul registration are made from them.
- identity: the certificate source runs for the life of the process (certificate files are watched anyway).
- discovery, consul: the discovery task and its watches feed every cluster; a new upstream is watched through the
  running discovery (under `static`, only services listed at start have endpoints).
- registration: the Consul registration, its checks and its deregistration on exit.
- admin.bind: the listener that serves `POST /reload` itself.
- log.level, log.access_log: logging is set up once at start.
- telemetry: the span exporter runs for the life of the process.
- shutdown.drain_timeout: read at start by the signal handler.

Everything else is applied: listeners (see diff_listeners), clusters (see unchanged_clusters), the inbound's
allow/deny, mesh.default_policy, timeouts, limits, retries, routes, service.app and service.protocol."""


def keep_settings(new: SidecarConfig, old: SidecarConfig, dotted: Iterable[str]) -> SidecarConfig:
    """`new` with the settings named (dotted paths, as in RESTART_SETTINGS) taken from `old`."""
    for path in dotted:
        new = _replaced(new, old, path.split("."))
    return new


def _replaced(model: Any, old: Any, parts: list[str]) -> Any:
    """`model` with the setting at `parts` taken from `old` (a whole section where one of them lacks it)."""
    inner, old_inner = getattr(model, parts[0], None), getattr(old, parts[0], None)
    if len(parts) == 1 or inner is None or old_inner is None:
        return model.model_copy(update={parts[0]: old_inner})
    return model.model_copy(update={parts[0]: _replaced(inner, old_inner, parts[1:])})


def sections_needing_restart(old: SidecarConfig, new: SidecarConfig) -> list[str]:
    """The RESTART_SETTINGS whose values differ between `old` and `new`, in that order."""
    return [dotted for dotted in RESTART_SETTINGS if _get(old, dotted) != _get(new, dotted)]
