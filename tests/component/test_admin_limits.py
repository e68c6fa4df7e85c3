"""The admin listener's limits on memory streams and a virtual clock: head and send deadlines, and eviction."""

from __future__ import annotations

from typing import Any

import structlog
import trio
import trio.testing

from mesh.admin import AdminApp
from mesh.metrics import Metrics

GET_LIVE = b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n"


def admin(**limits: Any) -> AdminApp:
    return AdminApp(
        metrics=Metrics(),
        ready=lambda: (True, "ready"),
        config=dict,
        clusters=dict,
        certs=dict,
        **limits,
    )


class Served:
    """One connection's handler run by the test: when it returns, its stream is closed, as serve_tcp does."""

    def __init__(self, nursery: trio.Nursery, app: AdminApp, stream: trio.abc.Stream) -> None:
        self.closed = trio.Event()
        self.closed_at: float | None = None
        nursery.start_soon(self._run, app, stream)

    async def _run(self, app: AdminApp, stream: trio.abc.Stream) -> None:
        try:
            await app.handle(stream)
        finally:
            self.closed_at = trio.current_time()
            self.closed.set()
            await stream.aclose()


def connect(nursery: trio.Nursery, app: AdminApp) -> tuple[trio.abc.Stream, Served]:
    client, server = trio.testing.memory_stream_pair()
    return client, Served(nursery, app, server)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


async def test_a_trickled_head_gets_408_at_the_head_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client, served = connect(nursery, admin())
    start = trio.current_time()

    async def trickle() -> None:
        for byte in GET_LIVE[:-2]:  # one byte a second, never the final CRLF
            await client.send_all(bytes([byte]))
            await trio.sleep(1)

    nursery.start_soon(trickle)
    with trio.fail_after(60):
        answer = await read_all(client)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert served.closed_at == start + 5.0  # the default head deadline, although a byte came every second


async def test_a_silent_connection_is_closed_at_the_head_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client, served = connect(nursery, admin(head_timeout=2.0))
    start = trio.current_time()
    with trio.fail_after(60):
        assert await read_all(client) == b""
    assert served.closed_at == start + 2.0


async def test_an_idle_keep_alive_connection_gets_the_head_deadline_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client, served = connect(nursery, admin(head_timeout=2.0))
    await trio.sleep(1.5)
    await client.send_all(GET_LIVE)
    answered = trio.current_time()
    with trio.fail_after(60):
        answer = await read_all(client)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"live\n")
    assert served.closed_at == answered + 2.0


async def test_a_full_waiting_room_closes_the_connection_that_waited_longest(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    app = admin(max_waiting=3, max_connections=4)
    start = trio.current_time()
    slow = []
    for _ in range(3):
        slow.append(connect(nursery, app))
        await slow[-1][0].send_all(b"GET /li")  # each a head begun and never finished
        await trio.sleep(1)
    with structlog.testing.capture_logs() as logs:
        probe, _ = connect(nursery, app)
        await probe.send_all(GET_LIVE)
        with trio.fail_after(1):
            assert (await probe.receive_some()).startswith(b"HTTP/1.1 200 ")
            assert await slow[0][0].receive_some() == b""  # closed without an answer
    assert [served.closed_at for _, served in slow] == [start + 3.0, None, None]
    assert logs == [{"event": "connection evicted", "listener": "admin", "waited_s": 3.0, "log_level": "info"}]


async def test_a_response_the_client_does_not_take_is_abandoned(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = trio.testing.lockstep_stream_pair()  # a send waits until the other side reads
    served = Served(nursery, admin(send_timeout=3.0), server)
    await client.send_all(GET_LIVE)
    sent = trio.current_time()
    with trio.fail_after(60):
        await served.closed.wait()
    assert served.closed_at == sent + 3.0
