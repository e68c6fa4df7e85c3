"""OutlierDetector: consecutive-failure ejection, growing and capped durations, the ejection cap, probation, panic."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.discovery import Endpoint
from mesh.outlier import OutlierDetector


@dataclass
class Policy:
    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejected_percent: int = 50


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


outcome = st.tuples(st.integers(0, 5), st.booleans(), st.sampled_from([0.0, 0.0, 1.0, 29.0, 61.0, 400.0]))


@settings(max_examples=300, deadline=None)
@given(
    healthy=st.lists(st.booleans(), min_size=1, max_size=6),
    percent=st.integers(0, 100),
    threshold=st.integers(0, 3),
    steps=st.lists(outcome, max_size=80),
    reshuffle=st.integers(0, 100),
)
def test_property_usable_is_healthy_nonempty_and_within_the_cap(
    healthy: list[bool], percent: int, threshold: int, steps: list[tuple[int, bool, float]], reshuffle: int
) -> None:
    clock = Clock()
    detector = OutlierDetector(
        Policy(consecutive_failures=threshold, max_ejected_percent=percent),  # type: ignore[arg-type]
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
