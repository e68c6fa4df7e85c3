"""Per-cluster circuit breaking (sans-io): limits on connections, pending requests and requests in flight."""

from __future__ import annotations

from mesh.config import CircuitBreakers


class CircuitBreaker:
    """Counts what one cluster has open; `admit_*` answer the name of the limit that is full, or None.

    Overflow is refused at once (the caller answers 503 `circuit open (<limit>)`); it is not an outlier
    failure of any endpoint. Every successful `admit_*` must be paired with its `*_done`."""

    __slots__ = ("connections", "limits", "overflows", "pending", "requests")

    def __init__(self, limits: CircuitBreakers) -> None:
        self.limits = limits
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.overflows: dict[str, int] = {"max_connections": 0, "max_pending": 0, "max_requests": 0}

    def __repr__(self) -> str:
        return f"<CircuitBreaker connections={self.connections} pending={self.pending} requests={self.requests}>"

    def _full(self, limit: str) -> str:
        self.overflows[limit] += 1
        return limit

    def admit_request(self) -> str | None:
        if self.requests >= self.limits.max_requests:
            return self._full("max_requests")
        self.requests += 1
        return None

    def request_done(self) -> None:
        self.requests -= 1

    def admit_connection(self) -> str | None:
        """A new connection is about to be opened: it is pending until `connection_opened` or `pending_done`."""
        if self.connections >= self.limits.max_connections:
            return self._full("max_connections")
        if self.pending >= self.limits.max_pending:
            return self._full("max_pending")
        self.pending += 1
        return None

    def pending_done(self, *, opened: bool) -> None:
        self.pending -= 1
        if opened:
            self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1
