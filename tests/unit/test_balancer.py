"""Balancers: round robin's exact rotation, P2C-EWMA avoiding slow endpoints in a scripted event loop, least
request, weighted random, and ring hash / maglev stickiness when the endpoint set changes."""

import heapq
import math
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.balancer import (
    Balancer,
    LeastRequest,
    Maglev,
    PeakEwma,
    RingHash,
    RoundRobin,
    WeightedRandom,
    _Usable,
    make_balancer,
)
from mesh.config import BalancerSettings
from mesh.discovery import Endpoint


def endpoints(*weights: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.0.0.{i + 1}", 15001, weight=weight) for i, weight in enumerate(weights))


def picks(balancer: RoundRobin, endpoint_set: tuple[Endpoint, ...], count: int) -> list[str]:
    chosen = [balancer.pick(endpoint_set) for _ in range(count)]
    return [endpoint.host if endpoint else "none" for endpoint in chosen]


def test_equal_weights_rotate_in_order() -> None:
    assert picks(RoundRobin(), endpoints(1, 1, 1), 7) == [
        "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1",
    ]  # fmt: skip


def test_weights_three_to_one_give_three_to_one_each_cycle_interleaved() -> None:
    chosen = picks(RoundRobin(), endpoints(3, 1), 8)
    assert Counter(chosen[:4]) == Counter(chosen[4:]) == {"10.0.0.1": 3, "10.0.0.2": 1}
    assert chosen[:4] == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1"]  # nginx's smooth order


def test_unhealthy_and_zero_weight_endpoints_are_skipped() -> None:
    a, b, c = endpoints(1, 1, 1)
    endpoint_set = (a, Endpoint(b.host, b.port, healthy=False), Endpoint(c.host, c.port, weight=0))
    assert set(picks(RoundRobin(), endpoint_set, 6)) == {"10.0.0.1"}


def test_nothing_usable_gives_none() -> None:
    balancer = RoundRobin()
    assert balancer.pick(()) is None
    assert balancer.pick((Endpoint("10.0.0.1", 1, healthy=False),)) is None


def test_added_endpoint_joins_the_rotation_where_it_stands() -> None:
    balancer = RoundRobin()
    three = endpoints(1, 1, 1)
    assert picks(balancer, three, 2) == ["10.0.0.1", "10.0.0.2"]
    four = (*three, Endpoint("10.0.0.4", 15001))
    assert picks(balancer, four, 3) == ["10.0.0.3", "10.0.0.4", "10.0.0.1"]


def test_removed_endpoint_is_never_picked_again_and_the_rotation_goes_on() -> None:
    balancer = RoundRobin()
    a, b, c, d = endpoints(1, 1, 1, 1)
    assert picks(balancer, (a, b, c, d), 2) == ["10.0.0.1", "10.0.0.2"]
    assert picks(balancer, (a, c, d), 4) == ["10.0.0.3", "10.0.0.4", "10.0.0.1", "10.0.0.3"]
    assert picks(balancer, (a, d), 2) == ["10.0.0.4", "10.0.0.1"]  # the last pick left: its successor


def test_weighted_state_carries_over_a_set_change() -> None:
    balancer = RoundRobin()
    a, b = endpoints(3, 1)
    picks(balancer, (a, b), 3)  # a, a, b
    c = Endpoint("10.0.0.3", 15001, weight=1)
    chosen = picks(balancer, (a, b, c), 50)
    assert "10.0.0.3" in chosen[:5]
    counts = Counter(chosen)
    assert abs(counts["10.0.0.1"] - 30) <= 2 and abs(counts["10.0.0.2"] - 10) <= 2


def test_a_changed_weight_is_honoured() -> None:
    balancer = RoundRobin()
    picks(balancer, endpoints(1, 1), 3)
    assert Counter(picks(balancer, endpoints(1, 4), 5)) == {"10.0.0.1": 1, "10.0.0.2": 4}


def test_same_set_object_is_read_once_but_a_new_equal_set_also_works() -> None:
    balancer = RoundRobin()
    assert picks(balancer, endpoints(1, 1), 1) == ["10.0.0.1"]
    assert picks(balancer, endpoints(1, 1), 1) == ["10.0.0.2"]  # a new tuple, same endpoints


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=12))
def test_each_cycle_of_sum_weights_picks_matches_the_weights_exactly(weights: list[int]) -> None:
    balancer = RoundRobin()
    endpoint_set = endpoints(*weights)
    expected = {f"10.0.0.{i + 1}": weight for i, weight in enumerate(weights)}
    for _ in range(2):
        assert Counter(picks(balancer, endpoint_set, sum(weights))) == expected


