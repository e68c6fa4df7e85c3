"""A hostile HTTP/2 client against a real sidecar's h2c outbound listener: stream refusal, floods, a stalled window and
late request heads.

The client writes hyperframe frames on a plain socket, as an attacker would, and a thread reads the sidecar's frames.
Each test gets a fresh sidecar whose upstream is the backend app itself, so that its memory and the requests that
reached the app can be measured. Memory is the sidecar's peak RSS (VmHWM, reset through clear_refs) minus its RSS
before the attack, after one warm-up request has loaded everything a request needs.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from .clients import backend_stats, request
from .conftest import Mesh, Process, free_port, sidecar_config
from .test_http2 import H2Client

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MiB = 1024 * 1024
DEADLINE = 20.0  # generous: a loaded 2-core machine runs the sidecar, the backend and this client at once

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = DEADLINE, interval: float = 0.05) -> T:
    """Poll an observable condition until it holds (returning its value) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


class RawH2:
    """A client that writes raw frames; with `read`, a thread parses everything the sidecar sends back."""

    def __init__(self, port: int, *, read: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.settings: dict[int, int] = {}
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaways: list[GoAwayFrame] = []
        self.closed = False  # the reader saw EOF or a reset
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        assert self.write(PREFACE + SettingsFrame(0).serialize())
        if read:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def request(self, stream_id: int, path: str, *, end_headers: bool = True) -> bytes:
        """A GET without a body as one HEADERS frame (encoded now: frames must be written in the order built)."""
        fields = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "api")]
        frame = HeadersFrame(stream_id, data=self.encoder.encode(fields))
        frame.flags.add("END_STREAM")
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame.serialize()

    def write(self, data: bytes) -> bool:
        """Write all of `data` (within the socket timeout); False when the sidecar closed (reset or broken pipe)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def wait_for(self, condition: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
        with self._changed:
            if not self._changed.wait_for(lambda: condition() or self.error is not None, timeout):
                raise AssertionError(f"not within {timeout} s: {what}; frames so far: {self.summary()}")
            if self.error is not None:
                raise AssertionError(f"the reader failed: {self.error!r}")
            return condition()

    def summary(self) -> str:
        return f"heads={sorted(self.heads)} resets={self.resets} goaways={self.goaways} closed={self.closed}"

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        except OSError:
            pass
        if self._reader is not None:
            self._reader.join(DEADLINE)
        self.sock.close()

    def _read(self) -> None:
        buffer = b""
        block = b""
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:  # a reset: what arrived before it has been read already
                    data = b""
                if not data:
                    return
                buffer += data
                with self._changed:
                    while len(buffer) >= 9:
                        frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                        if len(buffer) < 9 + length:
                            break
                        frame.parse_body(memoryview(buffer[9 : 9 + length]))
                        buffer = buffer[9 + length :]
                        block = self._take(frame, block)
                    self._changed.notify_all()
        except BaseException as exc:
            self.error = exc
        finally:
            with self._changed:
                self.closed = True
                self._changed.notify_all()

    def _take(self, frame: Frame, block: bytes) -> bytes:
        """Record one frame; returns the header block still being assembled."""
        if isinstance(frame, HeadersFrame | ContinuationFrame):
            block += frame.data
            if "END_HEADERS" not in frame.flags:
                return block
            fields = dict(self.decoder.decode(block, raw=True))
            self.heads.setdefault(frame.stream_id, fields)
            block = b""
        elif isinstance(frame, DataFrame):
            self.bodies[frame.stream_id] = self.bodies.get(frame.stream_id, b"") + frame.data
        elif isinstance(frame, RstStreamFrame):
            self.resets[frame.stream_id] = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            self.goaways.append(frame)
        elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.settings.update(frame.settings)
        if "END_STREAM" in frame.flags and isinstance(frame, HeadersFrame | DataFrame):
            self.ended.add(frame.stream_id)
        return block


class PeakRss:
    """Peak RSS growth of a process from now on: its VmHWM is reset to its current RSS, then compared with it."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        Path(f"/proc/{proc.proc.pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
        self.baseline_kib = proc.memory_kib("VmRSS")

    def growth_mib(self) -> float:
        peak = self.proc.memory_kib("VmHWM")
        print(f"RSS before {self.baseline_kib} KiB, peak since {peak} KiB")
        return (peak - self.baseline_kib) / 1024


def assert_serves(port: int) -> None:
    """A new HTTP/2 connection gets a whole response."""
    client = H2Client(port)
    try:
        (answer,) = client.wait(client.send("GET", "/bytes?n=5"))
    finally:
        client.close()
    assert answer.headers[b":status"] == b"200" and answer.body == b"xxxxx"


def tcp_queues(pid: int, port: int) -> tuple[list[int], list[int]]:
    """Established loopback TCP connections to `port`, from /proc/<pid>/net/tcp: the receive queues of the
    connecting side (bytes the client has not read) and the send queues of the `port` side (bytes not yet taken)."""
    client_rx, server_tx = [], []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, remote_port = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if fields[3] != "01":  # ESTABLISHED
            continue
        tx, rx = (int(part, 16) for part in fields[4].split(":"))
        if remote_port == port:
            client_rx.append(rx)
        elif local_port == port:
            server_tx.append(tx)
    return client_rx, server_tx


def _sysctl_max(name: str) -> int:
    return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])


