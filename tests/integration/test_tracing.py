"""Distributed tracing through real sidecars: client → web's sidecar → api's sidecar → api, which calls billing
through its own sidecar → billing's sidecar → billing. One trace, the right parents at every hop, for W3C, B3 multi,
B3 single and no context at all; spans exported over OTLP/HTTP to a receiver the test runs."""

from __future__ import annotations

import http.client
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.ports import free_port

from .conftest import Mesh, Process, sidecar_config
from .otlp_receiver import OtlpReceiver
from .otlp_receiver import start as start_receiver
from .test_h2_unanswered import scrape
from .test_routes import wait_until

TRACE_HEADERS = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags")
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
INPUTS: dict[str, dict[str, str]] = {
    "w3c": {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    "b3multi": {"x-b3-traceid": CLIENT_TRACE, "x-b3-spanid": CLIENT_SPAN, "x-b3-sampled": "1"},
    "b3single": {"b3": f"{CLIENT_TRACE}-{CLIENT_SPAN}-1"},
    "none": {},
}
SERVER, CLIENT = 2, 3
FAILED = {"outcome": "failed"}


class CallingApp:
    """The api service: for every request it calls billing through its own sidecar, passing on the trace headers
    it received (what an instrumented application does), and answers with billing's status."""

    def __init__(self, outbound_port: int) -> None:
        app = self
        self.seen: list[dict[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                incoming = {name: self.headers[name] for name in TRACE_HEADERS if self.headers[name] is not None}
                app.seen.append(incoming)
                conn = http.client.HTTPConnection("127.0.0.1", outbound_port, timeout=10)
                try:
                    conn.request("GET", "/whoami", headers={"host": "billing", **incoming})
                    answer = conn.getresponse()
                    answer.read()
                    status = answer.status
                finally:
                    conn.close()
                body = b"api called billing"
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started, _ = start_receiver()
    yield started
    started.stop()


def tracing(receiver: OtlpReceiver) -> dict[str, Any]:
    return {"tracing": {"collector": receiver.endpoint, "sampling": 1.0}}


def chain(
    mesh: Mesh, receiver: OtlpReceiver, backend: dict[str, int], *, dead_api: str | None = None
) -> tuple[int, CallingApp, Process]:
    """Start billing's, api's and web's sidecars and the api app; returns web's outbound port, the app, and web's
    sidecar. `dead_api`: an address web's discovery also lists for api, where nothing listens."""
    billing_in, api_in, api_out, web_out = free_port(), free_port(), free_port(), free_port()
    mesh.sidecar(
        sidecar_config(
            service={"name": "billing", "app": f"127.0.0.1:{backend['http']}"},
            inbound={"bind": f"127.0.0.1:{billing_in}", "tls": "off"},
            telemetry=tracing(receiver),
        ),
        "billing",
    )
    app = CallingApp(api_out)
    mesh.sidecar(
        sidecar_config(
            service={"name": "api", "app": f"127.0.0.1:{app.port}"},
            inbound={"bind": f"127.0.0.1:{api_in}", "tls": "off"},
            upstreams=[{"service": "billing", "bind": f"127.0.0.1:{api_out}", "tls": "off"}],
            discovery={"static": {"billing": [f"127.0.0.1:{billing_in}"]}},
            telemetry=tracing(receiver),
        ),
        "api",
    )
    web = mesh.sidecar(
        sidecar_config(
            service={"name": "web", "app": "127.0.0.1:1"},
            upstreams=[
                {
                    "service": "api",
                    "bind": f"127.0.0.1:{web_out}",
                    "tls": "off",
                    "balancer": {"policy": "round_robin"},
                    "outlier": {"consecutive_failures": 0},
                }
            ],
            discovery={"static": {"api": [*([dead_api] if dead_api else []), f"127.0.0.1:{api_in}"]}},
            telemetry=tracing(receiver),
        ),
        "web",
    )
    return web_out, app, web


def call(port: int, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/charge", headers={"host": "api", **headers})
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()
        return answer.status


def by_service(spans: list[dict[str, Any]], service: str, kind: int) -> list[dict[str, Any]]:
    return [s for s in spans if s["attributes"].get("mesh.service") == service and s["kind"] == kind]


@pytest.mark.parametrize("given", list(INPUTS))
def test_one_trace_across_every_hop_with_the_right_parents(
    mesh: Mesh, receiver: OtlpReceiver, backend: dict[str, int], given: str
) -> None:
    port, app, _ = chain(mesh, receiver, backend)
    try:
        assert call(port, INPUTS[given]) == 200
        spans = receiver.wait_for(4, timeout=15)  # web: client; api: server and client; billing: server
    finally:
        app.close()
    (web,) = by_service(spans, "web", CLIENT)
    (api_server,) = by_service(spans, "api", SERVER)
    (api_client,) = by_service(spans, "api", CLIENT)
    (billing,) = by_service(spans, "billing", SERVER)
    trace_ids = {span["trace_id"] for span in (web, api_server, api_client, billing)}
    assert len(trace_ids) == 1
    if given == "none":
        assert web["parent_span_id"] == ""  # the outbound started the trace
        assert trace_ids != {CLIENT_TRACE}
    else:
        assert trace_ids == {CLIENT_TRACE} and web["parent_span_id"] == CLIENT_SPAN
    assert api_server["parent_span_id"] == web["span_id"]
    assert api_client["parent_span_id"] == api_server["span_id"]  # through the app, which passed the context on
    assert billing["parent_span_id"] == api_client["span_id"]
    # The app saw the inbound's server span as its parent, in W3C always and in the format it came in.
    seen = app.seen[0]
    assert seen["traceparent"] == f"00-{api_server['trace_id']}-{api_server['span_id']}-01"
    if given == "b3multi":
        assert seen["x-b3-spanid"] == api_server["span_id"]
    if given == "b3single":
        assert seen["b3"].split("-")[1] == api_server["span_id"]
    for span in (web, api_server, api_client, billing):
        attributes = span["attributes"]
        assert attributes["http.request.method"] == "GET"
        assert attributes["http.response.status_code"] == 200
        assert span["status"]["code"] != 2  # not an error
        assert span["start_time_unix_nano"] <= span["end_time_unix_nano"]
    assert web["attributes"]["mesh.winner"] is True
    assert web["attributes"]["mesh.request_id"] == api_server["attributes"]["mesh.request_id"]  # kept end to end


def test_a_retried_request_shows_each_try(mesh: Mesh, receiver: OtlpReceiver, backend: dict[str, int]) -> None:
    dead = f"127.0.0.1:{free_port()}"  # connection refused: a try that never ran, retried on the other endpoint
    port, app, _ = chain(mesh, receiver, backend, dead_api=dead)
    try:
        for i in range(6):  # round robin: some requests try the dead endpoint first
            assert call(port, {"traceparent": f"00-{i + 1:032x}-{CLIENT_SPAN}-01"}) == 200  # a trace each
        spans = receiver.wait_for(6 * 4, timeout=15)
    finally:
        app.close()
    web = by_service(spans, "web", CLIENT)
    retried = [
        [s for s in web if s["trace_id"] == trace_id]
        for trace_id in {s["trace_id"] for s in web}
        if len([s for s in web if s["trace_id"] == trace_id]) == 2
    ]
    assert retried, "no request was retried"
    for tries in retried:
        first, second = sorted(tries, key=lambda s: s["attributes"]["mesh.try"])
        assert first["attributes"]["mesh.upstream_endpoint"] == dead and first["status"]["code"] == 2
        assert first["attributes"]["mesh.winner"] is False and second["attributes"]["mesh.winner"] is True
        assert second["attributes"]["http.request.resend_count"] == 1
        assert first["parent_span_id"] == second["parent_span_id"] == CLIENT_SPAN
        assert first["span_id"] != second["span_id"]


def test_a_collector_that_is_down_fails_no_request_and_is_counted(
    mesh: Mesh, receiver: OtlpReceiver, backend: dict[str, int]
) -> None:
    receiver.refuse()  # nothing listens on the collector's port any more
    port, app, web = chain(mesh, receiver, backend)
    try:
        for _ in range(5):
            assert call(port, INPUTS["none"]) == 200

        def failed_spans() -> float:
            samples = scrape(web).items()
            return sum(v for (name, labels), v in samples if (name, dict(labels)) == ("mesh_spans_total", FAILED))

        wait_until(lambda: failed_spans() >= 5, "the failed exports counted", 15)  # one try a second
    finally:
        app.close()