def test_importing_the_balancer_loads_no_trio_even_through_endpoint_types() -> None:
    # test_architecture checks direct imports; Endpoint lives in trio-driven discovery, hence this check.
    code = "import sys, mesh.balancer; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def peak_ewma(clock: FakeClock, seed: int = 1) -> PeakEwma:
    return PeakEwma(clock, random.Random(seed), rtt=0.030, decay=10.0)


def run_load(
    balancer: Balancer,
    clock: FakeClock,
    endpoint_set: Sequence[Endpoint],
    latency: dict[str, float],
    *,
    requests: int,
    concurrency: int,
) -> Counter[str]:
    """A scripted client: `concurrency` requests always in flight, each endpoint answering after its fixed
    latency (±10 %, seeded); the clock jumps to each completion, which starts the next request."""
    jitter = random.Random(7)
    in_flight: list[tuple[float, int, Endpoint, float]] = []
    counts: Counter[str] = Counter()
    for sequence in range(requests):
        if len(in_flight) >= concurrency:
            done_at, _, done, took = heapq.heappop(in_flight)
            clock.now = done_at
            balancer.finished(done, took, ok=True)
        endpoint = balancer.pick(endpoint_set)
        assert endpoint is not None
        balancer.started(endpoint)
        counts[endpoint.host] += 1
        took = latency[endpoint.host] * jitter.uniform(0.9, 1.1)
        heapq.heappush(in_flight, (clock.now + took, sequence, endpoint, took))
    while in_flight:
        done_at, _, done, took = heapq.heappop(in_flight)
        clock.now = done_at
        balancer.finished(done, took, ok=True)
    return counts


@pytest.mark.parametrize("count", [2, 3, 10])
@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_p2c_ewma_sends_at_most_10_percent_to_an_endpoint_10x_slower(count: int, concurrency: int) -> None:
    clock = FakeClock()
    endpoint_set = endpoints(*[1] * count)
    latency = {endpoint.host: 0.020 for endpoint in endpoint_set}
    latency["10.0.0.1"] = 0.200
    counts = run_load(peak_ewma(clock), clock, endpoint_set, latency, requests=20_000, concurrency=concurrency)
    assert counts["10.0.0.1"] / 20_000 <= 0.10 / (count - 1)  # 10 % of what an even share would be


def test_p2c_ewma_spreads_evenly_over_equal_endpoints() -> None:
    clock = FakeClock()
    endpoint_set = endpoints(1, 1, 1, 1)
    latency = {endpoint.host: 0.020 for endpoint in endpoint_set}
    counts = run_load(peak_ewma(clock), clock, endpoint_set, latency, requests=20_000, concurrency=8)
    assert all(4_000 <= counts[host] <= 6_000 for host in latency)


def test_p2c_ewma_gives_a_new_endpoint_some_but_not_all_traffic() -> None:
    clock = FakeClock()
    balancer = peak_ewma(clock)
    warm = endpoints(1, 1, 1)
    latency = {endpoint.host: 0.020 for endpoint in warm} | {"10.0.0.4": 0.020}
    run_load(balancer, clock, warm, latency, requests=5_000, concurrency=8)
    assert balancer.state(warm[0])["ewma_ms"] == pytest.approx(20, rel=0.15)
    grown = (*warm, Endpoint("10.0.0.4", 15001))
    assert balancer.state(grown[3]) == {"ewma_ms": 30.0, "outstanding": 0}  # before it is seen: rtt
    first = run_load(balancer, clock, grown, latency, requests=200, concurrency=8)
    assert 10 <= first["10.0.0.4"] <= 100  # fair would be 50 of 200: neither starved nor flooded
    later = run_load(balancer, clock, grown, latency, requests=8_000, concurrency=8)
    assert 1_500 <= later["10.0.0.4"] <= 2_500