def _start_sidecar(mesh: Mesh, backend: dict[str, int]) -> tuple[int, Process]:
    port = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off"}],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},
    )
    proc = mesh.sidecar(config, "outbound")
    assert_serves(port)  # warm-up: what any request allocates is in the baseline of the measurements
    return port, proc


def test_the_stream_above_the_concurrency_limit_alone_is_refused(mesh, backend) -> None:
    """With 100 streams held open at the app, the 101st HEADERS gets RST_STREAM(REFUSED_STREAM); the 100 complete."""
    port, _ = _start_sidecar(mesh, backend)
    key = uuid.uuid4().hex
    client = RawH2(port)
    try:
        limit = client.wait_for(lambda: client.settings.get(SettingsFrame.MAX_CONCURRENT_STREAMS), "SETTINGS")
        assert limit == 100
        held = [1 + 2 * i for i in range(limit)]
        assert client.write(b"".join(client.request(s, f"/hold?key={key}") for s in held))
        wait_until(lambda: backend_stats(backend["http"])["holding"].get(key) == limit, "all streams held at the app")
        extra = held[-1] + 2
        assert client.write(client.request(extra, f"/hold?key={key}"))
        client.wait_for(lambda: extra in client.resets, "the excess stream reset")
        assert client.resets == {extra: ErrorCodes.REFUSED_STREAM}  # that stream only
        assert not client.goaways and not client.heads and not client.closed
        assert request(backend["http"], "GET", f"/release?key={key}").status == 200
        client.wait_for(lambda: client.ended >= set(held), "the held streams complete")
    finally:
        request(backend["http"], "GET", f"/release?key={key}")  # never leave the app holding requests
        client.close()
    assert all(client.heads[s][b":status"] == b"200" and client.bodies[s] == b"released" for s in held)
    assert client.resets == {extra: ErrorCodes.REFUSED_STREAM} and not client.goaways
    assert backend_stats(backend["http"])["held"][key] == limit  # the refused request never reached the app


def test_rapid_reset_gets_goaway_and_reaches_the_app_at_most_once_per_allowed_stream(mesh, backend) -> None:
    """10,000 HEADERS+RST_STREAM pairs: GOAWAY(ENHANCE_YOUR_CALM) and a close, <= 100 requests at the app."""
    port, _ = _start_sidecar(mesh, backend)
    path = f"/rapid-reset/{uuid.uuid4().hex}"  # unknown to the app (404), counted in its stats by path
    client = RawH2(port)
    pairs = [
        client.request(s, path) + RstStreamFrame(s, error_code=ErrorCodes.CANCEL).serialize()
        for s in range(1, 2 * 10_000, 2)
    ]
    written = 0
    try:
        for start in range(0, len(pairs), 250):
            if not client.write(b"".join(pairs[start : start + 250])):
                break
            written += 250
        client.wait_for(lambda: client.closed, "the sidecar closes the connection")
    finally:
        client.close()
    assert [g.error_code for g in client.goaways] == [ErrorCodes.ENHANCE_YOUR_CALM], client.summary()
    # The sidecar ends the connection's stream tasks before closing it, so every request it forwarded was written
    # upstream by now; a request on a new connection then makes the round trip through the app after them.
    assert_serves(port)
    reached = backend_stats(backend["http"])["paths"].count(path)
    print(f"rapid reset: {written} pairs written before the close, {reached} requests reached the app")
    assert reached <= 100


