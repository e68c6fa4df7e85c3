"""Real grpcio peers for the HTTP/2 + gRPC tests: an h2c `mesh.test.Echo` server (in-process or `serve`), a client."""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

SERVICE = "mesh.test.Echo"
CALL_ID = "x-call-id"
MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.enable_http_proxy", 0),  # never tunnel test traffic through an http_proxy from the environment
]
SERVER_OPTIONS = [*CHANNEL_OPTIONS[:2], ("grpc.so_reuseport", 0)]
_RESERVED = ("grpc-", ":")  # metadata a handler may not send back
Metadata = list[tuple[str, str | bytes]]


def _jsonable(md: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """Metadata as a JSON-friendly dict; `-bin` values as hex."""
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in md}


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline (from grpc-timeout); None when the caller set no deadline."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else remaining


class Recorder:
    """Per-call records, read back as JSON through `Stats`.

    {"method", "call_id" (the caller's x-call-id), "peer", "metadata" (as the app saw it; -bin values hex),
     "time_remaining" (s left of grpc-timeout at the start, null without one), "started", "finished" (the handler
     completed normally), "ended" (the RPC terminated), "cancelled" (terminated before the handler finished: client
     cancel, RST_STREAM or deadline), "cancelled_at", "remaining_at_cancel"}; times are time.monotonic(), which on
     Linux is system-wide, so comparable between the test process and a `serve` process.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []

    def begin(self, method: str, context: grpc.ServicerContext) -> tuple[dict[str, Any], threading.Event]:
        md = list(context.invocation_metadata())
        record: dict[str, Any] = {
            "method": method,
            "call_id": dict(md).get(CALL_ID),
            "peer": context.peer(),
            "metadata": _jsonable(md),
            "time_remaining": _remaining(context),
            "started": time.monotonic(),
            "finished": None,  # the handler's own work ended
            "ended": None,  # the RPC terminated (any reason)
            "cancelled": False,
            "cancelled_at": None,
            "remaining_at_cancel": None,
        }
        terminated = threading.Event()

        def on_termination() -> None:
            with self.lock:
                record["ended"] = time.monotonic()
                if record["finished"] is None:  # terminated before the handler was done: cancel or deadline
                    record["cancelled"] = True
                    record["cancelled_at"] = record["ended"]
                    record["remaining_at_cancel"] = _remaining(context)
            terminated.set()

        with self.lock:
            self.calls.append(record)
        if not context.add_callback(on_termination):
            on_termination()
        return record, terminated

    def finish(self, record: dict[str, Any]) -> None:
        with self.lock:
            if record["finished"] is None and not record["cancelled"]:
                record["finished"] = time.monotonic()

    def select(self, call_id: str = "") -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.calls if not call_id or r["call_id"] == call_id]


class Echo:
    """The `mesh.test.Echo` methods; every one (but Stats) is recorded."""

    def __init__(self, recorder: Recorder) -> None:
        self.rec = recorder

    def Unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        record, _ = self.rec.begin("Unary", context)
        try:
            if request.startswith(b"size:"):
                return b"x" * int(request[5:])
            return request
        finally:
            self.rec.finish(record)

    def ClientStream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        record, _ = self.rec.begin("ClientStream", context)
        count = total = 0
        for message in requests:
            count, total = count + 1, total + len(message)
        self.rec.finish(record)
        return f"count={count} length={total}".encode()

    def ServerStream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        record, _ = self.rec.begin("ServerStream", context)
        n, size = (int(x) for x in request.split(b":"))
        for i in range(n):
            yield bytes([i % 256]) * size
        self.rec.finish(record)

    def Bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        record, _ = self.rec.begin("Bidi", context)
        yield from requests
        self.rec.finish(record)

    def Sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        record, terminated = self.rec.begin("Sleep", context)
        if terminated.wait(float(request or b"0")):
            return b"cancelled"  # nobody will read this
        self.rec.finish(record)
        return b"slept"

    def Status(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        record, _ = self.rec.begin("Status", context)
        name, _, message = request.decode().partition(":")
        code = next(c for c in grpc.StatusCode if name in (c.name, str(c.value[0])))  # "NOT_FOUND" or "5"
        context.set_trailing_metadata([("x-custom", "value"), ("x-bin-bin", b"\x00\x01\xff")])
        self.rec.finish(record)
        context.abort(code, message)
        raise AssertionError("unreachable")

    def Metadata(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Echo the caller's metadata as initial and trailing metadata; the body lists everything seen, as JSON."""
        record, _ = self.rec.begin("Metadata", context)
        md = [(k, v) for k, v in context.invocation_metadata() if not k.startswith(_RESERVED) and k != "user-agent"]
        context.send_initial_metadata(md)
        context.set_trailing_metadata(md)
        self.rec.finish(record)
        return json.dumps(record["metadata"]).encode()

    def Stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The records of calls whose x-call-id is the request (all calls for an empty request), as a JSON list."""
        return json.dumps(self.rec.select(request.decode())).encode()


def start_server(port: int = 0, host: str = "127.0.0.1", workers: int = 64) -> tuple[grpc.Server, int]:
    """A started plaintext (h2c) server; stop it with `server.stop(None)`."""
    servicer = Echo(Recorder())
    unary = ("Unary", "Sleep", "Status", "Metadata", "Stats")
    handlers: dict[str, grpc.RpcMethodHandler] = {
        m: grpc.unary_unary_rpc_method_handler(getattr(servicer, m)) for m in unary
    }
    handlers["ClientStream"] = grpc.stream_unary_rpc_method_handler(servicer.ClientStream)
    handlers["ServerStream"] = grpc.unary_stream_rpc_method_handler(servicer.ServerStream)
    handlers["Bidi"] = grpc.stream_stream_rpc_method_handler(servicer.Bidi)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    return server, bound


@dataclass
class Result:
    """How a call ended, in easy-to-assert form (metadata as dicts, `-bin` values as bytes)."""

    code: grpc.StatusCode
    details: str | None
    responses: list[bytes] = field(default_factory=list)
    initial_metadata: dict[str, str | bytes] = field(default_factory=dict)
    trailing_metadata: dict[str, str | bytes] = field(default_factory=dict)
    call_id: str = ""

    @property
    def response(self) -> bytes:
        assert len(self.responses) == 1, self
        return self.responses[0]


@dataclass
class Cancellation:
    call_id: str
    client_cancelled_at: float  # time.monotonic(): system-wide on Linux, so comparable with the server process's
    server_cancelled_at: float | None
    code: grpc.StatusCode

    @property
    def lag(self) -> float | None:
        return None if self.server_cancelled_at is None else self.server_cancelled_at - self.client_cancelled_at


def _md(md: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str | bytes]:
    return dict(md or ())


def _result(call: Any, call_id: str, responses: list[bytes]) -> Result:
    return Result(
        call.code(), call.details(), responses, _md(call.initial_metadata()), _md(call.trailing_metadata()), call_id
    )


class Client:
    """A grpcio channel to `target` ("host:port"); Stats is asked of `stats_target` if given (the app, past a mesh)."""

    def __init__(self, target: str, stats_target: str | None = None) -> None:
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stats = Client(stats_target) if stats_target else None

    def close(self) -> None:
        if self._stats is not None:
            self._stats.close()
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, metadata: Metadata | None) -> tuple[str, Metadata]:
        call_id = uuid.uuid4().hex[:12]
        return call_id, [*(metadata or ()), (CALL_ID, call_id)]

    def _call(self, shape: Callable[..., Any], method: str) -> Any:
        return shape(f"/{SERVICE}/{method}" if not method.startswith("/") else method)

    def unary(
        self, request: bytes, method: str = "Unary", timeout: float | None = 10, metadata: Metadata | None = None
    ) -> Result:
        """Any unary method (by name under mesh.test.Echo, or a full "/pkg.Service/Method" path)."""
        call_id, md = self._meta(metadata)
        try:
            response, call = self._call(self.channel.unary_unary, method).with_call(
                request, timeout=timeout, metadata=md
            )
            return _result(call, call_id, [response])
        except grpc.RpcError as e:
            return _result(e, call_id, [])

    def client_stream(self, requests: Iterable[bytes], timeout: float | None = 10) -> Result:
        call_id, md = self._meta(None)
        try:
            response, call = self._call(self.channel.stream_unary, "ClientStream").with_call(
                iter(requests), timeout=timeout, metadata=md
            )
            return _result(call, call_id, [response])
        except grpc.RpcError as e:
            return _result(e, call_id, [])

    def server_stream(self, n: int, size: int, timeout: float | None = 10) -> Result:
        call_id, md = self._meta(None)
        call = self._call(self.channel.unary_stream, "ServerStream")(
            f"{n}:{size}".encode(), timeout=timeout, metadata=md
        )
        responses: list[bytes] = []
        try:
            responses.extend(call)
        except grpc.RpcError:
            pass
        return _result(call, call_id, responses)

    def bidi(self, rounds: int, payload: bytes = b"ping", timeout: float | None = 10) -> Result:
        """Ping-pong: each message is sent only after the previous one came back; responses must equal requests."""
        call_id, md = self._meta(None)
        outgoing: queue.Queue[bytes | None] = queue.Queue()
        call = self._call(self.channel.stream_stream, "Bidi")(iter(outgoing.get, None), timeout=timeout, metadata=md)
        responses: list[bytes] = []
        try:
            for i in range(rounds):
                outgoing.put(b"%s-%d" % (payload, i))
                responses.append(next(call))
            outgoing.put(None)
            responses.extend(call)
        except grpc.RpcError:
            pass
        finally:
            outgoing.put(None)
        return _result(call, call_id, responses)

    def sleep(self, seconds: float, timeout: float | None = None) -> Result:
        return self.unary(str(seconds).encode(), "Sleep", timeout=timeout)

    def status(self, code: grpc.StatusCode, message: str) -> Result:
        return self.unary(f"{code.name}:{message}".encode(), "Status")

    def metadata(self, metadata: Metadata) -> Result:
        return self.unary(b"", "Metadata", metadata=metadata)

    def stats(self, call_id: str = "") -> list[dict[str, Any]]:
        if self._stats is not None:
            return self._stats.stats(call_id)
        response = self._call(self.channel.unary_unary, "Stats")(call_id.encode(), timeout=10)
        return json.loads(response)

    def wait_record(self, call_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 5) -> dict[str, Any]:
        """Poll Stats until the call's record satisfies `until`; the last record seen otherwise (or {})."""
        deadline, record = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            records = self.stats(call_id)
            if records and until(record := records[-1]):
                break
            time.sleep(0.02)
        return record

    def cancel_after(self, delay: float, sleep: float = 30, wait: float = 5) -> Cancellation:
        """Sleep(`sleep`) cancelled after `delay` s: when (monotonic) did the client cancel and the server see it?"""
        call_id, md = self._meta(None)
        future = self._call(self.channel.unary_unary, "Sleep").future(str(sleep).encode(), metadata=md)
        time.sleep(delay)
        cancelled_at = time.monotonic()  # taken before cancel(): the server may see the RST_STREAM before it returns
        future.cancel()
        record = self.wait_record(call_id, lambda r: r["cancelled"], wait)
        return Cancellation(call_id, cancelled_at, record.get("cancelled_at"), future.code())


def main() -> None:
    parser = argparse.ArgumentParser(prog="grpc_apps")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve mesh.test.Echo (h2c) until killed; prints {'port': N} first")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server, port = start_server(args.port, args.host)
    print(json.dumps({"port": port}), flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