def test_p2c_ewma_honours_weights() -> None:
    clock = FakeClock()
    endpoint_set = endpoints(3, 1)
    latency = {endpoint.host: 0.020 for endpoint in endpoint_set}
    counts = run_load(peak_ewma(clock), clock, endpoint_set, latency, requests=10_000, concurrency=8)
    assert counts["10.0.0.1"] >= 2 * counts["10.0.0.2"] > 0


def test_p2c_ewma_forgives_a_recovered_endpoint() -> None:
    clock = FakeClock()
    balancer = peak_ewma(clock)
    endpoint_set = endpoints(1, 1)
    latency = {"10.0.0.1": 0.200, "10.0.0.2": 0.020}
    run_load(balancer, clock, endpoint_set, latency, requests=2_000, concurrency=4)
    latency["10.0.0.1"] = 0.020
    counts = run_load(balancer, clock, endpoint_set, latency, requests=20_000, concurrency=4)
    assert counts["10.0.0.1"] >= 6_000  # back to (nearly) an even share within the run


def test_peak_ewma_jumps_up_at_once_and_decays_down_with_elapsed_time() -> None:
    clock = FakeClock()
    balancer = peak_ewma(clock)
    (endpoint,) = endpoints(1)
    assert balancer.pick((endpoint,)) is endpoint
    balancer.started(endpoint)
    assert balancer.state(endpoint) == {"ewma_ms": 30.0, "outstanding": 1}
    clock.now = 1.0
    balancer.finished(endpoint, 0.300, ok=True)
    assert balancer.state(endpoint) == {"ewma_ms": pytest.approx(300.0), "outstanding": 0}
    balancer.started(endpoint)
    clock.now = 11.0
    balancer.finished(endpoint, 0.020, ok=True)
    w = math.exp(-1.0)
    assert balancer.state(endpoint)["ewma_ms"] == pytest.approx(300.0 * w + 20.0 * (1 - w))
    clock.now = 21.0  # no sample for one decay period: the estimate fades so the endpoint is retried
    assert balancer.state(endpoint)["ewma_ms"] == pytest.approx((300.0 * w + 20.0 * (1 - w)) * w)


def test_peak_ewma_a_fast_failure_does_not_make_an_endpoint_look_fast() -> None:
    clock = FakeClock()
    balancer = peak_ewma(clock)
    (endpoint,) = endpoints(1)
    balancer.pick((endpoint,))
    for _ in range(100):
        balancer.started(endpoint)
        clock.now += 0.5
        balancer.finished(endpoint, 0.001, ok=False)
    assert balancer.state(endpoint)["ewma_ms"] == pytest.approx(30.0)


def test_load_of_a_departed_endpoint_is_kept_until_its_requests_finish() -> None:
    clock = FakeClock()
    balancer = peak_ewma(clock)
    a, b = endpoints(1, 1)
    balancer.pick((a, b))
    balancer.started(b)
    balancer.pick((a,))
    assert balancer.state(b)["outstanding"] == 1
    balancer.finished(b, 0.01, ok=True)
    balancer.pick((a, b))
    assert balancer.state(b)["outstanding"] == 0


def settings(policy: str) -> BalancerSettings:
    hash_on = {"header": "x-user"} if policy in ("ring_hash", "maglev") else None
    return BalancerSettings.model_validate({"policy": policy, "hash_on": hash_on})


