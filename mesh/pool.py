"""Upstream connection pool bookkeeping (sans-io): idle connections per endpoint, expiry and stale detection."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

C = TypeVar("C")


class IdlePool(Generic[C]):
    """Idle keep-alive connections per endpoint key, most recently used first.

    Synchronous: the methods return the connections the caller must close, so the I/O side decides how.
    `is_usable(conn)` is asked when a connection is taken; it answers False for a connection the upstream
    closed (or wrote to) while it sat idle, which must then be closed instead of carrying a request."""

    def __init__(self, *, max_idle_per_endpoint: int, idle_timeout: float, is_usable: Callable[[C], bool]) -> None:
        self.max_idle_per_endpoint = max_idle_per_endpoint
        self.idle_timeout = idle_timeout
        self._is_usable = is_usable
        self._idle: dict[Hashable, deque[tuple[float, C]]] = {}

    def __repr__(self) -> str:
        counts = {str(k): len(v) for k, v in self._idle.items() if v}
        return f"<IdlePool max_idle={self.max_idle_per_endpoint} idle_timeout={self.idle_timeout}s idle={counts}>"

    def idle_count(self, key: Hashable | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def take(self, key: Hashable, now: float) -> tuple[C | None, list[C], int]:
        """Pop the freshest usable idle connection for `key`.

        Returns (connection or None, connections to close, how many of those were stale)."""
        idle = self._idle.get(key)
        to_close: list[C] = []
        stale = 0
        while idle:
            since, conn = idle.pop()
            if now - since >= self.idle_timeout:
                # Everything older than this one has expired too.
                to_close.append(conn)
                to_close.extend(c for _, c in idle)
                idle.clear()
                break
            if self._is_usable(conn):
                return conn, to_close, stale
            stale += 1
            to_close.append(conn)
        return None, to_close, stale

    def put(self, key: Hashable, conn: C, now: float) -> list[C]:
        """Return a connection after a complete exchange; answers what to close if the pool is full."""
        if self.max_idle_per_endpoint <= 0:
            return [conn]
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        idle.append((now, conn))
        if len(idle) > self.max_idle_per_endpoint:
            return [idle.popleft()[1]]
        return []

    def expire(self, now: float) -> list[C]:
        """Remove connections idle for longer than `idle_timeout`."""
        to_close: list[C] = []
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0][0] >= self.idle_timeout:
                to_close.append(idle.popleft()[1])
            if not idle:
                del self._idle[key]
        return to_close

    def drop(self, keep: Callable[[Hashable], bool]) -> list[C]:
        """Remove every idle connection whose endpoint key `keep` rejects (endpoint left discovery)."""
        to_close: list[C] = []
        for key in [k for k in self._idle if not keep(k)]:
            to_close.extend(c for _, c in self._idle.pop(key))
        return to_close

    def clear(self) -> list[C]:
        to_close = [c for idle in self._idle.values() for _, c in idle]
        self._idle.clear()
        return to_close
