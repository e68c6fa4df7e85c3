"""Forwarded alone: the forwarding headers a hop adds (XFF, XFP, request id, caller identity, XFCC) and the caller's
deadline (grpc-timeout, inbound x-mesh-deadline)."""

from __future__ import annotations

import re

import pytest
import trio

from mesh.deadline import DEADLINE_HEADER
from mesh.errors import MeshError
from mesh.pipeline.forwarded import Forwarded
from mesh.timers import INF
from mesh.transport import Accepted
from tests.component.pipeline_doubles import RecordingLayer, ScriptedSide, header, request, started

CALLER = "spiffe://mesh.local/ns/default/dc/dc1/svc/web"
SELF = b"spiffe://mesh.local/ns/default/dc/dc1/svc/api"
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def layer(*, inbound: bool = False, proto: bytes = b"http") -> tuple[Forwarded, RecordingLayer]:
    inner = RecordingLayer()
    return Forwarded(inner, inbound=inbound, forwarded_proto=proto, identity=SELF), inner


def mtls_side(**kwargs) -> ScriptedSide:
    return ScriptedSide(accepted=Accepted(None, CALLER, cert_hash="c0ffee"), **kwargs)  # type: ignore[arg-type]


async def run(forwarded: Forwarded, side: ScriptedSide, head) -> None:
    assert await forwarded(side, head, started(side, head)) is True


async def test_xff_is_added_with_the_peer_address(autojump_clock) -> None:
    forwarded, inner = layer()
    await run(forwarded, ScriptedSide(peer_ip=b"10.1.1.1"), request())
    assert header(inner.call.headers, b"x-forwarded-for") == b"10.1.1.1"


async def test_xff_gets_the_peer_address_appended(autojump_clock) -> None:
    forwarded, inner = layer()
    await run(forwarded, ScriptedSide(peer_ip=b"10.1.1.1"), request(headers=[(b"x-forwarded-for", b"203.0.113.7")]))
    assert [v for n, v in inner.call.headers if n == b"x-forwarded-for"] == [b"203.0.113.7, 10.1.1.1"]


async def test_xff_in_two_field_lines_gets_the_peer_address_once_at_the_end(autojump_clock) -> None:
    forwarded, inner = layer()
    head = request(headers=[(b"x-forwarded-for", b"203.0.113.7"), (b"x-forwarded-for", b"198.51.100.2")])
    await run(forwarded, ScriptedSide(peer_ip=b"10.1.1.1"), head)
    combined = b", ".join(v for n, v in inner.call.headers if n == b"x-forwarded-for")
    assert combined == b"203.0.113.7, 198.51.100.2, 10.1.1.1"


async def test_xff_is_left_alone_without_a_peer_address(autojump_clock) -> None:
    forwarded, inner = layer()
    await run(forwarded, ScriptedSide(peer_ip=b""), request(headers=[(b"x-forwarded-for", b"203.0.113.7")]))
    assert header(inner.call.headers, b"x-forwarded-for") == b"203.0.113.7"


async def test_xfp_is_set_when_absent_and_kept_when_present(autojump_clock) -> None:
    forwarded, inner = layer(proto=b"https")
    await run(forwarded, ScriptedSide(), request())
    assert header(inner.call.headers, b"x-forwarded-proto") == b"https"
    forwarded, inner = layer(proto=b"https")
    await run(forwarded, ScriptedSide(), request(headers=[(b"x-forwarded-proto", b"http")]))
    assert [v for n, v in inner.call.headers if n == b"x-forwarded-proto"] == [b"http"]


async def test_a_request_id_is_generated_when_absent(autojump_clock) -> None:
    forwarded, inner = layer()
    await run(forwarded, ScriptedSide(), request())
    await run(forwarded, ScriptedSide(), request())
    first, second = (header(call.headers, b"x-request-id") for call in inner.calls)
    assert first is not None and second is not None and first != second
    assert UUID.fullmatch(first) and UUID.fullmatch(second)
    assert inner.calls[0].ex.request_id == first


async def test_a_request_id_that_came_is_kept(autojump_clock) -> None:
    forwarded, inner = layer()
    await run(forwarded, ScriptedSide(), request(headers=[(b"x-request-id", b"abc-123")]))
    assert [v for n, v in inner.call.headers if n == b"x-request-id"] == [b"abc-123"]
    assert inner.call.ex.request_id == b"abc-123"


async def test_the_inbound_adds_the_caller_identity_and_its_own_xfcc(autojump_clock) -> None:
    forwarded, inner = layer(inbound=True)
    await run(forwarded, mtls_side(), request())
    headers = inner.call.headers
    assert header(headers, b"x-mesh-peer-identity") == CALLER.encode()
    assert header(headers, b"x-forwarded-client-cert") == b"By=%s;Hash=c0ffee;URI=%s" % (SELF, CALLER.encode())


