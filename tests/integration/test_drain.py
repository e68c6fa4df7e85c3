"""SIGTERM under load: every request that reached the app gets its real answer or an honest one; none is made up."""

from __future__ import annotations

import itertools
import signal
import socket
import threading
from dataclasses import dataclass

from tests.ports import free_port

from .clients import backend_stats
from .conftest import sidecar_config

CLIENTS = 50
SLOW_EVERY = 15  # every 15th request makes the app wait past the drain deadline
DRAIN_TIMEOUT = 2.0


@dataclass
class Outcome:
    """What one client saw for one request it finished sending."""

    id: str
    method: str
    status: int | None = None  # None: the connection ended before any response byte
    body: bytes = b""
    mesh_error: str | None = None


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One response with a Content-Length body; None if the connection ended before any byte of it."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            piece = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            piece = b""
        if not piece:
            assert not data, f"a response cut inside its head: {data!r}"
            return None
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(65536)
        assert piece, "a response cut inside its body"
        body += piece
    return status, headers, body


def _client(port: int, number: int, ids: itertools.count, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """Send GETs and POSTs on keep-alive connections until the listener refuses new ones."""
    sock: socket.socket | None = None
    while True:
        if sock is None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=15)
            except OSError:
                return  # the listener stopped accepting: the drain has begun
        request_id = f"{number}-{next(ids)}"
        slow = "&s=5" if next(ids) % SLOW_EVERY == 0 else ""
        method = "POST" if number % 2 else "GET"
        body = b"x" * 100 if method == "POST" else b""
        length = f"content-length: {len(body)}\r\n" if method == "POST" else ""
        request = f"{method} /count?id={request_id}{slow} HTTP/1.1\r\nhost: api\r\n{length}\r\n".encode() + body
        try:
            sock.sendall(request)
        except OSError:
            sock.close()  # not finished sending: the client does not count it
            sock = None
            if stop.is_set():
                return
            continue
        outcome = Outcome(request_id, method)
        outcomes.append(outcome)
        response = _read_response(sock)
        if response is None:
            sock.close()
            sock = None
            if stop.is_set():
                return
            continue
        outcome.status, headers, outcome.body = response
        outcome.mesh_error = headers.get("x-mesh-error")
        if headers.get("connection") == "close":
            sock.close()
            sock = None
            if stop.is_set():
                return


def test_sigterm_under_load_loses_no_request_and_makes_up_no_timeout(mesh, backend, tmp_path) -> None:
    port = free_port()
    config = sidecar_config(
        service={"name": "api", "app": f"127.0.0.1:{backend['http']}"},
        inbound={"bind": f"127.0.0.1:{port}", "tls": "off", "timeouts": {"request": "30s"}},
        shutdown={"drain_timeout": f"{DRAIN_TIMEOUT}s"},
    )
    sidecar = mesh.sidecar(config, "inbound")
    before = len(backend_stats(backend["http"])["counted"])
    stop = threading.Event()
    outcomes: list[Outcome] = []
    ids = itertools.count()
    threads = [threading.Thread(target=_client, args=(port, n, ids, stop, outcomes)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    # Under way: enough requests have reached the app, some of them slow ones still in progress.
    for _ in range(600):
        if len(backend_stats(backend["http"])["counted"]) - before >= 300:
            break
        stop.wait(0.05)
    sidecar.proc.send_signal(signal.SIGTERM)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert sidecar.proc.wait(30) == 0
    reached = set(backend_stats(backend["http"])["counted"][before:])

    assert len(outcomes) > 300
    real = [o for o in outcomes if o.status == 200 and o.body == f"counted {o.id}".encode()]
    cut = [o for o in outcomes if o.mesh_error is not None and "may have run" in o.mesh_error]
    refused = [o for o in outcomes if o.mesh_error is not None and "may have run" not in o.mesh_error]
    unanswered = [o for o in outcomes if o.status is None]
    assert len(real) + len(cut) + len(refused) + len(unanswered) == len(outcomes), [
        o for o in outcomes if o not in real + cut + refused + unanswered
    ]
    # A request that reached the app got its real answer, or (the slow ones the drain deadline cut) an answer
    # that says it may have run: never a made-up timeout, never silence.
    assert {o.id for o in outcomes if o.id in reached} == {o.id for o in real + cut}
    assert cut, "no request was cut by the drain deadline: the test did not exercise it"
    assert all(o.status == 503 for o in cut)
    # Every other failure names its reason, or is a connection closed between requests, and in both cases the
    # request never reached the app.
    assert not {o.id for o in refused + unanswered} & reached
    assert all(o.status == 503 and o.mesh_error == "draining" for o in refused)
    # The cut requests are counted: one access-log line each, saying so.
    logged = [e for e in sidecar.events("request") if "may have run" in (e.get("mesh_error") or "")]
    assert len(logged) == len(cut)
