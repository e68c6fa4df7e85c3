"""The "web" example frontend of `mesh demo`: calls the api through its own sidecar, standard library only.

    python examples/web.py --port 8080 --api-url http://127.0.0.1:9001

GET /  calls `<api-url>/` (the outbound listener of web's own sidecar, which carries the call to an api
       sidecar) and answers {"service": "web", ..., "api_said": <the api's answer>}. When the call fails it
       answers 502 and passes on the `x-mesh-error` header the sidecar gave as the reason.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_TIMEOUT_S = 10.0
# The app's part of tracing: pass the incoming request's trace headers on to the calls it makes.
TRACE_HEADERS = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
)

# The api is reached through the sidecar on 127.0.0.1: never through an HTTP proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WebHandler(BaseHTTPRequestHandler):
    server_version = "triomesh-example-web"
    protocol_version = "HTTP/1.1"
    api_url = "http://127.0.0.1:9001"  # replaced from --api-url

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/":
            self.send_json(404, {"error": f"no route for {path}", "routes": ["/"]})
            return
        trace = {name: value for name in TRACE_HEADERS if (value := self.headers.get(name)) is not None}
        request = urllib.request.Request(self.api_url + "/", headers=trace)
        page: dict[str, object] = {"service": "web", "hostname": socket.gethostname(), "time": _now()}
        try:
            with _opener.open(request, timeout=API_TIMEOUT_S) as response:
                page["api_said"] = json.load(response)
        except urllib.error.HTTPError as exc:
            # An answer, but not a good one: from the api itself, or a mesh error made by a sidecar.
            with exc:
                body = exc.read().decode(errors="replace").strip()
            mesh_error = exc.headers.get("x-mesh-error")
            page.update(error=f"the api answered {exc.code}", api_status=exc.code, api_body=body[:500])
            if mesh_error is not None:
                page["x-mesh-error"] = mesh_error
            self.send_json(502, page, {"x-mesh-error": mesh_error} if mesh_error is not None else {})
            return
        except (OSError, ValueError) as exc:  # refused or timed out (URLError), or not JSON
            page["error"] = f"cannot call the api at {self.api_url}: {getattr(exc, 'reason', exc)}"
            self.send_json(502, page)
            return
        self.send_json(200, page)

    def send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, indent=2).encode() + b"\n"
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The 'web' example frontend of the triomesh demo.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument(
        "--api-url",
        default=WebHandler.api_url,
        help="the api, as reached through this service's own sidecar (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    WebHandler.api_url = args.api_url.rstrip("/")
    return serve(ThreadingHTTPServer((args.host, args.port), WebHandler), "web")


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