async def test_the_inbound_removes_a_caller_sent_xfcc(autojump_clock) -> None:
    forwarded, inner = layer(inbound=True)
    forged = (b"x-forwarded-client-cert", b"By=spiffe://evil;URI=spiffe://mesh.local/ns/default/dc/dc1/svc/admin")
    await run(forwarded, mtls_side(), request(headers=[forged]))
    values = [v for n, v in inner.call.headers if n == b"x-forwarded-client-cert"]
    assert values == [b"By=%s;Hash=c0ffee;URI=%s" % (SELF, CALLER.encode())]


async def test_the_inbound_without_a_verified_caller_passes_no_xfcc_at_all(autojump_clock) -> None:
    forwarded, inner = layer(inbound=True)
    await run(forwarded, ScriptedSide(), request(headers=[(b"x-forwarded-client-cert", b"By=forged")]))
    assert header(inner.call.headers, b"x-forwarded-client-cert") is None
    assert header(inner.call.headers, b"x-mesh-peer-identity") is None


async def test_the_outbound_sets_no_xfcc(autojump_clock) -> None:
    forwarded, inner = layer(inbound=False)
    await run(forwarded, mtls_side(), request())
    assert header(inner.call.headers, b"x-forwarded-client-cert") is None


async def test_the_grpc_timeout_index_is_found(autojump_clock) -> None:
    forwarded, _inner = layer()
    head = request(headers=[(b"content-type", b"application/grpc"), (b"grpc-timeout", b"2S")])
    side = ScriptedSide()
    ex = started(side, head)
    await forwarded(side, head, ex)
    assert head.headers[ex.grpc_timeout] == (b"grpc-timeout", b"2S")
    assert ex.caller_deadline == pytest.approx(trio.current_time() + 2.0)


async def test_the_grpc_timeout_index_follows_an_xfcc_removal(autojump_clock) -> None:
    forwarded, _inner = layer(inbound=True)
    head = request(headers=[(b"x-forwarded-client-cert", b"By=forged"), (b"grpc-timeout", b"100m")])
    side = mtls_side()
    ex = started(side, head)
    await forwarded(side, head, ex)
    assert head.headers[ex.grpc_timeout] == (b"grpc-timeout", b"100m")


async def test_the_caller_deadline_runs_from_the_request_head(autojump_clock) -> None:
    forwarded, _inner = layer()
    side = ScriptedSide()
    head = request(headers=[(b"grpc-timeout", b"1500m")])
    ex = started(side, head)
    start = trio.current_time()
    await trio.sleep(0.25)  # earlier layers took time: the budget still counts from the head
    await forwarded(side, head, ex)
    assert ex.caller_deadline == pytest.approx(start + 1.5)


async def test_a_spent_grpc_timeout_is_answered_504_and_nothing_is_forwarded(autojump_clock) -> None:
    forwarded, inner = layer()
    side = ScriptedSide()
    head = request(headers=[(b"grpc-timeout", b"0m")])
    with pytest.raises(MeshError) as caught:
        await forwarded(side, head, started(side, head))
    assert (caught.value.status, caught.value.code) == (504, "deadline_expired")
    assert inner.calls == []


async def test_the_inbound_honours_the_mesh_deadline(autojump_clock) -> None:
    forwarded, _inner = layer(inbound=True)
    side = ScriptedSide()
    head = request(mesh_headers=[(DEADLINE_HEADER, b"2500")])
    ex = started(side, head)
    await forwarded(side, head, ex)
    assert ex.caller_deadline == pytest.approx(trio.current_time() + 2.5)


async def test_the_smaller_of_mesh_deadline_and_grpc_timeout_counts(autojump_clock) -> None:
    forwarded, _inner = layer(inbound=True)
    side = ScriptedSide()
    head = request(headers=[(b"grpc-timeout", b"1S")], mesh_headers=[(DEADLINE_HEADER, b"2500")])
    ex = started(side, head)
    await forwarded(side, head, ex)
    assert ex.caller_deadline == pytest.approx(trio.current_time() + 1.0)


async def test_a_spent_mesh_deadline_on_the_inbound_is_answered_504(autojump_clock) -> None:
    forwarded, inner = layer(inbound=True)
    side = ScriptedSide()
    head = request(mesh_headers=[(DEADLINE_HEADER, b"0")])
    with pytest.raises(MeshError) as caught:
        await forwarded(side, head, started(side, head))
    assert caught.value.code == "deadline_expired" and inner.calls == []


async def test_the_outbound_ignores_a_mesh_deadline(autojump_clock) -> None:
    forwarded, inner = layer(inbound=False)
    side = ScriptedSide()
    head = request(mesh_headers=[(DEADLINE_HEADER, b"0")])
    ex = started(side, head)
    await forwarded(side, head, ex)
    assert ex.caller_deadline == INF and len(inner.calls) == 1
