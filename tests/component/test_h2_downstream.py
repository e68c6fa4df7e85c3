"""HTTP/2 downstream connections through `HttpServer.handle` over in-memory streams, on trio's autojump clock: the
request-head timeout, and what is recorded for streams that end without a response.

The client writes raw frames (hyperframe and hpack), as a hostile one would. Requests are answered without any
upstream: the caller is not allowed (403), so the exchange never reaches the cluster.
"""

from __future__ import annotations

from typing import Any

import hpack
import pytest
import structlog.testing
import trio
import trio.testing
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from mesh.config import Http2Settings, Limits, Timeouts
from mesh.httpserver import HttpServer
from mesh.listener import Drain
from mesh.log import AccessLog
from mesh.metrics import Metrics
from mesh.proxy import HttpProxy, HttpProxySettings
from mesh.timers import Sweeper
from mesh.transport import Accepted

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEAD_TIMEOUT = 10.0
GET = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "api")]


class _Socket:
    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 40000)


class Pipe:
    """The proxy's end of an in-memory stream, shaped like the mesh's streams (sync close, a socket, ALPN)."""

    def __init__(self, stream: trio.StapledStream, alpn: str | None) -> None:
        self.stream = stream
        self.socket = _Socket()
        self.alpn = alpn

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    def close(self) -> None:
        self.stream.send_stream.close()
        self.stream.receive_stream.close()

    def selected_alpn_protocol(self) -> str | None:
        return self.alpn


class Acceptor:
    """Hands the proxy a prepared `Accepted`: plaintext, or as if mTLS with ALPN h2 had just completed."""

    def __init__(self, accepted: Accepted) -> None:
        self.accepted = accepted

    async def accept(self, stream: object) -> Accepted:
        return self.accepted


class Recorder:
    """A logger for AccessLog: keeps each event's fields."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})


class Client:
    """The client's end: writes frames, reads everything until the proxy closes."""

    def __init__(self, stream: trio.StapledStream) -> None:
        self.stream = stream
        self.encoder = hpack.Encoder()
        self.frames: list[Frame] = []
        self.closed = trio.Event()
        self.closed_at: float | None = None

    def headers(self, stream_id: int, fields: list[tuple[str, str]] = GET, *, end_stream: bool = True) -> bytes:
        flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
        return HeadersFrame(stream_id, data=self.encoder.encode(fields), flags=flags).serialize()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_until_closed(self) -> None:
        buffer = b""
        while data := await self.stream.receive_some(65536):
            buffer += data
            while len(buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                if len(buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(buffer[9 : 9 + length]))
                self.frames.append(frame)
                buffer = buffer[9 + length :]
        self.closed_at = trio.current_time()
        self.closed.set()

    def goaways(self) -> list[tuple[int, int, bytes]]:
        return [(f.error_code, f.last_stream_id, f.additional_data) for f in self.frames if isinstance(f, GoAwayFrame)]

    def resets(self) -> dict[int, int]:
        return {f.stream_id: f.error_code for f in self.frames if isinstance(f, RstStreamFrame)}

    def statuses(self) -> dict[int, bytes]:
        decoder = hpack.Decoder()
        return {
            f.stream_id: dict(decoder.decode(f.data, raw=True))[b":status"]
            for f in self.frames
            if isinstance(f, HeadersFrame)
        }


class Served:
    """One downstream connection served by `HttpServer.handle` in the test's nursery."""

    def __init__(self, proxy: HttpProxy, client: Client, access: Recorder) -> None:
        self.proxy = proxy
        self.client = client
        self.access = access

    def unanswered(self) -> dict[str, float]:
        return {
            sample.labels["reason"]: sample.value
            for family in self.proxy.metrics.registry.collect()
            if family.name == "mesh_requests_unanswered"
            for sample in family.samples
            if sample.name.endswith("_total")
        }


async def serve(nursery: trio.Nursery, *, tls: bool = False, max_concurrent_streams: int = 100) -> Served:
    """A proxy whose connection is already accepted (as h2c, or as mTLS that agreed on h2), being served."""
    client_end, proxy_end = trio.testing.memory_stream_pair()
    settings = HttpProxySettings(
        "outbound",
        "api",
        Timeouts(request_headers=HEAD_TIMEOUT, idle=3600.0),
        Limits(http2=Http2Settings(max_concurrent_streams=max_concurrent_streams)),
    )
    identity = "spiffe://mesh.local/ns/default/dc/dc1/svc/web" if tls else None
    accepted = Accepted(Pipe(proxy_end, "h2" if tls else None), identity, allowed=False, rule="test")  # type: ignore[arg-type]
    access = Recorder()
    sweeper = Sweeper()
    proxy = HttpProxy(
        settings,
        None,  # type: ignore[arg-type]  (no request is forwarded: the caller is not allowed)
        metrics=Metrics(),
        access_log=AccessLog(True, access),
        drain=Drain(),
        sweeper=sweeper,
        acceptor=Acceptor(accepted),
    )
    served = Served(proxy, Client(client_end), access)

    nursery.start_soon(sweeper.run)
    nursery.start_soon(HttpServer(proxy).handle, None)
    nursery.start_soon(served.client.read_until_closed)
    return served


# --------------------------------------------------------------------------------------------- request-head timeout


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "mtls-alpn-h2"])
async def test_preface_and_settings_alone_get_goaway_no_error_at_the_head_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tls: bool
) -> None:
    start = trio.current_time()
    served = await serve(nursery, tls=tls)
    with structlog.testing.capture_logs() as logs:
        await served.client.send(PREFACE + SettingsFrame(0).serialize())
        await served.client.closed.wait()
    assert served.client.closed_at == pytest.approx(start + HEAD_TIMEOUT)
    assert served.client.goaways() == [(ErrorCodes.NO_ERROR, 0, b"request header timeout")]
    assert [log["reason"] for log in logs if log["event"] == "request rejected"] == ["request header timeout"]


