"""Failed token attempts limited per client address: the token bucket, its bounded table, and the address key."""

from __future__ import annotations

import pytest

from ca.ratelimit import FailureLimiter, client_key


def test_a_burst_of_failures_then_one_per_interval() -> None:
    limiter = FailureLimiter(burst=3, interval=10.0, max_clients=100)
    for _ in range(3):
        assert limiter.retry_after("a", 0.0) == 0
        limiter.failed("a", 0.0)
    assert limiter.retry_after("a", 0.0) == 10.0
    assert limiter.retry_after("a", 4.0) == 6.0
    assert limiter.retry_after("a", 10.0) == 0  # one failure refilled
    limiter.failed("a", 10.0)
    assert limiter.retry_after("a", 10.0) == 10.0
    assert limiter.retry_after("a", 40.0) == 0  # all refilled: a full burst again
    for _ in range(3):
        limiter.failed("a", 40.0)
    assert limiter.retry_after("a", 40.0) == 10.0


def test_clients_are_limited_separately() -> None:
    limiter = FailureLimiter(burst=1, interval=5.0, max_clients=100)
    limiter.failed("a", 0.0)
    assert limiter.retry_after("a", 1.0) == 4.0
    assert limiter.retry_after("b", 1.0) == 0


def test_the_table_is_bounded_and_forgets_the_client_quiet_for_longest() -> None:
    limiter = FailureLimiter(burst=2, interval=60.0, max_clients=3)
    for client in ("a", "b", "c"):
        limiter.failed(client, 0.0)
        limiter.failed(client, 0.0)
    limiter.failed("a", 1.0)  # a failed most recently: b is now the one quiet for longest
    limiter.failed("d", 2.0)
    assert len(limiter) == 3
    assert limiter.retry_after("b", 2.0) == 0  # forgotten
    assert limiter.retry_after("a", 2.0) > 0 and limiter.retry_after("c", 2.0) > 0
    assert repr(limiter) == "<FailureLimiter 2 then 1 per 60s; 3 clients tracked>"


def test_refilled_clients_leave_the_table() -> None:
    limiter = FailureLimiter(burst=5, interval=1.0, max_clients=100)
    for n in range(50):
        limiter.failed(f"client-{n}", float(n))
    assert len(limiter) <= 2  # each refilled one second after its failure, and left when the next failure came


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        FailureLimiter(burst=0, interval=1.0, max_clients=1)
    with pytest.raises(ValueError):
        FailureLimiter(burst=1, interval=0.0, max_clients=1)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("", ""),
    ],
)
def test_the_client_key_is_the_address_and_ipv6_by_its_64(host: str, key: str) -> None:
    assert client_key(host) == key
