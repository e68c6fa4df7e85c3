"""RouteMatch and Split alone: routes in order on the normalised path, 404 without a route, 400 for a refused path,
the route named in a mesh error, and a split's shares."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mesh.config import Route as RouteSpec
from mesh.errors import MeshError
from mesh.pipeline.compile import route_pipeline
from mesh.pipeline.direct import Direct
from mesh.pipeline.faults import Faults
from mesh.pipeline.forward import Forward
from mesh.pipeline.mirror import Background, Mirror
from mesh.pipeline.rewrite import Rewrite
from mesh.pipeline.router import Destination, RouteTable
from mesh.pipeline.routing import RouteMatch, Split
from tests.component.pipeline_doubles import (
    FakeProxy,
    RecordingLayer,
    ScriptedCluster,
    ScriptedSide,
    endpoints,
    request,
    response,
    started,
)


def table(*specs: dict[str, Any], default: Destination | None = None) -> RouteTable:
    return RouteTable([RouteSpec.model_validate(spec) for spec in specs], default=default)


def matcher(routes: RouteTable) -> tuple[RouteMatch, dict[str, RecordingLayer]]:
    stacks = {route.name: RecordingLayer() for route in routes.all_routes}
    return RouteMatch(routes, stacks), stacks


async def run(layer: Any, head: Any) -> Any:
    side = ScriptedSide()
    ex = started(side, head)
    await layer(side, head, ex)
    return ex


ROUTES = (
    {"name": "api", "match": {"path_prefix": "/api"}, "to": {"service": "api"}},
    {"name": "api-v2", "match": {"path_prefix": "/api/v2"}, "to": {"service": "api2"}},
    {"name": "posts", "match": {"methods": ["POST"]}, "to": {"service": "writer"}},
)


async def test_routes_are_tried_in_order(autojump_clock) -> None:
    match, stacks = matcher(table(*ROUTES))
    ex = await run(match, request(target=b"/api/v2/users"))  # the later, longer prefix does not win
    await run(match, request(b"POST", b"/other", body=b""))
    assert len(stacks["api"].calls) == 1 and stacks["api-v2"].calls == []
    assert len(stacks["posts"].calls) == 1
    assert ex.route == "api"


async def test_no_route_and_no_default_is_answered_404(autojump_clock) -> None:
    match, stacks = matcher(table(*ROUTES))
    with pytest.raises(MeshError) as caught:
        await run(match, request(target=b"/elsewhere"))
    assert (caught.value.status, caught.value.reason, caught.value.code) == (404, "no route", "no_route")
    assert all(stack.calls == [] for stack in stacks.values())


async def test_with_a_default_unmatched_requests_take_the_default_route(autojump_clock) -> None:
    match, stacks = matcher(table(*ROUTES, default=Destination("api")))
    ex = await run(match, request(target=b"/elsewhere"))
    assert len(stacks["default"].calls) == 1 and ex.route == "default"


@pytest.mark.parametrize("target", [b"/api%2Fadmin", b"/api%2fadmin", b"/api/%5C", b"/a\\b"])
async def test_an_encoded_slash_or_backslash_is_answered_400(autojump_clock, target) -> None:
    match, stacks = matcher(table(*ROUTES, default=Destination("api")))
    with pytest.raises(MeshError) as caught:
        await run(match, request(target=target))
    assert (caught.value.status, caught.value.code) == (400, "bad_request")
    assert caught.value.reason.startswith("invalid path: ")
    assert all(stack.calls == [] for stack in stacks.values())


async def test_the_next_layer_sees_the_normalised_target(autojump_clock) -> None:
    match, stacks = matcher(table(*ROUTES))
    await run(match, request(target=b"/public/..//api/./v1//users?q=a//b"))
    assert stacks["api"].call.target == b"/api/v1/users?q=a//b"  # the query is not touched


async def test_a_dot_segment_cannot_reach_around_a_route(autojump_clock) -> None:
    admin = {"name": "admin", "match": {"path_prefix": "/admin"}, "direct_response": {"status": 403}}
    match, stacks = matcher(table(admin, default=Destination("api")))
    await run(match, request(target=b"/public/%2e%2e/admin/keys"))
    assert stacks["admin"].call.target == b"/admin/keys" and stacks["default"].calls == []


async def test_a_mesh_error_of_a_route_names_the_route(autojump_clock) -> None:
    routes = table(*ROUTES)
    failing = RecordingLayer(raises=lambda: MeshError(503, "no healthy endpoints", "no_healthy_endpoints"))
    match = RouteMatch(routes, {"api": failing, "api-v2": RecordingLayer(), "posts": RecordingLayer()})
    with pytest.raises(MeshError) as caught:
        await run(match, request(target=b"/api"))
    assert caught.value.reason == "no healthy endpoints (route api)"
    assert (caught.value.status, caught.value.code) == (503, "no_healthy_endpoints")


async def test_a_split_sends_90_10_by_weight(autojump_clock) -> None:
    spec = {
        "name": "canary",
        "split": [
            {"to": {"service": "reviews", "subset": {"version": "v1"}}, "weight": 90},
            {"to": {"service": "reviews", "subset": {"version": "v2"}}, "weight": 10},
        ],
    }
    route = table(spec).routes[0]
    v1, v2 = route.destinations
    layers = {v1: RecordingLayer(), v2: RecordingLayer()}
    split = Split(route, layers, rng=random.Random(1))
    for _ in range(2000):
        await run(split, request())
    share = len(layers[v2].calls) / 2000
    assert len(layers[v1].calls) + len(layers[v2].calls) == 2000
    assert 0.07 <= share <= 0.13


async def test_a_split_entry_of_weight_0_gets_nothing(autojump_clock) -> None:
    spec = {
        "name": "draining",
        "split": [{"to": {"service": "a"}, "weight": 1}, {"to": {"service": "b"}, "weight": 0}],
    }
    route = table(spec).routes[0]
    a, b = route.destinations
    layers = {a: RecordingLayer(), b: RecordingLayer()}
    split = Split(route, layers, rng=random.Random(7))
    for _ in range(200):
        await run(split, request())
    assert len(layers[a].calls) == 200 and layers[b].calls == []


# -- route_pipeline: each route gets only the layers its configuration uses ----------------------------------------


def compiled(monkeypatch, *specs: dict[str, Any]) -> tuple[RouteMatch, dict[Destination, ScriptedCluster]]:
    routes = table(*specs)
    clusters = {
        destination: ScriptedCluster(
            monkeypatch, endpoints(1), [response(200) for _ in range(4)], name=destination.service
        )
        for destination in routes.destinations()
    }

    def forward_for(route: Any, destination: Destination, is_mirror: bool) -> Forward:
        return Forward(
            clusters[destination].cluster,
            outbound=True,
            request_timeout=5.0,
            connect_timeout=1.0,
            retry=None,
            label=destination.label,
            response_changes=route.apply_response_headers if route.changes_response else None,
        )

    pipeline = route_pipeline(
        routes, forward_for=forward_for, proxy=FakeProxy(), background=Background(), rng=random.Random(1)
    )  # type: ignore[arg-type]
    return pipeline, clusters


async def test_each_route_gets_only_the_layers_it_uses(monkeypatch, autojump_clock) -> None:
    pipeline, _ = compiled(
        monkeypatch,
        {"name": "plain", "match": {"path": "/plain"}, "to": {"service": "api"}},
        {
            "name": "answer",
            "match": {"path": "/x"},
            "direct_response": {"status": 204},
            "fault": {"delay": {"duration": "1s"}},
        },
        {
            "name": "full",
            "match": {"path_prefix": "/full"},
            "rewrite": {"prefix": "/"},
            "mirror": {"to": {"service": "shadow"}},
            "split": [{"to": {"service": "api"}, "weight": 1}, {"to": {"service": "api2"}, "weight": 1}],
        },
    )
    stacks = pipeline.stacks
    assert type(stacks["plain"]) is Forward
    assert type(stacks["answer"]) is Faults and type(stacks["answer"].next) is Direct
    full = stacks["full"]
    assert type(full) is Rewrite and type(full.next) is Mirror and type(full.next.next) is Split


async def test_a_compiled_route_forwards_the_rewritten_request_and_changes_the_response(
    monkeypatch, autojump_clock
) -> None:
    spec = {
        "name": "v1",
        "match": {"path_prefix": "/v1"},
        "rewrite": {"prefix": "/api"},
        "request_headers": {"add": {"x-route": "v1"}},
        "response_headers": {"add": {"x-served": "v1"}},
        "to": {"service": "api"},
    }
    pipeline, clusters = compiled(monkeypatch, spec)
    side = ScriptedSide()
    head = request(target=b"/v1/./users?id=1")
    ex = started(side, head)
    await pipeline(side, head, ex)
    upstream = clusters[Destination("api")].upstreams[0]
    assert upstream.head is not None and upstream.head.target == b"/api/users?id=1"
    assert (b"x-route", b"v1") in upstream.head.headers
    assert (b"x-served", b"v1") in side.answer.headers
    assert (ex.route, ex.destination) == ("v1", "api")


async def test_policies_go_first_on_the_routes_they_apply_to(monkeypatch, autojump_clock) -> None:
    """The L7 policy slots (JWT, external authorisation, rate limit, CORS, intentions): a policy wraps the routes it
    applies to, outermost first, in front of their faults; a route it does not apply to is left as it was."""

    class Deny:
        def __init__(self, name: str, next: Any) -> None:
            self.name, self.next = name, next

        async def __call__(self, side: Any, head: Any, ex: Any) -> bool:
            raise MeshError(403, f"denied by {self.name}", "denied")

    def only_admin(route: Any, layer: Any) -> Any:
        return Deny("intentions", layer) if route.name == "admin" else None

    def everywhere(route: Any, layer: Any) -> Any:
        return Deny("jwt", layer)

    routes = table(
        {
            "name": "admin",
            "match": {"path": "/admin"},
            "to": {"service": "api"},
            "fault": {"delay": {"duration": "1s"}},
        },
        {"name": "public", "match": {"path": "/"}, "to": {"service": "api"}},
    )
    cluster = ScriptedCluster(monkeypatch, endpoints(1), [response(200)], name="api")
    pipeline = route_pipeline(
        routes,
        forward_for=lambda route, destination, mirror: Forward(
            cluster.cluster, outbound=True, request_timeout=5.0, connect_timeout=1.0, retry=None
        ),
        proxy=FakeProxy(),  # type: ignore[arg-type]
        background=Background(),
        rng=random.Random(1),
        policies=[everywhere, only_admin],
    )
    admin, public = pipeline.stacks["admin"], pipeline.stacks["public"]
    assert (admin.name, admin.next.name) == ("jwt", "intentions") and type(admin.next.next) is Faults
    assert public.name == "jwt" and type(public.next) is Forward
    with pytest.raises(MeshError, match="denied by jwt"):
        await run(pipeline, request(target=b"/admin"))
