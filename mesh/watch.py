"""Latest-value broadcast: publish a value, let any number of tasks wait for it to change."""

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Watch(Generic[T]):
    """Holds the latest value and a version that grows by one on every `set`.

    Readers never miss the *latest* value but may skip intermediate ones, which is what config snapshots
    and endpoint sets need. `set` is synchronous so that sans-io code driven by a task can publish it.
    """

    __slots__ = ("_changed", "_value", "_version")

    def __init__(self, initial: T) -> None:
        self._value = initial
        self._version = 0
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<Watch version={self._version} value={self._value!r}>"

    @property
    def value(self) -> T:
        return self._value

    @property
    def version(self) -> int:
        return self._version

    def set(self, value: T) -> None:
        """Publish `value` and wake every task waiting in `wait_changed`."""
        self._value = value
        self._version += 1
        # A fresh event per version: tasks already waiting hold the old one, which is set exactly once.
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_changed(self, since_version: int) -> tuple[T, int]:
        """Return `(value, version)` once the version is greater than `since_version`.

        Returns without waiting if that is already the case; like every Trio async function it is still a
        checkpoint, so a loop of `wait_changed` calls cannot starve other tasks.
        """
        if self._version > since_version:
            await trio.lowlevel.checkpoint()
        while self._version <= since_version:
            await self._changed.wait()
        return self._value, self._version
