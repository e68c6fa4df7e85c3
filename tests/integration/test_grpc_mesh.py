"""grpcio clients and servers through an mTLS sidecar pair: every call shape, deadlines, cancellation, metadata.

The call-shape tests are test_grpc_apps' own, run here with a `client` whose channel goes through the mesh."""

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
from .test_grpc_apps import (  # every call shape, as checked client → server directly, now through the mesh
    test_bidi_ping_pong_100_rounds,  # noqa: F401
    test_client_cancel_is_seen_by_the_server_within_1s,  # noqa: F401
    test_client_streaming_counts_messages_and_bytes,  # noqa: F401
    test_deadline_exceeded_on_sleep_and_server_sees_cancellation,  # noqa: F401
    test_metadata_round_trip_including_binary,  # noqa: F401
    test_server_streaming_sends_n_messages_in_order,  # noqa: F401
    test_status_message_and_custom_and_binary_trailers_are_preserved,  # noqa: F401
    test_unary_4_mib_both_ways,  # noqa: F401
    test_unary_small_is_echoed_and_recorded,  # noqa: F401
    test_unknown_method_and_service_are_unimplemented,  # noqa: F401
)
from .test_h2_unanswered import scrape
from .test_http2_abuse import wait_until
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


def test_cancelled_calls_are_counted_and_logged_by_both_sidecars(pair: GrpcMesh) -> None:
    """20 calls, 3 cancelled by the client mid-call: each sidecar logs 20 access lines (the cancelled ones with
    status 0 and the reason) and counts the 3 in mesh_requests_unanswered_total."""
    with Client(pair.outbound, stats_target=pair.app) as client:
        results = [client.unary(b"call %d" % i) for i in range(17)]
        cancellations = [client.cancel_after(0.2) for _ in range(3)]
    assert [r.code for r in results] == [grpc.StatusCode.OK] * 17
    assert [c.code for c in cancellations] == [grpc.StatusCode.CANCELLED] * 3
    for proc in (pair.outbound_proc, pair.inbound_proc):
        lines = wait_until(lambda p=proc: (lambda e: e if len(e) >= 20 else None)(p.events("request")), "20 lines")
        outcomes: dict[tuple[int, str], int] = {}
        for line in lines:
            outcomes[line["status"], line["mesh_error"]] = outcomes.get((line["status"], line["mesh_error"]), 0) + 1
        assert outcomes == {(200, ""): 17, (0, "client reset the stream"): 3}, proc.name
        unanswered = {
            dict(labels)["reason"]: value
            for (name, labels), value in scrape(proc).items()
            if name == "mesh_requests_unanswered_total"
        }
        assert unanswered == {"client_reset": 3.0}, proc.name
