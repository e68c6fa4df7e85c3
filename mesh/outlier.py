"""Passive outlier ejection (sans-io): consecutive failures or a low success rate eject an endpoint, with a cap."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from mesh.endpoint import Endpoint

_Key = tuple[str, int]


class SuccessRatePolicy(Protocol):
    """The success-rate settings the detector reads (mesh.config.SuccessRateSettings has them)."""

    interval: float
    min_hosts: int
    request_volume: int
    stdev_factor: float


class OutlierPolicy(Protocol):
    """The settings the detector reads (mesh.config.OutlierSettings has them)."""

    consecutive_failures: int
    base_ejection: float
    max_ejection: float
    max_ejected_percent: int

    @property
    def success_rate(self) -> SuccessRatePolicy | None: ...  # None: the success-rate rule is off


class _Host:
    """What the detector knows about one endpoint key."""

    __slots__ = (
        "consecutive",
        "ejected_by",
        "ejected_until",
        "failures",
        "gone_since",
        "interval_failures",
        "interval_successes",
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
        self.ejected_by: str | None = None  # the rule behind the latest ejection
        # successes / failures when the current success-rate interval began (record() itself never touches these)
        self.interval_successes = 0
        self.interval_failures = 0


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

    With `settings.success_rate` set (read once, here) Envoy's success-rate rule runs as well: when the clock passes
    the end of an `interval`, the next `record()`, `usable()` or `state()` judges the interval just ended, once, however
    long ago it ended, and a new interval starts then. The endpoints judged are the healthy ones of the latest set that
    are not ejected and had at least `request_volume` requests in the interval; with at least `min_hosts` of them,
    each one whose success rate is below mean - `stdev_factor` x stdev (population) of theirs is ejected, the lowest
    first while the cap allows. Such an ejection lasts, counts and ends on probation like a consecutive-failure one
    (`times_ejected` is shared); a failure on probation re-ejects whatever the rule, keeping `ejected_by`. Interval
    counts are the per-host totals minus a snapshot taken when the interval began, so `record()` pays nothing for
    the rule beyond one comparison with the next judging time (infinite when the rule is off).
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
        self._next_expiry = math.inf  # the earliest ejection end or success-rate judging: usable() looks again then
        self._success_rate = settings.success_rate
        self._next_judging = math.inf if self._success_rate is None else clock() + self._success_rate.interval

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
        if now >= self._next_judging:
            self._judge_success_rates(now)
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
        if host.probation:
            if self._may_eject(key):
                self._eject(key, host, now, host.ejected_by or "consecutive_failures")
            return
        threshold = self.settings.consecutive_failures
        if threshold > 0 and host.consecutive >= threshold and self._may_eject(key):
            self._eject(key, host, now, "consecutive_failures")

    # -- admin ----------------------------------------------------------------------------------------------

    def state(self, endpoint: Endpoint) -> dict[str, object]:
        """The endpoint's counters and ejection for admin /clusters (`ejected_until` is a clock value or None).

        `success_rate` is the share of successes in the current success-rate interval (None with no requests in
        it or with the rule off); `ejected_by` names the rule behind the latest ejection (None if never ejected).
        """
        now = self._clock()
        if now >= self._next_judging:
            self._judge_success_rates(now)
        host = self._hosts.get(endpoint.key)
        if host is None:
            return {
                "successes": 0,
                "failures": 0,
                "consecutive_failures": 0,
                "ejected_until": None,
                "times_ejected": 0,
                "probation": False,
                "success_rate": None,
                "ejected_by": None,
            }
        if host.ejected_until is not None and now >= host.ejected_until:
            self._end_ejection(endpoint.key, host)
        rate = None
        if self._success_rate is not None:
            successes = host.successes - host.interval_successes
            requests = successes + host.failures - host.interval_failures
            rate = successes / requests if requests else None
        return {
            "successes": host.successes,
            "failures": host.failures,
            "consecutive_failures": host.consecutive,
            "ejected_until": host.ejected_until,
            "times_ejected": host.times_ejected,
            "probation": host.probation,
            "success_rate": rate,
            "ejected_by": host.ejected_by,
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

    def _eject(self, key: _Key, host: _Host, now: float, reason: str) -> None:
        settings = self.settings
        host.times_ejected += 1
        host.ejected_until = now + min(settings.base_ejection * host.times_ejected, settings.max_ejection)
        host.ejected_by = reason
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

    def _judge_success_rates(self, now: float) -> None:
        """Judge the success-rate interval that has ended, eject its outliers and start a new interval at `now`."""
        policy = self._success_rate
        assert policy is not None
        self._next_judging = now + policy.interval
        settings = self.settings
        ejected = 0
        judged: list[tuple[float, _Key, _Host]] = []
        for key in self._healthy_keys:
            host = self._hosts.get(key)
            if host is None:
                continue
            if host.ejected_until is not None:
                if now < host.ejected_until:
                    ejected += 1
                    continue
                self._end_ejection(key, host)
            successes = host.successes - host.interval_successes
            requests = successes + host.failures - host.interval_failures
            if requests >= policy.request_volume:
                judged.append((successes / requests, key, host))
        for host in self._hosts.values():
            host.interval_successes = host.successes
            host.interval_failures = host.failures
        if len(judged) < max(1, policy.min_hosts):
            return
        # Rates relative to the first one: identical rates are exactly 0 apart, so rounding never ejects among equals.
        origin = judged[0][0]
        offsets = [rate - origin for rate, _, _ in judged]
        mean = math.fsum(offsets) / len(offsets)
        stdev = math.sqrt(math.fsum((offset - mean) ** 2 for offset in offsets) / len(offsets))
        cutoff = mean - policy.stdev_factor * stdev
        outliers = sorted(item for item, offset in zip(judged, offsets, strict=True) if offset < cutoff)
        cap = self._cap(len(self._healthy_keys))
        for _, key, host in outliers:
            if ejected >= cap:
                break
            if host.times_ejected and not host.probation and now - host.quiet_since >= settings.max_ejection:
                host.times_ejected = 0  # the decay record() would have applied
            self._eject(key, host, now, "success_rate")
            ejected += 1

    def _recompute(self, endpoints: Sequence[Endpoint]) -> tuple[Sequence[Endpoint], bool]:
        now = self._clock()
        if endpoints is not self._set:
            self._new_set(endpoints, now)
        if now >= self._next_judging:
            self._judge_success_rates(now)
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
        self._next_expiry = min(min((until for until, _, _ in ejected), default=math.inf), self._next_judging)
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
