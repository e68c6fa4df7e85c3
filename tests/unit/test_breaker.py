"""Circuit breaker counting: limits refuse at once, and releases reopen them."""

from __future__ import annotations

from mesh.breaker import CircuitBreaker
from mesh.config import CircuitBreakers


def test_requests_over_the_limit_are_refused_until_one_finishes() -> None:
    breaker = CircuitBreaker(CircuitBreakers(max_requests=2))
    assert breaker.admit_request() is None
    assert breaker.admit_request() is None
    assert breaker.admit_request() == "max_requests"
    assert breaker.overflows["max_requests"] == 1
    breaker.request_done()
    assert breaker.admit_request() is None


def test_connections_and_pending_limits() -> None:
    breaker = CircuitBreaker(CircuitBreakers(max_connections=2, max_pending=1))
    assert breaker.admit_connection() is None
    assert breaker.admit_connection() == "max_pending"  # one connect already in progress
    breaker.pending_done(opened=True)
    assert breaker.admit_connection() is None
    breaker.pending_done(opened=False)  # that connect failed: nothing stays open
    assert (breaker.connections, breaker.pending) == (1, 0)
    assert breaker.admit_connection() is None
    breaker.pending_done(opened=True)
    assert breaker.admit_connection() == "max_connections"
    breaker.connection_closed()
    assert breaker.admit_connection() is None
