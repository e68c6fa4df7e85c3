"""Failed attempts (guessed tokens) limited per client address: a token bucket per address in a bounded table."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict


class FailureLimiter:
    """Lets each client fail `burst` times in a row, then once more every `interval` seconds (a token bucket).

    Synchronous; the time (any monotonic clock, in seconds) is passed in. A client takes memory only while its
    bucket is not full again, and at most `max_clients` do: when one more would, the client whose last failure is
    oldest is forgotten (an attacker with more addresses than that gets their full burst on each of them)."""

    def __init__(self, *, burst: int, interval: float, max_clients: int) -> None:
        if burst < 1 or interval <= 0 or max_clients < 1:
            raise ValueError("burst and max_clients must be at least 1, and interval positive")
        self.burst = burst
        self.interval = interval
        self.max_clients = max_clients
        # client -> when its bucket is full again; least recently failed first. One float a client: a bucket that
        # refills one failure per interval has (full_at - now) / interval failures spent.
        self._full_at: OrderedDict[str, float] = OrderedDict()

    def __repr__(self) -> str:
        return f"<FailureLimiter {self.burst} then 1 per {self.interval:g}s; {len(self._full_at)} clients tracked>"

    def __len__(self) -> int:
        return len(self._full_at)

    def retry_after(self, client: str, now: float) -> float:
        """0 if `client` may make one more attempt now; otherwise the seconds until it may."""
        full_at = self._full_at.get(client)
        if full_at is None:
            return 0.0
        return max(0.0, full_at - now - (self.burst - 1) * self.interval)

    def failed(self, client: str, now: float) -> None:
        """Count one failed attempt by `client`."""
        full_at = max(self._full_at.pop(client, now), now)
        while self._full_at and (len(self._full_at) >= self.max_clients or next(iter(self._full_at.values())) <= now):
            self._full_at.popitem(last=False)  # refilled (as good as absent), or the table is full
        self._full_at[client] = full_at + self.interval


def client_key(host: str) -> str:
    """The address failures are counted for: the IP address, an IPv6 one by its /64 (one host or site usually holds
    a whole /64), an IPv4-mapped IPv6 one as IPv4. Anything that is not an IP address is its own key."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
