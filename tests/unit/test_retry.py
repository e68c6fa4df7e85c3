"""The retry rules, budget, backoff and Retry-After parsing, and the latency window used for hedging."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from mesh.config import RetryBudget as BudgetSettings
from mesh.config import RetrySettings
from mesh.deadline import format_deadline_ms, format_grpc_timeout, parse_deadline_ms, parse_grpc_timeout
from mesh.retry import CONNECT_FAILURE, RESET, STATUS, LatencyWindow, RetryBudget, RetryPolicy, parse_retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_allows_the_reserve_then_a_fifth_of_the_requests() -> None:
    clock = Clock()
    budget = RetryBudget(BudgetSettings(percent=20, min_per_second=1, window=10), clock=clock)
    # Reserve: 1/s over 10 s = 10 retries with no requests at all.
    assert [budget.withdraw() for _ in range(11)] == [True] * 10 + [False]
    for _ in range(100):
        budget.deposit()
    assert [budget.withdraw() for _ in range(21)] == [True] * 20 + [False]
    assert budget.exhausted == 2


def test_budget_forgets_requests_and_retries_after_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(BudgetSettings(percent=20, min_per_second=0, window=10), clock=clock)
    for _ in range(50):
        budget.deposit()
    assert sum(budget.withdraw() for _ in range(20)) == 10
    clock.now += 5
    assert not budget.withdraw()  # still inside the window
    clock.now += 5.5
    assert not budget.withdraw()  # the requests left the window with the retries: nothing to spend
    for _ in range(10):
        budget.deposit()
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    clock.now += 1000  # many windows later everything is forgotten at once
    assert budget.available() == 0


def test_budget_under_a_steady_failure_caps_retries_at_the_percentage() -> None:
    clock = Clock()
    budget = RetryBudget(BudgetSettings(), clock=clock)  # 20 %, 10/s, 10 s
    retries = 0
    for _ in range(60 * 100):  # 100 requests/s for 60 s, each wanting 2 retries
        clock.now += 0.01
        budget.deposit()
        retries += budget.withdraw() + budget.withdraw()
    # Over 60 s: 20 % of the 6000 requests plus the reserve of 10/s: the extra load is capped, not tripled.
    assert 1700 <= retries <= 0.2 * 6000 + 10 * 60


def policy(**rules: object) -> RetryPolicy:
    return RetryPolicy(RetrySettings(**rules), clock=Clock(), rng=random.Random(7))


def test_rule_two_decides_what_may_be_sent_again() -> None:
    retry = policy()
    # Never ran: any method.
    assert retry.wanted(CONNECT_FAILURE, never_ran=True, method=b"POST")
    # May have run: idempotent methods only, unless the upstream says every request is safe.
    assert retry.wanted(RESET, never_ran=False, method=b"GET")
    assert retry.wanted(RESET, never_ran=False, method=b"PUT")
    assert not retry.wanted(RESET, never_ran=False, method=b"POST")
    assert not retry.wanted(STATUS, never_ran=False, method=b"PATCH")
    assert policy(methods="all").wanted(RESET, never_ran=False, method=b"POST")
    # Reasons not listed in `on` are not retried at all.
    assert not policy(on=["reset"]).wanted(CONNECT_FAILURE, never_ran=True, method=b"GET")


def test_backoff_is_full_jitter_up_to_the_cap() -> None:
    retry = policy(backoff_base="25ms", backoff_max="250ms")
    for n, ceiling in [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (40, 0.25)]:
        pauses = [retry.backoff(n) for _ in range(200)]
        assert all(p is not None and 0 <= p <= ceiling for p in pauses)
        assert max(p for p in pauses if p is not None) > ceiling * 0.8  # the whole range is used


def test_retry_after_replaces_the_backoff_up_to_its_cap() -> None:
    retry = policy(retry_after_max="1s")
    assert retry.backoff(0, retry_after=0.5) == 0.5
    assert retry.backoff(0, retry_after=2.0) is None  # longer than we hold a request: not retried
    ignoring = policy(retry_after_max=0)
    backoff = ignoring.backoff(0, retry_after=30.0)
    assert backoff is not None and backoff <= 0.025


def test_parse_retry_after() -> None:
    assert parse_retry_after(b"3", 0) == 3.0
    assert parse_retry_after(b" 0 ", 0) == 0.0
    date = formatdate(1_000_010, usegmt=True).encode()
    assert parse_retry_after(date, 1_000_000) == pytest.approx(10.0)
    assert parse_retry_after(date, 2_000_000) == 0.0  # a date in the past: no wait
    assert parse_retry_after(b"soon", 0) is None
    assert parse_retry_after(b"-1", 0) is None


def test_latency_window_reports_the_95th_percentile() -> None:
    window = LatencyWindow(size=100, every=10)
    for i in range(9):
        window.add(i / 1000)
    assert window.value is None  # not enough samples yet
    for i in range(9, 100):
        window.add(i / 1000)
    assert window.value == pytest.approx(0.095)
    for _ in range(100):  # the old samples are replaced
        window.add(1.0)
    assert window.value == 1.0


def test_grpc_timeout_round_trip_and_limits() -> None:
    assert parse_grpc_timeout(b"100m") == pytest.approx(0.1)
    assert parse_grpc_timeout(b"5S") == 5.0
    assert parse_grpc_timeout(b"2H") == 7200.0
    assert parse_grpc_timeout(b"1n") == pytest.approx(1e-9)
    for bad in (b"", b"m", b"10", b"10x", b"123456789m", b"-1S", b"1.5S"):
        assert parse_grpc_timeout(bad) is None
    assert format_grpc_timeout(0.25) == b"250000u"
    assert format_grpc_timeout(1000.0) == b"1000000m"
    assert format_grpc_timeout(10**6) == b"1000000S"
    assert format_grpc_timeout(-1) == b"0u"
    for seconds in (0.0001, 0.5, 42.0, 3600.5, 10**7):
        value = format_grpc_timeout(seconds)
        parsed = parse_grpc_timeout(value)
        assert parsed is not None and parsed <= seconds and len(value) <= 9


def test_mesh_deadline_header_round_trip() -> None:
    assert format_deadline_ms(1.2345) == b"1234"
    assert format_deadline_ms(-3) == b"0"
    assert parse_deadline_ms(b"1234") == 1.234
    assert parse_deadline_ms(b"0") == 0.0
    for bad in (b"", b"-5", b"1.5", b"1e3", b"9" * 13):
        assert parse_deadline_ms(bad) is None
