"""serve_exchange and answer_expired alone, with a scripted downstream and scripted pipelines: exactly one outcome
per request, the held upstream closed on failure, and the answer an expired deadline or a drain cut gets."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from mesh.errors import MeshError
from mesh.http1 import ProtocolError
from mesh.message import END
from mesh.pipeline.exchange import BODY, REQUEST, STALL, DownstreamGone, Exchange, answer_expired, serve_exchange
from mesh.pipeline.forward import Forward
from tests.component.pipeline_doubles import (
    FakeProxy,
    RecordingLayer,
    ScriptedCluster,
    ScriptedSide,
    ScriptedUpstream,
    endpoints,
    request,
    response,
    serve_like_codec,
)


def side_with(pipeline: Any, events: Any = (END,)) -> ScriptedSide:
    proxy = FakeProxy()
    proxy.pipeline = pipeline
    return ScriptedSide(events, proxy=proxy)


async def test_a_pipeline_answer_is_the_one_outcome(autojump_clock) -> None:
    side = side_with(RecordingLayer(result=True))
    assert await serve_exchange(side, request()) is True  # type: ignore[arg-type]
    assert side.answers == [] and len(side.finished) == 1 and side.exchange is None
    assert side.proxy.drain._active == set()


async def test_a_mesh_error_is_answered_once(autojump_clock) -> None:
    side = side_with(RecordingLayer(raises=lambda: MeshError(503, "no healthy endpoints", "no_healthy_endpoints")))
    keep_alive = await serve_exchange(side, request())  # type: ignore[arg-type]
    assert (side.answer.kind, side.answer.status, side.answer.reason) == ("mesh_error", 503, "no healthy endpoints")
    assert keep_alive is True  # the request had no body left unread
    ex = side.finished[0]
    assert (ex.mesh_error, ex.error_code, ex.status) == ("no healthy endpoints", "no_healthy_endpoints", 503)
    assert len(side.finished) == 1


async def test_a_mesh_error_after_the_response_began_is_not_answered_again(autojump_clock) -> None:
    def begin(side: Any, head: Any, ex: Exchange) -> None:
        ex.response_started = True

    layer = RecordingLayer(
        raises=lambda: MeshError(502, "upstream closed mid-response", "upstream_reset"), effect=begin
    )
    side = side_with(layer)
    assert await serve_exchange(side, request()) is False  # type: ignore[arg-type]
    assert side.answers == []
    assert side.finished[0].error_code == "upstream_reset" and len(side.finished) == 1


async def test_a_broken_request_body_is_answered_with_its_status(autojump_clock) -> None:
    side = side_with(RecordingLayer(raises=lambda: ProtocolError(413, "request body too large")))
    assert await serve_exchange(side, request(b"POST", chunked=True)) is False  # type: ignore[arg-type]
    assert (side.answer.status, side.answer.reason) == (413, "request body too large")
    assert side.finished[0].request_done is False


async def test_a_client_that_left_gets_no_answer_and_is_recorded(autojump_clock) -> None:
    side = side_with(RecordingLayer(raises=lambda: DownstreamGone("client closed mid-request")))
    assert await serve_exchange(side, request(b"POST", chunked=True)) is False  # type: ignore[arg-type]
    assert side.answers == []
    ex = side.finished[0]
    assert (ex.mesh_error, ex.error_code) == ("client closed mid-request", "client_gone")


async def test_a_lost_downstream_connection_is_recorded_as_client_gone(autojump_clock) -> None:
    side = side_with(RecordingLayer(raises=lambda: trio.BrokenResourceError()))
    await serve_exchange(side, request())  # type: ignore[arg-type]
    assert side.answers == [] and side.finished[0].error_code == "client_gone"


async def test_the_upstream_held_is_closed_when_the_exchange_fails(autojump_clock) -> None:
    held = ScriptedUpstream()

    def hold(side: Any, head: Any, ex: Exchange) -> None:
        side.upstream = held

    side = side_with(RecordingLayer(raises=lambda: MeshError(502, "invalid response", "invalid_response"), effect=hold))
    await serve_exchange(side, request())  # type: ignore[arg-type]
    assert held.closed and side.upstream is None
    assert len(side.answers) == 1


async def test_a_real_forward_gives_one_outcome_through_serve_exchange(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [response(200, body=b"ok")])
    forward = Forward(scripted.cluster, outbound=True, request_timeout=5.0, connect_timeout=1.0, retry=None)
    side = side_with(forward)
    assert await serve_exchange(side, request()) is True  # type: ignore[arg-type]
    assert (side.answer.status, side.answer.body) == (200, b"ok")
    assert side.finished[0].endpoint == "10.0.0.1:15000"


# -- answer_expired -------------------------------------------------------------------------------------------------


def expired(waiting_for: int, *, forwarded: bool = False, cutting: bool = False, **fields: Any) -> ScriptedSide:
    side = ScriptedSide([b"part"])
    head = request(b"PUT", chunked=True)
    ex = Exchange()
    ex.forwarded = forwarded
    for name, value in fields.items():
        setattr(ex, name, value)
    side.exchange = (head, ex, trio.current_time())
    side.waiting_for = waiting_for
    if cutting:
        side.proxy.drain.cut()
    return side


@pytest.mark.parametrize(
    ("waiting_for", "fields", "status", "reason", "code"),
    [
        (REQUEST, {}, 504, "upstream request timeout", "request_timeout"),
        (BODY, {}, 408, "request body stalled past the idle timeout", "body_stalled"),
        (BODY, {"upstream_reading": True}, 504, "upstream stopped reading the request body", "response_stalled"),
        (BODY, {"caller_deadline": 0.0}, 504, "upstream request timeout", "request_timeout"),
    ],
    ids=["request", "body-stalled", "upstream-not-reading", "caller-deadline"],
)
async def test_an_expired_deadline_is_answered_by_what_it_waited_for(
    autojump_clock, waiting_for, fields, status, reason, code
) -> None:
    side = expired(waiting_for, **fields)
    await answer_expired(side)  # type: ignore[arg-type]
    assert (side.answer.status, side.answer.reason) == (status, reason)
    ex = side.finished[0]
    assert ex.error_code == code and ex.request_done is False and side.exchange is None


@pytest.mark.parametrize(
    ("forwarded", "reason", "code"),
    [
        (False, "draining", "draining"),
        (
            True,
            "draining: cut by the drain deadline before the upstream answered (the request may have run)",
            "drain_cut",
        ),
    ],
)
async def test_a_drain_cut_says_whether_the_request_may_have_run(autojump_clock, forwarded, reason, code) -> None:
    side = expired(REQUEST, forwarded=forwarded, cutting=True)
    await answer_expired(side)  # type: ignore[arg-type]
    assert (side.answer.status, side.answer.reason) == (503, reason)
    assert side.finished[0].error_code == code


async def test_a_stalled_response_that_began_is_recorded_not_answered(autojump_clock) -> None:
    side = expired(STALL, response_started=True)
    await answer_expired(side)  # type: ignore[arg-type]
    assert side.answers == []
    assert side.finished[0].error_code == "response_stalled"


async def test_a_drain_cut_mid_exchange_answers_once_that_it_may_have_run(monkeypatch, autojump_clock) -> None:
    upstream = ScriptedUpstream()  # never answers
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [upstream])
    forward = Forward(scripted.cluster, outbound=True, request_timeout=30.0, connect_timeout=1.0, retry=None)
    side = side_with(forward)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_like_codec, side, request())
        await upstream.request_sent.wait()
        side.proxy.drain.cut()
    assert (side.answer.status, side.answer.reason) == (
        503,
        "draining: cut by the drain deadline before the upstream answered (the request may have run)",
    )
    assert len(side.finished) == 1 and upstream.closed


async def test_an_exchange_that_starts_during_a_drain_cut_is_not_forwarded(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [])
    forward = Forward(scripted.cluster, outbound=True, request_timeout=30.0, connect_timeout=1.0, retry=None)
    side = side_with(forward)
    side.proxy.drain.cut()
    await serve_like_codec(side, request())
    assert (side.answer.status, side.answer.reason) == (503, "draining")
    assert scripted.connected == [] and len(side.finished) == 1
