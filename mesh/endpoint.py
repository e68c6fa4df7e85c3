"""Endpoints (sans-io): one instance of a service as discovery reports it, and a service's set of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.config import EndpointSpec

_NO_META: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service (a peer sidecar's inbound listener) as discovery reports it.

    Hashed by `key`, its address, so pools and balancers can keep state per endpoint across set changes;
    equality compares every field. `meta` is stored read-only.
    """

    host: str
    port: int
    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: _NO_META)
    healthy: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.meta, MappingProxyType):
            object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)

    @classmethod
    def from_spec(cls, spec: EndpointSpec) -> Endpoint:
        return cls(spec.address.host, spec.address.port, spec.weight, tuple(spec.tags), spec.meta)


@dataclass(frozen=True)
class EndpointSet:
    """A service's endpoints as learned at one moment from one source."""

    endpoints: tuple[Endpoint, ...]
    updated_at: float
    """time.time() when this set was learned; its age tells how stale the knowledge may be."""
    source: str
    """Where it came from: "static", "file:<path>" or "consul:<endpoint>/<service>"."""
    error: str | None = None
    """Why the set may be stale: the source's current error (the set is the last one it gave), else None."""
