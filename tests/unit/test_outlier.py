"""OutlierDetector: consecutive-failure and success-rate ejection, growing and capped durations, the cap, probation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.discovery import Endpoint
from mesh.outlier import OutlierDetector


@dataclass
class SuccessRate:
    interval: float = 10.0
    min_hosts: int = 5
    request_volume: int = 100
    stdev_factor: float = 1.9


@dataclass
class Policy:
    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejected_percent: int = 50
    success_rate: SuccessRate | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(n: int = 4, **policy: object) -> tuple[OutlierDetector, Clock, tuple[Endpoint, ...]]:
    clock = Clock()
    detector = OutlierDetector(Policy(**policy), clock=clock)  # type: ignore[arg-type]
    endpoints = tuple(Endpoint("10.0.0.1", 8000 + i) for i in range(n))
    return detector, clock, endpoints


def fail(detector: OutlierDetector, endpoint: Endpoint, times: int = 5) -> None:
    for _ in range(times):
        detector.record(endpoint, ok=False)


def keys(result: tuple[object, bool]) -> list[int]:
    chosen, _ = result
    return [e.port for e in chosen]  # type: ignore[attr-defined]


def test_five_consecutive_failures_eject_for_30s_then_return() -> None:
    detector, clock, eps = make()
    assert detector.usable(eps) == (eps, False)
    fail(detector, eps[0], 4)
    assert detector.usable(eps)[0] is eps
    detector.record(eps[0], ok=False)
    assert keys(detector.usable(eps)) == [8001, 8002, 8003]
    assert detector.ejections_total == 1
    state = detector.state(eps[0])
    assert state == {
        "successes": 0,
        "failures": 5,
        "consecutive_failures": 0,
        "ejected_until": 1030.0,
        "times_ejected": 1,
        "probation": False,
        "success_rate": None,
        "ejected_by": "consecutive_failures",
    }
    clock.advance(29.9)
    assert keys(detector.usable(eps)) == [8001, 8002, 8003]
    clock.advance(0.1)
    assert detector.usable(eps) == (eps, False)
    assert detector.state(eps[0])["probation"] is True


def test_second_ejection_lasts_60s_and_durations_are_capped_at_300s() -> None:
    detector, clock, eps = make()
    detector.usable(eps)
    fail(detector, eps[0])
    clock.advance(30)
    detector.usable(eps)
    detector.record(eps[0], ok=True)  # probation passed: fully back, times_ejected kept
    assert detector.state(eps[0])["probation"] is False
    assert detector.state(eps[0])["times_ejected"] == 1
    fail(detector, eps[0])
    assert detector.state(eps[0])["ejected_until"] == clock.now + 60
    clock.advance(59)
    assert 8000 not in keys(detector.usable(eps))
    clock.advance(1)
    assert 8000 in keys(detector.usable(eps))
    durations = []
    for _ in range(10):  # probation failures re-eject at once, each time for longer
        detector.record(eps[0], ok=False)
        until = detector.state(eps[0])["ejected_until"]
        assert isinstance(until, float)
        durations.append(until - clock.now)
        clock.now = until
    assert durations == [90, 120, 150, 180, 210, 240, 270, 300, 300, 300]


def test_a_success_resets_the_consecutive_count() -> None:
    detector, _, eps = make()
    detector.usable(eps)
    fail(detector, eps[0], 4)
    detector.record(eps[0], ok=True)
    fail(detector, eps[0], 4)
    assert detector.usable(eps)[0] is eps
    assert detector.state(eps[0])["consecutive_failures"] == 4
    assert detector.ejections_total == 0
    detector.record(eps[0], ok=False)
    assert detector.ejections_total == 1


def test_never_more_than_half_of_the_endpoints_ejected() -> None:
    detector, _, eps = make(4)
    detector.usable(eps)
    for endpoint in eps:
        fail(detector, endpoint, 20)
    chosen, panic = detector.usable(eps)
    assert len(chosen) == 2 and not panic
    assert detector.ejections_total == 2


def test_with_two_endpoints_one_may_be_ejected_and_three_allow_only_one() -> None:
    detector, _, eps = make(2)
    detector.usable(eps)
    fail(detector, eps[0])
    fail(detector, eps[1])
    assert keys(detector.usable(eps)) == [8001]
    detector, _, eps = make(3)
    detector.usable(eps)
    for endpoint in eps:
        fail(detector, endpoint)
    assert len(detector.usable(eps)[0]) == 2


def test_zero_disables_ejection() -> None:
    detector, _, eps = make(consecutive_failures=0)
    detector.usable(eps)
    fail(detector, eps[0], 50)
    assert detector.usable(eps)[0] is eps
    detector, _, eps = make(max_ejected_percent=0)
    detector.usable(eps)
    fail(detector, eps[0], 50)
    assert detector.usable(eps)[0] is eps


def test_panic_returns_every_endpoint_when_all_are_ejected() -> None:
    detector, clock, eps = make(1)
    assert detector.usable(eps) == (eps, False)
    fail(detector, eps[0])
    assert detector.usable(eps) == (eps, True)
    assert detector.panic is True
    assert detector.usable(eps) == (eps, True)
    assert detector.panics_total == 1  # counted once per transition
    clock.advance(30)
    assert detector.usable(eps) == (eps, False)
    assert detector.panic is False
    detector.record(eps[0], ok=False)  # probation failure: ejected again → panic again
    assert detector.usable(eps) == (eps, True)
    assert detector.panics_total == 2


def test_panic_at_100_percent_returns_only_healthy_endpoints() -> None:
    detector, _, eps = make(2, max_ejected_percent=100)
    sick = Endpoint("10.0.0.9", 9000, healthy=False)
    endpoints = (*eps, sick)
    detector.usable(endpoints)
    fail(detector, eps[0])
    assert keys(detector.usable(endpoints)) == [8001]
    fail(detector, eps[1])
    assert detector.usable(endpoints) == (eps, True)


def test_probation_success_restores_and_failure_re_ejects_at_once() -> None:
    detector, clock, eps = make()
    detector.usable(eps)
    fail(detector, eps[0])
    clock.advance(30)
    assert 8000 in keys(detector.usable(eps))
    detector.record(eps[0], ok=False)  # one failure suffices on probation
    assert 8000 not in keys(detector.usable(eps))
    assert detector.state(eps[0])["ejected_until"] == clock.now + 60
    assert detector.state(eps[0])["times_ejected"] == 2
    clock.advance(60)
    detector.record(eps[0], ok=True)  # expiry noticed by record() itself
    assert detector.state(eps[0])["probation"] is False
    fail(detector, eps[0], 4)
    assert detector.usable(eps)[0] is eps  # fully back: needs five failures again


def test_times_ejected_decays_after_max_ejection_without_failures() -> None:
    detector, clock, eps = make()
    detector.usable(eps)
    fail(detector, eps[0])
    clock.advance(30)
    detector.record(eps[0], ok=True)
    clock.advance(300)
    detector.record(eps[0], ok=True)
    assert detector.state(eps[0])["times_ejected"] == 0
    fail(detector, eps[0])
    assert detector.state(eps[0])["ejected_until"] == clock.now + 30


def test_unhealthy_endpoints_are_never_used() -> None:
    detector, _, eps = make(2)
    sick = Endpoint("10.0.0.9", 9000, healthy=False)
    endpoints = (eps[0], sick, eps[1])
    assert detector.usable(endpoints) == ((eps[0], eps[1]), False)
    fail(detector, eps[0])
    assert detector.usable(endpoints) == ((eps[1],), False)
    assert detector.usable((sick,)) == ((), False)


def test_fast_path_returns_the_identical_object_and_result() -> None:
    detector, _, eps = make()
    first = detector.usable(eps)
    assert first[0] is eps
    assert detector.usable(eps) is first  # not even a new pair
    fail(detector, eps[0])
    ejected = detector.usable(eps)
    assert detector.usable(eps) is ejected  # cached until the set, an ejection or an expiry changes it
    new_set = (*eps, Endpoint("10.0.0.2", 8000))
    assert keys(detector.usable(new_set)) == [8001, 8002, 8003, 8000]


def test_state_survives_set_changes_and_gone_keys_are_forgotten() -> None:
    detector, clock, eps = make()
    detector.usable(eps)
    fail(detector, eps[0])
    detector.record(eps[1], ok=True)
    smaller = eps[1:]
    detector.usable(smaller)
    assert detector.state(eps[1])["successes"] == 1
    assert detector.state(eps[0])["times_ejected"] == 1  # kept for a while: it may come back
    back = tuple(Endpoint(e.host, e.port) for e in eps)
    assert 8000 not in keys(detector.usable(back))  # a new identity, the same keys
    detector.usable(smaller)
    clock.advance(300)
    detector.usable(eps[2:])
    assert detector.state(eps[0])["times_ejected"] == 0
    assert detector.state(eps[1])["successes"] == 0
    assert len(detector._hosts) == 0


def test_set_shrinking_under_ejections_keeps_the_cap() -> None:
    detector, clock, eps = make(4)
    detector.usable(eps)
    fail(detector, eps[0])
    clock.advance(1)
    fail(detector, eps[1])
    chosen, _ = detector.usable(eps[:3])  # 2 of 3 ejected would exceed 50 %: the one due back first returns
    assert keys((chosen, False)) == [8000, 8002]
    assert detector.state(eps[0])["probation"] is True


# -- the success-rate rule --------------------------------------------------------------------------------------


def make_sr(
    n: int = 7, *, consecutive_failures: int = 0, max_ejected_percent: int = 50, **rule: float
) -> tuple[OutlierDetector, Clock, tuple[Endpoint, ...]]:
    """A detector with the success-rate rule on (and, unless asked, the consecutive rule off), its set seen once."""
    clock = Clock()
    policy = Policy(
        consecutive_failures=consecutive_failures,
        max_ejected_percent=max_ejected_percent,
        success_rate=SuccessRate(**rule),  # type: ignore[arg-type]
    )
    detector = OutlierDetector(policy, clock=clock)  # type: ignore[arg-type]
    endpoints = tuple(Endpoint("10.0.0.1", 8000 + i) for i in range(n))
    detector.usable(endpoints)
    return detector, clock, endpoints


def send(detector: OutlierDetector, endpoint: Endpoint, successes: int, requests: int) -> None:
    """`requests` outcomes with the failures spread out evenly (never two failures in a row below 50 %)."""
    for i in range(requests):
        detector.record(endpoint, ok=(i + 1) * successes // requests > i * successes // requests)


def traffic(detector: OutlierDetector, endpoints: tuple[Endpoint, ...], *rates: tuple[int, int]) -> None:
    """(successes, requests) for the first endpoints; every other endpoint gets 100 successes."""
    for i, endpoint in enumerate(endpoints):
        successes, requests = rates[i] if i < len(rates) else (100, 100)
        send(detector, endpoint, successes, requests)


def test_half_successful_endpoint_among_perfect_ones_is_ejected_at_the_interval_boundary() -> None:
    detector, clock, eps = make_sr(7)
    traffic(detector, eps, (50, 100))
    assert detector.state(eps[0])["success_rate"] == 0.5
    assert detector.state(eps[1])["success_rate"] == 1.0
    clock.advance(9.9)
    assert detector.usable(eps)[0] is eps  # not before the interval ends
    assert detector.ejections_total == 0
    clock.advance(0.1)
    assert keys(detector.usable(eps)) == [8001, 8002, 8003, 8004, 8005, 8006]
    assert detector.ejections_total == 1
    assert detector.state(eps[0]) == {
        "successes": 50,
        "failures": 50,
        "consecutive_failures": 0,
        "ejected_until": 1040.0,
        "times_ejected": 1,
        "probation": False,
        "success_rate": None,  # a new interval, no requests in it yet
        "ejected_by": "success_rate",
    }
    clock.advance(30)
    assert detector.usable(eps) == (eps, False)
    assert detector.state(eps[0])["probation"] is True


def test_record_and_state_judge_the_interval_too() -> None:
    detector, clock, eps = make_sr(7)
    traffic(detector, eps, (50, 100))
    clock.advance(10)
    detector.record(eps[3], ok=True)  # the first call after the boundary judges, before counting its own outcome
    assert detector.state(eps[0])["ejected_by"] == "success_rate"
    assert detector.state(eps[3])["success_rate"] == 1.0
    detector, clock, eps = make_sr(7)
    traffic(detector, eps, (50, 100))
    clock.advance(10)
    assert detector.state(eps[0])["ejected_until"] == 1040.0
    assert 8000 not in keys(detector.usable(eps))


def test_fewer_than_min_hosts_with_enough_requests_ejects_nothing() -> None:
    volumes = ((0, 100), (100, 100), (100, 100), (100, 100), (99, 99), (99, 99), (0, 0))
    detector, clock, eps = make_sr(7, stdev_factor=1.0)  # min_hosts 5: only 4 endpoints have 100 requests
    traffic(detector, eps, *volumes)
    clock.advance(10)
    assert detector.usable(eps)[0] is eps
    assert detector.ejections_total == 0
    detector, clock, eps = make_sr(7, stdev_factor=1.0, min_hosts=4)
    traffic(detector, eps, *volumes)
    clock.advance(10)
    assert keys(detector.usable(eps)) == [8001, 8002, 8003, 8004, 8005, 8006]


def test_endpoints_below_the_request_volume_are_neither_judged_nor_counted_in_the_mean() -> None:
    detector, clock, eps = make_sr(8)
    # 8000 fails everything but has too few requests; had it counted, the mean would drop and 8001 would survive.
    traffic(detector, eps, (0, 99), (50, 100))
    clock.advance(10)
    assert keys(detector.usable(eps)) == [8000, 8002, 8003, 8004, 8005, 8006, 8007]
    assert detector.state(eps[0])["times_ejected"] == 0
    assert detector.state(eps[1])["ejected_by"] == "success_rate"


def test_max_ejected_percent_caps_success_rate_ejections_lowest_rates_first() -> None:
    detector, clock, eps = make_sr(10, max_ejected_percent=20, stdev_factor=1.0)
    traffic(detector, eps, (60, 100), (40, 100), (50, 100))
    clock.advance(10)
    assert keys(detector.usable(eps)) == [8000, 8003, 8004, 8005, 8006, 8007, 8008, 8009]
    assert detector.ejections_total == 2
    # An endpoint ejected by the other rule takes capacity and is not judged again.
    detector, clock, eps = make_sr(10, consecutive_failures=5, max_ejected_percent=20, stdev_factor=1.0)
    fail(detector, eps[9])
    traffic(detector, eps, (60, 100), (40, 100), (50, 100))
    clock.advance(10)
    assert keys(detector.usable(eps)) == [8000, 8002, 8003, 8004, 8005, 8006, 8007, 8008]
    assert detector.state(eps[9])["ejected_by"] == "consecutive_failures"
    assert detector.state(eps[9])["times_ejected"] == 1
    detector, clock, eps = make_sr(7, max_ejected_percent=0)
    traffic(detector, eps, (0, 100))
    clock.advance(10)
    assert detector.usable(eps)[0] is eps


def test_ejection_durations_grow_with_times_ejected_across_both_rules() -> None:
    detector, clock, eps = make_sr(7, consecutive_failures=5)
    fail(detector, eps[0])  # consecutive rule: 30 s
    assert detector.state(eps[0])["ejected_until"] == 1030.0
    clock.advance(30)
    detector.usable(eps)  # judges the (empty) interval just ended; a new one starts now
    detector.record(eps[0], ok=True)  # probation passed
    traffic(detector, eps, (49, 99))
    clock.advance(10)
    assert 8000 not in keys(detector.usable(eps))
    state = detector.state(eps[0])
    assert (state["ejected_until"], state["times_ejected"], state["ejected_by"]) == (1100.0, 2, "success_rate")
    clock.advance(60)
    assert 8000 in keys(detector.usable(eps))
    detector.record(eps[0], ok=False)  # a failure on probation re-ejects at once, for longer, keeping the reason
    state = detector.state(eps[0])
    assert (state["ejected_until"], state["times_ejected"], state["ejected_by"]) == (1190.0, 3, "success_rate")
    assert detector.ejections_total == 3
    clock.advance(90)
    detector.record(eps[0], ok=True)  # fully back
    fail(detector, eps[0])
    state = detector.state(eps[0])
    assert (state["ejected_until"], state["times_ejected"], state["ejected_by"]) == (1310.0, 4, "consecutive_failures")


def test_probation_re_ejects_with_the_consecutive_rule_off() -> None:
    detector, clock, eps = make_sr(7)
    traffic(detector, eps, (50, 100))
    clock.advance(10)
    detector.usable(eps)
    clock.advance(30)
    assert 8000 in keys(detector.usable(eps))
    detector.record(eps[0], ok=False)
    assert 8000 not in keys(detector.usable(eps))
    assert detector.state(eps[0])["ejected_until"] == clock.now + 60
    fail(detector, eps[1], 50)  # and with the rule off, failures in a row alone eject nothing
    assert 8001 in keys(detector.usable(eps))


def test_interval_counters_reset_and_a_late_judging_starts_a_fresh_interval() -> None:
    detector, clock, eps = make_sr(7)
    traffic(detector, eps, (30, 60), *[(60, 60)] * 6)  # below the request volume
    clock.advance(10)
    assert detector.usable(eps)[0] is eps
    assert detector.state(eps[0])["success_rate"] is None
    traffic(detector, eps, (30, 60), *[(60, 60)] * 6)  # 120 requests over two intervals are still too few
    assert detector.state(eps[0])["success_rate"] == 0.5
    clock.advance(10)
    assert detector.usable(eps)[0] is eps
    assert detector.ejections_total == 0
    assert detector.state(eps[0])["successes"] == 60  # the lifetime counters are not reset
    traffic(detector, eps, (50, 100))
    clock.advance(35)  # several intervals with no traffic: the last one with traffic is judged once, at 1055
    assert 8000 not in keys(detector.usable(eps))
    assert detector.state(eps[0])["ejected_until"] == 1085.0
    traffic(detector, eps, (100, 100), (50, 100))
    clock.advance(9.9)  # the next interval started at 1055, not on a 10 s grid
    assert keys(detector.usable(eps)) == [8001, 8002, 8003, 8004, 8005, 8006]
    clock.advance(0.1)
    assert keys(detector.usable(eps)) == [8002, 8003, 8004, 8005, 8006]


def test_state_reports_the_success_rate_only_with_the_rule_on() -> None:
    detector, _, eps = make_sr(2)
    assert detector.state(eps[0])["success_rate"] is None
    send(detector, eps[0], 3, 4)
    assert detector.state(eps[0])["success_rate"] == 0.75
    assert detector.state(eps[0])["ejected_by"] is None
    detector, _, eps = make()
    detector.usable(eps)
    send(detector, eps[0], 3, 4)
    assert detector.state(eps[0])["success_rate"] is None


def test_without_the_rule_low_success_rates_eject_nothing() -> None:
    detector, clock, eps = make(7)
    detector.usable(eps)
    for _ in range(5):
        traffic(detector, eps, (50, 100))
        clock.advance(10)
        assert detector.usable(eps)[0] is eps
    assert detector.ejections_total == 0
    assert detector._next_judging == math.inf  # record() compares with infinity and does nothing else for the rule


def test_identical_success_rates_never_eject_anyone() -> None:
    for n in (5, 6, 7, 10, 13):
        for successes in (0, 1, 7, 33, 50, 93, 99, 100):
            for factor in (0.01, 0.5, 1.0, 1.9, 3.0):
                detector, clock, eps = make_sr(n, stdev_factor=factor, max_ejected_percent=100)
                # the same rate from different volumes: successes/100, 2*successes/200, ...
                traffic(detector, eps, *[(successes * (1 + i % 3), 100 * (1 + i % 3)) for i in range(n)])
                clock.advance(10)
                assert detector.usable(eps)[0] is eps, (n, successes, factor)
                assert detector.ejections_total == 0


outcome = st.tuples(st.integers(0, 5), st.booleans(), st.sampled_from([0.0, 0.0, 1.0, 29.0, 61.0, 400.0]))


@settings(max_examples=300, deadline=None)
@given(
    healthy=st.lists(st.booleans(), min_size=1, max_size=6),
    percent=st.integers(0, 100),
    threshold=st.integers(0, 3),
    steps=st.lists(outcome, max_size=80),
    reshuffle=st.integers(0, 100),
    success_rate=st.booleans(),
)
def test_property_usable_is_healthy_nonempty_and_within_the_cap(
    healthy: list[bool],
    percent: int,
    threshold: int,
    steps: list[tuple[int, bool, float]],
    reshuffle: int,
    success_rate: bool,
) -> None:
    clock = Clock()
    rule = SuccessRate(interval=1.0, min_hosts=2, request_volume=1, stdev_factor=0.5) if success_rate else None
    detector = OutlierDetector(
        Policy(consecutive_failures=threshold, max_ejected_percent=percent, success_rate=rule),  # type: ignore[arg-type]
        clock=clock,
    )
    everyone = tuple(Endpoint("10.0.0.1", 8000 + i, healthy=h) for i, h in enumerate(healthy))
    endpoints = everyone
    panics = 0
    was_panic = False
    for i, (index, ok, step) in enumerate(steps):
        if reshuffle and i % reshuffle == reshuffle - 1:  # discovery publishes a new set (maybe smaller)
            endpoints = tuple(everyone[: max(1, len(everyone) - i % 3)])
        chosen, panic = detector.usable(endpoints)
        live = [e for e in endpoints if e.healthy]
        assert all(e.healthy for e in chosen)
        assert set(chosen) <= set(live)
        assert bool(chosen) == bool(live)
        if panic:
            assert set(chosen) == set(live)
        elif live:
            cap = 0 if percent == 0 else max(1, percent * len(live) // 100)
            assert len(live) - len(chosen) <= cap
        panics += panic and not was_panic
        was_panic = panic
        assert detector.panics_total == panics
        if chosen:
            detector.record(chosen[index % len(chosen)], ok)
        clock.advance(step)
