"""The single writer task of an HTTP/2 connection, shared by the downstream and upstream sides."""

from __future__ import annotations

import trio

from mesh.http2 import H2Session
from mesh.transport import Stream

STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)  # a transport that failed


class SessionWriter:
    """Owns the send side of one HTTP/2 connection: whatever the session queues is written by `_writer`, woken by
    `flush()`. `_quiet` is set whenever everything queued has been written. Subclasses set `stream`, `session`
    and `_out` (bytes to write first, e.g. the preface) and say what a failed write means (`_send_failed`)."""

    stream: Stream
    session: H2Session
    _out: bytes

    def _init_writer(self) -> None:
        self._dirty = trio.Event()
        self._quiet = trio.Event()

    def flush(self) -> None:
        """Wake the writer: the session has bytes queued."""
        self._dirty.set()

    async def _flushed(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until the writer has written everything queued so far."""
        self._quiet = trio.Event()
        self.flush()
        with trio.move_on_after(timeout):
            await self._quiet.wait()

    def _send_failed(self) -> None:
        raise NotImplementedError

    async def _writer(self) -> None:
        pending, self._out = self._out, b""
        while True:
            data = pending + self.session.data_to_send()
            pending = b""
            if data:
                try:
                    await self.stream.send_all(data)
                except STREAM_ERRORS:
                    self._send_failed()
                    return
                continue
            self._quiet.set()
            await self._dirty.wait()
            self._dirty = trio.Event()
