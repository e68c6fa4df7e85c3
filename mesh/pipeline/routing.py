"""Route match: the request's normalised path and its host, method, headers and query choose a route of the
listener's table, whose own layers then take it; a split picks one destination by weight."""

from __future__ import annotations

from collections.abc import Mapping

from mesh.errors import MeshError
from mesh.message import RequestHead
from mesh.pipeline.exchange import Downstream, Exchange, Layer
from mesh.pipeline.pathnorm import PathRejected, normalize_target
from mesh.pipeline.router import Destination, Rng, Route, RouteTable


class RouteMatch:
    """Matches each request against `table` (mesh.pipeline.router: the order is the configuration's) and runs the
    layers built for the route it finds (`stacks`, by route name). The path is normalised first (merged slashes,
    dot segments; an encoded `/` or `\\` is refused with 400): what the routes see is what is forwarded. A request
    no route takes is answered 404 `no route`. A mesh error on the way back names the route."""

    __slots__ = ("stacks", "table")

    def __init__(self, table: RouteTable, stacks: Mapping[str, Layer]) -> None:
        self.table = table
        self.stacks = dict(stacks)

    def __repr__(self) -> str:
        return f"<RouteMatch {self.table!r}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        try:
            path, query = normalize_target(head.target)
        except PathRejected as exc:
            raise MeshError(400, f"invalid path: {exc.reason}", "bad_request") from None
        route = self.table.match(head.method, head.authority, path, query, head.headers)
        if route is None:
            raise MeshError(404, "no route", "no_route")
        ex.route = route.name
        head.target = path + query
        try:
            return await self.stacks[route.name](side, head, ex)
        except MeshError as exc:
            exc.reason = f"{exc.reason} (route {route.name})"
            raise


class Split:
    """Sends each request to one of the route's destinations, by weight (a canary's 90/10)."""

    __slots__ = ("destinations", "rng", "route")

    def __init__(self, route: Route, destinations: Mapping[Destination, Layer], *, rng: Rng) -> None:
        self.route = route
        self.destinations = dict(destinations)
        self.rng = rng

    def __repr__(self) -> str:
        return f"<Split {self.route.name} {[d.label for d in self.destinations]}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        destination = self.route.pick(self.rng)
        assert destination is not None
        return await self.destinations[destination](side, head, ex)
