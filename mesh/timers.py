"""Coarse per-connection deadlines swept by one task, so the request hot path never creates a trio deadline."""

from __future__ import annotations

from typing import Protocol

import trio

INF = float("inf")


class Expiring(Protocol):
    """Something with a deadline (trio clock seconds) that knows what to do when it passes."""

    deadline: float

    def expire(self) -> None: ...


class Sweeper:
    """Expires registered items whose `deadline` has passed, checking every `tick` seconds.

    Setting a trio CancelScope deadline costs several microseconds (it reorders trio's deadline heap);
    a connection changes its deadline several times per request. Here a deadline is a plain float that
    this one task compares, so a timeout fires up to `tick` seconds late, which is fine for timeouts of
    a second or more (nginx and Envoy use coarse timers the same way)."""

    def __init__(self, tick: float = 0.1) -> None:
        self.tick = tick
        self._items: set[Expiring] = set()

    def __repr__(self) -> str:
        return f"<Sweeper tick={self.tick}s items={len(self._items)}>"

    def add(self, item: Expiring) -> None:
        self._items.add(item)

    def discard(self, item: Expiring) -> None:
        self._items.discard(item)

    def sweep(self, now: float) -> None:
        expired = [item for item in self._items if item.deadline <= now]
        for item in expired:
            self._items.discard(item)
            item.expire()

    async def run(self) -> None:
        """Sweep forever; runs until cancelled."""
        while True:
            await trio.sleep(self.tick)
            self.sweep(trio.current_time())
