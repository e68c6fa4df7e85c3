"""Faults alone: an abort answers with its status (gRPC: 200 with the grpc-status) and nothing goes on; a delay
holds the request, then the next layer runs; 0 % touches nothing."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from mesh.config import Route as RouteSpec
from mesh.errors import MeshError
from mesh.pipeline.faults import Faults
from mesh.pipeline.router import Route
from tests.component.pipeline_doubles import RecordingLayer, ScriptedSide, header, request, started

GRPC = (b"content-type", b"application/grpc")


class AlwaysZero:
    """A random source that would fire every share above 0 %."""

    def random(self) -> float:
        return 0.0


def faults(fault: dict[str, Any], rng: Any = None) -> tuple[Faults, RecordingLayer]:
    route = Route(RouteSpec.model_validate({"fault": fault, "to": {"service": "api"}}), name="r1", default=None)
    inner = RecordingLayer()
    return Faults(route, inner, rng=rng or random.Random(1)), inner


async def test_an_abort_at_100_percent_is_a_mesh_error_and_nothing_goes_on(autojump_clock) -> None:
    layer, inner = faults({"abort": {"percent": 100, "status": 503}})
    side = ScriptedSide()
    head = request()
    with pytest.raises(MeshError) as caught:
        await layer(side, head, started(side, head))
    assert (caught.value.status, caught.value.reason, caught.value.code) == (503, "fault injected", "fault_injected")
    assert inner.calls == [] and side.answers == []


async def test_a_grpc_abort_with_a_grpc_status_is_answered_200(autojump_clock) -> None:
    layer, inner = faults({"abort": {"percent": 100, "status": 503, "grpc_status": 14}})
    side = ScriptedSide()
    head = request(b"POST", b"/svc/M", [GRPC], body=b"")
    ex = started(side, head)
    await layer(side, head, ex)
    answer = side.answer
    assert (answer.kind, answer.status) == ("response", 200)
    assert header(answer.headers, b"grpc-status") == b"14"
    assert header(answer.headers, b"x-mesh-error") == b"fault injected"
    assert (ex.mesh_error, ex.error_code) == ("fault injected", "fault_injected")
    assert inner.calls == []


async def test_a_grpc_status_is_not_used_for_a_plain_http_request(autojump_clock) -> None:
    layer, inner = faults({"abort": {"percent": 100, "status": 503, "grpc_status": 14}})
    side = ScriptedSide()
    head = request()
    with pytest.raises(MeshError) as caught:
        await layer(side, head, started(side, head))
    assert caught.value.status == 503 and side.answers == [] and inner.calls == []


async def test_a_delay_holds_the_request_then_the_next_layer_runs(autojump_clock) -> None:
    layer, inner = faults({"delay": {"percent": 100, "duration": "2.5s"}})
    side = ScriptedSide()
    head = request()
    t0 = trio.current_time()
    assert await layer(side, head, started(side, head)) is True
    assert inner.call.at - t0 == pytest.approx(2.5)


async def test_a_delay_comes_before_the_abort(autojump_clock) -> None:
    layer, inner = faults({"delay": {"percent": 100, "duration": "1s"}, "abort": {"percent": 100, "status": 500}})
    side = ScriptedSide()
    head = request()
    t0 = trio.current_time()
    with pytest.raises(MeshError):
        await layer(side, head, started(side, head))
    assert trio.current_time() - t0 == pytest.approx(1.0) and inner.calls == []


async def test_0_percent_never_delays_nor_aborts(autojump_clock) -> None:
    fault = {"delay": {"percent": 0, "duration": "5s"}, "abort": {"percent": 0, "status": 503}}
    layer, inner = faults(fault, rng=AlwaysZero())
    t0 = trio.current_time()
    for _ in range(100):
        side = ScriptedSide()
        head = request()
        await layer(side, head, started(side, head))
    assert len(inner.calls) == 100 and trio.current_time() == t0


async def test_a_share_aborts_about_that_share(autojump_clock) -> None:
    layer, inner = faults({"abort": {"percent": 25, "status": 503}}, rng=random.Random(3))
    aborted = 0
    for _ in range(2000):
        side = ScriptedSide()
        head = request()
        try:
            await layer(side, head, started(side, head))
        except MeshError:
            aborted += 1
    assert 0.22 <= aborted / 2000 <= 0.28 and aborted + len(inner.calls) == 2000
