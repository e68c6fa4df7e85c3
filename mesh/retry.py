"""Retry decisions (sans-io): what may be re-sent, the retry budget, full-jitter backoff, Retry-After, latency p95."""

from __future__ import annotations

import random
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Protocol

from mesh.config import GRPC_STATUS_CODES

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""RFC 9110 idempotent methods: a request that may have run is re-sent only with one of these (DESIGN rule 2)."""

CONNECT_FAILURE = "connect_failure"  # the request never left: connection refused, failed, timed out, TLS refused
RESET = "reset"  # the request was written, then the connection closed or reset before any response byte
PER_TRY_TIMEOUT = "per_try_timeout"  # no response head within the per-try timeout
STATUS = "status"  # a response with a retryable status (counted in metrics as "status_<code>")


class BudgetSettings(Protocol):
    percent: int
    min_per_second: float
    window: float


class RetryBudget:
    """Retries allowed on top of requests: `percent` % of the requests in the last `window` seconds, plus a
    reserve of `min_per_second` x `window` (Linkerd's and Finagle's budget: 20 %, 10/s, 10 s).

    Under a failing upstream each request could triple into three tries; the budget caps the extra load at
    a fifth of the traffic, so retries cannot turn an overload into an outage. Counts live in ten time
    buckets that roll over with `clock`; `deposit` and `withdraw` are O(1) apart from rolling buckets."""

    __slots__ = (
        "_bucket",
        "_buckets",
        "_clock",
        "_current",
        "_per_width",
        "_ratio",
        "_requests",
        "_reserve",
        "_retries",
        "exhausted",
    )

    _BUCKETS = 10

    def __init__(self, settings: BudgetSettings, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._ratio = settings.percent / 100
        self._reserve = settings.min_per_second * settings.window
        self._per_width = self._BUCKETS / settings.window  # buckets per second
        self._buckets = [[0, 0] for _ in range(self._BUCKETS)]  # [requests, retries] per bucket
        self._current = int(clock() * self._per_width)
        self._bucket = self._buckets[self._current % self._BUCKETS]
        self._requests = 0
        self._retries = 0
        self.exhausted = 0  # retries refused by the budget

    def __repr__(self) -> str:
        return f"<RetryBudget requests={self._requests} retries={self._retries} available={self.available():.1f}>"

    def _advance(self, index: int) -> None:
        """Move to bucket `index`, emptying the buckets passed over (they left the window)."""
        for i in range(max(self._current + 1, index - self._BUCKETS + 1), index + 1):
            bucket = self._buckets[i % self._BUCKETS]
            self._requests -= bucket[0]
            self._retries -= bucket[1]
            bucket[0] = bucket[1] = 0
        self._current = index
        self._bucket = self._buckets[index % self._BUCKETS]

    def deposit(self, now: float | None = None) -> None:
        """Count one original request (not a retry); `now` saves a clock read when the caller has it."""
        index = int((self._clock() if now is None else now) * self._per_width)
        if index != self._current:
            self._advance(index)
        self._bucket[0] += 1
        self._requests += 1

    def available(self) -> float:
        self._advance_to_now()
        return self._requests * self._ratio + self._reserve - self._retries

    def withdraw(self) -> bool:
        """Take one retry from the budget; False (and counted in `exhausted`) when there is none left."""
        self._advance_to_now()
        if self._retries + 1 > self._requests * self._ratio + self._reserve:
            self.exhausted += 1
            return False
        self._bucket[1] += 1
        self._retries += 1
        return True

    def _advance_to_now(self) -> None:
        index = int(self._clock() * self._per_width)
        if index != self._current:
            self._advance(index)


class RetryRules(Protocol):
    """The settings RetryPolicy reads (mesh.config.RetrySettings has them)."""

    attempts: int
    on: list[str]
    statuses: list[int]
    grpc_statuses: list[str]
    methods: str
    per_try_timeout: float
    backoff_base: float
    backoff_max: float
    retry_after_max: float
    max_body_bytes: int
    budget: BudgetSettings


class RetryPolicy:
    """One upstream's retry rules and budget, and its counts of retries by reason.

    DESIGN rule 2 decides what may be re-sent at all: a request that provably never ran (`never_ran`: the
    connection was refused or failed before anything was written) may be re-sent whatever its method; one that
    may have run only if its method is idempotent or the upstream declares every request safe (`methods: all`).
    A body is re-sent only if the whole of it was buffered and is at most `max_body_bytes`."""

    def __init__(
        self,
        rules: RetryRules,
        *,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        budget: RetryBudget | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.attempts = rules.attempts
        self.on = frozenset(rules.on)
        self.statuses = frozenset(rules.statuses)
        # gRPC answers errors with HTTP 200 and a grpc-status; one in the response head (a "trailers-only"
        # response, how servers refuse a call) is retried if its code is listed. Values as they arrive: b"14".
        self.grpc_statuses = frozenset(b"%d" % GRPC_STATUS_CODES[name] for name in rules.grpc_statuses)
        self.all_methods = rules.methods == "all"
        self.per_try_timeout = rules.per_try_timeout
        self.max_body_bytes = rules.max_body_bytes
        self._base = rules.backoff_base
        self._cap = rules.backoff_max
        self._retry_after_max = rules.retry_after_max
        self._uniform = (rng or random.Random()).uniform
        # The budget and counts are the destination cluster's, shared by every route's policy for it.
        self.budget = budget if budget is not None else RetryBudget(rules.budget, clock=clock)
        self.retries: dict[str, int] = counts if counts is not None else {}  # by reason: reset, status_503, ...

    def __repr__(self) -> str:
        return f"<RetryPolicy attempts={self.attempts} {self.budget!r}>"

    def may_resend(self, method: bytes) -> bool:
        """Whether a request that may already have run may be sent again (its body aside)."""
        return self.all_methods or method in IDEMPOTENT

    def wanted(self, reason: str, *, never_ran: bool, method: bytes) -> bool:
        """Whether this kind of failure is one to retry, by the rules alone (tries left and budget aside)."""
        if reason != STATUS and reason not in self.on:
            return False
        return never_ran or self.may_resend(method)

    def backoff(self, retry: int, retry_after: float | None = None) -> float | None:
        """The pause before retry number `retry` (0-based): full jitter, uniform in [0, min(max, base x 2^retry)].

        A `Retry-After` the upstream sent replaces it when it is at most `retry_after_max`; a longer one means
        the request is not retried (None): the caller gets the upstream's answer rather than a held request."""
        if retry_after is not None and self._retry_after_max > 0:
            if retry_after > self._retry_after_max:
                return None
            return retry_after
        return self._uniform(0.0, min(self._cap, self._base * (1 << min(retry, 30))))

    def count(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1


def grpc_status(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The `grpc-status` of a response head (a trailers-only gRPC response), None if it has none."""
    for name, value in headers:
        if name == b"grpc-status":
            return value
    return None


def parse_retry_after(value: bytes, now_unix: float) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or an HTTP-date); None if it is neither."""
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_unix)


class LatencyWindow:
    """The 95th percentile of an upstream's recent response-head latencies, for hedging.

    Keeps the last `size` samples in a ring and recomputes the quantile every `every` samples, so a
    request pays an append and a comparison. Until `every` samples have arrived it answers None."""

    __slots__ = ("_every", "_next", "_samples", "_since", "_size", "quantile", "value")

    def __init__(self, *, quantile: float = 0.95, size: int = 1000, every: int = 50) -> None:
        self.quantile = quantile
        self._size = size
        self._every = every
        self._samples: list[float] = []
        self._next = 0
        self._since = 0
        self.value: float | None = None

    def add(self, latency: float) -> None:
        samples = self._samples
        if len(samples) < self._size:
            samples.append(latency)
        else:
            samples[self._next] = latency
            self._next = (self._next + 1) % self._size
        self._since += 1
        if self._since >= self._every:
            self._since = 0
            ordered = sorted(samples)
            self.value = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
