"""Span records (sans-io): what one hop records of a request, kept small and encoded in batches off the request path."""

from __future__ import annotations

from dataclasses import dataclass, field

SERVER, CLIENT = 2, 3  # OpenTelemetry's SpanKind values (INTERNAL 1, PRODUCER 4, CONSUMER 5 are not used)
UNSET, OK, ERROR = 0, 1, 2  # OpenTelemetry's status codes

AttributeValue = str | int | float | bool


@dataclass(slots=True)
class SpanRecord:
    """One finished span. Ids are raw bytes (trace 16, span 8, parent 8 or empty for a root); times are unix
    nanoseconds; attributes follow OpenTelemetry's HTTP semantic conventions plus the mesh's own (`mesh.*`)."""

    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    name: str
    kind: int
    start_ns: int
    end_ns: int = 0
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    status: int = UNSET
    status_message: str = ""