def test_ping_flood_from_a_client_that_never_reads_is_cut_off_with_bounded_memory(mesh, backend) -> None:
    """100,000 PINGs, socket never read: the sidecar closes, its peak RSS grows < 20 MiB, it serves another client."""
    port, proc = _start_sidecar(mesh, backend)
    memory = PeakRss(proc)
    client = RawH2(port, read=False)
    ping = PingFrame(0, opaque_data=b"abuse!!!").serialize()
    batch = ping * 1000
    written, open_ = 0, True
    try:
        while open_ and written < 100_000:
            open_ = client.write(batch)
            written += 1000 if open_ else 0
        # All of it may fit in socket buffers before the sidecar acts: keep writing until the close shows.
        deadline = time.monotonic() + DEADLINE
        while open_ and time.monotonic() < deadline:
            open_ = client.write(ping)
            time.sleep(0.05)
    finally:
        client.close()
    growth = memory.growth_mib()
    print(f"PING flood: {written} PINGs written before the close, peak RSS growth {growth:.1f} MiB")
    assert not open_, "the sidecar kept the connection open"
    # It reads 64 KiB at a time and queues at most 16 KiB of replies for a peer that does not read; 20 MiB is
    # far above that and far below what keeping 100,000 PING ACKs (1.7 MB of frames, as Python objects) would take.
    assert growth < 20
    assert_serves(port)


