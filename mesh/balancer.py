"""Load balancing (sans-io): choose the endpoint for the next request from a service's endpoint set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import add
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # discovery runs on trio; the balancer only reads endpoint fields
    from mesh.config import BalancerSettings
    from mesh.discovery import Endpoint


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        """The endpoint for the next request, or None when none is usable (all unhealthy or none at all)."""
        ...


class RoundRobin:
    """Smooth weighted round robin (nginx's): over each run of sum(weights) picks, an endpoint of weight w
    is picked exactly w times, spread out rather than in bursts.

    Endpoints that are unhealthy, or have weight 0 (draining), are skipped. The work of reading a set is
    done once per set: `pick` recognises the same sequence object (discovery publishes a new tuple on every
    change, so do not mutate a list in place) and then costs a few list operations, or just an index step
    when all weights are equal. On a new set, the rotation state of each endpoint key that remains carries
    over, so a change neither restarts the rotation nor sends a burst to any endpoint.
    """

    __slots__ = ("_current", "_endpoints", "_last", "_total", "_usable", "_weights")

    def __init__(self) -> None:
        self._endpoints: Sequence[Endpoint] = ()  # the set the state below was built from
        self._usable: list[Endpoint] = []
        self._weights: list[int] = []  # empty when all usable weights are equal: plain rotation
        self._current: list[int] = []  # nginx's current_weight per usable endpoint (weighted mode)
        self._total = 0
        self._last = -1  # index in _usable of the latest pick

    def __repr__(self) -> str:
        mode = "weighted" if self._weights else "equal"
        return f"<RoundRobin {mode} usable={len(self._usable)}/{len(self._endpoints)}>"

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        if endpoints is not self._endpoints:
            self._adopt(endpoints)
        usable = self._usable
        if not usable:
            return None
        if self._weights:
            current = list(map(add, self._current, self._weights))
            chosen = current.index(max(current))
            current[chosen] -= self._total
            self._current = current
        else:
            chosen = self._last + 1
            if chosen >= len(usable):
                chosen = 0
        self._last = chosen
        return usable[chosen]

    def _adopt(self, endpoints: Sequence[Endpoint]) -> None:
        previous = self._usable
        last_key = previous[self._last].key if 0 <= self._last < len(previous) else None
        carried = {endpoint.key: current for endpoint, current in zip(previous, self._current, strict=False)}

        usable = [endpoint for endpoint in endpoints if endpoint.healthy and endpoint.weight > 0]
        weights = [endpoint.weight for endpoint in usable]
        keys = [endpoint.key for endpoint in usable]
        self._endpoints = endpoints
        self._usable = usable
        self._total = sum(weights)
        if len(set(weights)) > 1:
            self._weights = weights
            self._current = [carried.get(key, 0) for key in keys]
        else:
            self._weights = []
            self._current = []
        if last_key in keys:
            self._last = keys.index(last_key)
        else:
            # The latest pick left the set: continue with whatever now stands at its place.
            self._last = max(self._last - 1, -1)


_POLICIES: dict[str, Callable[[], Balancer]] = {"round_robin": RoundRobin}


def make_balancer(settings: BalancerSettings) -> Balancer:
    """A fresh balancer (per cluster, per worker) for the configured policy."""
    return _POLICIES[settings.policy]()
