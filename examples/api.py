"""The "api" example service of `mesh demo`: a few JSON endpoints, standard library only.

    python examples/api.py --port 8081

GET /         who answered: {"service": "api", "hostname": ..., "time": ...}
GET /items    a small JSON list
GET /headers  the request headers exactly as the app received them, to show what the mesh adds
              (x-forwarded-for, x-request-id) and that it removed every x-mesh-* header on the way
GET /flaky    503 on every other call, to show the caller's sidecar retrying: through the mesh it always
              answers 200, and the caller's mesh_retries_total counts the retries
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import socket
import sys
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ITEMS = [
    {"id": 1, "name": "teapot", "price": 18.0},
    {"id": 2, "name": "kettle", "price": 32.5},
    {"id": 3, "name": "mug", "price": 6.0},
]


FLAKY_CALLS = itertools.count()  # next() on a count is atomic in CPython: safe across the server's threads


class ApiHandler(BaseHTTPRequestHandler):
    server_version = "triomesh-example-api"
    protocol_version = "HTTP/1.1"  # keep-alive, so the sidecar's connection pool has something to reuse

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.send_json(200, {"service": "api", "hostname": socket.gethostname(), "time": _now()})
        elif path == "/items":
            self.send_json(200, ITEMS)
        elif path == "/headers":
            self.send_json(200, {"service": "api", "headers": dict(self.headers.items())})
        elif path == "/flaky":
            if next(FLAKY_CALLS) % 2 == 0:
                self.send_json(503, {"service": "api", "error": "flaky by design: try again"})
            else:
                self.send_json(200, {"service": "api", "flaky": "answered on a retry"})
        else:
            routes = ["/", "/items", "/headers", "/flaky"]
            self.send_json(404, {"error": f"no route for {path}", "routes": routes})

    def send_json(self, status: int, body: object) -> None:
        data = json.dumps(body, indent=2).encode() + b"\n"
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The 'api' example service of the triomesh demo.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    args = parser.parse_args(argv)
    return serve(ThreadingHTTPServer((args.host, args.port), ApiHandler), "api")


def serve(server: ThreadingHTTPServer, name: str) -> int:
    """Serve until SIGTERM or SIGINT, then close the listener and return 0."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)  # unwinds serve_forever() in the main thread

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"{name} listening on http://{host}:{port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        server.server_close()
    print(f"{name} stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
