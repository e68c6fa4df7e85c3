"""Mirror alone, with a Background nursery of the test and a real Forward to a scripted mirror destination: the
caller never waits for the copy, what is not copied is counted, in-flight copies are bounded, a failing copy stays
its own."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from mesh.config import Limits, RetrySettings
from mesh.config import Route as RouteSpec
from mesh.errors import MeshError
from mesh.message import END
from mesh.pipeline import mirror as mirror_module
from mesh.pipeline.forward import Forward
from mesh.pipeline.mirror import Background, Mirror
from mesh.pipeline.router import Route
from tests.component.pipeline_doubles import (
    Cut,
    FakeProxy,
    RecordingLayer,
    ScriptedCluster,
    ScriptedSide,
    WaitFor,
    endpoints,
    request,
    response,
    started,
)

SPEC = {"to": {"service": "api"}, "mirror": {"to": {"service": "shadow"}, "percent": 100}}


def mirror_of(
    scripted: ScriptedCluster, proxy: FakeProxy, background: Background, *, spec: dict[str, Any] = SPEC
) -> tuple[Mirror, RecordingLayer]:
    route = Route(RouteSpec.model_validate(spec), name="r1", default=None)
    forward = Forward(
        scripted.cluster, outbound=True, request_timeout=5.0, connect_timeout=1.0, retry=None, label="shadow"
    )
    inner = RecordingLayer()
    return Mirror(route, forward, inner, proxy=proxy, background=background, rng=random.Random(1)), inner  # type: ignore[arg-type]


async def test_a_copy_goes_out_and_the_caller_does_not_wait_for_it(monkeypatch, autojump_clock) -> None:
    caller_done = trio.Event()
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [[WaitFor(caller_done), *response(200, body=b"shadow")]])
    proxy = FakeProxy()
    background = Background()
    layer, inner = mirror_of(scripted, proxy, background)
    side = ScriptedSide([b"hello", END], proxy=proxy)
    head = request(b"POST", b"/orders?id=1", [(b"x-user", b"7")], body=b"hello")
    ex = started(side, head)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            background.nursery = nursery
            assert await layer(side, head, ex) is True  # returns while the copy still waits for its answer
            assert len(inner.calls) == 1 and layer.in_flight == 1
            caller_done.set()
    assert (layer.copied, layer.skipped, layer.failed, layer.in_flight) == (1, 0, 0, 0)
    copy = scripted.upstreams[0]
    assert copy.head is not None and (copy.head.method, copy.head.target) == (b"POST", b"/orders?id=1")
    assert (b"x-user", b"7") in copy.head.headers and copy.body == [b"hello"]
    assert copy.answered_at is not None and inner.returned_at is not None
    assert inner.returned_at <= copy.answered_at
    assert ex.prebuffered == ([b"hello"], True)  # the caller's own layers use the body already read
    assert scripted.released == [(copy, True)]  # the copy's response was read to its end


async def test_the_copy_has_its_own_headers(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [response(200)])
    proxy = FakeProxy()
    background = Background()

    def change_after_copy(side: Any, head: Any, ex: Any) -> None:
        head.headers.append((b"x-caller-only", b"1"))

    layer, inner = mirror_of(scripted, proxy, background)
    inner.effect = change_after_copy
    side = ScriptedSide(proxy=proxy)
    head = request()
    async with trio.open_nursery() as nursery:
        background.nursery = nursery
        await layer(side, head, started(side, head))
    assert scripted.upstreams[0].head is not None
    assert (b"x-caller-only", b"1") not in scripted.upstreams[0].head.headers


async def test_without_a_background_nursery_the_copy_is_skipped(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [])
    proxy = FakeProxy()
    layer, inner = mirror_of(scripted, proxy, Background())
    side = ScriptedSide(proxy=proxy)
    head = request()
    assert await layer(side, head, started(side, head)) is True
    assert (layer.skipped, layer.copied) == (1, 0) and len(inner.calls) == 1 and scripted.connected == []


async def test_a_body_not_complete_within_the_buffer_is_not_copied(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [])
    proxy = FakeProxy(limits=Limits(request_buffer=4))
    background = Background()
    layer, inner = mirror_of(scripted, proxy, background)
    side = ScriptedSide([b"ab"], proxy=proxy)
    head = request(b"POST", chunked=True)
    ex = started(side, head)

    async def client() -> None:
        await trio.sleep(1)
        side.send_later(b"cde")
        await trio.sleep(1)
        side.send_later(b"fgh")

    async with trio.open_nursery() as nursery:
        background.nursery = nursery
        nursery.start_soon(client)
        await layer(side, head, ex)
    assert (layer.skipped, layer.copied) == (1, 0) and scripted.connected == []
    assert ex.prebuffered == ([b"ab", b"cde"], False)  # what was read stays for the caller's own layers
    assert len(inner.calls) == 1


async def test_a_share_of_0_percent_is_never_copied(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [])
    proxy = FakeProxy()
    background = Background()
    spec = {"to": {"service": "api"}, "mirror": {"to": {"service": "shadow"}, "percent": 0}}
    layer, inner = mirror_of(scripted, proxy, background, spec=spec)
    async with trio.open_nursery() as nursery:
        background.nursery = nursery
        for _ in range(50):
            side = ScriptedSide(proxy=proxy)
            head = request()
            await layer(side, head, started(side, head))
    assert (layer.copied, layer.skipped) == (0, 0) and len(inner.calls) == 50


async def test_copies_in_flight_are_bounded(monkeypatch, autojump_clock) -> None:
    limit = mirror_module.MAX_IN_FLIGHT
    answer = trio.Event()
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [[WaitFor(answer), *response(200)] for _ in range(limit)])
    proxy = FakeProxy()
    background = Background()
    layer, inner = mirror_of(scripted, proxy, background)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            background.nursery = nursery
            for _ in range(limit + 1):
                side = ScriptedSide(proxy=proxy)
                head = request()
                await layer(side, head, started(side, head))
            assert (layer.in_flight, layer.skipped) == (limit, 1)
            answer.set()
    assert (layer.copied, layer.skipped, layer.in_flight) == (limit, 1, 0)
    assert len(inner.calls) == limit + 1


@pytest.mark.parametrize(
    "plan",
    [MeshError(502, "upstream connect refused", "connect_refused"), [Cut()]],
    ids=["connect-refused", "reset"],
)
async def test_a_failing_copy_never_reaches_the_caller(monkeypatch, autojump_clock, plan) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [plan])
    proxy = FakeProxy()
    background = Background()
    layer, inner = mirror_of(scripted, proxy, background)
    side = ScriptedSide(proxy=proxy)
    head = request()
    async with trio.open_nursery() as nursery:
        background.nursery = nursery
        assert await layer(side, head, started(side, head)) is True
    assert (layer.failed, layer.copied, layer.in_flight) == (1, 0, 0)
    assert side.answers == [] and len(inner.calls) == 1


async def test_a_copy_that_never_answers_ends_with_the_mirror_timeout(monkeypatch, autojump_clock) -> None:
    scripted = ScriptedCluster(monkeypatch, endpoints(1), [[]])  # never answers
    proxy = FakeProxy()
    background = Background()
    layer, _inner = mirror_of(scripted, proxy, background)
    side = ScriptedSide(proxy=proxy)
    head = request()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        background.nursery = nursery
        await layer(side, head, started(side, head))
    assert trio.current_time() - t0 == pytest.approx(5.0 + 1.0)  # request timeout + connect timeout
    assert layer.in_flight == 0 and scripted.upstreams[0].closed


async def primary_with_small_buffer(monkeypatch, *, mirrored: bool) -> ScriptedSide:
    """A PUT of 10 bytes arriving in two pieces, request_buffer 4, the first try answered 503: retried without a
    mirror in front (the body is read whole for the retry policy)."""
    shadow = ScriptedCluster(monkeypatch, endpoints(1), [response(200)], name="shadow")
    primary = ScriptedCluster(monkeypatch, endpoints(2), [response(503), response(200)])
    proxy = FakeProxy(limits=Limits(request_buffer=4))
    background = Background()
    route = Route(RouteSpec.model_validate(SPEC), name="r1", default=None)
    policy = primary.cluster.retry_policy(RetrySettings())
    own = Forward(primary.cluster, outbound=True, request_timeout=5.0, connect_timeout=1.0, retry=policy)
    copy = Forward(shadow.cluster, outbound=True, request_timeout=5.0, connect_timeout=1.0, retry=None)
    # As mesh.pipeline.compile builds it: the mirror reads the body ahead as far as the route's own policy would.
    layer: Any = Mirror(route, copy, own, proxy=proxy, background=background, rng=random.Random(1), retry=policy)  # type: ignore[arg-type]
    if not mirrored:
        layer = own
    side = ScriptedSide([b"abcde"], proxy=proxy)
    head = request(b"PUT", body=b"abcdefghij")

    async def client() -> None:
        await trio.sleep(1)
        side.send_later(b"fghij")
        side.send_later(END)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            background.nursery = nursery
            nursery.start_soon(client)
            await layer(side, head, started(side, head))
    return side


async def test_without_a_mirror_a_small_body_is_read_whole_and_retried(monkeypatch, autojump_clock) -> None:
    side = await primary_with_small_buffer(monkeypatch, mirrored=False)
    assert side.answer.status == 200


async def test_a_mirror_does_not_change_what_the_caller_may_retry(monkeypatch, autojump_clock) -> None:
    side = await primary_with_small_buffer(monkeypatch, mirrored=True)
    assert side.answer.status == 200
