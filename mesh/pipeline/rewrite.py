"""A route's changes to the forwarded request: the path prefix, the host, and added, set and removed headers."""

from __future__ import annotations

from mesh.message import RequestHead
from mesh.pipeline.exchange import Downstream, Exchange, Layer
from mesh.pipeline.forwarded import grpc_timeout_index
from mesh.pipeline.router import Route


class Rewrite:
    """Rewrites the request before it is forwarded: `rewrite.prefix` replaces the matched path prefix (the query
    is kept), `rewrite.host` replaces the authority (Host, :authority), `request_headers` removes, sets and adds
    fields. The response's header changes are applied by the destination's layer (mesh.pipeline.forward)."""

    __slots__ = ("authority", "next", "route")

    def __init__(self, route: Route, next: Layer) -> None:
        self.route = route
        self.next = next
        self.authority = route.rewrite_authority

    def __repr__(self) -> str:
        return f"<Rewrite {self.route.name} → {self.next!r}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        route = self.route
        path, mark, query = head.target.partition(b"?")
        rewritten = route.rewrite_path(path)
        if rewritten is not path:
            head.target = rewritten + mark + query
        headers = head.headers
        authority = self.authority
        if authority is not None:
            head.authority = authority
            headers[:] = [(n, authority if n == b"host" else v) for n, v in headers]
        route.apply_request_headers(headers)
        ex.grpc_timeout = grpc_timeout_index(headers)
        return await self.next(side, head, ex)