@pytest.mark.parametrize("policy", ["p2c_ewma", "least_request", "random", "round_robin", "ring_hash", "maglev"])
def test_every_policy_skips_unhealthy_and_draining_and_gives_none_without_usable(policy: str) -> None:
    balancer = make_balancer(settings(policy), clock=FakeClock(), rng=random.Random(3))
    a, b, c = endpoints(1, 1, 1)
    endpoint_set = (a, Endpoint(b.host, b.port, healthy=False), Endpoint(c.host, c.port, weight=0))
    for i in range(200):
        key = None if i % 2 else f"user-{i}".encode()
        assert balancer.pick(endpoint_set, key) is a
    assert balancer.pick((), b"k") is None
    assert balancer.pick((Endpoint("10.0.0.9", 1, healthy=False),), b"k") is None
    assert balancer.pick((Endpoint("10.0.0.9", 1, healthy=False),)) is None


@pytest.mark.parametrize(
    ("policy", "kind"),
    [
        ("p2c_ewma", PeakEwma),
        ("least_request", LeastRequest),
        ("random", WeightedRandom),
        ("round_robin", RoundRobin),
        ("ring_hash", RingHash),
        ("maglev", Maglev),
    ],
)
def test_make_balancer_builds_each_policy(policy: str, kind: type) -> None:
    balancer = make_balancer(settings(policy), clock=FakeClock())
    assert type(balancer) is kind
    assert isinstance(balancer.state(endpoints(1)[0]), dict)


def test_least_request_never_picks_the_busier_of_any_pair() -> None:
    balancer = LeastRequest(FakeClock(), random.Random(5))
    a, b, c = endpoints(1, 1, 1)
    for _ in range(3):
        balancer.started(a)
    balancer.started(b)
    chosen = Counter(balancer.pick((a, b, c)).host for _ in range(3_000))  # type: ignore[union-attr]
    assert "10.0.0.1" not in chosen
    assert chosen["10.0.0.3"] > chosen["10.0.0.2"] > 0  # b only when paired with a
    assert balancer.state(a) == {"outstanding": 3}


def test_least_request_weighs_outstanding_by_weight() -> None:
    balancer = LeastRequest(FakeClock(), random.Random(5))
    heavy, light = endpoints(4, 1)
    for _ in range(7):
        balancer.started(heavy)
    balancer.started(light)  # (7 + 1) / 4 == (1 + 1) / 1: a tie, the first drawn wins
    assert {balancer.pick((heavy, light)) for _ in range(100)} == {heavy, light}
    balancer.finished(heavy, 0.01, ok=True)
    assert {balancer.pick((heavy, light)) for _ in range(100)} == {heavy}
    balancer.finished(light, 0.01, ok=True)
    assert {balancer.pick((heavy, light)) for _ in range(100)} == {light}


