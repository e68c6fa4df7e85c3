"""Routes that answer themselves: a direct response (status, body) or a redirect (Location built from the request)."""

from __future__ import annotations

from mesh.message import Headers, RequestHead
from mesh.pipeline.exchange import Downstream, Exchange
from mesh.pipeline.router import Action, Route


class Direct:
    """Answers the request from the route's configuration; the end of a route's layers, nothing is forwarded. A
    redirect keeps the request's path and query unless the route rewrites them, and names the scheme the listener
    is reached by (`x-forwarded-proto` of the hop: http, or https behind TLS). The route's response header changes
    apply."""

    __slots__ = ("route", "scheme")

    def __init__(self, route: Route, *, scheme: bytes) -> None:
        if route.action is Action.FORWARD:
            raise ValueError(f"route {route.name} forwards: it has no answer of its own")
        self.route = route
        self.scheme = scheme

    def __repr__(self) -> str:
        return f"<Direct {self.route.name} {self.route.action.value}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        route = self.route
        answer = route.direct_response
        if answer is not None:
            status, body = answer.status, answer.body
            headers: Headers = [(b"content-type", answer.content_type)] if body else []
        else:
            assert route.redirect_status is not None
            path, mark, query = head.target.partition(b"?")
            location = route.redirect_location(self.scheme, head.authority, path, mark + query)
            status, body, headers = route.redirect_status, b"", [(b"location", location)]
        route.apply_response_headers(headers)
        return await side.send_response(status, headers, body, head, ex)
