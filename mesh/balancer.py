"""Load balancing (sans-io): choose the endpoint for the next request from a service's endpoint set."""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from hashlib import blake2b
from itertools import accumulate
from math import exp
from operator import add
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # discovery runs on trio; the balancer only reads endpoint fields
    from mesh.config import BalancerSettings
    from mesh.endpoint import Endpoint


class Balancer(Protocol):
    """One cluster's load-balancing state (per worker). Every policy reads a set once, when `pick` first sees
    that sequence object: discovery publishes a new tuple on every change, so never mutate a set in place."""

    def pick(self, endpoints: Sequence[Endpoint], hash_key: bytes | None = None) -> Endpoint | None:
        """The endpoint for the next request, or None when none is usable (all unhealthy or none at all).

        Unhealthy and weight-0 (draining) endpoints are never picked. `hash_key` is what ring_hash and maglev
        keep sticky; the other policies ignore it, and those two pick at random without it."""
        ...

    def started(self, endpoint: Endpoint) -> None:
        """A request was sent to `endpoint` (it is now outstanding)."""
        ...

    def finished(self, endpoint: Endpoint, latency_s: float, ok: bool) -> None:
        """A request `started` on `endpoint` ended after `latency_s` seconds; `ok` False for a failure."""
        ...

    def state(self, endpoint: Endpoint) -> dict[str, float | int]:
        """What the policy knows of `endpoint`, for the admin /clusters page (empty if it tracks nothing)."""
        ...


class _LoadBlind:
    """For policies that do not look at load: the request bookkeeping calls cost nothing."""

    __slots__ = ()

    def started(self, endpoint: Endpoint) -> None:
        pass

    def finished(self, endpoint: Endpoint, latency_s: float, ok: bool) -> None:
        pass

    def state(self, endpoint: Endpoint) -> dict[str, float | int]:
        return {}


class _Usable:
    """The usable endpoints of one set (healthy, weight > 0) prepared for weighted sampling by bisection."""

    __slots__ = ("cumulative", "endpoints", "equal", "total", "weights")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = [endpoint for endpoint in endpoints if endpoint.healthy and endpoint.weight > 0]
        self.weights = [endpoint.weight for endpoint in self.endpoints]
        self.cumulative = list(accumulate(self.weights))
        self.total = self.cumulative[-1] if self.cumulative else 0
        self.equal = len(set(self.weights)) <= 1

    def one(self, u: float) -> Endpoint | None:
        """The endpoint at `u` (uniform in [0, 1)) on the weight line: each with probability weight/total."""
        endpoints = self.endpoints
        if self.equal:
            return endpoints[int(u * len(endpoints))] if endpoints else None
        return endpoints[bisect_right(self.cumulative, u * self.total)]

    def two(self, u: float, v: float) -> tuple[int, int]:
        """Indexes of two distinct endpoints (at least two must be usable): the first drawn by weight, the
        second by weight from the others. u*n and u*total stay below n and total for any float u < 1."""
        if self.equal:
            n = len(self.endpoints)
            first = int(u * n)
            second = int(v * (n - 1))
            return first, second + (second >= first)
        cumulative = self.cumulative
        first = bisect_right(cumulative, u * self.total)
        weight = self.weights[first]
        x = v * (self.total - weight)
        if x >= cumulative[first] - weight:  # step over the first's stretch of the line
            x += weight
        return first, min(bisect_right(cumulative, x), len(cumulative) - 1)


class RoundRobin(_LoadBlind):
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

    def pick(self, endpoints: Sequence[Endpoint], hash_key: bytes | None = None) -> Endpoint | None:
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


class WeightedRandom(_LoadBlind):
    """Each pick independent, an endpoint's chance its share of the usable weight."""

    __slots__ = ("_endpoints", "_random", "_usable")

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random
        self._endpoints: Sequence[Endpoint] = ()
        self._usable = _Usable(())

    def __repr__(self) -> str:
        return f"<WeightedRandom usable={len(self._usable.endpoints)}/{len(self._endpoints)}>"

    def pick(self, endpoints: Sequence[Endpoint], hash_key: bytes | None = None) -> Endpoint | None:
        if endpoints is not self._endpoints:
            self._usable = _Usable(endpoints)
            self._endpoints = endpoints
        return self._usable.one(self._random())


