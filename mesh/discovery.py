"""Service discovery: each service's endpoint set, published through a watch, from static config or a file."""

import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import trio

from mesh import log as mesh_log
from mesh.config import ConfigError, DiscoverySettings, EndpointSpec, load_registry
from mesh.endpoint import Endpoint, EndpointSet
from mesh.watch import Watch

_NO_ERRORS: Mapping[str, str | None] = MappingProxyType({})


class Discovery(Protocol):
    """A source of endpoint sets, kept fresh by `run` and read through one watch per service."""

    def watch(self, service: str) -> Watch[EndpointSet | None]:
        """The service's endpoint set, None until first resolved; repeated calls return the same watch."""
        ...

    @property
    def errors(self) -> Mapping[str, str | None]:
        """Per watched service, the source's current error: why its set may be stale, or, while the service is
        unresolved, why it has none; None while the source answers."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the watches fresh until cancelled; `started()` once the first resolution attempt finished
        (whether or not it succeeded)."""
        ...


def _endpoints(specs: list[EndpointSpec]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint.from_spec(spec) for spec in specs)


class StaticDiscovery:
    """Endpoints fixed in the config; a service it does not list resolves to no endpoints."""

    def __init__(self, static: dict[str, list[EndpointSpec]]) -> None:
        self._learned_at = time.time()
        self._watches = {
            service: Watch[EndpointSet | None](EndpointSet(_endpoints(specs), self._learned_at, "static"))
            for service, specs in static.items()
        }

    def __repr__(self) -> str:
        return f"<StaticDiscovery services={sorted(self._watches)}>"

    def watch(self, service: str) -> Watch[EndpointSet | None]:
        if service not in self._watches:
            self._watches[service] = Watch(EndpointSet((), self._learned_at, "static"))
        return self._watches[service]

    @property
    def errors(self) -> Mapping[str, str | None]:
        return _NO_ERRORS  # the config never changes, so it never fails

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


_FileSignature = tuple[int, int, int] | None
"""(st_mtime_ns, st_size, st_ino) of the registry file, None when it cannot be stat'ed."""


def _signature(path: Path) -> _FileSignature:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class FileDiscovery:
    """Endpoints from a registry file (YAML or JSON), re-read whenever its mtime, size or inode changes.

    The file is polled with `trio.sleep`, which works on every platform and file system without inotify.
    It is read inline on the event loop: a local registry is small, and this keeps polling deterministic
    under a mock clock. A file that is missing or invalid on reload leaves the last good endpoints in place,
    republished with `error` saying why they may be stale, and is logged once per distinct error; one that is
    bad from the start leaves the services unresolved, `errors` saying why. A service that leaves the file is
    published with no endpoints.
    """

    def __init__(self, path: Path, *, poll_interval: float = 1.0, log: Any = None) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self._log = log if log is not None else mesh_log.get_logger("mesh.discovery")
        self._source = f"file:{path}"
        self._watches: dict[str, Watch[EndpointSet | None]] = {}
        self._services: dict[str, tuple[Endpoint, ...]] | None = None  # None until a load succeeded
        self._learned_at = 0.0
        self._signature: _FileSignature = None
        self._error: str | None = None  # why the file cannot be used now, None while it can

    def __repr__(self) -> str:
        services = None if self._services is None else sorted(self._services)
        return f"<FileDiscovery {self.path} services={services}>"

    def watch(self, service: str) -> Watch[EndpointSet | None]:
        if service not in self._watches:
            self._watches[service] = Watch(self._current_set(service))
        return self._watches[service]

    @property
    def errors(self) -> Mapping[str, str | None]:
        return {service: self._error for service in self._watches}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._signature = _signature(self.path)
        self._load()
        task_status.started()
        while True:
            await trio.sleep(self.poll_interval)
            signature = _signature(self.path)
            if signature != self._signature:
                self._signature = signature
                self._load()

    def _current_set(self, service: str) -> EndpointSet | None:
        if self._services is None:
            return None
        return EndpointSet(self._services.get(service, ()), self._learned_at, self._source, self._error)

    def _load(self) -> None:
        try:
            registry = load_registry(self.path)
        except ConfigError as exc:
            self._report(exc)
            return
        self._error = None
        services = {service: _endpoints(specs) for service, specs in registry.services.items()}
        first_load = self._services is None
        self._services, self._learned_at = services, time.time()
        changed = []
        for service, watch in self._watches.items():
            endpoints, current = services.get(service, ()), watch.value
            if current is None or current.endpoints != endpoints:
                changed.append(service)
            elif current.error is not None:  # the same endpoints, no longer stale
                endpoints = current.endpoints  # the same tuple object: balancer and ejection caches stay valid
            else:
                continue
            watch.set(EndpointSet(endpoints, self._learned_at, self._source))
        self._log.info(
            "registry loaded" if first_load else "registry reloaded",
            file=str(self.path),
            services=len(services),
            endpoints=sum(len(endpoints) for endpoints in services.values()),
            changed=sorted(changed),
        )

    def _report(self, exc: ConfigError) -> None:
        error = "; ".join(exc.errors)
        if error == self._error:
            return
        self._error = error
        if self._services is None:
            self._log.error("registry unusable; its services stay unresolved", file=str(self.path), errors=exc.errors)
            return
        self._log.warning(
            "registry reload failed; keeping the last good endpoints",
            file=str(self.path),
            errors=exc.errors,
        )
        for watch in self._watches.values():
            current = watch.value
            assert current is not None  # every watch holds a set once a load has succeeded
            watch.set(EndpointSet(current.endpoints, current.updated_at, current.source, error))  # its age kept


def discovery_from_settings(settings: DiscoverySettings) -> Discovery:
    """The discovery source the config selects (it guarantees exactly one)."""
    if settings.static is not None:
        return StaticDiscovery(settings.static)
    assert settings.file is not None
    return FileDiscovery(settings.file)
