"""The listener's first layer: the forwarding headers a hop adds (XFF, XFP, request id, caller identity, XFCC) and
the caller's deadline."""

from __future__ import annotations

import itertools
from random import getrandbits

from mesh.deadline import DEADLINE_HEADER, GRPC_TIMEOUT, parse_deadline_ms, parse_grpc_timeout
from mesh.errors import deadline_expired
from mesh.message import RequestHead
from mesh.pipeline.exchange import Downstream, Exchange, Layer
from mesh.timers import INF


class Forwarded:
    """Rewrites the request's headers for the hop and works out the caller's deadline, then hands the exchange on.

    `x-forwarded-for` gets the client's address appended, `x-forwarded-proto` and `x-request-id` are set when
    absent; the caller's verified identity travels as `x-mesh-peer-identity`; on the inbound, the only
    `x-forwarded-client-cert` the app sees describes the certificate this hop verified (Envoy's SANITIZE_SET).
    The caller's deadline is the smaller of its `grpc-timeout` and (inbound) its `x-mesh-deadline`, counted from
    the request head; a spent one is answered 504 and nothing is forwarded."""

    __slots__ = ("forwarded_proto", "identity", "inbound", "next")

    def __init__(self, next: Layer, *, inbound: bool, forwarded_proto: bytes, identity: bytes) -> None:
        self.next = next
        self.inbound = inbound
        self.forwarded_proto = forwarded_proto
        self.identity = identity  # this sidecar's SPIFFE ID: `By=` of the x-forwarded-client-cert

    def __repr__(self) -> str:
        return f"<Forwarded inbound={self.inbound} → {self.next!r}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        headers = head.headers
        proto = rid = xfcc = False
        xff = -1  # the last x-forwarded-for line: the client's address goes at the end of the chain, once
        grpc_timeout = -1
        peer_ip = side.peer_ip
        for i, (name, value) in enumerate(headers):
            first = name[0]
            if first == 120:  # b"x": only then can it be one of ours
                if name == b"x-forwarded-for":
                    xff = i
                elif name == b"x-forwarded-proto":
                    proto = True
                elif name == b"x-request-id":
                    rid = True
                    ex.request_id = value
                elif name == b"x-forwarded-client-cert":
                    xfcc = True
            elif first == 103 and name == GRPC_TIMEOUT:  # b"g"
                grpc_timeout = i
        inbound = self.inbound
        if peer_ip:
            if xff < 0:
                headers.append((b"x-forwarded-for", peer_ip))
            else:
                headers[xff] = (b"x-forwarded-for", headers[xff][1] + b", " + peer_ip)
        if xfcc and inbound:  # only the inbound's own, from the verified certificate, may reach the app
            headers[:] = [(n, v) for n, v in headers if n != b"x-forwarded-client-cert"]
            grpc_timeout = grpc_timeout_index(headers)
        if not proto:
            headers.append((b"x-forwarded-proto", self.forwarded_proto))
        if not rid:
            ex.request_id = new_request_id()
            headers.append((b"x-request-id", ex.request_id))
        accepted = side.accepted
        if accepted.peer_identity is not None:  # the caller's verified identity, for the application
            peer = accepted.peer_identity.encode()
            headers.append((b"x-mesh-peer-identity", peer))
            if inbound:
                value = b"By=%s;Hash=%s;URI=%s" % (self.identity, accepted.cert_hash.encode(), peer)
                headers.append((b"x-forwarded-client-cert", value))
        ex.grpc_timeout = grpc_timeout
        ex.caller_deadline = self._caller_deadline(head, side.exchange[2] if side.exchange else 0.0, grpc_timeout)
        return await self.next(side, head, ex)

    def _caller_deadline(self, head: RequestHead, start: float, grpc_timeout: int) -> float:
        """When the caller's own budget ends, counted from the request head: its `grpc-timeout` and (inbound) its
        mesh deadline; INF if it sent neither. MeshError 504 if it is already spent: nothing is forwarded."""
        timeout = INF
        if head.mesh_headers and self.inbound:
            for name, value in head.mesh_headers:
                if name == DEADLINE_HEADER and (left := parse_deadline_ms(value)) is not None:
                    timeout = min(timeout, left)
        if grpc_timeout >= 0 and (left := parse_grpc_timeout(head.headers[grpc_timeout][1])) is not None:
            timeout = min(timeout, left)
        if timeout <= 0:
            raise deadline_expired()
        return start + timeout


def grpc_timeout_index(headers: list[tuple[bytes, bytes]]) -> int:
    """Where the request's `grpc-timeout` is (after a layer changed the headers), -1 if it has none."""
    return next((i for i, (n, _) in enumerate(headers) if n == GRPC_TIMEOUT), -1)


def _request_id_prefix() -> bytes:
    raw = b"%020x" % getrandbits(80)
    return b"%s-%s-%s-%s-" % (raw[:8], raw[8:12], raw[12:16], raw[16:20])


_REQUEST_ID_PREFIX = _request_id_prefix()
_request_ids = itertools.count(getrandbits(32))


def new_request_id() -> bytes:
    """A UUID-shaped id: 80 random bits per process, then a counter; unique without a random draw per request."""
    return b"%s%012x" % (_REQUEST_ID_PREFIX, next(_request_ids))