class _Load:
    """What a load-aware policy knows of one endpoint; kept by address across set changes."""

    __slots__ = ("cost", "outstanding", "stamp")

    def __init__(self, cost: float, stamp: float) -> None:
        self.cost = cost  # peak-EWMA latency in seconds as of `stamp` (p2c_ewma only)
        self.stamp = stamp
        self.outstanding = 0


class LeastRequest:
    """Power of two choices over outstanding requests (Envoy's least_request): of two distinct endpoints
    drawn by weight, the one with fewer outstanding requests per unit of weight; the first on a tie."""

    __slots__ = ("_clock", "_endpoints", "_loads", "_random", "_rtt", "_usable", "_usable_loads")

    def __init__(self, clock: Callable[[], float], rng: random.Random, *, rtt: float = 0.0) -> None:
        self._clock = clock
        self._random = rng.random
        self._rtt = rtt
        self._endpoints: Sequence[Endpoint] = ()
        self._usable = _Usable(())
        self._loads: dict[tuple[str, int], _Load] = {}  # by address: every endpoint of the set, and gone ones in use
        self._usable_loads: list[_Load] = []  # aligned with self._usable.endpoints

    def __repr__(self) -> str:
        busy = sum(load.outstanding for load in self._loads.values())
        return f"<{type(self).__name__} usable={len(self._usable.endpoints)}/{len(self._endpoints)} outstanding={busy}>"

    def pick(self, endpoints: Sequence[Endpoint], hash_key: bytes | None = None) -> Endpoint | None:
        if endpoints is not self._endpoints:
            self._adopt(endpoints)
        usable = self._usable
        if len(usable.endpoints) < 2:
            return usable.endpoints[0] if usable.endpoints else None
        first, second = usable.two(self._random(), self._random())
        a, b = self._usable_loads[first], self._usable_loads[second]
        weights = usable.weights
        if (a.outstanding + 1) * weights[second] <= (b.outstanding + 1) * weights[first]:
            return usable.endpoints[first]
        return usable.endpoints[second]

    def started(self, endpoint: Endpoint) -> None:
        key = endpoint.key
        load = self._loads.get(key)
        if load is None:  # not (or no longer) in the set: counted all the same, in case it comes back
            load = self._loads[key] = _Load(self._rtt, self._clock())
        load.outstanding += 1

    def finished(self, endpoint: Endpoint, latency_s: float, ok: bool) -> None:
        load = self._loads.get(endpoint.key)
        if load is not None and load.outstanding > 0:
            load.outstanding -= 1

    def state(self, endpoint: Endpoint) -> dict[str, float | int]:
        load = self._loads.get(endpoint.key)
        return {"outstanding": load.outstanding if load else 0}

    def _adopt(self, endpoints: Sequence[Endpoint]) -> None:
        previous = self._loads
        now = self._clock()
        loads = {}
        for endpoint in endpoints:
            key = endpoint.key
            loads[key] = previous.get(key) or _Load(self._rtt, now)
        for key, load in previous.items():  # a departed endpoint's requests still finish
            if load.outstanding and key not in loads:
                loads[key] = load
        self._loads = loads
        self._usable = _Usable(endpoints)
        self._usable_loads = [loads[endpoint.key] for endpoint in self._usable.endpoints]
        self._endpoints = endpoints


