"""HTTP/2 upstream connections against an independent HTTP/2 server (the h2 library) over an in-memory stream."""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import trio
import trio.testing
from h2.errors import ErrorCodes

from mesh.discovery import Endpoint
from mesh.errors import UpstreamLost
from mesh.h2io import WRITE_BUDGET
from mesh.h2upstream import H2Connection, H2Exchange, H2Pool
from mesh.message import END, RequestHead, ResponseHead, Trailers

pytestmark = pytest.mark.trio


def request(
    method: bytes = b"GET",
    target: bytes = b"/",
    *,
    body: bool = False,
    content_length: int | None = None,
    upgrade: bytes | None = None,
) -> RequestHead:
    """A request head as the codecs produce it (a body without content-length is of unknown length)."""
    return RequestHead(
        method=method,
        target=target,
        http10=False,
        headers=[(b"host", b"api")],
        mesh_headers=[],
        keep_alive=True,
        has_body=body,
        chunked=body and content_length is None,
        content_length=content_length,
        expect_continue=False,
        upgrade=upgrade,
        authority=b"api",
    )


class Server:
    """The peer: h2's server side, answering as each test tells it to."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.changed = trio.Event()
        self.sending = trio.Lock()

    async def run(self) -> None:
        await self.flush()
        while data := await self.stream.receive_some(65536):
            try:
                self.events += self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:  # after our GOAWAY h2 accepts nothing more; keep reading to EOF
                continue
            self.changed.set()
            self.changed = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        async with self.sending:
            if data := self.conn.data_to_send():
                await self.stream.send_all(data)

    async def wait_for(self, kind: type, stream_id: int = 1) -> h2.events.Event:
        while True:
            for event in self.events:
                if isinstance(event, kind) and getattr(event, "stream_id", stream_id) == stream_id:
                    return event
            await self.changed.wait()


class Pipe:
    """The client's end of an in-memory stream, with the synchronous close() the mesh's streams have."""

    def __init__(self, stream: trio.StapledStream) -> None:
        self.stream = stream

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    def close(self) -> None:
        self.stream.send_stream.close()
        self.stream.receive_stream.close()


async def setup(nursery: trio.Nursery) -> tuple[H2Connection, Server, list[H2Connection]]:
    memory_client, server_stream = trio.testing.memory_stream_pair()
    client_stream = Pipe(memory_client)
    closed: list[H2Connection] = []
    conn = H2Connection(
        client_stream, Endpoint("127.0.0.1", 1), scheme=b"https", idle_timeout=60, on_close=closed.append
    )
    server = Server(server_stream)
    nursery.start_soon(server.run)
    nursery.start_soon(conn.run)
    return conn, server, closed


async def read_response(exchange: H2Exchange) -> list[object]:
    events: list[object] = []
    while not events or events[-1] is not END:
        event = exchange.next_event()
        if event is None:
            await exchange.read_more()
        else:
            events.append(event)
    return events


async def next_event(exchange: H2Exchange) -> object:
    while (event := exchange.next_event()) is None:
        await exchange.read_more()
    return event


async def test_a_request_and_its_trailers_cross_both_ways(nursery: trio.Nursery) -> None:
    conn, server, _ = await setup(nursery)
    exchange = conn.open()
    head = request(b"POST", b"/pkg.Svc/Call", body=True)
    fields = [(b"host", b"api"), (b"content-type", b"application/grpc"), (b"x-mesh-deadline", b"900")]
    await exchange.send_request(head, fields, [b"hello"], True, [(b"x-end", b"1")])
    received = await server.wait_for(h2.events.RequestReceived)
    headers = dict(received.headers)
    assert headers[b":authority"] == b"api" and headers[b":scheme"] == b"https"
    assert headers[b":path"] == b"/pkg.Svc/Call" and headers[b"te"] == b"trailers"
    assert headers[b"x-mesh-deadline"] == b"900"  # the mesh's own headers travel
    assert b"transfer-encoding" not in headers and b"host" not in headers
    trailers = await server.wait_for(h2.events.TrailersReceived)
    assert dict(trailers.headers) == {b"x-end": b"1"}
    data = b"".join(e.data for e in server.events if isinstance(e, h2.events.DataReceived))
    assert data == b"hello"
    server.conn.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.conn.send_data(1, b"world")
    server.conn.send_headers(1, [(b"grpc-status", b"0"), (b"x-bin-bin", b"AAE=")], end_stream=True)
    await server.flush()
    events = await read_response(exchange)
    head = events[0]
    assert isinstance(head, ResponseHead) and head.status == 200
    assert events[1] == b"world"
    assert events[2] == Trailers([(b"grpc-status", b"0"), (b"x-bin-bin", b"AAE=")])
    exchange.close()
    assert not conn.streams and conn.available


async def test_a_refused_stream_is_a_failure_before_any_response_byte(nursery: trio.Nursery) -> None:
    conn, server, _ = await setup(nursery)
    exchange = conn.open()
    await exchange.send_request(request(), [(b"host", b"api")], [], True)
    await server.wait_for(h2.events.RequestReceived)
    server.conn.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    await server.flush()
    with pytest.raises(UpstreamLost, match="REFUSED_STREAM") as lost:
        await exchange.read_more()
    assert lost.value.never_ran


async def test_close_mid_response_resets_the_stream_and_the_connection_stays(nursery: trio.Nursery) -> None:
    conn, server, _ = await setup(nursery)
    exchange = conn.open()
    await exchange.send_request(request(target=b"/long"), [(b"host", b"api")], [], True)
    await server.wait_for(h2.events.RequestReceived)
    server.conn.send_headers(1, [(b":status", b"200")])
    server.conn.send_data(1, b"part")
    await server.flush()
    head = await next_event(exchange)
    assert isinstance(head, ResponseHead) and head.status == 200
    exchange.close()
    reset = await server.wait_for(h2.events.StreamReset)
    assert reset.error_code == ErrorCodes.CANCEL
    assert conn.available  # the connection serves the next request
    second = conn.open()
    await second.send_request(request(), [(b"host", b"api")], [], True)
    assert (await server.wait_for(h2.events.RequestReceived, 3)).stream_id == 3


async def test_the_response_window_opens_only_as_the_proxy_reads(nursery: trio.Nursery) -> None:
    conn, server, _ = await setup(nursery)
    exchange = conn.open()
    await exchange.send_request(request(target=b"/big"), [(b"host", b"api")], [], True)
    await server.wait_for(h2.events.RequestReceived)
    server.conn.send_headers(1, [(b":status", b"200")])
    await server.flush()
    await server.wait_for(h2.events.RemoteSettingsChanged, 0)
    sent = 0
    while (room := server.conn.local_flow_control_window(1)) > 0:  # fill the 1 MiB stream window
        chunk = min(room, server.conn.max_outbound_frame_size)
        server.conn.send_data(1, b"x" * chunk)
        sent += chunk
        await server.flush()
    assert sent == 1 << 20  # what the mesh advertises per stream: nothing more can be sent unread
    await trio.testing.wait_all_tasks_blocked()
    assert server.conn.local_flow_control_window(1) == 0
    assert isinstance(await next_event(exchange), ResponseHead)
    received = 0
    while received < sent:
        data = await next_event(exchange)
        assert isinstance(data, bytes)
        received += len(data)
    assert exchange.next_event() is None  # all taken: the credit goes back
    with trio.fail_after(5):
        while server.conn.local_flow_control_window(1) == 0:  # reading gave the window back
            await server.changed.wait()
    exchange.close()


async def test_goaway_stops_new_streams_and_the_pool_looks_elsewhere(nursery: trio.Nursery) -> None:
    conn, server, closed = await setup(nursery)
    pool = H2Pool()
    pool.add(conn.endpoint.key, conn)
    exchange = pool.take(conn.endpoint.key)
    assert exchange is not None
    await exchange.send_request(request(), [(b"host", b"api")], [], True)
    await server.wait_for(h2.events.RequestReceived)
    server.conn.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=1)
    await server.flush()
    await trio.testing.wait_all_tasks_blocked()
    assert conn.draining
    assert pool.take(conn.endpoint.key) is None  # no stream on a connection that is going away
    exchange.close()
    await trio.testing.wait_all_tasks_blocked()  # the last stream ended: the connection closes
    assert closed == [conn] and conn.closed


async def test_a_request_http2_cannot_carry_gives_its_reserved_stream_back(nursery: trio.Nursery) -> None:
    conn, _, _ = await setup(nursery)
    exchange = conn.open()
    assert conn.reserved == 1
    with pytest.raises(trio.BrokenResourceError, match="upgrade"):
        await exchange.send_request(request(target=b"/ws", upgrade=b"websocket"), [(b"host", b"api")], [], True)
    exchange.close()
    exchange.close()
    assert conn.reserved == 0 and conn.available


async def test_a_request_body_stops_at_the_write_budget_when_the_peer_opens_a_huge_window_and_stops_reading(
    nursery: trio.Nursery,
) -> None:
    """The peer's windows (2**31-1) cannot bound what the connection holds: once a write budget of bytes waits
    unwritten, the body's sender waits too, and everything arrives once the peer reads again."""
    client_end, server_end = trio.testing.lockstep_stream_pair()  # a write completes only as the peer reads it
    closed: list[H2Connection] = []
    conn = H2Connection(
        Pipe(client_end), Endpoint("127.0.0.1", 1), scheme=b"https", idle_timeout=60, on_close=closed.append
    )
    nursery.start_soon(conn.run)
    server = Server(server_end)
    server.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    server.conn.increment_flow_control_window(2**31 - 1 - 65535)

    async def serve(until: Callable[[], bool]) -> None:
        await server.flush()
        while not until():
            server.events += server.conn.receive_data(await server.stream.receive_some(65536))
            await server.flush()

    size = 16 << 20
    exchange = conn.open()
    await exchange.send_request(
        request(b"POST", b"/up", body=True, content_length=size), [(b"host", b"api")], [], False
    )
    await serve(lambda: any(isinstance(e, h2.events.RequestReceived) for e in server.events))
    await trio.testing.wait_all_tasks_blocked()  # the client has taken the huge windows; the peer reads no more
    assert conn.session.window(1) > size
    handed = 0
    done = trio.Event()

    async def send_body() -> None:
        nonlocal handed
        piece = b"x" * 65536
        while handed < size:
            await exchange.send_body(piece)
            handed += len(piece)
        done.set()

    nursery.start_soon(send_body)
    await trio.testing.wait_all_tasks_blocked()
    assert handed <= WRITE_BUDGET + 65536  # not the whole 16 MiB
    assert conn.unwritten <= WRITE_BUDGET + 2 * 65536
    await serve(lambda: sum(len(e.data) for e in server.events if isinstance(e, h2.events.DataReceived)) == size)
    await done.wait()
    exchange.close()
