"""The waiting room: which connections still waiting for a complete request are closed to make room."""

from __future__ import annotations

import pytest

from mesh.admission import Waiter, WaitingRoom


def test_a_full_room_evicts_those_that_waited_longest_first() -> None:
    room: WaitingRoom[str] = WaitingRoom(3)
    assert [room.enter(name) for name in ("a", "b", "c")] == [[], [], []]
    assert room.enter("d") == ["a"]
    assert room.enter("e") == ["b"]
    assert len(room) == 3 and repr(room) == "<WaitingRoom 3/3 waiting>"


def test_one_that_left_is_never_evicted_and_one_that_waits_again_is_the_newest() -> None:
    room: WaitingRoom[str] = WaitingRoom(3)
    for name in ("a", "b", "c"):
        room.enter(name)
    room.leave("a")  # its request is complete ...
    room.leave("a")  # ... and leaving twice is harmless
    assert room.enter("d") == []
    room.leave("b")
    room.enter("b")  # keep-alive: b waits for its next request, from now
    assert room.enter("e") == ["c"]
    assert room.enter("f") == ["d"]
    assert room.enter("g") == ["b"]


def test_the_room_holds_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least one"):
        WaitingRoom(0)
    room: WaitingRoom[str] = WaitingRoom(1)
    room.enter("a")
    assert room.enter("b") == ["a"]


def test_a_waiter_records_an_eviction_and_cancels_what_it_waits_in() -> None:
    cancelled: list[str] = []
    waiter = Waiter(12.5, lambda: cancelled.append("handshake"))
    waiter.cancel = lambda: cancelled.append("request")  # its handler moved on to reading the request
    waiter.expire()  # a drain: cancelled, not evicted
    assert cancelled == ["request"] and not waiter.evicted
    waiter.evict()
    assert cancelled == ["request", "request"] and waiter.evicted
    assert repr(waiter) == "<Waiter since=12.500 evicted>"
