"""Passive outlier ejection (sans-io): consecutive failures eject an endpoint, with a cap, probation and panic."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from mesh.discovery import Endpoint

_Key = tuple[str, int]


class OutlierPolicy(Protocol):
    """The settings the detector reads (mesh.config.OutlierSettings has them)."""

    consecutive_failures: int
    base_ejection: float
    max_ejection: float
    max_ejected_percent: int


class _Host:
    """What the detector knows about one endpoint key."""

    __slots__ = (
        "consecutive",
        "ejected_until",
        "failures",
        "gone_since",
        "probation",
        "quiet_since",
        "successes",
        "times_ejected",
    )

    def __init__(self, now: float) -> None:
        self.successes = 0
        self.failures = 0
        self.consecutive = 0
        self.ejected_until: float | None = None
        self.times_ejected = 0
        self.probation = False
        self.quiet_since = now  # last failure or last return to full service: times_ejected decays from here
        self.gone_since: float | None = None  # when the key left the endpoint set


class OutlierDetector:
    """Ejects endpoints after `consecutive_failures` failures in a row (Envoy's consecutive-5xx rule).

    An ejection lasts `base_ejection` x times ejected, capped at `max_ejection`; when it ends the endpoint is
    on probation: its next outcome either restores it (success) or ejects it again at once, for longer (failure).
    `times_ejected` resets after `max_ejection` with no failure. At most `max_ejected_percent` of the healthy
    endpoints of the latest set are ejected at once, but (as in Envoy) one may always be ejected when none is;
    0 % ejects nothing. Endpoints discovery reports unhealthy are never returned. When every healthy endpoint is
    ejected the detector panics and returns all of them; with no healthy endpoint it returns `()`, not in panic.

    `usable()` is called per request: with nothing ejected and every endpoint healthy it returns the `endpoints`
    object itself without allocating; otherwise the filtered tuple is cached until the set's identity changes,
    an ejection happens, or the next ejection ends. `record()` is O(1). State is kept per `Endpoint.key` across set
    changes; a key that left the set is forgotten at a later set change once it has been gone for `max_ejection`
    (at once if it carries no ejection history).
    """

    def __init__(self, settings: OutlierPolicy, *, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock
        self._hosts: dict[_Key, _Host] = {}
        self.ejections_total = 0
        self.panics_total = 0
        self.panic = False
        # The latest set (by identity) and what usable() answers for it.
        self._set: Sequence[Endpoint] | None = None
        self._healthy_keys: frozenset[_Key] = frozenset()
        self._ejected_count = 0  # ejected keys among _healthy_keys
        self._result: tuple[Sequence[Endpoint], bool] = ((), False)
        self._dirty = True
        self._next_expiry = math.inf

    def __repr__(self) -> str:
        ejected = sum(1 for h in self._hosts.values() if h.ejected_until is not None)
        return (
            f"<OutlierDetector endpoints={len(self._healthy_keys)} ejected={ejected} panic={self.panic} "
            f"ejections_total={self.ejections_total} panics_total={self.panics_total}>"
        )

    # -- hot path -------------------------------------------------------------------------------------------

    def usable(self, endpoints: Sequence[Endpoint]) -> tuple[Sequence[Endpoint], bool]:
        """The endpoints to balance over and whether this is panic mode."""
        if endpoints is self._set and not self._dirty:
            if self._next_expiry == math.inf or self._clock() < self._next_expiry:
                return self._result
        return self._recompute(endpoints)

    def record(self, endpoint: Endpoint, ok: bool) -> None:
        """One request outcome: ok=False for a 5xx, a connect error or a reset."""
        key = endpoint.key
        now = self._clock()
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(now)
        elif host.ejected_until is not None and now >= host.ejected_until:
            self._end_ejection(key, host)
        if (
            host.times_ejected
            and host.ejected_until is None
            and not host.probation
            and now - host.quiet_since >= self.settings.max_ejection
        ):
            host.times_ejected = 0
        if ok:
            host.successes += 1
            host.consecutive = 0
            if host.probation:
                host.probation = False
                host.quiet_since = now
            return
        host.failures += 1
        host.consecutive += 1
        host.quiet_since = now
        if host.ejected_until is not None:
            return  # a request that was in flight when the endpoint was ejected
        threshold = self.settings.consecutive_failures
        if threshold <= 0:
            return
        if (host.probation or host.consecutive >= threshold) and self._may_eject(key):
            self._eject(key, host, now)

    # -- admin ----------------------------------------------------------------------------------------------

    def state(self, endpoint: Endpoint) -> dict[str, object]:
        """The endpoint's counters and ejection for admin /clusters (`ejected_until` is a clock value or None)."""
        host = self._hosts.get(endpoint.key)
        if host is None:
            return {
                "successes": 0,
                "failures": 0,
                "consecutive_failures": 0,
                "ejected_until": None,
                "times_ejected": 0,
                "probation": False,
            }
        if host.ejected_until is not None and self._clock() >= host.ejected_until:
            self._end_ejection(endpoint.key, host)
        return {
            "successes": host.successes,
            "failures": host.failures,
            "consecutive_failures": host.consecutive,
            "ejected_until": host.ejected_until,
            "times_ejected": host.times_ejected,
            "probation": host.probation,
        }

    # -- internals ------------------------------------------------------------------------------------------

    def _cap(self, healthy: int) -> int:
        """How many of `healthy` endpoints may be ejected at once."""
        percent = self.settings.max_ejected_percent
        if percent <= 0 or healthy <= 0:
            return 0
        return max(1, percent * healthy // 100)

    def _may_eject(self, key: _Key) -> bool:
        if key not in self._healthy_keys:
            return True  # not among the endpoints being balanced over: takes no capacity
        return self._ejected_count < self._cap(len(self._healthy_keys))

    def _eject(self, key: _Key, host: _Host, now: float) -> None:
        settings = self.settings
        host.times_ejected += 1
        host.ejected_until = now + min(settings.base_ejection * host.times_ejected, settings.max_ejection)
        host.probation = False
        host.consecutive = 0
        self.ejections_total += 1
        if key in self._healthy_keys:
            self._ejected_count += 1
            self._dirty = True

    def _end_ejection(self, key: _Key, host: _Host) -> None:
        host.ejected_until = None
        host.probation = True
        if key in self._healthy_keys:
            self._ejected_count -= 1
            self._dirty = True

    def _recompute(self, endpoints: Sequence[Endpoint]) -> tuple[Sequence[Endpoint], bool]:
        now = self._clock()
        if endpoints is not self._set:
            self._new_set(endpoints, now)
        hosts = self._hosts
        healthy: list[Endpoint] = []
        ejected: list[tuple[float, Endpoint, _Host]] = []
        for endpoint in endpoints:
            if not endpoint.healthy:
                continue
            healthy.append(endpoint)
            host = hosts.get(endpoint.key)
            if host is None or host.ejected_until is None:
                continue
            if now >= host.ejected_until:
                host.ejected_until = None
                host.probation = True
            else:
                ejected.append((host.ejected_until, endpoint, host))
        cap = self._cap(len(healthy))
        if len(ejected) > cap:
            # The set shrank under its ejections: the ones due back soonest return early, on probation.
            ejected.sort(key=lambda item: item[0])
            for _, _, host in ejected[: len(ejected) - cap]:
                host.ejected_until = None
                host.probation = True
            ejected = ejected[len(ejected) - cap :]
        self._ejected_count = len(ejected)
        self._next_expiry = min((until for until, _, _ in ejected), default=math.inf)
        panic = False
        if not ejected:
            chosen: Sequence[Endpoint] = endpoints if len(healthy) == len(endpoints) else tuple(healthy)
        elif len(ejected) == len(healthy):
            panic = True
            chosen = endpoints if len(healthy) == len(endpoints) else tuple(healthy)
        else:
            out = {endpoint.key for _, endpoint, _ in ejected}
            chosen = tuple(endpoint for endpoint in healthy if endpoint.key not in out)
        if panic and not self.panic:
            self.panics_total += 1
        self.panic = panic
        self._result = (chosen, panic)
        self._dirty = False
        return self._result

    def _new_set(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self._set = endpoints
        present = {endpoint.key for endpoint in endpoints}
        self._healthy_keys = frozenset(endpoint.key for endpoint in endpoints if endpoint.healthy)
        horizon = self.settings.max_ejection
        for key in list(self._hosts):
            host = self._hosts[key]
            if key in present:
                host.gone_since = None
                continue
            if host.gone_since is None:
                host.gone_since = now
            history = host.times_ejected or host.ejected_until is not None or host.probation
            if not history or now - host.gone_since >= horizon:
                del self._hosts[key]