async def test_a_partial_preface_gets_one_head_timeout_not_two(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    served = await serve(nursery)
    await served.client.send(PREFACE[:10])
    await served.client.closed.wait()
    assert served.client.closed_at == pytest.approx(start + HEAD_TIMEOUT)
    assert served.client.goaways() == [(ErrorCodes.NO_ERROR, 0, b"request header timeout")]


async def test_the_time_to_the_first_request_counts_from_the_connection_not_from_the_preface(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    served = await serve(nursery)
    await served.client.send(PREFACE[:10])
    await trio.sleep(HEAD_TIMEOUT - 1)
    await served.client.send(PREFACE[10:] + SettingsFrame(0).serialize())
    await served.client.closed.wait()
    assert served.client.closed_at == pytest.approx(start + HEAD_TIMEOUT)
    assert served.client.goaways() == [(ErrorCodes.NO_ERROR, 0, b"request header timeout")]


async def test_a_first_request_split_mid_header_block_gets_goaway_protocol_error(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    served = await serve(nursery)
    client = served.client
    block = client.encoder.encode(GET)
    await client.send(PREFACE + SettingsFrame(0).serialize() + HeadersFrame(1, data=block[:4]).serialize())
    await served.client.closed.wait()
    assert client.closed_at == pytest.approx(start + HEAD_TIMEOUT)
    assert client.goaways() == [(ErrorCodes.PROTOCOL_ERROR, 0, b"request header timeout")]


@pytest.mark.parametrize("split", ["continuation", "half-frame"])
async def test_a_later_header_block_left_unfinished_gets_goaway_after_the_head_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, split: str
) -> None:
    """The first request is answered (403) and the connection idles well past the head timeout; then a HEADERS
    without END_HEADERS (or half a HEADERS frame) starts the head timeout again."""
    served = await serve(nursery)
    client = served.client
    await client.send(PREFACE + SettingsFrame(0).serialize() + client.headers(1))
    await trio.sleep(3 * HEAD_TIMEOUT)
    assert client.closed_at is None and client.statuses() == {1: b"403"}
    block = client.encoder.encode(GET)
    if split == "continuation":
        partial = HeadersFrame(3, data=block[:4], flags=["END_STREAM"]).serialize()
    else:
        partial = HeadersFrame(3, data=block, flags=["END_STREAM", "END_HEADERS"]).serialize()[:12]
    started = trio.current_time()
    await client.send(partial)
    await served.client.closed.wait()
    assert client.closed_at == pytest.approx(started + HEAD_TIMEOUT)
    assert client.goaways() == [(ErrorCodes.PROTOCOL_ERROR, 1, b"request header timeout")]


async def test_a_header_block_finished_in_time_is_served_and_the_connection_stays(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    served = await serve(nursery)
    client = served.client
    block = client.encoder.encode(GET)
    await client.send(PREFACE + SettingsFrame(0).serialize() + HeadersFrame(1, data=block[:4]).serialize())
    await trio.sleep(HEAD_TIMEOUT - 1)
    await client.send(ContinuationFrame(1, data=block[4:], flags=["END_HEADERS"]).serialize())
    await client.send(DataFrame(1, flags=["END_STREAM"]).serialize())
    await trio.sleep(10 * HEAD_TIMEOUT)  # only the idle timeout (an hour) applies now
    assert client.closed_at is None and client.goaways() == []
    assert client.statuses() == {1: b"403"}


# ------------------------------------------------------------------------------------ streams without a response


async def test_every_stream_the_session_refuses_rejects_or_drops_is_counted_and_logged(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Refused (over the stream limit), malformed (twice: by the session, and without any authority), answered by
    the session (431), and reset by the client in the write that opened it: each is counted, and logged as a
    rejected request or (the client's reset) as an access-log event with status 0."""
    served = await serve(nursery, max_concurrent_streams=1)
    client = served.client
    with structlog.testing.capture_logs() as logs:
        await client.send(
            PREFACE
            + SettingsFrame(0).serialize()
            + client.headers(1, end_stream=False)  # open until its response (403): stream 3 is over the limit
            + client.headers(3)
        )
        await trio.testing.wait_all_tasks_blocked()
        assert client.statuses() == {1: b"403"} and client.resets()[3] == ErrorCodes.REFUSED_STREAM
        await client.send(client.headers(5, [*GET, ("connection", "close")]))
        await client.send(client.headers(7) + RstStreamFrame(7, error_code=ErrorCodes.CANCEL).serialize())
        await client.send(client.headers(9, [*GET, *((f"x-{i}", "1") for i in range(100))]))
        await client.send(client.headers(11, GET[:3]))  # no :authority and no host: nothing to name upstream
        await trio.testing.wait_all_tasks_blocked()
    resets = client.resets()
    assert (resets[5], resets[11]) == (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.PROTOCOL_ERROR)
    assert client.statuses() == {1: b"403", 9: b"431"}
    assert served.unanswered() == {"refused": 1.0, "malformed": 2.0, "client_reset": 1.0}
    rejected = [(log["stream"], log["status"]) for log in logs if log["event"] == "request rejected"]
    assert rejected == [(3, 0), (5, 0), (9, 431), (11, 0)]
    access = [(e["path"], e["status"], e["mesh_error"]) for e in served.access.events]
    assert access == [("/", 403, "caller None denied: test"), ("/", 0, "client reset the stream")]
