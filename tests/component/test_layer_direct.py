"""Direct alone: a route's own answer (status, body, content-type) or redirect (Location from scheme, authority,
path and query), with the route's response header changes."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.config import Route as RouteSpec
from mesh.pipeline.direct import Direct
from mesh.pipeline.router import Route
from tests.component.pipeline_doubles import ScriptedSide, header, request, started


def route(spec: dict[str, Any]) -> Route:
    return Route(RouteSpec.model_validate(spec), name="r1", default=None)


async def answer(layer: Direct, head: Any) -> ScriptedSide:
    side = ScriptedSide()
    assert await layer(side, head, started(side, head)) is True
    return side


async def test_a_direct_response_has_its_status_body_and_content_type(autojump_clock) -> None:
    spec = {"direct_response": {"status": 418, "body": "short and stout", "content_type": "text/teapot"}}
    side = await answer(Direct(route(spec), scheme=b"http"), request())
    assert (side.answer.kind, side.answer.status, side.answer.body) == ("response", 418, b"short and stout")
    assert side.answer.headers == [(b"content-type", b"text/teapot")]


async def test_a_direct_response_without_a_body_has_no_content_type(autojump_clock) -> None:
    side = await answer(Direct(route({"direct_response": {"status": 204}}), scheme=b"http"), request())
    assert (side.answer.status, side.answer.body, side.answer.headers) == (204, b"", [])


async def test_a_direct_response_gets_the_response_header_changes(autojump_clock) -> None:
    spec = {
        "direct_response": {"status": 200, "body": "ok"},
        "response_headers": {"set": {"content-type": "application/json"}, "add": {"x-served-by": "mesh"}},
    }
    side = await answer(Direct(route(spec), scheme=b"http"), request())
    assert side.answer.headers == [(b"content-type", b"application/json"), (b"x-served-by", b"mesh")]


@pytest.mark.parametrize(
    ("redirect", "path_prefix", "target", "location"),
    [
        ({"port": 9090}, None, b"/a/b?x=1", b"http://shop.example:9090/a/b?x=1"),
        ({"scheme": "https"}, None, b"/a?x=1", b"https://shop.example/a?x=1"),
        ({"scheme": "https", "port": 443}, None, b"/a", b"https://shop.example/a"),
        ({"scheme": "https", "port": 8443}, None, b"/a", b"https://shop.example:8443/a"),
        ({"host": "new.example"}, None, b"/a", b"http://new.example/a"),
        ({"path": "/moved"}, None, b"/a?x=1", b"http://shop.example:8080/moved?x=1"),
        ({"prefix_rewrite": "/v2"}, "/v1", b"/v1/items?id=3", b"http://shop.example:8080/v2/items?id=3"),
    ],
    ids=["port-only", "scheme", "default-port", "port", "host", "path", "prefix"],
)
async def test_a_redirect_builds_its_location(autojump_clock, redirect, path_prefix, target, location) -> None:
    spec: dict[str, Any] = {"redirect": {"status": 301, **redirect}}
    if path_prefix is not None:
        spec["match"] = {"path_prefix": path_prefix}
    side = await answer(Direct(route(spec), scheme=b"http"), request(target=target, authority=b"shop.example:8080"))
    assert (side.answer.status, side.answer.body) == (301, b"")
    assert header(side.answer.headers, b"location") == location


async def test_a_redirect_names_the_listener_scheme(autojump_clock) -> None:
    layer = Direct(route({"redirect": {"path": "/y"}}), scheme=b"https")
    side = await answer(layer, request(target=b"/x?q", authority=b"h"))
    assert (side.answer.status, header(side.answer.headers, b"location")) == (302, b"https://h/y?q")


async def test_a_redirect_gets_the_response_header_changes(autojump_clock) -> None:
    spec = {"redirect": {"path": "/new"}, "response_headers": {"add": {"cache-control": "no-store"}}}
    side = await answer(Direct(route(spec), scheme=b"http"), request(target=b"/old", authority=b"h"))
    assert side.answer.headers == [(b"location", b"http://h/new"), (b"cache-control", b"no-store")]


def test_a_route_that_forwards_has_no_direct_answer() -> None:
    with pytest.raises(ValueError):
        Direct(route({"to": {"service": "api"}}), scheme=b"http")