class PeakEwma(LeastRequest):
    """Power of two choices over peak-EWMA latency x (outstanding + 1) / weight (Linkerd's default, from
    Finagle): of two distinct endpoints drawn by weight, the cheaper.

    The latency estimate jumps to any sample above it at once and otherwise moves towards the sample with
    weight exp(-elapsed / decay), so a slow endpoint is avoided at once and forgiven gradually. Between
    samples the estimate decays towards zero at the same rate (Finagle does so on every read), so an
    endpoint that was avoided is tried again in time and can show it recovered. A new endpoint starts at
    `rtt`: a typical latency, so it is neither starved nor flooded. A failure's sample counts as no faster
    than the estimate, so an endpoint that fails fast does not attract traffic.
    """

    __slots__ = ("_decay",)

    def __init__(self, clock: Callable[[], float], rng: random.Random, *, rtt: float, decay: float) -> None:
        super().__init__(clock, rng, rtt=rtt)
        self._decay = decay

    def pick(self, endpoints: Sequence[Endpoint], hash_key: bytes | None = None) -> Endpoint | None:
        if endpoints is not self._endpoints:
            self._adopt(endpoints)
        usable = self._usable
        if len(usable.endpoints) < 2:
            return usable.endpoints[0] if usable.endpoints else None
        first, second = usable.two(self._random(), self._random())
        a, b = self._usable_loads[first], self._usable_loads[second]
        now = self._clock()
        decay = self._decay
        weights = usable.weights
        cost_a = a.cost * exp((a.stamp - now) / decay) * (a.outstanding + 1) * weights[second]
        cost_b = b.cost * exp((b.stamp - now) / decay) * (b.outstanding + 1) * weights[first]
        return usable.endpoints[first] if cost_a <= cost_b else usable.endpoints[second]

    def finished(self, endpoint: Endpoint, latency_s: float, ok: bool) -> None:
        load = self._loads.get(endpoint.key)
        if load is None:
            return
        if load.outstanding > 0:
            load.outstanding -= 1
        now = self._clock()
        if latency_s > load.cost:
            load.cost = latency_s
        elif ok:
            weight = exp((load.stamp - now) / self._decay)
            load.cost = load.cost * weight + latency_s * (1.0 - weight)
        load.stamp = now

    def state(self, endpoint: Endpoint) -> dict[str, float | int]:
        load = self._loads.get(endpoint.key)
        if load is None:
            return {"ewma_ms": self._rtt * 1000.0, "outstanding": 0}
        estimate = load.cost * exp((load.stamp - self._clock()) / self._decay)
        return {"ewma_ms": estimate * 1000.0, "outstanding": load.outstanding}


