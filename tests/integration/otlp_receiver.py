"""A tiny OTLP/HTTP trace receiver for tests: decodes ExportTraceServiceRequest POSTs and keeps the spans as dicts.

`receiver, port = start()` serves POST /v1/traces on 127.0.0.1:<port> from a thread until `receiver.stop()`. Each
span received is kept in `receiver.spans` as a plain dict: ids in hex, attributes decoded to Python values, and the
resource attributes and scope of the batch it came in. `receiver.requests` records every POST (path, content type,
span count, status answered). Switches for tests: `answer` (a status such as 503: the spans are not kept),
`rejected` (answer 200 with an OTLP partial success rejecting that many spans), `delay` (seconds before answering),
`refuse()` / `resume()` (close the listening socket, so connections are refused, then listen on the same port again).
`wait_for` blocks: from a Trio test, call it through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

TRACES_PATH = "/v1/traces"


def decode_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as the Python value it carries (arrays as lists, key-value lists as dicts)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [decode_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    return getattr(value, kind)


def decode_attributes(attributes: list[KeyValue]) -> dict[str, Any]:
    return {attribute.key: decode_value(attribute.value) for attribute in attributes}


def decode_spans(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """Every span of an export request as a plain dict, with its batch's resource attributes and scope."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = decode_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = {"name": scope_spans.scope.name, "version": scope_spans.scope.version}
            for span in scope_spans.spans:
                spans.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "start_time_unix_nano": span.start_time_unix_nano,
                        "end_time_unix_nano": span.end_time_unix_nano,
                        "attributes": decode_attributes(span.attributes),
                        "status": {"code": span.status.code, "message": span.status.message},
                        "resource": resource,
                        "scope": scope,
                    }
                )
    return spans


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # `stop` must not wait for a handler still writing to a client that gave up

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out and hung up is expected
            super().handle_error(request, client_address)


class OtlpReceiver:
    """What the receiver has been sent, and how it answers; see the module docstring."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.answer = 200
        self.rejected = 0
        self.delay = 0.0
        self.port = 0
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "listening" if self._server else "refusing"
        return f"<OtlpReceiver 127.0.0.1:{self.port} {state} spans={len(self.spans)} requests={len(self.requests)}>"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}{TRACES_PATH}"

    def resume(self) -> None:
        """Listen (again) on the receiver's port, or on a new one the first time."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                content_type = self.headers.get("Content-Type", "")
                status, reply = receiver._receive(self.path, content_type, body)
                if receiver.delay:
                    receiver._stopping.wait(receiver.delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `requests` instead
                pass

        server = _Server(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="otlp-receiver", daemon=True)
        self._thread.start()

    def refuse(self) -> None:
        """Close the listening socket: connections to the port are refused until `resume()`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def stop(self) -> None:
        """Stop listening and release any answer held back by `delay`."""
        self._stopping.set()
        self.refuse()

    def _receive(self, path: str, content_type: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) to answer a POST; keeps its spans when the answer is a success."""
        if path != TRACES_PATH:
            status, spans = 404, []
        elif content_type != "application/x-protobuf":
            status, spans = 415, []
        else:
            try:
                spans = decode_spans(ExportTraceServiceRequest.FromString(body))
                status = self.answer
            except DecodeError:
                status, spans = 400, []
        reply = ExportTraceServiceResponse()
        if status == 200 and self.rejected:
            reply.partial_success.rejected_spans = self.rejected
            reply.partial_success.error_message = "rejected for the test"
        with self._changed:
            self.requests.append({"path": path, "content_type": content_type, "spans": len(spans), "status": status})
            if 200 <= status < 300:
                self.spans.extend(spans)
            self._changed.notify_all()
        return status, reply.SerializeToString()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Block until at least `count` spans have been kept, then return them all; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.spans) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self!r}: waited {timeout}s for {count} spans, got {len(self.spans)}")
                self._changed.wait(min(left, 0.05))
            return list(self.spans)


def start() -> tuple[OtlpReceiver, int]:
    """A receiver listening on a new loopback port, and that port."""
    receiver = OtlpReceiver()
    receiver.resume()
    return receiver, receiver.port
