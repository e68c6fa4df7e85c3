"""Mesh errors: reason codes, one instance per failure, and their gRPC form (status codes, grpc-message)."""

from __future__ import annotations

import importlib
from pathlib import Path

import mesh
from mesh import errors
from mesh.errors import grpc_error_headers, grpc_message, grpc_status, is_grpc


def test_status_codes_follow_the_design() -> None:
    assert grpc_status(502, "upstream connect refused") == 14  # UNAVAILABLE
    assert grpc_status(503, "no healthy endpoints") == 14
    assert grpc_status(503, "circuit open (max_requests)") == 8  # RESOURCE_EXHAUSTED: a local limit
    assert grpc_status(504, "upstream request timeout") == 4  # DEADLINE_EXCEEDED
    assert grpc_status(408, "request header timeout") == 4
    assert grpc_status(403, "caller denied") == 7  # PERMISSION_DENIED
    assert grpc_status(431, "too many headers") == 8
    assert grpc_status(418, "teapot") == 2  # UNKNOWN


def test_grpc_message_is_percent_encoded_utf8() -> None:
    assert grpc_message("plain words: ok") == b"plain words: ok"
    assert grpc_message("100% é\n") == b"100%25 %C3%A9%0A"


def test_is_grpc_reads_the_content_type() -> None:
    assert is_grpc([(b"content-type", b"application/grpc")])
    assert is_grpc([(b"content-type", b"application/grpc+proto")])
    assert not is_grpc([(b"content-type", b"application/json")])
    assert not is_grpc([])


def test_the_answer_carries_the_reason_twice() -> None:
    headers = dict(grpc_error_headers(504, "deadline expired before forwarding"))
    assert headers[b"grpc-status"] == b"4"
    assert headers[b"grpc-message"] == b"deadline expired before forwarding"
    assert headers[b"x-mesh-error"] == b"deadline expired before forwarding"


def test_no_module_of_the_mesh_holds_an_exception_instance() -> None:
    """A shared exception instance collects the traceback of every raise (and the frames and connections those
    reference): each failure must raise an exception of its own."""
    held = []
    for path in sorted((Path(mesh.__file__).parent).glob("*.py")):
        module = importlib.import_module(f"mesh.{path.stem}")
        held += [f"{path.stem}.{name}" for name, value in vars(module).items() if isinstance(value, BaseException)]
    assert held == []


def test_error_factories_make_a_new_error_with_its_reason_code_each_time() -> None:
    for factory, code in [
        (errors.connect_timeout, "connect_timeout"),
        (errors.request_timeout, "request_timeout"),
        (errors.deadline_expired, "deadline_expired"),
    ]:
        first, second = factory(), factory()
        assert first is not second
        assert first.code == code and first.code in errors.REASON_CODES
    assert errors.no_endpoints(resolved=True).code == "no_healthy_endpoints"
    assert errors.MeshError(502, "free text naming spiffe://x/y", "not a code").code == "other"
