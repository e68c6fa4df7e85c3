"""The protocol-neutral request and response: heads, body events and trailers, as every codec produces them."""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestHead:
    """A validated request head, from either codec. `headers` are the end-to-end headers (lower-case names,
    hop-by-hop and `x-mesh-*` removed); `mesh_headers` holds the `x-mesh-*` headers that arrived. `chunked`
    means a body of unknown length (HTTP/1.1 chunked, or HTTP/2 without content-length); `authority` is the
    Host or :authority."""

    method: bytes
    target: bytes
    http10: bool
    headers: list[tuple[bytes, bytes]]
    mesh_headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    has_body: bool
    chunked: bool
    content_length: int | None
    expect_continue: bool
    upgrade: bytes | None
    authority: bytes


@dataclass(slots=True)
class ResponseHead:
    """A validated response head; `headers` as in RequestHead. `informational` marks a 1xx (other than 101)."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    chunked: bool
    content_length: int | None
    until_close: bool  # body ends when the upstream closes the connection
    has_body: bool
    informational: bool
    upgrade: bool  # a 101 Switching Protocols: the connection becomes an opaque byte stream


@dataclass(frozen=True, slots=True)
class Trailers:
    """Trailer fields that followed a body (HTTP/1.1 chunked trailers, HTTP/2 trailing HEADERS)."""

    headers: list[tuple[bytes, bytes]]


class EndOfMessage:
    """The message is complete: the last body event."""

    __slots__ = ()


END = EndOfMessage()
