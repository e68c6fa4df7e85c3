"""The grpcio peers of the HTTP/2 tests, checked directly client → server with no mesh in between."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import free_port
from tests.integration.grpc_apps import Client, start_server

ROOT = Path(__file__).parents[2]
MiB = 1024 * 1024


@pytest.fixture(scope="module", params=["thread", "process"])
def target(request: pytest.FixtureRequest) -> Iterator[str]:
    """The server in this process, and as `python -m tests.integration.grpc_apps serve` (how the mesh tests run it)."""
    if request.param == "thread":
        server, port = start_server()
        yield f"127.0.0.1:{port}"
        server.stop(None).wait()
        return
    args = [sys.executable, "-m", "tests.integration.grpc_apps", "serve", "--port", "0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        port = json.loads(proc.stdout.readline())["port"]
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.fixture
def client(target: str) -> Iterator[Client]:
    with Client(target) as c:
        yield c


def test_unary_small_is_echoed_and_recorded(client: Client) -> None:
    result = client.unary(b"hello", timeout=10)
    assert (result.code, result.response) == (grpc.StatusCode.OK, b"hello")
    [record] = client.stats(result.call_id)
    assert record["method"] == "Unary" and not record["cancelled"]
    assert record["metadata"]["user-agent"].startswith("grpc-python/")
    # grpc-timeout as the server saw it. Here grpcio's own client sets it (the mesh rewrites it in test_grpc_mesh,
    # which keeps the tight bound): grpcio rounds the value it sends up to the unit it picks, so a server in another
    # process has been seen to read 10.096 s of a 10 s timeout.
    assert 8 < record["time_remaining"] <= 10.25
    assert record["started"] <= record["finished"] <= record["ended"]


def test_unary_4_mib_both_ways(client: Client) -> None:
    big = bytes(range(256)) * (4 * MiB // 256)
    assert client.unary(big).response == big
    result = client.unary(b"size:%d" % (4 * MiB))
    assert result.code == grpc.StatusCode.OK and result.response == b"x" * (4 * MiB)


def test_client_streaming_counts_messages_and_bytes(client: Client) -> None:
    messages = [b"a" * n for n in (0, 1, 1000, 70000, 5)]
    result = client.client_stream(iter(messages))
    assert (result.code, result.response) == (grpc.StatusCode.OK, b"count=5 length=71006")


def test_server_streaming_sends_n_messages_in_order(client: Client) -> None:
    result = client.server_stream(5, 100_000)
    assert result.code == grpc.StatusCode.OK
    assert result.responses == [bytes([i]) * 100_000 for i in range(5)]


def test_bidi_ping_pong_100_rounds(client: Client) -> None:
    result = client.bidi(100)
    assert result.code == grpc.StatusCode.OK
    assert result.responses == [b"ping-%d" % i for i in range(100)]
    assert client.stats(result.call_id)[0]["method"] == "Bidi"


def test_deadline_exceeded_on_sleep_and_server_sees_cancellation(client: Client) -> None:
    result = client.sleep(10, timeout=0.5)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    record = client.wait_record(result.call_id, lambda r: r["cancelled"])
    assert record["cancelled"] and record["finished"] is None
    assert 0 < record["time_remaining"] <= 0.51  # grpc-timeout as the server saw it (its clock rounds up a little)
    assert 0.3 < record["cancelled_at"] - record["started"] < 2.0
    assert record["remaining_at_cancel"] < 0.25


def test_client_cancel_is_seen_by_the_server_within_1s(client: Client) -> None:
    cancellation = client.cancel_after(0.3)
    assert cancellation.code == grpc.StatusCode.CANCELLED
    assert cancellation.lag is not None and 0 <= cancellation.lag < 1
    [record] = client.stats(cancellation.call_id)
    assert record["time_remaining"] is None  # no deadline was sent


def test_status_message_and_custom_and_binary_trailers_are_preserved(client: Client) -> None:
    result = client.status(grpc.StatusCode.NOT_FOUND, "no such thing: é 100%")
    assert (result.code, result.details) == (grpc.StatusCode.NOT_FOUND, "no such thing: é 100%")
    assert result.trailing_metadata["x-custom"] == "value"
    assert result.trailing_metadata["x-bin-bin"] == b"\x00\x01\xff"
    numeric = client.unary(b"14:by number", "Status")
    assert (numeric.code, numeric.details) == (grpc.StatusCode.UNAVAILABLE, "by number")


def test_metadata_round_trip_including_binary(client: Client) -> None:
    result = client.metadata([("x-text", "hello"), ("x-raw-bin", b"\x00\xff\x80")])
    assert result.code == grpc.StatusCode.OK
    for md in (result.initial_metadata, result.trailing_metadata):
        assert md["x-text"] == "hello" and md["x-raw-bin"] == b"\x00\xff\x80"
        assert md["x-call-id"] == result.call_id
    seen = json.loads(result.response)
    assert seen["x-raw-bin"] == "00ff80" and seen["x-text"] == "hello"


def test_unknown_method_and_service_are_unimplemented(client: Client) -> None:
    assert client.unary(b"", "Nope").code == grpc.StatusCode.UNIMPLEMENTED
    assert client.unary(b"", "/other.Service/Unary").code == grpc.StatusCode.UNIMPLEMENTED


def test_server_down_is_unavailable() -> None:
    with Client(f"127.0.0.1:{free_port()}") as client:
        result = client.unary(b"anyone?", timeout=5)
    assert result.code == grpc.StatusCode.UNAVAILABLE
