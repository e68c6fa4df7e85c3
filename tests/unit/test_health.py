"""HealthTracker: thresholds both ways, admin state, usable() without allocation and its cache, forget()."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.config import HealthCheckSettings
from mesh.discovery import Endpoint
from mesh.health import HealthTracker


def make(n: int = 3, **settings: object) -> tuple[HealthTracker, tuple[Endpoint, ...]]:
    tracker = HealthTracker(HealthCheckSettings(**settings))  # type: ignore[arg-type]
    return tracker, tuple(Endpoint("10.0.0.1", 8000 + i) for i in range(n))


def report(
    tracker: HealthTracker, endpoint: Endpoint, ok: bool, times: int, reason: str = "connect refused"
) -> list[bool]:
    return [tracker.report(endpoint.key, ok, None if ok else reason) for _ in range(times)]


def ports(endpoints: object) -> list[int]:
    return [e.port for e in endpoints]  # type: ignore[attr-defined]


def test_unhealthy_after_threshold_failures_in_a_row() -> None:
    tracker, eps = make()  # unhealthy_threshold=3, healthy_threshold=2
    assert report(tracker, eps[0], False, 2) == [False, False]
    assert tracker.usable(eps) is eps
    assert tracker.report(eps[0].key, False, "timeout") is True
    assert ports(tracker.usable(eps)) == [8001, 8002]
    assert report(tracker, eps[0], False, 3) == [False] * 3  # already unhealthy: no further change
    assert tracker.changes_total == 1


def test_a_pass_resets_the_failure_count() -> None:
    tracker, eps = make()
    report(tracker, eps[0], False, 2)
    report(tracker, eps[0], True, 1)
    assert report(tracker, eps[0], False, 2) == [False, False]
    assert tracker.state(eps[0])["health_check"] == "healthy"


def test_healthy_again_after_threshold_passes_in_a_row() -> None:
    tracker, eps = make()
    report(tracker, eps[1], False, 3)
    assert tracker.report(eps[1].key, True) is False
    assert tracker.report(eps[1].key, False, "status 503") is False  # a failure resets the passes
    assert tracker.report(eps[1].key, True) is False
    assert tracker.report(eps[1].key, True) is True
    assert tracker.usable(eps) is eps
    assert tracker.changes_total == 2


def test_thresholds_of_one_flip_on_every_change() -> None:
    tracker, eps = make(unhealthy_threshold=1, healthy_threshold=1)
    assert [tracker.report(eps[0].key, ok) for ok in (False, False, True, True, False)] == [
        True,
        False,
        True,
        False,
        True,
    ]
    assert tracker.changes_total == 3


def test_state_reports_unknown_then_counts_and_last_probe() -> None:
    tracker, eps = make()
    assert tracker.state(eps[0]) == {"health_check": "unknown", "health_check_failures": 0, "last_probe": None}
    tracker.report(eps[0].key, True)
    assert tracker.state(eps[0]) == {"health_check": "healthy", "health_check_failures": 0, "last_probe": "ok"}
    report(tracker, eps[0], False, 2, reason="timeout")
    assert tracker.state(eps[0]) == {"health_check": "healthy", "health_check_failures": 2, "last_probe": "timeout"}
    tracker.report(eps[0].key, False, "status 503")
    assert tracker.state(eps[0]) == {
        "health_check": "unhealthy",
        "health_check_failures": 3,
        "last_probe": "status 503",
    }
    tracker.report(eps[0].key, True)
    assert tracker.state(eps[0]) == {"health_check": "unhealthy", "health_check_failures": 0, "last_probe": "ok"}
    tracker.report(eps[0].key, False)
    assert tracker.state(eps[0])["last_probe"] == "failed"  # no reason given


def test_usable_returns_the_same_object_when_none_is_unhealthy() -> None:
    tracker, eps = make()
    assert tracker.usable(eps) is eps
    report(tracker, eps[0], False, 2)
    report(tracker, eps[1], True, 5)
    assert tracker.usable(eps) is eps
    as_list = list(eps)
    assert tracker.usable(as_list) is as_list


def test_usable_caches_the_filtered_tuple_per_set_and_version() -> None:
    tracker, eps = make()
    report(tracker, eps[0], False, 3)
    first = tracker.usable(eps)
    assert ports(first) == [8001, 8002]
    assert tracker.usable(eps) is first  # cached: no new tuple per request
    other = tuple(list(eps))  # an equal set, but a new object from discovery
    assert other is not eps
    assert tracker.usable(other) is not first
    assert ports(tracker.usable(other)) == [8001, 8002]
    report(tracker, eps[2], False, 3)  # a health change invalidates the cache
    assert ports(tracker.usable(other)) == [8001]
    report(tracker, eps[0], True, 2)
    assert ports(tracker.usable(other)) == [8000, 8001]


def test_an_unhealthy_endpoint_outside_the_set_keeps_the_sets_identity() -> None:
    tracker, eps = make(4)
    report(tracker, eps[3], False, 3)
    subset = eps[:3]
    assert tracker.usable(subset) is subset
    assert tracker.usable(subset) is subset


def test_every_endpoint_unhealthy_leaves_none() -> None:
    tracker, eps = make(2)
    for endpoint in eps:
        report(tracker, endpoint, False, 3)
    assert tracker.usable(eps) == ()


def test_forget_drops_state_of_keys_no_longer_discovered() -> None:
    tracker, eps = make()
    report(tracker, eps[0], False, 3)
    report(tracker, eps[1], False, 1)
    report(tracker, eps[2], True, 1)
    assert ports(tracker.usable(eps)) == [8001, 8002]
    tracker.forget({eps[2].key})
    assert tracker.state(eps[0])["health_check"] == "unknown"
    assert tracker.state(eps[1])["health_check"] == "unknown"
    assert tracker.state(eps[2])["last_probe"] == "ok"
    assert tracker.usable(eps) is eps  # a forgotten endpoint that comes back starts as never probed
    assert tracker.changes_total == 1  # forgetting is not a transition
    assert "unhealthy=0" in repr(tracker)


def test_forget_invalidates_the_cache_for_a_set_still_in_use() -> None:
    tracker, eps = make()
    report(tracker, eps[0], False, 3)
    report(tracker, eps[1], False, 3)
    assert ports(tracker.usable(eps)) == [8002]
    tracker.forget({eps[1].key, eps[2].key})
    assert ports(tracker.usable(eps)) == [8000, 8002]


@given(st.lists(st.tuples(st.integers(0, 2), st.booleans()), max_size=60))
def test_usable_matches_the_consecutive_rule(results: list[tuple[int, bool]]) -> None:
    tracker, eps = make(unhealthy_threshold=2, healthy_threshold=2)
    unhealthy = [False] * 3
    streak = [0] * 3  # > 0: passes in a row, < 0: failures in a row
    changes = 0
    for index, ok in results:
        streak[index] = max(streak[index], 0) + 1 if ok else min(streak[index], 0) - 1
        flips = (unhealthy[index] and streak[index] >= 2) or (not unhealthy[index] and streak[index] <= -2)
        assert tracker.report(eps[index].key, ok) is flips
        if flips:
            unhealthy[index] = not unhealthy[index]
            changes += 1
        assert ports(tracker.usable(eps)) == [e.port for i, e in enumerate(eps) if not unhealthy[i]]
    assert tracker.changes_total == changes
