"""Composing a listener's pipeline from its route table: each route gets only the layers its configuration uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mesh.pipeline.direct import Direct
from mesh.pipeline.exchange import Layer
from mesh.pipeline.faults import Faults
from mesh.pipeline.forward import Forward
from mesh.pipeline.mirror import Background, Mirror
from mesh.pipeline.rewrite import Rewrite
from mesh.pipeline.router import Action, Destination, Rng, Route, RouteTable
from mesh.pipeline.routing import RouteMatch, Split
from mesh.proxy import HttpProxy

# Builds the destination layer of one route: (route, destination, is_mirror) → a Forward to that destination's
# cluster with the route's timeouts, retries (none for a mirror) and response header changes.
ForwardFor = Callable[[Route, Destination, bool], Forward]

# An L7 policy slot: given a route and the layers built for it, the policy's layer in front of them, or None
# where the policy does not apply to that route. The gateway's JWT check, external authorisation, rate limit and
# CORS, and Consul's L7 intentions, are such policies; they run first on a route, before its faults.
Policy = Callable[[Route, Layer], Layer | None]


def route_pipeline(
    table: RouteTable,
    *,
    forward_for: ForwardFor,
    proxy: HttpProxy,
    background: Background,
    rng: Rng,
    policies: Sequence[Policy] = (),
) -> RouteMatch:
    """The routing part of a listener's pipeline (what follows its own layers, HttpProxy.entry): route match,
    then per route the L7 policies (`policies`, the first outermost) → faults → direct response or redirect, or
    rewrite → mirror → split → destination."""
    stacks: dict[str, Layer] = {}
    for route in table.all_routes:
        layer: Layer
        if route.action is not Action.FORWARD:
            layer = Direct(route, scheme=proxy.settings.forwarded_proto)
        else:
            forwards = {destination: forward_for(route, destination, False) for destination in route.destinations}
            layer = Split(route, forwards, rng=rng) if len(forwards) > 1 else next(iter(forwards.values()))
            if route.mirror is not None:
                mirror = forward_for(route, route.mirror, True)
                retry = next(iter(forwards.values())).retry  # the route's policy (a split's share the rules)
                layer = Mirror(route, mirror, layer, proxy=proxy, background=background, rng=rng, retry=retry)
            if route.changes_request:
                layer = Rewrite(route, layer)
        if route.has_faults:
            layer = Faults(route, layer, rng=rng)
        for policy in reversed(policies):
            layer = policy(route, layer) or layer
        stacks[route.name] = layer
    return RouteMatch(table, stacks)
