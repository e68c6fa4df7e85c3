"""The HTTP/2 codec's own cost per request, in one process with no I/O: the floor under any HTTP/2 proxy path.

    python bench/h2/codec_floor.py [-n REQUESTS]

A client H2Session and a server H2Session (mesh/http2.py, the sidecar's sessions with their default limits) talk
through memory: per request the client sends a GET head, the server reads it and answers a head plus a 6-byte
body, the client reads that. Prints µs of CPU per request for each side, and for h2's bare H2Connection doing
the same work (no defences, h2's own header validation and normalisation) for comparison. Requests are in
flight eight at a time, as under h2load -m8. A sidecar pays the server side once per request it receives over
HTTP/2 and the client side once per request it sends over HTTP/2; through a pair with an HTTP/2 mesh hop that
is server + client at the outbound and server at the inbound.
"""

from __future__ import annotations

import argparse
import time

import h2.config
import h2.connection
import h2.events

from mesh.http2 import Data, H2Limits, H2Session, Request, Response

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"127.0.0.1:10000"),
    (b":path", b"/"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
REQUEST_ID = b"x-request-id"
RESPONSE = [
    (b":status", b"200"),
    (b"server", b"nginx/1.22.1"),
    (b"date", b"Thu, 03 Dec 2026 07:30:00 GMT"),
    (b"content-type", b"text/plain"),
    (b"content-length", b"6"),
]
BATCH = 8


def _feed(session: H2Session, data: bytes) -> list:
    return session.receive(data) if data else []  # b"" would mean end of file


def mesh_sessions(n: int) -> tuple[float, float]:
    clock = time.monotonic
    client, server = H2Session(True, H2Limits(), clock), H2Session(False, H2Limits(), clock)
    server.initiate()
    _feed(server, client.initiate())
    _feed(client, server.data_to_send())
    _feed(server, client.data_to_send())
    client_cpu = server_cpu = 0.0
    responses = 0
    for first in range(0, n, BATCH):
        t0 = time.process_time()
        for i in range(first, min(first + BATCH, n)):
            headers = [*REQUEST, (REQUEST_ID, b"%036d" % i)]
            client.send_headers(client.next_stream_id(), headers, end_stream=True)
        wire = client.data_to_send()
        t1 = time.process_time()
        for event in _feed(server, wire):
            if isinstance(event, Request):
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, b"hello\n", end_stream=True)
        wire = server.data_to_send()
        t2 = time.process_time()
        for event in _feed(client, wire):
            if isinstance(event, Data):
                client.acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, Response):
                responses += 1
        _feed(server, client.data_to_send())
        t3 = time.process_time()
        client_cpu += (t1 - t0) + (t3 - t2)
        server_cpu += t2 - t1
    assert responses == n, f"{responses} responses to {n} requests"
    return client_cpu / n * 1e6, server_cpu / n * 1e6


def bare_h2(n: int) -> tuple[float, float]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client_cpu = server_cpu = 0.0
    for first in range(0, n, BATCH):
        t0 = time.process_time()
        for i in range(first, min(first + BATCH, n)):
            headers = [*REQUEST, (REQUEST_ID, b"%036d" % i)]
            client.send_headers(client.get_next_available_stream_id(), headers, end_stream=True)
        wire = client.data_to_send()
        t1 = time.process_time()
        for event in server.receive_data(wire):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, b"hello\n", end_stream=True)
        wire = server.data_to_send()
        t2 = time.process_time()
        for event in client.receive_data(wire):
            if isinstance(event, h2.events.DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        server.receive_data(client.data_to_send())
        t3 = time.process_time()
        client_cpu += (t1 - t0) + (t3 - t2)
        server_cpu += t2 - t1
    return client_cpu / n * 1e6, server_cpu / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="requests per measurement (default 20000)")
    args = parser.parse_args()
    mesh_sessions(1000)  # warm-up
    bare_h2(1000)
    for name, run in (("mesh H2Session", mesh_sessions), ("bare h2 H2Connection", bare_h2)):
        client, server = run(args.n)
        print(f"{name:22} server side {server:6.1f} µs/request   client side {client:6.1f} µs/request")


if __name__ == "__main__":
    main()
