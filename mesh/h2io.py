"""The single writer task of an HTTP/2 connection, shared by the downstream and upstream sides."""

from __future__ import annotations

import trio

from mesh.http2 import H2Session
from mesh.stream import STREAM_ERRORS
from mesh.transport import Stream

# Body bytes are handed to the session only while fewer than this many bytes of the connection are unwritten (queued
# in the session or in the writer's current send). The peer's flow-control windows cannot bound memory: a peer may
# open them to 2**31-1 and then read slowly. A stream that finds the budget spent waits, so it stops reading its
# source and the backpressure reaches that socket. One MiB keeps several 16 KiB frames per stream in flight on a
# fast connection.
WRITE_BUDGET = 1 << 20


class SessionWriter:
    """Owns the send side of one HTTP/2 connection: whatever the session queues is written by `_writer`, woken by
    `flush()`. `_quiet` is set whenever everything queued has been written. Body senders call `_write_room()`
    before queueing more, which bounds the connection's unwritten bytes by WRITE_BUDGET (plus one piece per
    sender). Subclasses set `stream`, `session` and `_out` (bytes to write first, e.g. the preface) and say what
    a failed write means (`_send_failed`)."""

    stream: Stream
    session: H2Session
    _out: bytes

    def _init_writer(self) -> None:
        self._dirty = trio.Event()
        self._quiet = trio.Event()
        self._writing = 0  # bytes of the send in progress
        self._room = trio.Event()  # set (and replaced) when a send finished while a sender waited for room
        self._room_wanted = False
        self.writer_gone = False  # nothing queued from now on will be written

    def flush(self) -> None:
        """Wake the writer: the session has bytes queued."""
        self._dirty.set()

    @property
    def unwritten(self) -> int:
        """Bytes the connection has queued or is writing: what the peer has not yet taken from us."""
        return self._writing + self.session.outbound_pending

    async def _write_room(self) -> None:
        """Wait until the connection's unwritten bytes are within WRITE_BUDGET, or the writer is gone (the caller
        checks `writer_gone`: nothing it queues would be written). Cancellation leaves nothing behind."""
        while self.unwritten > WRITE_BUDGET and not self.writer_gone:
            self._room_wanted = True
            self.flush()
            await self._room.wait()

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
        try:
            while True:
                data = pending + self.session.data_to_send()
                pending = b""
                if data:
                    self._writing = len(data)
                    try:
                        await self.stream.send_all(data)
                    except STREAM_ERRORS:
                        self.writer_gone = True
                        self._send_failed()
                        return
                    self._writing = 0
                    if self._room_wanted:  # a new Event per write only while a sender waits for one
                        self._room_wanted = False
                        self._room.set()
                        self._room = trio.Event()
                    continue
                self._quiet.set()
                await self._dirty.wait()
                self._dirty = trio.Event()
        finally:
            self.writer_gone = True  # failed, or cancelled with its connection: wake senders waiting for room
            self._writing = 0
            self._room.set()
