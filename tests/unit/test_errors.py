"""Mesh errors in gRPC's terms: status codes, grpc-message encoding and the trailers-only answer."""

from __future__ import annotations

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
