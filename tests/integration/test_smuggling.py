"""Request-smuggling and limit cases sent raw to a real outbound sidecar: refused, and nothing reaches the app."""

from __future__ import annotations

import pytest

from .clients import backend_stats, header_of, raw_exchange, status_of

CASES = {
    "CL+TE": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "TE+CL": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate CL": (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "malformed CL": (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3a\r\n\r\nabc", 400),
    "bare LF": (b"GET /status HTTP/1.1\nHost: a\n\n", 400),
    "obs-fold": (b"GET /status HTTP/1.1\r\nHost: a\r\nX-A: b\r\n  c\r\n\r\n", 400),
    "space before colon": (b"GET /status HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", 400),
    "CR in value": (b"GET /status HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
    "NUL in value": (b"GET /status HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
    "missing Host": (b"GET /status HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    "two Hosts": (b"GET /status HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "HTTP/1.0 with TE": (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bad chunk line": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "TE gzip, chunked": (b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "TE identity": (b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    "101 header fields": (
        b"GET /status HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
        431,
    ),
    "65 KiB header block": (b"GET /status HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 66000 + b"\r\n\r\n", 431),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rejected_and_nothing_reaches_the_app(name: str, http_pair, backend) -> None:
    port = http_pair[0]
    raw, status = CASES[name]
    before = backend_stats(backend["http"])["requests"]
    response = raw_exchange(port, raw)  # returns once the sidecar closed the connection
    assert status_of(response) == status
    assert header_of(response, "x-mesh-error")
    assert header_of(response, "connection") == "close"
    assert backend_stats(backend["http"])["requests"] == before


def test_smuggled_second_request_never_reaches_the_app(http_pair, backend) -> None:
    """A CL.TE attack: the hidden GET inside the 'body' must not be seen as a request."""
    port = http_pair[0]
    before = backend_stats(backend["http"])
    attack = (
        b"POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /headers HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert status_of(raw_exchange(port, attack)) == 400
    after = backend_stats(backend["http"])
    assert after["requests"] == before["requests"]


def test_body_limit_413(mesh, backend) -> None:
    port, _, _ = mesh.pair(backend["http"], outbound={"limits": {"max_body_bytes": "1KiB"}})
    before = backend_stats(backend["http"])["requests"]
    response = raw_exchange(port, b"POST /consume HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000)
    assert status_of(response) == 413
    assert backend_stats(backend["http"])["requests"] == before
