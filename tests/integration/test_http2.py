"""HTTP/2 with prior knowledge (h2c) from the application into its sidecar, over a real process pair.

The client is the `h2` library driving a plain socket: an independent HTTP/2 peer, not the mesh's own session code.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import DataFrame, Frame, GoAwayFrame

from .clients import request
from .conftest import free_port, sidecar_config


@dataclass
class Answer:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None
    ended: bool = False


class H2Client:
    """A blocking HTTP/2 client on one connection; reads until the streams it waits for end (or reset)."""

    def __init__(self, port: int, *, window: int = 65535) -> None:
        # Outbound headers exactly as given: the client may send what a hostile one would.
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if window != 65535:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.answers: dict[int, Answer] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.auto_ack = True
        self.flush()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send(self, method: str, path: str, body: bytes = b"", headers: list[tuple[str, str]] = ()) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "api"), *headers]
        self.conn.send_headers(stream_id, [(n.encode(), v.encode()) for n, v in fields], end_stream=not body)
        self.answers[stream_id] = Answer()
        self.flush()
        while body:  # within the sidecar's flow-control window, reading its WINDOW_UPDATEs as needed
            room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if room == 0:
                self.feed(self.sock.recv(65536))
                continue
            chunk, body = body[:room], body[room:]
            self.conn.send_data(stream_id, chunk, end_stream=not body)
            self.flush()
        return stream_id

    def wait(self, *stream_ids: int) -> list[Answer]:
        while not all(self.answers[s].ended or self.answers[s].reset is not None for s in stream_ids):
            data = self.sock.recv(65536)
            if not data:
                break
            self.feed(data)
        return [self.answers[s] for s in stream_ids]

    def feed(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.answers[event.stream_id].headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.answers[event.stream_id].body += event.data
                if self.auto_ack:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self.answers[event.stream_id].trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                self.answers[event.stream_id].ended = True
            elif isinstance(event, h2.events.StreamReset):
                self.answers[event.stream_id].reset = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        self.flush()


def test_concurrent_streams_cross_the_mesh_and_bodies_arrive_whole(http_pair, backend) -> None:
    port, _ = http_pair
    client = H2Client(port)
    try:
        gets = [client.send("GET", f"/bytes?n={n}") for n in (0, 10, 300_000)]
        upload = bytes(range(256)) * 1000
        post = client.send("POST", "/consume", upload)
        echoed = client.send("POST", "/echo", b"x" * 70_000)  # more than one flow-control window
        answers = client.wait(*gets, post, echoed)
    finally:
        client.close()
    assert [a.headers[b":status"] for a in answers] == [b"200"] * 5
    assert [len(a.body) for a in answers[:3]] == [0, 10, 300_000]
    assert json.loads(answers[3].body)["sha256"] == hashlib.sha256(upload).hexdigest()
    assert answers[4].body == b"x" * 70_000


def test_mesh_errors_and_limits_answer_the_stream_not_the_connection(mesh) -> None:
    port = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", "retries": {"attempts": 0}}],
        discovery={"static": {"api": [f"127.0.0.1:{free_port()}"]}},  # nothing listens there
    )
    mesh.sidecar(config, "outbound")
    client = H2Client(port)
    try:
        first, second = client.send("GET", "/a"), client.send("GET", "/b")
        answers = client.wait(first, second)
        bad = client.send("GET", "/c", headers=[("connection", "keep-alive")])  # connection-specific in HTTP/2
        (refused,) = client.wait(bad)
        third = client.send("GET", "/d")
        (after,) = client.wait(third)
    finally:
        client.close()
    for answer in answers:
        assert answer.headers[b":status"] == b"502"
        assert answer.headers[b"x-mesh-error"] == b"upstream connect refused"
    assert refused.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert after.headers[b":status"] == b"502"  # the connection outlived the bad stream


def _outbound_with_idle_1s(mesh, backend) -> int:
    port = free_port()
    upstream = {"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", "retries": {"attempts": 0}}
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{**upstream, "timeouts": {"idle": "1s"}}],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},
    )
    mesh.sidecar(config, "outbound")
    return port


def test_a_request_body_that_stalls_past_the_idle_timeout_ends_that_stream_only(mesh, backend) -> None:
    client = H2Client(_outbound_with_idle_1s(mesh, backend))
    try:
        stalled = client.conn.get_next_available_stream_id()
        head = [(b":method", b"POST"), (b":path", b"/consume"), (b":scheme", b"http"), (b":authority", b"api")]
        client.conn.send_headers(stalled, [*head, (b"content-length", b"10")])
        client.conn.send_data(stalled, b"12345")  # half the body, then nothing
        client.answers[stalled] = Answer()
        client.flush()
        slow = client.send("GET", "/slow?s=2")  # in flight beside it, answered after the stalled one ended
        answer, fine = client.wait(stalled, slow)
    finally:
        client.close()
    # Answered as on HTTP/1.1 (and by Envoy's stream idle timeout): 408 with the reason; the rest of the body is
    # then refused with RST_STREAM(NO_ERROR), as for any response complete before its request (RFC 9113 8.1).
    assert answer.headers[b":status"] == b"408"
    assert answer.headers[b"x-mesh-error"] == b"request body stalled past the idle timeout"
    assert answer.ended and answer.reset in (None, h2.errors.ErrorCodes.NO_ERROR)  # the RST may follow the read
    assert (fine.headers[b":status"], fine.body) == (b"200", b"slow done")  # the connection outlived the stream


def test_a_response_that_stalls_past_the_idle_timeout_is_cut_with_a_reset(mesh, backend) -> None:
    client = H2Client(_outbound_with_idle_1s(mesh, backend))
    try:
        stalled = client.send("GET", "/stall")
        slow = client.send("GET", "/slow?s=2")
        answer, fine = client.wait(stalled, slow)
    finally:
        client.close()
    assert (answer.headers[b":status"], answer.body) == (b"200", b"12345")
    assert answer.reset == h2.errors.ErrorCodes.CANCEL and not answer.ended  # never mistaken for a whole body
    assert (fine.headers[b":status"], fine.body) == (b"200", b"slow done")


def test_a_stream_the_client_resets_stops_its_upstream_request(http_pair, backend) -> None:
    port, _ = http_pair
    client = H2Client(port)
    try:
        slow = client.send("GET", "/slow?s=5")
        client.conn.reset_stream(slow, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        fast = client.send("GET", "/bytes?n=5")
        (answer,) = client.wait(fast)
    finally:
        client.close()
    assert answer.headers[b":status"] == b"200" and len(answer.body) == 5


def test_a_client_that_does_not_read_holds_back_the_upstream(http_pair, backend) -> None:
    port, _ = http_pair
    client = H2Client(port)
    client.auto_ack = False  # never open the windows: the sidecar may send one window's worth, then must wait
    try:
        stream = client.send("GET", "/bytes?n=10000000")
        received = 0
        client.sock.settimeout(2)
        try:
            while True:
                data = client.sock.recv(65536)
                if not data:
                    break
                client.feed(data)
                received = len(client.answers[stream].body)
        except TimeoutError:
            pass
    finally:
        client.close()
    assert 0 < received <= 65535  # one initial window, no more, while the upstream waits
    assert request(port, "GET", "/bytes?n=3").status == 200  # and the sidecar serves others meanwhile


def test_a_drain_sends_goaway_lets_the_open_stream_finish_and_exits(mesh, backend) -> None:
    port, outbound, _ = mesh.pair(backend["http"])
    client = H2Client(port)
    frames = []
    try:
        slow = client.send("GET", "/slow?s=1.5")
        outbound.proc.send_signal(signal.SIGTERM)
        # Raw frames from here: the h2 library stops reading a connection at its first GOAWAY, graceful or not.
        buffer = b""
        while data := client.sock.recv(65536):
            buffer += data
            while len(buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                if len(buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(buffer[9 : 9 + length]))
                frames.append(frame)
                buffer = buffer[9 + length :]
    finally:
        client.close()
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways and all(f.error_code == 0 for f in goaways)  # graceful: NO_ERROR
    assert goaways[0].last_stream_id == 2**31 - 1  # first the announcement, then the real last stream
    body = b"".join(f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == slow)
    assert body == b"slow done"  # the open stream finished after the drain began
    assert any("END_STREAM" in f.flags for f in frames if isinstance(f, DataFrame) and f.stream_id == slow)
    assert outbound.proc.wait(30) == 0  # the drain's own exit (a second SIGTERM could race with the teardown)