def test_continuation_flood_gets_goaway_with_bounded_memory(mesh, backend) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames: GOAWAY(ENHANCE_YOUR_CALM), peak RSS growth < 20 MiB."""
    port, proc = _start_sidecar(mesh, backend)
    memory = PeakRss(proc)
    client = RawH2(port)
    fragment = client.encoder.encode([hpack.NeverIndexedHeaderTuple("x-flood", "a" * 1000)], huffman=False)
    batch = ContinuationFrame(1, data=fragment).serialize() * 100
    written = 0
    try:
        assert client.write(client.request(1, "/bytes?n=5", end_headers=False))
        while written < 10_000 and client.write(batch):  # 10,000 frames, about 10 MB of header block
            written += 100
        client.wait_for(lambda: client.closed, "the sidecar closes the connection")
    finally:
        client.close()
    growth = memory.growth_mib()
    print(f"CONTINUATION flood: {written} frames written before the close, peak RSS growth {growth:.1f} MiB")
    assert [g.error_code for g in client.goaways] == [ErrorCodes.ENHANCE_YOUR_CALM], client.summary()
    assert 1 not in client.heads  # the request was never answered, so never forwarded
    assert growth < 20  # buffering the whole block would take over 10 MiB as bytes alone
    assert_serves(port)


def test_a_window_that_never_opens_pauses_a_100_mib_response_upstream(mesh, backend) -> None:
    """No WINDOW_UPDATE for a 100 MiB body: the app's writes stall, RSS grows < 50 MiB; a reset releases the upstream.

    test_http2.py checks that no more than one window reaches the client; this checks where the rest waits.
    """
    port, proc = _start_sidecar(mesh, backend)
    memory = PeakRss(proc)
    key = uuid.uuid4().hex
    size = 100 * MiB
    client = RawH2(port)  # the default 65535-byte windows, never opened

    def stats() -> dict:
        return backend_stats(backend["http"])["streamed"].get(key, {})

    def stalled() -> int | None:
        """The app's byte count, once it has not moved across 5 polls (about 1 s) while the sidecar leaves its
        upstream socket unread."""
        history.append(stats().get("sent", 0))
        unread, _ = tcp_queues(proc.proc.pid, backend["http"])
        quiet = len(history) >= 5 and len(set(history[-5:])) == 1 and history[-1] > 0
        return history[-1] if quiet and max(unread, default=0) > 0 else None

    history: list[int] = []
    try:
        assert client.write(client.request(1, f"/bytes?n={size}&key={key}"))
        client.wait_for(lambda: 1 in client.heads, "the response head")
        sent = wait_until(stalled, "the app's writes stall", interval=0.2)
        unread, unsent = tcp_queues(proc.proc.pid, backend["http"])
        growth = memory.growth_mib()
        state = stats()["state"]
        received = len(client.bodies.get(1, b""))
        assert client.write(RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize())
        wait_until(lambda: stats()["state"] == "aborted", "the sidecar lets the upstream response go")
    finally:
        client.close()
    print(
        f"stalled window: the app wrote {sent // 1024} KiB of {size // MiB} MiB "
        f"(sidecar's upstream socket unread {max(unread) // 1024} KiB, app's unsent {max(unsent, default=0) // 1024}"
        f" KiB), client got {received} bytes, sidecar peak RSS growth {growth:.1f} MiB"
    )
    assert 0 < received <= 65535
    assert state == "streaming"  # the app is still trying to write: the sidecar does not read on
    # What the app wrote waits in kernel buffers (the sidecar's receive and the app's send buffer, each at most the
    # tcp_rmem / tcp_wmem maximum) and in at most a few reads inside the sidecar.
    assert sent < size
    assert sent <= _sysctl_max("tcp_rmem") + _sysctl_max("tcp_wmem") + 8 * MiB
    assert growth < 50
    assert_serves(port)


def test_a_late_request_head_gets_goaway_after_one_request_header_timeout(mesh, backend) -> None:
    """With `timeouts.request_headers: 2s`: preface + SETTINGS alone, a partial preface, and half a HEADERS frame
    after a served request each end in GOAWAY naming the timeout (the half frame: PROTOCOL_ERROR) and a close after
    2 s, not 4 (the partial preface once counted for detection and again for HTTP/1.1) and not after an hour."""
    port = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", "timeouts": {"request_headers": 2}}],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},
    )
    proc = mesh.sidecar(config, "outbound")
    preface_only = RawH2(port)
    partial = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    after_request = RawH2(port)
    try:
        started = time.monotonic()
        partial.sendall(PREFACE[:10])
        assert after_request.write(after_request.request(1, "/bytes?n=5"))
        after_request.wait_for(lambda: 1 in after_request.ended, "the first response")
        half_started = time.monotonic()
        assert after_request.write(after_request.request(3, "/bytes?n=5")[:12])  # 9-byte header + 3 of the block

        preface_only.wait_for(lambda: preface_only.closed, "the close")
        preface_only_s = time.monotonic() - started
        received = b""
        while chunk := partial.recv(65536):
            received += chunk
        partial_s = time.monotonic() - started
        after_request.wait_for(lambda: after_request.closed, "the close")
        half_s = time.monotonic() - half_started
    finally:
        preface_only.close()
        partial.close()
        after_request.close()
    print(f"closed after {preface_only_s:.2f} s (preface only), {partial_s:.2f} s (partial), {half_s:.2f} s (half)")
    assert [(g.error_code, g.additional_data) for g in preface_only.goaways] == [(0, b"request header timeout")]
    assert b"request header timeout" in received  # SETTINGS, then the GOAWAY
    goaway = after_request.goaways[0]
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.PROTOCOL_ERROR, 1)
    assert goaway.additional_data == b"request header timeout"
    assert 1.9 < preface_only_s < 3.5 and 1.9 < partial_s < 3.5 and 1.9 < half_s < 3.5
    proc.wait_for_count('"reason": "request header timeout"', 3)
    assert_serves(port)
