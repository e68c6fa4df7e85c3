"""IdlePool bookkeeping: freshest first, expiry, stale detection and the per-endpoint cap."""

from __future__ import annotations

from mesh.pool import IdlePool


class Conn:
    def __init__(self, name: str, usable: bool = True) -> None:
        self.name = name
        self.usable = usable

    def __repr__(self) -> str:
        return self.name


def make_pool(max_idle: int = 2, idle_timeout: float = 10.0) -> IdlePool[Conn]:
    return IdlePool(max_idle_per_endpoint=max_idle, idle_timeout=idle_timeout, is_usable=lambda c: c.usable)


def test_take_returns_most_recently_used_first() -> None:
    pool = make_pool()
    a, b = Conn("a"), Conn("b")
    assert pool.put("e1", a, now=0) == []
    assert pool.put("e1", b, now=1) == []
    assert pool.take("e1", now=2) == (b, [], 0)
    assert pool.take("e1", now=2) == (a, [], 0)
    assert pool.take("e1", now=2) == (None, [], 0)
    assert pool.take("other", now=2) == (None, [], 0)


def test_cap_per_endpoint_closes_the_oldest() -> None:
    pool = make_pool(max_idle=2)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    pool.put("e", a, 0)
    pool.put("e", b, 0)
    assert pool.put("e", c, 0) == [a]
    assert pool.idle_count("e") == 2
    assert make_pool(max_idle=0).put("e", a, 0) == [a]


def test_stale_connections_are_skipped_and_returned_for_closing() -> None:
    pool = make_pool(max_idle=5)
    good, stale = Conn("good"), Conn("stale", usable=False)
    pool.put("e", good, 0)
    pool.put("e", stale, 1)
    assert pool.take("e", now=2) == (good, [stale], 1)


def test_expired_connections_are_never_handed_out() -> None:
    pool = make_pool(max_idle=5, idle_timeout=10)
    old, older = Conn("old"), Conn("older")
    pool.put("e", older, 0)
    pool.put("e", old, 1)
    conn, to_close, _ = pool.take("e", now=11)
    assert conn is None and set(to_close) == {old, older}


def test_expire_and_drop() -> None:
    pool = make_pool(max_idle=5, idle_timeout=10)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    pool.put("e1", a, 0)
    pool.put("e1", b, 5)
    pool.put("e2", c, 5)
    assert pool.expire(now=12) == [a]
    assert pool.drop(lambda key: key == "e1") == [c]
    assert pool.idle_count() == 1
    assert pool.clear() == [b]
