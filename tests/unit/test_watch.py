"""Watch: latest-value broadcast semantics."""

import trio
import trio.testing

from mesh.watch import Watch


def test_initial_value_has_version_zero() -> None:
    watch = Watch("a")
    assert (watch.value, watch.version) == ("a", 0)


def test_set_bumps_version_and_replaces_value() -> None:
    watch = Watch(1)
    watch.set(2)
    watch.set(3)
    assert (watch.value, watch.version) == (3, 2)


async def test_wait_changed_returns_at_once_when_already_newer() -> None:
    watch = Watch("a")
    watch.set("b")
    with trio.fail_after(1):
        assert await watch.wait_changed(0) == ("b", 1)


async def test_wait_changed_is_a_checkpoint_even_when_not_waiting() -> None:
    watch = Watch("a")
    watch.set("b")
    with trio.testing.assert_checkpoints():
        await watch.wait_changed(0)


async def test_wait_changed_blocks_until_set_and_wakes_every_waiter() -> None:
    watch = Watch("a")
    seen: list[tuple[str, int]] = []

    async def waiter() -> None:
        seen.append(await watch.wait_changed(watch.version))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        watch.set("b")
    assert seen == [("b", 1)] * 3


async def test_waiter_skips_to_latest_value() -> None:
    watch = Watch(0)
    result: list[tuple[int, int]] = []

    async def waiter() -> None:
        result.append(await watch.wait_changed(0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        watch.set(1)
        watch.set(2)
    assert result == [(2, 2)]


async def test_wait_changed_is_cancellable(autojump_clock: trio.testing.MockClock) -> None:
    watch = Watch(0)
    with trio.move_on_after(1) as scope:
        await watch.wait_changed(0)
    assert scope.cancelled_caught
