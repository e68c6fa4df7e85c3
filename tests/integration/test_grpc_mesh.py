"""grpcio clients and servers through an mTLS sidecar pair: every call shape, deadlines, cancellation, metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from .clients import request
from .conftest import free_port, sidecar_config
from .grpc_apps import Client
from .test_mtls import authority, write_identity  # noqa: F401  (authority is a fixture)

ROOT = Path(__file__).parents[2]
MiB = 1024 * 1024


@dataclass
class GrpcMesh:
    outbound: str  # where the client calls: the outbound listener of the caller's sidecar
    app: str  # the grpcio server itself (for Stats, past the mesh)
    outbound_proc: object
    inbound_proc: object


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    args = [sys.executable, "-m", "tests.integration.grpc_apps", "serve", "--port", "0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        yield f"127.0.0.1:{json.loads(proc.stdout.readline())['port']}"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def start_grpc_pair(mesh, tmp_path: Path, authority, app: str, *, upstream: dict | None = None) -> GrpcMesh:  # noqa: F811
    in_port, out_port = free_port(), free_port()
    inbound = mesh.sidecar(
        sidecar_config(
            service={"name": "api", "app": app, "protocol": "grpc"},
            inbound={"bind": f"127.0.0.1:{in_port}", "tls": "mutual", "allow": ["web"]},
            identity=write_identity(tmp_path / "api", authority.issue("api")),
        ),
        "inbound",
    )
    outbound = mesh.sidecar(
        sidecar_config(
            service={"name": "web", "app": "127.0.0.1:1"},
            upstreams=[{"service": "api", "bind": f"127.0.0.1:{out_port}", "protocol": "grpc", **(upstream or {})}],
            discovery={"static": {"api": [f"127.0.0.1:{in_port}"]}},
            identity=write_identity(tmp_path / "web", authority.issue("web")),
        ),
        "outbound",
    )
    return GrpcMesh(f"127.0.0.1:{out_port}", app, outbound, inbound)


@pytest.fixture
def pair(mesh, tmp_path, authority, server) -> GrpcMesh:  # noqa: F811
    return start_grpc_pair(mesh, tmp_path, authority, server)


@pytest.fixture
def client(pair: GrpcMesh) -> Iterator[Client]:
    with Client(pair.outbound, stats_target=pair.app) as c:
        yield c


def test_unary_small_crosses_the_mesh_with_the_callers_identity(client: Client) -> None:
    result = client.unary(b"hello", timeout=10)
    assert (result.code, result.response) == (grpc.StatusCode.OK, b"hello")
    [record] = client.stats(result.call_id)
    assert record["metadata"]["x-mesh-peer-identity"] == "spiffe://mesh.local/ns/default/dc/dc1/svc/web"
    assert 8 < record["time_remaining"] <= 10.01  # grpc-timeout travelled (and shrank a little)


def test_unary_4_mib_both_ways(client: Client) -> None:
    big = bytes(range(256)) * (4 * MiB // 256)
    assert client.unary(big).response == big
    result = client.unary(b"size:%d" % (4 * MiB))
    assert result.code == grpc.StatusCode.OK and result.response == b"x" * (4 * MiB)


def test_client_streaming(client: Client) -> None:
    messages = [b"a" * n for n in (0, 1, 1000, 70000, 5)]
    result = client.client_stream(iter(messages))
    assert (result.code, result.response) == (grpc.StatusCode.OK, b"count=5 length=71006")


def test_server_streaming(client: Client) -> None:
    result = client.server_stream(5, 100_000)
    assert result.code == grpc.StatusCode.OK
    assert result.responses == [bytes([i]) * 100_000 for i in range(5)]


def test_bidi_ping_pong(client: Client) -> None:
    result = client.bidi(100)
    assert result.code == grpc.StatusCode.OK
    assert result.responses == [b"ping-%d" % i for i in range(100)]


def test_deadline_exceeded_on_a_sleeping_server_which_sees_the_cancellation(client: Client) -> None:
    result = client.sleep(10, timeout=0.5)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    record = client.wait_record(result.call_id, lambda r: r["cancelled"])
    assert record["cancelled"] and record["finished"] is None
    assert 0 < record["time_remaining"] <= 0.51


def test_client_cancel_reaches_the_server_within_1s(client: Client) -> None:
    cancellation = client.cancel_after(0.3)
    assert cancellation.code == grpc.StatusCode.CANCELLED
    assert cancellation.lag is not None and 0 <= cancellation.lag < 1


def test_status_message_custom_and_binary_trailers_are_preserved(client: Client) -> None:
    result = client.status(grpc.StatusCode.NOT_FOUND, "no such thing: é 100%")
    assert (result.code, result.details) == (grpc.StatusCode.NOT_FOUND, "no such thing: é 100%")
    assert result.trailing_metadata["x-custom"] == "value"
    assert result.trailing_metadata["x-bin-bin"] == b"\x00\x01\xff"


def test_metadata_round_trip_including_binary(client: Client) -> None:
    result = client.metadata([("x-text", "hello"), ("x-raw-bin", b"\x00\xff\x80")])
    assert result.code == grpc.StatusCode.OK
    for md in (result.initial_metadata, result.trailing_metadata):
        assert md["x-text"] == "hello" and md["x-raw-bin"] == b"\x00\xff\x80"


def test_unknown_method_is_unimplemented(client: Client) -> None:
    assert client.unary(b"", "Nope").code == grpc.StatusCode.UNIMPLEMENTED


def test_upstream_down_is_unavailable_with_the_mesh_reason(mesh, tmp_path, authority) -> None:  # noqa: F811
    down = start_grpc_pair(mesh, tmp_path, authority, f"127.0.0.1:{free_port()}", upstream={"retries": {"attempts": 0}})
    with Client(down.outbound) as c:
        result = c.unary(b"anyone?", timeout=5)
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert result.details == "upstream connect refused"  # the reason the inbound's sidecar gave
    assert result.trailing_metadata["x-mesh-error"] == "upstream connect refused"


def test_an_http1_client_reaches_an_http2_only_app_and_gets_its_trailers(pair: GrpcMesh) -> None:
    """HTTP/1.1 → HTTP/2 on the way in, HTTP/2 trailers → HTTP/1.1 chunked trailers on the way back."""
    port = int(pair.outbound.rsplit(":", 1)[1])
    message = b"\x00" + (5).to_bytes(4, "big") + b"hello"  # one uncompressed gRPC message
    answer = request(
        port, "POST", "/mesh.test.Echo/Unary", headers=[("content-type", "application/grpc")], body=message
    )
    assert answer.status == 200 and answer.headers["content-type"] == "application/grpc"
    assert answer.body == message  # echoed
    assert answer.trailers["grpc-status"] == "0"
    assert answer.headers["transfer-encoding"] == "chunked"  # trailers need a chunked body on HTTP/1.1
