"""Peer authorisation: a request from a caller whose SPIFFE ID the inbound's allow/deny rules refuse gets 403."""

from __future__ import annotations

from mesh.errors import MeshError
from mesh.message import RequestHead
from mesh.pipeline.exchange import Downstream, Exchange, Layer


class PeerAuthz:
    """Refuses the exchange when the caller's verified identity was not allowed at the handshake (the decision
    and the rule that made it travel with the accepted connection); present only on mTLS listeners."""

    __slots__ = ("next",)

    def __init__(self, next: Layer) -> None:
        self.next = next

    def __repr__(self) -> str:
        return f"<PeerAuthz → {self.next!r}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        accepted = side.accepted
        if not accepted.allowed:
            raise MeshError(403, f"caller {accepted.peer_identity} denied: {accepted.rule}", "denied")
        return await self.next(side, head, ex)
