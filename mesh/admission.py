"""Connections still waiting to send a complete request, and which of them to close when too many wait."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

W = TypeVar("W")


class WaitingRoom(Generic[W]):
    """At most `capacity` connections that have not yet sent a complete request, in the order they began waiting.

    A connection enters when it begins to wait (accepted, or done with its previous request on a keep-alive
    connection) and leaves when its request is complete or it closes. When the room is full, `enter` names the
    connections to close to make room, those that have waited longest: a flood of slow or silent connections then
    costs its own oldest members, and never locks newer clients (health probes among them) out of the listener.

    Synchronous and clock-free: waiting order is entry order, since a connection enters when its wait begins."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a waiting room holds at least one connection, not {capacity}")
        self.capacity = capacity
        # Oldest first. An OrderedDict pops its first item in O(1); a plain dict finds its first key more slowly
        # the more keys were deleted from its front, which is every eviction here.
        self._waiting: OrderedDict[W, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"<WaitingRoom {len(self._waiting)}/{self.capacity} waiting>"

    def __len__(self) -> int:
        return len(self._waiting)

    def enter(self, waiter: W) -> list[W]:
        """Let `waiter` in; returns those to close to make room for it, longest waiting first.

        The returned have left the room already; the caller closes their connections."""
        evicted = []
        while len(self._waiting) >= self.capacity:
            oldest, _ = self._waiting.popitem(last=False)
            evicted.append(oldest)
        self._waiting[waiter] = None
        return evicted

    def leave(self, waiter: W) -> None:
        """`waiter`'s request is complete, or its connection closes; leaving twice or after eviction is harmless."""
        self._waiting.pop(waiter, None)


class Waiter:
    """One connection's wait in a WaitingRoom, from `since` (trio clock seconds).

    `cancel` ends what the connection waits in now (its handler sets it to the cancel scope of the current phase:
    a TLS handshake, a request); `evict()` records why and calls it. `expire()` lets mesh.listener.Drain end the
    wait of an idle connection when a drain begins."""

    __slots__ = ("cancel", "deadline", "evicted", "since")

    def __init__(self, since: float, cancel: Callable[[], None]) -> None:
        self.since = since
        self.cancel = cancel
        self.evicted = False
        self.deadline = float("inf")  # mesh.timers.Expiring's: a Sweeper does not time this; cancel scopes do

    def __repr__(self) -> str:
        return f"<Waiter since={self.since:.3f}{' evicted' if self.evicted else ''}>"

    def evict(self) -> None:
        self.evicted = True
        self.cancel()

    def expire(self) -> None:
        self.cancel()
