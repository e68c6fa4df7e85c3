"""OTLP span export: the encoding against the proto classes, and the exporter against a receiver on loopback."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import structlog
import trio
import trio.testing
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

import mesh
from mesh.telemetry import otlp
from mesh.telemetry.otlp import SpanExporter, encode
from mesh.telemetry.spans import CLIENT, ERROR, OK, SERVER, SpanRecord
from tests.integration.otlp_receiver import OtlpReceiver, start
from tests.ports import free_port

# Real sockets and threads: no autojump clock here; every wait is bounded by trio.fail_after.


def span(n: int = 0, **changes: object) -> SpanRecord:
    record = SpanRecord(
        trace_id=os.urandom(16),
        span_id=os.urandom(8),
        parent_id=os.urandom(8),
        name=f"GET /items/{n}",
        kind=CLIENT,
        start_ns=1_700_000_000_000_000_000 + n,
        end_ns=1_700_000_000_001_000_000 + n,
        attributes={"http.request.method": "GET", "mesh.n": n},
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver, _port = start()
    yield receiver
    receiver.stop()


@asynccontextmanager
async def running(exporter: SpanExporter) -> AsyncIterator[None]:
    """Run `exporter` for the body of the block, then cancel it and wait for every worker thread it left."""
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        yield
        nursery.cancel_scope.cancel()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def received(receiver: OtlpReceiver, count: int) -> list[dict]:
    return await trio.to_thread.run_sync(receiver.wait_for, count, 5.0)


# --- encoding ------------------------------------------------------------------------------------------------------


def test_encode_round_trip_keeps_every_field() -> None:
    root = span(
        1,
        parent_id=b"",
        kind=SERVER,
        attributes={"s": "text", "i": -7, "f": 0.25, "b": True, "false": False, "big": 2**64},
        status=ERROR,
        status_message="upstream connect timeout",
    )
    child = span(2, status=OK)
    plain = span(3)
    request = ExportTraceServiceRequest.FromString(
        encode([root, child, plain], service="web", resource={"deployment.environment": "test"})
    )

    [resource_spans] = request.resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource == {"deployment.environment": "test", "service.name": "web"}
    [scope_spans] = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("triomesh", mesh.__version__)
    assert len(scope_spans.spans) == 3
    for record, encoded in zip([root, child, plain], scope_spans.spans, strict=True):
        assert encoded.trace_id == record.trace_id
        assert encoded.span_id == record.span_id
        assert encoded.parent_span_id == record.parent_id
        assert encoded.name == record.name
        assert encoded.kind == record.kind
        assert encoded.start_time_unix_nano == record.start_ns
        assert encoded.end_time_unix_nano == record.end_ns
        assert (encoded.status.code, encoded.status.message) == (record.status, record.status_message)
    assert [typed(kv.value) for kv in scope_spans.spans[0].attributes] == [
        ("string_value", "text"),
        ("int_value", -7),
        ("double_value", 0.25),
        ("bool_value", True),
        ("bool_value", False),
        ("string_value", str(2**64)),  # beyond int64: kept as text rather than lost
    ]
    for record, encoded in zip([child, plain], scope_spans.spans[1:], strict=True):
        assert {kv.key: typed(kv.value) for kv in encoded.attributes} == {
            "http.request.method": ("string_value", "GET"),
            "mesh.n": ("int_value", record.attributes["mesh.n"]),
        }
    assert [kv.key for kv in scope_spans.spans[0].attributes] == ["s", "i", "f", "b", "false", "big"]
    assert not scope_spans.spans[2].HasField("status")  # UNSET without a message is left out


def typed(value: AnyValue) -> tuple[str, object]:
    kind = value.WhichOneof("value")
    return kind, getattr(value, kind)


def test_service_argument_wins_over_a_service_name_in_resource() -> None:
    request = ExportTraceServiceRequest.FromString(encode([], service="web", resource={"service.name": "other"}))
    attributes = request.resource_spans[0].resource.attributes
    assert [(kv.key, kv.value.string_value) for kv in attributes] == [("service.name", "web")]


def test_exporter_rejects_a_bad_endpoint() -> None:
    with pytest.raises(ValueError, match="http"):
        SpanExporter("127.0.0.1:4318/v1/traces", service="web")


# --- the exporter on loopback --------------------------------------------------------------------------------------


async def test_spans_arrive_in_batches_full_ones_early_the_rest_at_the_interval(receiver: OtlpReceiver) -> None:
    outcomes: list[tuple[str, int]] = []
    exporter = SpanExporter(
        receiver.endpoint,
        service="web",
        resource={"mesh.zone": "a"},
        batch_size=50,
        interval=0.3,
        on_outcome=lambda kind, count: outcomes.append((kind, count)),
    )
    records = [span(n) for n in range(120)]
    with trio.fail_after(5):
        async with running(exporter):
            for record in records:
                exporter.submit(record)
            spans = await received(receiver, 120)
            await eventually(lambda: exporter.exported == 120)
    assert [r["spans"] for r in receiver.requests] == [50, 50, 20]
    assert {r["content_type"] for r in receiver.requests} == {"application/x-protobuf"}
    assert [s["span_id"] for s in spans] == [r.span_id.hex() for r in records]  # in order, none twice
    assert spans[7]["attributes"] == {"http.request.method": "GET", "mesh.n": 7}
    assert spans[7]["resource"] == {"service.name": "web", "mesh.zone": "a"}
    assert spans[7]["scope"] == {"name": "triomesh", "version": mesh.__version__}
    assert (exporter.dropped, exporter.failed_batches, exporter.failed_spans) == (0, 0, 0)
    assert outcomes == [("exported", 50), ("exported", 50), ("exported", 20)]


async def test_a_full_queue_drops_and_counts_without_blocking(receiver: OtlpReceiver) -> None:
    dropped: list[int] = []
    exporter = SpanExporter(
        receiver.endpoint,
        service="web",
        max_queue=100,
        interval=0.1,
        on_outcome=lambda kind, count: dropped.append(count) if kind == "dropped" else None,
    )
    records = [span(n) for n in range(10_000)]
    started = time.perf_counter()
    for record in records:  # no checkpoint: submit never yields, so nothing can empty the queue meanwhile
        exporter.submit(record)
    assert time.perf_counter() - started < 0.5
    assert (exporter.queued, exporter.dropped, sum(dropped)) == (100, 9_900, 9_900)
    with trio.fail_after(5):
        async with running(exporter):
            spans = await received(receiver, 100)
    assert [s["span_id"] for s in spans] == [r.span_id.hex() for r in records[:100]]  # the first ones are kept
    assert exporter.exported == 100


async def test_a_collector_answering_503_fails_batches_and_warns_once(receiver: OtlpReceiver) -> None:
    receiver.answer = 503
    failed: list[int] = []
    exporter = SpanExporter(
        receiver.endpoint,
        service="web",
        batch_size=10,
        interval=0.05,
        on_outcome=lambda kind, count: failed.append(count) if kind == "failed" else None,
    )
    with structlog.testing.capture_logs() as logs, trio.fail_after(5):
        async with running(exporter):
            for n in range(30):
                exporter.submit(span(n))
            await eventually(lambda: exporter.failed_batches == 3)
            receiver.answer = 200  # the collector recovers: later spans go through
            exporter.submit(span(99))
            await received(receiver, 1)
            await eventually(lambda: exporter.exported == 1)
    assert (exporter.failed_spans, sum(failed), exporter.dropped) == (30, 30, 0)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1  # at most one a minute however many batches fail
    assert warnings[0]["event"] == "span export failed"
    assert "503" in warnings[0]["reason"]


async def test_a_collector_that_is_down_or_too_slow_fails_batches_without_raising(receiver: OtlpReceiver) -> None:
    receiver.refuse()
    exporter = SpanExporter(receiver.endpoint, service="web", batch_size=5, interval=0.05, timeout=0.3)
    with trio.fail_after(8):
        async with running(exporter):
            for n in range(10):
                exporter.submit(span(n))
            await eventually(lambda: exporter.failed_batches == 2)  # connection refused, twice
            receiver.delay = 3.0
            receiver.resume()
            exporter.submit(span(10))
            await eventually(lambda: exporter.failed_batches == 3)  # timed out
            assert exporter.failed_spans == 11
            receiver.delay = 0
            exporter.submit(span(11))
            await eventually(lambda: exporter.exported == 1)
    assert exporter.dropped == 0


async def test_nothing_listening_at_all_is_a_failed_batch() -> None:
    exporter = SpanExporter(f"http://127.0.0.1:{free_port()}/v1/traces", service="web", interval=0.05)
    with trio.fail_after(5):
        async with running(exporter):
            exporter.submit(span())
            await eventually(lambda: exporter.failed_batches == 1)
    assert (exporter.failed_spans, exporter.exported) == (1, 0)


async def test_a_partial_success_counts_the_rejected_spans_as_failed(receiver: OtlpReceiver) -> None:
    receiver.rejected = 2
    exporter = SpanExporter(receiver.endpoint, service="web", interval=0.05)
    with trio.fail_after(5):
        async with running(exporter):
            for n in range(5):
                exporter.submit(span(n))
            await eventually(lambda: exporter.exported + exporter.failed_spans == 5)
    assert (exporter.exported, exporter.failed_spans, exporter.failed_batches) == (3, 2, 0)


async def test_a_failing_metrics_hook_neither_raises_nor_stops_the_counting(receiver: OtlpReceiver) -> None:
    def hook(kind: str, count: int) -> None:
        raise RuntimeError("metrics broken")

    exporter = SpanExporter(receiver.endpoint, service="web", max_queue=1, interval=0.05, on_outcome=hook)
    exporter.submit(span(1))
    exporter.submit(span(2))  # dropped: the hook raises, submit does not
    with trio.fail_after(5):
        async with running(exporter):
            await eventually(lambda: exporter.exported == 1)
    assert exporter.dropped == 1


async def test_cancellation_flushes_what_is_queued(receiver: OtlpReceiver) -> None:
    exporter = SpanExporter(receiver.endpoint, service="web", interval=60)
    with trio.fail_after(5):
        async with running(exporter):
            for n in range(30):
                exporter.submit(span(n))
            await trio.sleep(0.05)
            assert receiver.requests == []  # the interval is far away: only the cancellation sends them
    assert exporter.exported == 30  # settled before run returned
    assert len(receiver.spans) == 30


async def test_cancellation_waits_for_the_batch_in_flight_then_flushes(receiver: OtlpReceiver) -> None:
    receiver.delay = 0.2
    exporter = SpanExporter(receiver.endpoint, service="web", batch_size=10, interval=60)
    with trio.fail_after(5):
        async with running(exporter):
            for n in range(20):
                exporter.submit(span(n))
            await eventually(lambda: len(receiver.requests) == 1)  # the first batch is in flight, the second waits
    assert (exporter.exported, exporter.failed_spans, exporter.dropped) == (20, 0, 0)


async def test_the_final_flush_is_bounded_and_counts_what_it_could_not_send(receiver: OtlpReceiver) -> None:
    receiver.delay = 10
    exporter = SpanExporter(receiver.endpoint, service="web", batch_size=10, interval=60)
    with trio.fail_after(5):
        async with running(exporter):
            for n in range(25):
                exporter.submit(span(n))
            await eventually(lambda: len(receiver.requests) == 1)
            started = trio.current_time()
        assert trio.current_time() - started < otlp.FINAL_FLUSH_TIMEOUT + 0.5
    # the batch in flight never came back (failed); the final flush waited for it and never ran (15 dropped)
    assert (exporter.exported, exporter.failed_batches, exporter.failed_spans, exporter.dropped) == (0, 1, 10, 15)
    receiver.stop()  # lets the abandoned worker thread finish
    with trio.fail_after(5):
        await trio.testing.wait_all_threads_completed()
