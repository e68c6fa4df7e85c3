"""Forward alone, with a scripted downstream and scripted upstreams behind a real Cluster: retries under DESIGN
rule 2, the budget, per-try and request timeouts, Retry-After, hedging, gRPC statuses, subsets, the breaker, a
streaming body, response header changes, the deadline headers and the reuse decision."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from mesh.config import CircuitBreakers, HedgeSettings, Limits, OutlierSettings, RetrySettings
from mesh.deadline import DEADLINE_HEADER, parse_grpc_timeout
from mesh.errors import MeshError
from mesh.message import END, Trailers
from mesh.pipeline.exchange import BODY, REQUEST, DownstreamGone, Exchange
from mesh.pipeline.forward import Forward
from tests.component.pipeline_doubles import (
    AwaitRequestEnd,
    Cut,
    Delay,
    FakeProxy,
    ScriptedCluster,
    ScriptedSide,
    ScriptedUpstream,
    WaitFor,
    endpoints,
    header,
    request,
    response,
    response_head,
    serve_like_codec,
    started,
)

GRPC = (b"content-type", b"application/grpc")


def forward_to(
    scripted: ScriptedCluster,
    *,
    retry: dict[str, Any] | None = None,
    outbound: bool = True,
    request_timeout: float = 15.0,
    subset: tuple[tuple[str, str], ...] = (),
    response_changes: Any = None,
) -> Forward:
    cluster = scripted.cluster
    policy = None if retry is None else cluster.retry_policy(RetrySettings.model_validate(retry))
    return Forward(
        cluster,
        outbound=outbound,
        request_timeout=request_timeout,
        connect_timeout=1.0,
        retry=policy,
        subset=subset,
        response_changes=response_changes,
    )


async def call(forward: Forward, side: ScriptedSide, head: Any, ex: Exchange | None = None) -> bool:
    ex = started(side, head, ex)
    with trio.fail_after(60):
        return await forward(side, head, ex)


# -- retries: what may be re-sent (rule 2) ------------------------------------------------------------------------


async def test_a_503_to_a_get_is_retried_on_another_endpoint(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [response(503), response(200, body=b"ok")])
    side = ScriptedSide()
    assert await call(forward_to(scripted, retry={}), side, request()) is True
    assert (side.answer.kind, side.answer.status, side.answer.body) == ("upstream", 200, b"ok")
    first, second = scripted.upstreams
    assert first.endpoint != second.endpoint
    assert first.closed  # the 503's connection is not reused: its body was never read
    assert scripted.cluster.retry_counts == {"status_503": 1}


async def test_a_503_to_a_post_is_passed_on_not_retried(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [response(503, body=b"busy")])
    side = ScriptedSide([b"data", END])
    await call(forward_to(scripted, retry={}), side, request(b"POST", body=b"data"))
    assert (side.answer.status, side.answer.body) == (503, b"busy")
    assert len(scripted.connected) == 1
    assert scripted.cluster.retry_counts == {}


async def test_a_post_whose_route_allows_every_method_is_retried_on_503(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [response(503), response(200)])
    side = ScriptedSide([b"data", END])
    await call(forward_to(scripted, retry={"methods": "all"}), side, request(b"POST", body=b"data"))
    assert side.answer.status == 200
    assert scripted.upstreams[1].body == [b"data"]


async def test_a_connect_failure_is_retried_even_for_a_post(monkeypatch, autojump_clock) -> None:
    refused = MeshError(502, "upstream connect refused", "connect_refused")
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [refused, response(200)])
    side = ScriptedSide([b"payload", END])
    await call(forward_to(scripted, retry={}), side, request(b"POST", body=b"payload"))
    assert side.answer.status == 200
    assert scripted.connected[0] != scripted.connected[1]
    assert scripted.upstreams[0].body == [b"payload"]  # the whole body, sent on the second connection
    assert scripted.cluster.retry_counts == {"connect_failure": 1}


async def test_a_refused_stream_is_sent_again_even_for_a_post(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [[Cut(never_ran=True)], response(200)])
    side = ScriptedSide([b"payload", END])
    await call(forward_to(scripted, retry={}), side, request(b"POST", body=b"payload"))
    assert side.answer.status == 200
    refused, ok = scripted.upstreams
    assert refused.closed and refused.head is not None and ok.body == [b"payload"]


async def test_a_post_reset_after_it_was_written_is_not_retried(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [[Cut()]])
    side = ScriptedSide([b"payload", END])
    with pytest.raises(MeshError) as caught:
        await call(forward_to(scripted, retry={}), side, request(b"POST", body=b"payload"))
    assert (caught.value.status, caught.value.code) == (502, "upstream_reset")
    assert len(scripted.connected) == 1 and scripted.upstreams[0].closed
    assert side.upstream is None


async def test_a_get_reset_after_it_was_written_is_retried_elsewhere(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [[Cut()], response(200)])
    side = ScriptedSide()
    await call(forward_to(scripted, retry={}), side, request())
    assert side.answer.status == 200
    assert scripted.connected[0] != scripted.connected[1]
    assert scripted.cluster.retry_counts == {"reset": 1}


async def test_a_body_over_the_retry_limit_is_not_sent_again(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [response(503)])
    side = ScriptedSide([b"x" * 20, END])
    await call(forward_to(scripted, retry={"max_body_bytes": 10}), side, request(b"PUT", body=b"x" * 20))
    assert side.answer.status == 503 and len(scripted.connected) == 1


async def test_no_retry_once_the_budget_is_spent(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [response(503)])
    side = ScriptedSide()
    retry = {"budget": {"percent": 0, "min_per_second": 0}}
    await call(forward_to(scripted, retry=retry), side, request())
    assert side.answer.status == 503 and len(scripted.connected) == 1
    assert scripted.cluster.budget is not None and scripted.cluster.budget.exhausted == 1


async def test_retries_stop_after_the_attempts(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(3), [response(503), response(503), response(503, body=b"3")])
    side = ScriptedSide()
    await call(forward_to(scripted, retry={"attempts": 2}), side, request())
    assert (side.answer.status, side.answer.body) == (503, b"3")
    assert len(set(scripted.connected)) == 3  # each retry on an endpoint not tried yet


# -- timeouts ------------------------------------------------------------------------------------------------------


async def test_a_per_try_timeout_gives_a_second_try_and_closes_the_first(monkeypatch, autojump_clock) -> None:
    slow = [Delay(10), *response(200, body=b"late")]
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [slow, response(200, body=b"second")])
    side = ScriptedSide()
    t0 = trio.current_time()
    await call(forward_to(scripted, retry={"per_try_timeout": 0.5}), side, request())
    assert side.answer.body == b"second"
    first, second = scripted.upstreams
    assert first.closed and first.endpoint != second.endpoint
    assert second.sent_at is not None and second.sent_at - t0 >= 0.5
    assert scripted.cluster.retry_counts == {"per_try_timeout": 1}


async def test_the_request_timeout_cuts_the_last_per_try_wait_with_504(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [[], []])  # neither ever answers
    side = ScriptedSide()
    t0 = trio.current_time()
    forward = forward_to(scripted, retry={"per_try_timeout": 1.0}, request_timeout=1.5)
    with pytest.raises(MeshError) as caught:
        await call(forward, side, request())
    assert (caught.value.status, caught.value.reason, caught.value.code) == (
        504,
        "upstream request timeout",
        "request_timeout",
    )
    assert trio.current_time() - t0 == pytest.approx(1.5)
    assert all(upstream.closed for upstream in scripted.upstreams)


async def test_the_request_timeout_is_answered_504_when_the_deadline_passes(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [[]])  # never answers
    proxy = FakeProxy()
    proxy.pipeline = forward_to(scripted, request_timeout=2.0)
    side = ScriptedSide(proxy=proxy)
    t0 = trio.current_time()
    with trio.fail_after(60):
        await serve_like_codec(side, request(), tick=0.05)
    assert (REQUEST, t0 + 2.0) in side.timer_log  # the deadline the layer set once the request was sent
    answer = side.answer
    assert (answer.kind, answer.status, answer.reason) == ("mesh_error", 504, "upstream request timeout")
    assert t0 + 2.0 <= answer.at <= t0 + 2.0 + 0.05 + 1e-9
    assert side.finished[0].error_code == "request_timeout" and len(side.finished) == 1
    assert scripted.upstreams[0].closed


async def test_a_retry_after_above_the_cap_is_not_retried(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [response(503, [(b"retry-after", b"5")])])
    side = ScriptedSide()
    t0 = trio.current_time()
    await call(forward_to(scripted, retry={"retry_after_max": 1.0}), side, request())
    assert side.answer.status == 503 and len(scripted.connected) == 1
    assert trio.current_time() == t0  # the caller is not held


async def test_a_retry_after_is_waited_for_and_the_deadline_headers_shrink(monkeypatch, autojump_clock) -> None:
    busy = response(503, [(b"retry-after", b"1")])
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [busy, response(200)])
    side = ScriptedSide()
    head = request(headers=[(b"grpc-timeout", b"5S")])
    ex = started(side, head)
    ex.grpc_timeout = 1
    ex.caller_deadline = trio.current_time() + 5.0
    await call(forward_to(scripted, retry={}, request_timeout=10.0), side, head, ex)
    first, second = scripted.upstreams
    assert first.sent_at is not None and second.sent_at is not None
    assert second.sent_at - first.sent_at == pytest.approx(1.0)
    sent = [(header(u.head.headers, DEADLINE_HEADER), header(u.head.headers, b"grpc-timeout")) for u in (first, second)]
    (deadline1, grpc1), (deadline2, grpc2) = sent
    assert 4999 <= int(deadline1) <= 5000 and 3999 <= int(deadline2) <= 4000  # the caller's 5 s, not 10 s
    assert parse_grpc_timeout(grpc1) == pytest.approx(5.0, abs=0.001)
    assert parse_grpc_timeout(grpc2) == pytest.approx(4.0, abs=0.001)
    assert [n for n, _ in second.head.headers].count(DEADLINE_HEADER) == 1  # replaced, not added again


async def test_the_mesh_deadline_header_goes_on_the_mesh_hop_only(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [response(200), response(200)])
    await call(forward_to(scripted, outbound=True, request_timeout=3.0), ScriptedSide(), request())
    await call(forward_to(scripted, outbound=False, request_timeout=3.0), ScriptedSide(), request())
    outbound, inbound = scripted.upstreams
    assert header(outbound.head.headers, DEADLINE_HEADER) == b"3000"
    assert header(inbound.head.headers, DEADLINE_HEADER) is None


# -- hedging -------------------------------------------------------------------------------------------------------


async def test_a_hedge_goes_out_after_the_delay_and_the_first_answer_wins(monkeypatch, autojump_clock) -> None:
    slow = [Delay(1.0), *response(200, body=b"slow")]
    fast = [Delay(0.05), *response(200, body=b"fast")]
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [slow, fast], hedging=HedgeSettings(delay=0.1))
    side = ScriptedSide()
    t0 = trio.current_time()
    await call(forward_to(scripted), side, request())
    assert side.answer.body == b"fast"
    first, hedge = scripted.upstreams
    assert first.endpoint != hedge.endpoint
    assert hedge.sent_at is not None and hedge.sent_at - t0 == pytest.approx(0.1)
    assert first.closed  # the loser is cancelled and its connection closed
    assert scripted.released == [(hedge, True)]
    assert scripted.cluster.hedges == {"sent": 1, "won": 1}
    assert trio.current_time() - t0 == pytest.approx(0.15)


async def test_no_hedge_when_the_first_try_answers_in_time(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(
        monkeypatch, endpoints(2), [[Delay(0.05), *response(200)]], hedging=HedgeSettings(delay=0.1)
    )
    side = ScriptedSide()
    await call(forward_to(scripted), side, request())
    assert side.answer.status == 200 and len(scripted.connected) == 1
    assert scripted.cluster.hedges == {"sent": 0, "won": 0}


async def test_a_post_is_never_hedged(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(
        monkeypatch, endpoints(2), [[Delay(1.0), *response(200)]], hedging=HedgeSettings(delay=0.1)
    )
    side = ScriptedSide([b"x", END])
    await call(forward_to(scripted), side, request(b"POST", body=b"x"))
    assert side.answer.status == 200 and len(scripted.connected) == 1


async def test_a_hedge_that_fails_lets_the_first_try_finish(monkeypatch, autojump_clock) -> None:
    first = [Delay(0.5), *response(200, body=b"first")]
    scripted = ScriptedCluster(
        monkeypatch, endpoints(2), [first, [Delay(0.02), Cut()]], hedging=HedgeSettings(delay=0.1)
    )
    side = ScriptedSide()
    await call(forward_to(scripted), side, request())
    assert side.answer.body == b"first"


async def test_a_first_try_that_fails_before_the_hedge_delay_is_retried(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(
        monkeypatch, endpoints(2), [[Delay(0.01), Cut()], response(200)], hedging=HedgeSettings(delay=0.1)
    )
    side = ScriptedSide()
    await call(forward_to(scripted, retry={}), side, request())
    assert side.answer.status == 200


# -- gRPC ----------------------------------------------------------------------------------------------------------


def grpc_answer(code: bytes, body: bytes = b"") -> list[object]:
    if body:
        return response(200, [GRPC], body, trailers=[(b"grpc-status", code)])
    return response(200, [GRPC, (b"grpc-status", code)])  # trailers-only: the status is in the head


async def test_grpc_unavailable_trailers_only_is_retried(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [grpc_answer(b"14"), grpc_answer(b"0", b"\0\0\0\0\0")])
    side = ScriptedSide([b"\0\0\0\0\0", END])
    retry = {"methods": "all", "grpc_statuses": ["unavailable"]}
    await call(forward_to(scripted, retry=retry), side, request(b"POST", b"/svc/M", [GRPC], body=b"\0\0\0\0\0"))
    assert side.answer.trailers == [(b"grpc-status", b"0")]
    assert scripted.connected[0] != scripted.connected[1]
    assert scripted.cluster.retry_counts == {"grpc_14": 1}


async def test_grpc_invalid_argument_is_passed_on(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [grpc_answer(b"3")])
    side = ScriptedSide([b"\0\0\0\0\0", END])
    retry = {"methods": "all", "grpc_statuses": ["unavailable"]}
    await call(forward_to(scripted, retry=retry), side, request(b"POST", b"/svc/M", [GRPC], body=b"\0\0\0\0\0"))
    assert header(side.answer.headers, b"grpc-status") == b"3"
    assert len(scripted.connected) == 1


async def test_grpc_unavailable_is_not_retried_with_idempotent_methods_only(monkeypatch, autojump_clock) -> None:
    # gRPC calls are POSTs: under rule 2 one that may have run is re-sent only if the route allows every method.
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [grpc_answer(b"14")])
    side = ScriptedSide([b"\0\0\0\0\0", END])
    await call(forward_to(scripted, retry={}), side, request(b"POST", b"/svc/M", [GRPC], body=b"\0\0\0\0\0"))
    assert header(side.answer.headers, b"grpc-status") == b"14" and len(scripted.connected) == 1


# -- subsets and the breaker ---------------------------------------------------------------------------------------


async def test_only_endpoints_of_the_subset_are_picked(monkeypatch, autojump_clock) -> None:
    v2 = {"version": "v2"}
    eps = endpoints(4, e0={"version": "v1"}, e1=v2, e2={"version": "v1"}, e3={**v2, "zone": "a"})
    scripted = ScriptedCluster(monkeypatch, eps, [response(200) for _ in range(6)])
    forward = forward_to(scripted, subset=(("version", "v2"),))
    for _ in range(6):
        await call(forward, ScriptedSide(), request())
    assert set(scripted.connected) == {eps[1], eps[3]}


async def test_an_empty_subset_is_answered_503(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2, e0={"version": "v1"}), [])
    forward = forward_to(scripted, subset=(("version", "v3"),))
    with pytest.raises(MeshError) as caught:
        await call(forward, ScriptedSide(), request())
    assert (caught.value.status, caught.value.reason, caught.value.code) == (
        503,
        "no healthy endpoints in subset version=v3",
        "no_healthy_endpoints",
    )
    assert scripted.cluster.breaker.requests == 0  # its breaker slot is given back


async def test_the_breaker_refuses_a_request_over_max_requests(monkeypatch, autojump_clock) -> None:
    release = trio.Event()
    held = ScriptedUpstream([WaitFor(release), *response(200)])
    breakers = CircuitBreakers(max_requests=1)
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [held], circuit_breakers=breakers)
    forward = forward_to(scripted)
    first = ScriptedSide()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, forward, first, request())
        await held.request_sent.wait()
        with pytest.raises(MeshError) as caught:
            await call(forward, ScriptedSide(), request())
        release.set()
    assert (caught.value.status, caught.value.reason, caught.value.code) == (
        503,
        "circuit open (max_requests)",
        "circuit_open",
    )
    assert first.answer.status == 200
    assert scripted.cluster.breaker.requests == 0


# -- the body and the response -------------------------------------------------------------------------------------


async def test_a_streaming_body_is_pumped_and_trailers_travel_both_ways(monkeypatch, autojump_clock) -> None:
    upstream = ScriptedUpstream([AwaitRequestEnd(), *response(200, body=b"done", trailers=[(b"x-sum", b"7")])])
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [upstream])
    side = ScriptedSide([b"a"], proxy=FakeProxy(limits=Limits(request_buffer=0)))
    head = request(b"POST", chunked=True)
    result: list[bool] = []
    t0 = trio.current_time()

    async def run() -> None:
        result.append(await call(forward_to(scripted, retry={}), side, head))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await upstream.request_sent.wait()
        assert upstream.body == [b"a"] and not upstream.request_ended.is_set()
        assert side.waiting_for == BODY  # the request timeout waits for the body to be through
        await trio.sleep(1)
        side.send_later(b"bc")
        side.send_later(Trailers([(b"x-checksum", b"abc")]))
        side.send_later(END)
    assert upstream.body == [b"a", b"bc"]
    assert upstream.trailers == [(b"x-checksum", b"abc")]
    assert (side.answer.body, side.answer.trailers) == (b"done", [(b"x-sum", b"7")])
    assert result == [True]
    assert scripted.released == [(upstream, True)]
    assert (REQUEST, t0 + 1.0 + 15.0) in side.timer_log  # the request timeout runs once the body is through


async def test_an_answer_before_the_body_ended_closes_both_connections(monkeypatch, autojump_clock) -> None:
    upstream = ScriptedUpstream(response(413, body=b"too big"))
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [upstream])
    side = ScriptedSide([b"a"], proxy=FakeProxy(limits=Limits(request_buffer=0)))
    keep_alive = await call(forward_to(scripted), side, request(b"POST", chunked=True))
    assert side.answer.status == 413
    assert keep_alive is False  # the client's connection still carries the rest of the body
    assert upstream.closed and scripted.released == []


async def test_the_response_changes_hook_is_applied(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [response(200, [(b"server", b"app"), (b"x-keep", b"1")])])

    def changes(headers: list[tuple[bytes, bytes]]) -> None:
        headers[:] = [(n, v) for n, v in headers if n != b"server"]
        headers.append((b"x-route", b"r1"))

    side = ScriptedSide()
    await call(forward_to(scripted, response_changes=changes), side, request())
    assert side.answer.headers == [(b"x-keep", b"1"), (b"x-route", b"r1")]


async def test_informational_heads_are_passed_on(monkeypatch, autojump_clock) -> None:
    events = [response_head(103, [(b"link", b"</a.css>")], has_body=False), *response(200)]
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [events])
    side = ScriptedSide()
    await call(forward_to(scripted), side, request())
    assert [h.status for h in side.informational] == [103] and side.answer.status == 200


@pytest.mark.parametrize(
    ("events", "reusable"),
    [
        (response(200, body=b"ok"), True),
        (response(200, body=b"ok", keep_alive=False), False),
        (response(200, body=b"ok", until_close=True), False),
    ],
    ids=["clean", "connection-close", "until-close"],
)
async def test_only_a_clean_exchange_is_released_as_reusable(monkeypatch, autojump_clock, events, reusable) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [events])
    side = ScriptedSide()
    await call(forward_to(scripted), side, request())
    assert side.answer.body == b"ok"
    assert scripted.released == [(scripted.upstreams[0], reusable)]
    assert side.upstream is None


async def test_a_response_cut_mid_body_is_not_released(monkeypatch, autojump_clock) -> None:
    head = response_head(200, content_length=10)
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [[head, b"12345", Cut()]])
    side = ScriptedSide()
    with pytest.raises(MeshError) as caught:
        await call(forward_to(scripted, retry={}), side, request())
    assert caught.value.code == "upstream_reset"
    assert scripted.released == [] and scripted.upstreams[0].closed
    assert len(scripted.connected) == 1  # a response already begun is never retried


async def test_a_client_that_leaves_mid_body_is_not_passed_on_as_a_complete_request(
    monkeypatch, autojump_clock
) -> None:
    upstream = ScriptedUpstream([AwaitRequestEnd(), *response(200)])
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [upstream])
    side = ScriptedSide([b"a"], proxy=FakeProxy(limits=Limits(request_buffer=0)))
    head = request(b"POST", chunked=True)
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            await call(forward_to(scripted), side, head)
        except DownstreamGone as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await upstream.request_sent.wait()
        side.client_gone()
    assert [type(exc) for exc in outcome] == [DownstreamGone]
    assert upstream.closed and not upstream.request_ended.is_set()
    assert side.answers == [] and scripted.released == []


async def test_a_per_try_timeout_of_a_post_is_answered_not_retried(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [[Delay(10), *response(200)]])
    side = ScriptedSide([b"x", END])
    with pytest.raises(MeshError) as caught:
        await call(forward_to(scripted, retry={"per_try_timeout": 0.5}), side, request(b"POST", body=b"x"))
    assert (caught.value.status, caught.value.reason, caught.value.code) == (
        504,
        "upstream per-try timeout",
        "per_try_timeout",
    )
    assert len(scripted.connected) == 1 and scripted.upstreams[0].closed


async def test_no_retry_when_the_pause_would_outlast_the_request_timeout(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [response(503, [(b"retry-after", b"1")])])
    side = ScriptedSide()
    await call(forward_to(scripted, retry={}, request_timeout=0.5), side, request())
    assert side.answer.status == 503 and len(scripted.connected) == 1


@pytest.mark.parametrize(("client_left", "counted"), [(True, False), (False, True)], ids=["client-left", "deadline"])
async def test_a_cancelled_try_counts_against_the_endpoint_only_if_the_client_stayed(
    monkeypatch, autojump_clock, client_left, counted
) -> None:
    upstream = ScriptedUpstream()  # never answers
    outlier = OutlierSettings(consecutive_failures=1)
    scripted = ScriptedCluster(monkeypatch, endpoints(2), [upstream], outlier=outlier)
    side = ScriptedSide()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, forward_to(scripted), side, request())
        await upstream.request_sent.wait()
        side.left = client_left  # an HTTP/2 stream reset by its client, or the sweeper's deadline
        nursery.cancel_scope.cancel()
    assert upstream.endpoint is not None
    state = scripted.cluster.endpoint_state(upstream.endpoint)
    assert (state["health"] == "ejected (outlier detection)") is counted