def _hash64(data: bytes) -> int:
    """A hash that every sidecar and every run computes alike (unlike hash())."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def _first_healthy_onwards(owners: list[Endpoint]) -> list[Endpoint | None]:
    """For each slot of a circular table, the first healthy owner at or after it (all None if none is)."""
    sick = [slot for slot, owner in enumerate(owners) if not owner.healthy]
    if len(sick) == len(owners):
        return [None] * len(owners)
    route: list[Endpoint | None] = list(owners)
    size = len(owners)
    for slot in sick:
        onwards = slot + 1
        while not owners[onwards % size].healthy:
            onwards += 1
        route[slot] = owners[onwards % size]
    return route


def _members(endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """The endpoints that own a share of a hash table, healthy or not, one per address, in address order:
    the table then does not depend on the order discovery lists them, nor change when health flaps."""
    return sorted({endpoint.key: endpoint for endpoint in endpoints if endpoint.weight > 0}.values(), key=_by_key)


def _by_key(endpoint: Endpoint) -> tuple[str, int]:
    return endpoint.key


class _HashTable(_LoadBlind):
    """Shared by ring_hash and maglev: a table of owners rebuilt when the members or weights change, and
    re-routed (each slot to the first healthy owner onwards) when only health changes."""

    __slots__ = ("_endpoints", "_fallback", "_owners", "_random", "_route", "_signature")

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random
        self._endpoints: Sequence[Endpoint] = ()
        self._fallback = _Usable(())
        self._signature: tuple[tuple[tuple[str, int], int], ...] = ()
        self._owners: list[int] = []  # per slot, the owner's index among the members (sorted by address)
        self._route: list[Endpoint | None] = []  # per slot, the endpoint to use (None: nothing healthy)

    def _adopt(self, endpoints: Sequence[Endpoint]) -> None:
        members = _members(endpoints)
        signature = tuple((member.key, member.weight) for member in members)
        if signature != self._signature:
            self._owners = self._build(members)
            self._signature = signature
        # Same signature, same members in the same order: the indexes stay valid, only health is new.
        self._route = _first_healthy_onwards(list(map(members.__getitem__, self._owners)))
        self._fallback = _Usable(endpoints)
        self._endpoints = endpoints

    def pick(self, endpoints: Sequence[Endpoint], hash_key: bytes | None = None) -> Endpoint | None:
        if endpoints is not self._endpoints:
            self._adopt(endpoints)
        if hash_key is None:
            return self._fallback.one(self._random())
        route = self._route
        if not route:
            return None
        return self._lookup(route, _hash64(hash_key))

    def _lookup(self, route: list[Endpoint | None], key_hash: int) -> Endpoint | None:
        raise NotImplementedError

    def _build(self, members: list[Endpoint]) -> list[int]:
        raise NotImplementedError


_VNODES = 100  # ring points per unit of weight
_MAX_RING = 1 << 16  # above this many points, weights are scaled down (each endpoint keeps at least one)


class RingHash(_HashTable):
    """Consistent hashing on a ring (Karger; Envoy's ring_hash): each endpoint owns 100 x weight points,
    a key goes to the owner of the first point at or after its hash, or on to the next healthy one.
    Removing an endpoint moves only its own keys, spread over the owners of the following points."""

    __slots__ = ("_points",)

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._points: list[int] = []

    def __repr__(self) -> str:
        return f"<RingHash points={len(self._points)} members={len(self._signature)}>"

    def _lookup(self, route: list[Endpoint | None], key_hash: int) -> Endpoint | None:
        slot = bisect_right(self._points, key_hash)
        return route[slot] if slot < len(route) else route[0]

    def _build(self, members: list[Endpoint]) -> list[int]:
        total = sum(member.weight for member in members)
        scale = min(1.0, _MAX_RING / (_VNODES * total)) if total else 1.0
        ring = sorted(
            (_hash64(f"{member}#{i}".encode()), index)
            for index, member in enumerate(members)
            for i in range(max(1, round(_VNODES * member.weight * scale)))
        )
        self._points = [point for point, _ in ring]
        return [index for _, index in ring]


MAGLEV_TABLE_SIZE = 65537  # prime; Envoy's default. Keep it well above 100 x the number of endpoints.


class Maglev(_HashTable):
    """Maglev hashing (Google's, as in Envoy): a lookup table of prime size M that each endpoint fills in
    turn along its own permutation of the slots (offset and skip from two hashes of its address), heavier
    endpoints taking more turns; a key goes to table[hash % M], or on to the next healthy slot's owner.
    Lookup is one hash and one index; the build (tens of ms for M = 65537) runs only when the members or
    their weights change."""

    __slots__ = ("_size",)

    def __init__(self, rng: random.Random, *, table_size: int = MAGLEV_TABLE_SIZE) -> None:
        super().__init__(rng)
        self._size = table_size

    def __repr__(self) -> str:
        return f"<Maglev size={self._size} members={len(self._signature)}>"

    def _lookup(self, route: list[Endpoint | None], key_hash: int) -> Endpoint | None:
        return route[key_hash % self._size]

    def _build(self, members: list[Endpoint]) -> list[int]:
        if not members:
            return []
        size = self._size
        positions, skips = [], []
        for member in members:
            digest = blake2b(str(member).encode(), digest_size=16).digest()
            positions.append(int.from_bytes(digest[:8], "big") % size)
            skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)
        weights = [member.weight for member in members]
        heaviest = max(weights)
        turns_taken = [0] * len(members)  # in units of the heaviest weight, as Envoy counts them
        table = [-1] * size
        filled = 0
        rounds = 0
        while filled < size:
            rounds += 1
            for index, weight in enumerate(weights):
                if rounds * weight < turns_taken[index]:
                    continue  # a lighter endpoint takes a turn only every heaviest/weight rounds
                turns_taken[index] += heaviest
                position, skip = positions[index], skips[index]
                while table[position] >= 0:
                    position += skip
                    if position >= size:
                        position -= size
                table[position] = index
                position += skip
                positions[index] = position - size if position >= size else position
                filled += 1
                if filled == size:
                    break
        return table


_POLICIES: dict[str, Callable[[BalancerSettings, Callable[[], float], random.Random], Balancer]] = {
    "p2c_ewma": lambda settings, clock, rng: PeakEwma(clock, rng, rtt=settings.rtt, decay=settings.decay),
    "round_robin": lambda settings, clock, rng: RoundRobin(),
    "random": lambda settings, clock, rng: WeightedRandom(rng),
    "least_request": lambda settings, clock, rng: LeastRequest(clock, rng),
    "ring_hash": lambda settings, clock, rng: RingHash(rng),
    "maglev": lambda settings, clock, rng: Maglev(rng),
}


def make_balancer(
    settings: BalancerSettings, *, clock: Callable[[], float], rng: random.Random | None = None
) -> Balancer:
    """A fresh balancer (per cluster, per worker) for the configured policy. `clock` gives seconds (the
    proxy passes trio.current_time); `rng` defaults to a Random seeded from the OS."""
    return _POLICIES[settings.policy](settings, clock, rng if rng is not None else random.Random())
