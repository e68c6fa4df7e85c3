"""A scripted, counting HTTP/1.1 endpoint in the test process: every request is recorded, then answered by a script.

Actions: "ok" (200 `ok`), "status:<code>[:<retry-after>]", "reset" (RST after reading the request), "eof" (close
without a response), "hang" (read the request, never answer), "ok-then-close" (200 with keep-alive framing, then
FIN while the connection sits idle in the caller's pool), "slow:<ms>" (200 after that long). The script is a function
of the arrival number; `paths` overrides it for particular paths.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11


@dataclass
class Arrival:
    method: str
    path: str
    body_bytes: int
    headers: dict[str, str]
    connection: int


class ScriptedEndpoint:
    def __init__(self, script: str | Callable[[int], str] = "ok", paths: dict[str, str] | None = None) -> None:
        self.script = script if callable(script) else (lambda _n, s=script: s)
        self.paths = paths or {}  # actions for particular paths (e.g. a health check), overriding the script
        self.arrivals: list[Arrival] = []
        self.connections = 0
        self.closed_idle = threading.Event()  # set when an ok-then-close connection was closed
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._hung: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for a in self.arrivals if method is None or a.method == method)

    def close(self) -> None:
        self._stop.set()
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread; a bare close() would not
        self._listener.close()
        for sock in self._hung:
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, connection: int) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = _read_request(sock, conn)
                if request is None:
                    sock.close()
                    return
                with self._lock:
                    n = len(self.arrivals)
                    self.arrivals.append(
                        Arrival(
                            request.method.decode(),
                            request.target.decode(),
                            body,
                            {k.decode(): v.decode() for k, v in request.headers},
                            connection,
                        )
                    )
                action = self.paths.get(request.target.decode()) or self.script(n)
                if action == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                    return
                if action == "eof":
                    sock.close()
                    return
                if action == "hang":
                    self._hung.append(sock)
                    return
                if action.startswith("slow:"):
                    time.sleep(int(action.split(":")[1]) / 1000)  # this endpoint's service time
                status, retry_after = 200, None
                if action.startswith("status:"):
                    parts = action.split(":")
                    status = int(parts[1])
                    retry_after = parts[2] if len(parts) > 2 else None
                headers = [("content-length", "2")]
                if retry_after is not None:
                    headers.append(("retry-after", retry_after))
                sock.sendall(conn.send(h11.Response(status_code=status, headers=headers)))
                sock.sendall(conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                if action == "ok-then-close":
                    sock.close()
                    self.closed_idle.set()
                    return
                if conn.our_state is h11.MUST_CLOSE:  # the caller asked for `Connection: close`
                    sock.close()
                    return
                conn.start_next_cycle()
        except (OSError, h11.RemoteProtocolError):
            sock.close()


def _read_request(sock: socket.socket, conn: h11.Connection) -> tuple[h11.Request | None, int]:
    request = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(65536)
            conn.receive_data(data)
            if not data and request is None:
                return None, 0
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            return None, 0
