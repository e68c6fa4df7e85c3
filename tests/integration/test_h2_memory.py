"""A slow HTTP/2 reader that opened a 2**31-1 window must not make a real sidecar hold its responses in memory.

The client is the `h2` library over a socket (h2c to an outbound listener, or mTLS with ALPN h2 and a client
certificate to an inbound one), with 10 streams of a 100 MiB download each. The stream window is the client's to
choose, so only the sidecar's own write budget per connection can bound what it holds: its peak RSS may grow by
less than 32 MiB while the client reads slowly, and the rest of each response waits in the app's socket.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings

from .conftest import Process, free_port, sidecar_config
from .test_http2_abuse import PeakRss, tcp_queues
from .test_mtls import authority, write_identity  # noqa: F401  (authority is a fixture)

MiB = 1024 * 1024
WINDOW = 2**31 - 1
STREAMS = 10
SIZE = 100 * MiB
READ_RATE = 4 * MiB  # bytes per second: far below what the app and the sidecar can move
READ_TOTAL = 8 * MiB  # about 2 s of slow reading
LIMIT_MIB = 32


class SlowReader:
    """An h2 client on `sock` that opens every window to 2**31-1, asks for 10 large downloads, then reads them at
    READ_RATE. It never gives window back: 10 x 100 MiB fits in the windows it opened."""

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock = sock
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        self.conn.increment_flow_control_window(WINDOW - 65535)
        for _ in range(STREAMS):
            stream_id = self.conn.get_next_available_stream_id()
            fields = [(":method", "GET"), (":path", f"/bytes?n={SIZE}"), (":scheme", "http"), (":authority", host)]
            self.conn.send_headers(stream_id, [(n.encode(), v.encode()) for n, v in fields], end_stream=True)
        self.received: dict[int, int] = {}
        self.statuses: dict[int, bytes] = {}
        self.sock.sendall(self.conn.data_to_send())

    def read_slowly(self, total: int, memory: PeakRss) -> None:
        """Read `total` bytes at READ_RATE, stopping early once the sidecar's peak RSS grew by the limit."""
        read = 0
        started = time.monotonic()
        while read < total:
            data = self.sock.recv(65536)
            assert data, "the sidecar closed the connection"
            read += len(data)
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.statuses[event.stream_id] = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    self.received[event.stream_id] = self.received.get(event.stream_id, 0) + len(event.data)
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    raise AssertionError(f"unexpected {event}")
            if pending := self.conn.data_to_send():  # SETTINGS and PING acknowledgements
                self.sock.sendall(pending)
            growth = (memory.proc.memory_kib("VmHWM") - memory.baseline_kib) / 1024
            if growth >= LIMIT_MIB:
                break  # already failed: stop before the sidecar takes more of the machine
            pause = started + read / READ_RATE - time.monotonic()  # the pace of a slow reader
            if pause > 0:
                time.sleep(pause)


def _check(proc: Process, sock: socket.socket, app_port: int) -> None:
    memory = PeakRss(proc)
    client = SlowReader(sock, "api")
    try:
        client.read_slowly(READ_TOTAL, memory)
        growth = memory.growth_mib()
        unread, _ = tcp_queues(proc.proc.pid, app_port)  # the sidecar's upstream sockets, bytes it has not read
    finally:
        sock.close()
    print(f"{STREAMS} slow streams: read {sum(client.received.values()) // 1024} KiB, peak RSS growth {growth:.1f} MiB")
    assert growth < LIMIT_MIB
    assert set(client.statuses.values()) == {b"200"} and len(client.statuses) == STREAMS
    assert sum(unread) > 0  # the backpressure reached the upstream sockets: the rest waits in the kernel and the app


def test_slow_h2c_reader_with_a_huge_window_keeps_the_sidecar_flat(mesh, backend) -> None:
    port = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off"}],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},
    )
    proc = mesh.sidecar(config, "outbound")
    _check(proc, socket.create_connection(("127.0.0.1", port), timeout=20), backend["http"])


def test_slow_mtls_h2_reader_with_a_huge_window_keeps_the_inbound_flat(
    mesh,
    tmp_path: Path,
    authority,  # noqa: F811
    backend,
) -> None:
    port = free_port()
    server = sidecar_config(
        service={"name": "api", "app": f"127.0.0.1:{backend['http']}"},
        inbound={"bind": f"127.0.0.1:{port}", "tls": "mutual", "allow": ["web"]},
        identity=write_identity(tmp_path / "api", authority.issue("api")),
    )
    proc = mesh.sidecar(server, "inbound")
    web = tmp_path / "web"
    write_identity(web, authority.issue("web"))
    context = ssl.create_default_context(cafile=str(web / "bundle.pem"))
    context.check_hostname = False
    context.load_cert_chain(str(web / "cert.pem"), str(web / "key.pem"))
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="api")
    assert sock.selected_alpn_protocol() == "h2"
    _check(proc, sock, backend["http"])
