"""Rewrite alone: the path prefix, the host (authority and Host header), header changes, and the grpc-timeout
index after the headers moved."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.config import Route as RouteSpec
from mesh.pipeline.rewrite import Rewrite
from mesh.pipeline.router import Route
from tests.component.pipeline_doubles import RecordingLayer, ScriptedSide, request, started


def rewrite(spec: dict[str, Any]) -> tuple[Rewrite, RecordingLayer]:
    inner = RecordingLayer()
    route = Route(RouteSpec.model_validate({"to": {"service": "api"}, **spec}), name="r1", default=None)
    return Rewrite(route, inner), inner


async def run(layer: Rewrite, head: Any) -> Any:
    side = ScriptedSide()
    ex = started(side, head)
    assert await layer(side, head, ex) is True
    return ex


@pytest.mark.parametrize(
    ("prefix", "replacement", "target", "expected"),
    [
        ("/api", "/v2", b"/api/users?x=1", b"/v2/users?x=1"),
        ("/api", "/v2", b"/api", b"/v2"),
        ("/api/", "/", b"/api/users", b"/users"),
        ("/api", "/v2/", b"/api/users", b"/v2/users"),
    ],
)
async def test_the_prefix_is_rewritten_and_the_query_kept(
    autojump_clock, prefix, replacement, target, expected
) -> None:
    layer, inner = rewrite({"match": {"path_prefix": prefix}, "rewrite": {"prefix": replacement}})
    await run(layer, request(target=target))
    assert inner.call.target == expected


async def test_a_host_rewrite_changes_the_authority_and_the_host_header(autojump_clock) -> None:
    layer, inner = rewrite({"rewrite": {"host": "internal.svc:8080"}})
    await run(layer, request(authority=b"public.example", headers=[(b"accept", b"*/*")]))
    assert inner.call.authority == b"internal.svc:8080"
    assert inner.call.headers == [(b"host", b"internal.svc:8080"), (b"accept", b"*/*")]


async def test_header_changes_remove_then_set_then_add(autojump_clock) -> None:
    changes = {"remove": ["x-debug"], "set": {"x-env": "prod"}, "add": {"x-extra": "1"}}
    layer, inner = rewrite({"request_headers": changes})
    headers = [(b"x-debug", b"1"), (b"x-env", b"dev"), (b"x-env", b"test"), (b"x-extra", b"0")]
    await run(layer, request(headers=headers))
    assert inner.call.headers == [(b"host", b"api"), (b"x-extra", b"0"), (b"x-env", b"prod"), (b"x-extra", b"1")]


async def test_the_grpc_timeout_index_follows_a_removal(autojump_clock) -> None:
    layer, _inner = rewrite({"request_headers": {"remove": ["x-drop"]}})
    head = request(headers=[(b"x-drop", b"1"), (b"x-drop", b"2"), (b"grpc-timeout", b"3S")])
    side = ScriptedSide()
    ex = started(side, head)
    ex.grpc_timeout = 3  # where Forwarded found it
    await layer(side, head, ex)
    assert ex.grpc_timeout == 1 and head.headers[ex.grpc_timeout] == (b"grpc-timeout", b"3S")


async def test_the_grpc_timeout_index_is_cleared_when_it_is_removed(autojump_clock) -> None:
    layer, _inner = rewrite({"request_headers": {"remove": ["grpc-timeout"]}})
    head = request(headers=[(b"grpc-timeout", b"3S")])
    side = ScriptedSide()
    ex = started(side, head)
    ex.grpc_timeout = 1
    await layer(side, head, ex)
    assert ex.grpc_timeout == -1