def test_weighted_random_shares_follow_weights() -> None:
    balancer = WeightedRandom(random.Random(11))
    endpoint_set = endpoints(1, 2, 7)
    counts = Counter(balancer.pick(endpoint_set).host for _ in range(100_000))  # type: ignore[union-attr]
    for host, weight in (("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 7)):
        assert counts[host] / 100_000 == pytest.approx(weight / 10, abs=0.01)


@given(
    st.lists(st.integers(min_value=1, max_value=1000), min_size=2, max_size=20),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_two_choices_are_distinct_and_in_range(weights: list[int], u: float, v: float) -> None:
    first, second = _Usable(endpoints(*weights)).two(u, v)
    assert first != second
    assert 0 <= first < len(weights) and 0 <= second < len(weights)


def test_second_choice_is_drawn_by_weight_from_the_others() -> None:
    usable = _Usable(endpoints(1, 2, 7))
    rng = random.Random(13)
    pairs = Counter(usable.two(rng.random(), rng.random()) for _ in range(100_000))
    # P(first=2, second=1) = 0.7 * 2/3; P(first=0, second=2) = 0.1 * 7/9
    assert pairs[(2, 1)] / 100_000 == pytest.approx(0.7 * 2 / 3, abs=0.01)
    assert pairs[(0, 2)] / 100_000 == pytest.approx(0.1 * 7 / 9, abs=0.01)


HASHED = [RingHash, Maglev]
KEYS = [f"user-{i}".encode() for i in range(10_000)]


def assignment(balancer: RingHash | Maglev, endpoint_set: Sequence[Endpoint]) -> list[str]:
    return [balancer.pick(endpoint_set, key).host for key in KEYS]  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", HASHED)
def test_hashing_removing_one_of_ten_moves_only_its_keys_and_spreads_them(kind: type) -> None:
    balancer = kind(random.Random(1))
    ten = endpoints(*[1] * 10)
    before = assignment(balancer, ten)
    assert max(Counter(before).values()) <= 1_500  # 1,000 each if perfectly even
    gone = ten[4].host
    after = assignment(balancer, ten[:4] + ten[5:])
    assert gone not in after
    stayed = [b == a for b, a in zip(before, after, strict=True) if b != gone]
    assert sum(stayed) / len(stayed) >= 0.99
    moved = Counter(a for b, a in zip(before, after, strict=True) if b == gone)
    assert len(moved) >= 5 and max(moved.values()) <= 0.4 * sum(moved.values())


@pytest.mark.parametrize("kind", HASHED)
def test_hashing_adding_one_takes_keys_only_for_itself(kind: type) -> None:
    balancer = kind(random.Random(1))
    ten = endpoints(*[1] * 10)
    before = assignment(balancer, ten[:9])
    after = assignment(balancer, ten)
    changed = Counter(a for b, a in zip(before, after, strict=True) if b != a)
    assert 700 <= changed[ten[9].host] <= 1_400
    assert changed.total() - changed[ten[9].host] <= 0.01 * len(KEYS)


@pytest.mark.parametrize("kind", HASHED)
def test_hashing_skew_follows_weights(kind: type) -> None:
    counts = Counter(assignment(kind(random.Random(1)), endpoints(1, 1, 1, 1, 4)))
    assert counts["10.0.0.5"] / 10_000 == pytest.approx(0.5, abs=0.06)
    assert all(counts[f"10.0.0.{i}"] / 10_000 == pytest.approx(0.125, abs=0.04) for i in range(1, 5))


@pytest.mark.parametrize("kind", HASHED)
def test_hashing_an_unhealthy_endpoint_keys_go_elsewhere_and_come_back(kind: type) -> None:
    balancer = kind(random.Random(1))
    ten = endpoints(*[1] * 10)
    before = assignment(balancer, ten)
    sick = (*ten[:3], Endpoint(ten[3].host, ten[3].port, healthy=False), *ten[4:])
    during = assignment(balancer, sick)
    assert ten[3].host not in during
    assert all(b == d for b, d in zip(before, during, strict=True) if b != ten[3].host)
    assert len(set(d for b, d in zip(before, during, strict=True) if b == ten[3].host)) >= 5
    assert assignment(balancer, tuple(ten)) == before


@pytest.mark.parametrize("kind", HASHED)
def test_hashing_is_the_same_in_every_sidecar_whatever_the_order(kind: type) -> None:
    ten = endpoints(*[1] * 10)
    assert assignment(kind(random.Random(1)), ten) == assignment(kind(random.Random(2)), ten[::-1])


@pytest.mark.parametrize("kind", HASHED)
def test_hashing_without_a_key_picks_at_random_among_healthy(kind: type) -> None:
    balancer = kind(random.Random(1))
    ten = endpoints(*[1] * 10)
    assert len({balancer.pick(ten) for _ in range(500)}) == 10


def test_maglev_rebuilds_the_table_only_when_members_or_weights_change() -> None:
    balancer = Maglev(random.Random(1))
    ten = endpoints(*[1] * 10)
    balancer.pick(ten, b"k")
    table = balancer._owners
    balancer.pick((*ten[:3], Endpoint(ten[3].host, ten[3].port, healthy=False), *ten[4:]), b"k")
    balancer.pick(tuple(ten), b"k")
    assert balancer._owners is table
    balancer.pick(endpoints(*[1] * 9, 2), b"k")
    assert balancer._owners is not table
