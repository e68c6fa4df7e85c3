"""Trace context propagation (sans-io): read W3C and B3 headers, decide sampling, write the next hop's headers.

What arrives
    `extract` reads W3C `traceparent` + `tracestate`, B3 multi (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`,
    `x-b3-flags`) and B3 single (`b3`). A format whose headers are malformed, repeated (all but `tracestate`) or
    incomplete is ignored as if it were absent; nothing here raises on input. Ids are lower-case hex in both formats
    (as both specs require) and never all zeros; optional whitespace around a value is ignored; `x-b3-flags` other
    than `1` means nothing.

    It returns a `TraceContext` when some format carried ids, a `SamplingHint` when only a sampling decision came
    (`b3: 0`, `b3: 1`, `b3: d`, or `x-b3-sampled` / `x-b3-flags` without ids), and None when nothing usable came. Both
    result types have `.sampled` and `.formats`, so `sample()` and `inject(formats=...)` take either; only a
    `TraceContext` continues a trace (a hint starts a new trace that keeps the caller's decision).

Precedence when several formats arrive
    W3C, then B3 single, then B3 multi (Envoy and Linkerd prefer W3C; Zipkin's own propagation reads `b3` before the
    multi headers). The first format with ids wins and gives the ids; `formats` records it and every other format that
    carried the same trace id and span id; formats with other ids (or no ids) are ignored. `sampled` is the winner's
    decision, else the first decision among the agreeing formats in the same order; W3C always carries one. Without
    ids, the hints follow the same order: the first decision wins and `formats` records those that agree with it.
    `tracestate` is read only together with a valid `traceparent`; several fields are joined with "," and a combined
    value over 512 bytes is dropped whole.

What leaves
    `inject` removes `traceparent`, `tracestate`, `b3` and every `x-b3-*` header (`x-b3-traceid`, `-spanid`,
    `-parentspanid`, `-sampled`, `-flags`), then appends `traceparent` (always) and `tracestate` (when not empty),
    `x-b3-traceid`, `x-b3-spanid` and `x-b3-sampled` when "b3multi" is in `formats`, and `b3` when "b3single" is.
    B3 trace ids are written as 16 hex digits when the upper half is zero (a 64-bit id that arrived that way), else
    32. An undecided context (`sampled` None) is written as W3C flags 00 and without a B3 sampling field. B3 debug
    (`x-b3-flags: 1`, `b3: ...-d`) is read as sampled and forwarded as sampled (1); `x-b3-parentspanid` and the B3
    single parent field are neither kept nor written.
"""

from __future__ import annotations

import re
from binascii import hexlify, unhexlify
from collections.abc import Set
from dataclasses import dataclass
from typing import Protocol

W3C = "w3c"
B3_MULTI = "b3multi"
B3_SINGLE = "b3single"

TRACESTATE_MAX = 512  # bytes; the W3C spec asks vendors to propagate at least this much of a combined tracestate

_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"
_B3 = b"b3"
_B3_TRACEID = b"x-b3-traceid"
_B3_SPANID = b"x-b3-spanid"
_B3_SAMPLED = b"x-b3-sampled"
_B3_FLAGS = b"x-b3-flags"
_READ = frozenset({_TRACEPARENT, _TRACESTATE, _B3, _B3_TRACEID, _B3_SPANID, _B3_SAMPLED, _B3_FLAGS})
# Every header of both formats: B3 defines exactly these x-b3-* names (openzipkin/b3-propagation).
_REMOVE = _READ | {b"x-b3-parentspanid"}

# version-traceid-parentid-flags, lower-hex only; a future version may append "-" and fields of its own.
_TRACEPARENT_RE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_B3_SINGLE_RE = re.compile(rb"([0-9a-f]{32}|[0-9a-f]{16})-([0-9a-f]{16})(?:-([01d])(?:-[0-9a-f]{16})?)?")
_B3_TRACEID_RE = re.compile(rb"[0-9a-f]{32}|[0-9a-f]{16}")
_B3_SPANID_RE = re.compile(rb"[0-9a-f]{16}")
_B3_MULTI_SAMPLED = {b"1": True, b"0": False, b"true": True, b"false": False}
_B3_SINGLE_SAMPLED = {b"1": True, b"0": False, b"d": True, None: None}
_OWS = b" \t"
_W3C_BIT, _SINGLE_BIT, _MULTI_BIT = 1, 2, 4
_FORMAT_SETS = [  # indexed by a mask of the bits above: built once, shared by every context
    frozenset(fmt for bit, fmt in ((_W3C_BIT, W3C), (_SINGLE_BIT, B3_SINGLE), (_MULTI_BIT, B3_MULTI)) if mask & bit)
    for mask in range(8)
]
_ZERO_HEX16 = b"0" * 16
_ZERO_HEX32 = b"0" * 32
_ZERO8 = bytes(8)


class RandomSource(Protocol):
    """What ids and sampling draw from: `random.Random` (seeded in tests) or `random.SystemRandom`."""

    def getrandbits(self, k: int, /) -> int: ...

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True, repr=False)
class TraceContext:
    """A trace context as it arrived. `trace_id` is 16 raw bytes (a 64-bit B3 id left-padded with zeros), `span_id`
    8 raw bytes: the caller's span, parent of the receiving hop's. `sampled` is None when no decision came.
    `tracestate` is the raw W3C tracestate (b"" if none); `formats` the formats that carried these ids."""

    trace_id: bytes
    span_id: bytes
    sampled: bool | None
    tracestate: bytes = b""
    formats: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return (
            f"TraceContext(trace_id={self.trace_id.hex()}, span_id={self.span_id.hex()}, sampled={self.sampled}, "
            f"tracestate={self.tracestate!r}, formats={'+'.join(sorted(self.formats))})"
        )


@dataclass(frozen=True, slots=True)
class SamplingHint:
    """A sampling decision that came without ids (`b3: 0`, `x-b3-sampled: 1`, ...): the hop starts a new trace and
    keeps the decision. `formats` are the formats it arrived in, so the new trace is forwarded in them too."""

    sampled: bool
    formats: frozenset[str]


# (trace_id, span_id, sampled): ids both bytes or both None (a sampling-only hint, sampled then not None).
_Parsed = tuple[bytes | None, bytes | None, bool | None]


def extract(headers: list[tuple[bytes, bytes]]) -> TraceContext | SamplingHint | None:
    """The trace context of a request head's headers (lower-case names); see the module docstring for precedence."""
    found: dict[bytes, bytes] | None = None
    tracestate: list[bytes] = []
    for name, value in headers:
        if name not in _READ:
            continue
        if name == _TRACESTATE:
            tracestate.append(value)
            continue
        if found is None:
            found = {}
        # A repeated single-valued header is ambiguous: b"" is invalid for each of them, so the format is ignored.
        found[name] = b"" if name in found else value.strip(_OWS)
    if found is None:
        return None

    value = found.get(_TRACEPARENT)
    w3c = None if value is None else _parse_traceparent(value)
    value = found.get(_B3)
    single = None if value is None else _parse_b3_single(value)
    multi = _parse_b3_multi(found)

    if w3c is not None:
        winner = w3c
    elif single is not None and single[0] is not None:
        winner = single
    elif multi is not None and multi[0] is not None:
        winner = multi
    else:  # no ids anywhere: at most a sampling hint
        hint = single if single is not None else multi
        if hint is None:
            return None
        decision = hint[2]
        assert decision is not None  # a format without ids is parsed only when it carries a decision
        mask = (_SINGLE_BIT if single is not None and single[2] == decision else 0) | (
            _MULTI_BIT if multi is not None and multi[2] == decision else 0
        )
        return SamplingHint(decision, _FORMAT_SETS[mask])

    trace_id, span_id, sampled = winner
    # The winner matches itself; the formats after it count when they carry the same ids.
    mask = _W3C_BIT if w3c is not None else 0
    if single is not None and single[0] == trace_id and single[1] == span_id:
        mask |= _SINGLE_BIT
        if sampled is None:
            sampled = single[2]
    if multi is not None and multi[0] == trace_id and multi[1] == span_id:
        mask |= _MULTI_BIT
        if sampled is None:
            sampled = multi[2]
    state = b""
    if tracestate and w3c is not None:
        if len(tracestate) == 1:
            state = tracestate[0].strip(_OWS)
        else:
            state = b",".join([v for v in [v.strip(_OWS) for v in tracestate] if v])
        if len(state) > TRACESTATE_MAX:
            state = b""
    assert trace_id is not None and span_id is not None
    return TraceContext(trace_id, span_id, sampled, state, _FORMAT_SETS[mask])


def _parse_traceparent(value: bytes) -> _Parsed | None:
    """W3C trace-context level 1: version 00 exactly; a higher version by its first four fields; ff never."""
    m = _TRACEPARENT_RE.fullmatch(value)
    if m is None:
        return None
    version, trace_hex, span_hex, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace_hex == _ZERO_HEX32 or span_hex == _ZERO_HEX16:
        return None
    return unhexlify(trace_hex), unhexlify(span_hex), bool(int(flags, 16) & 1)


def _parse_b3_single(value: bytes) -> _Parsed | None:
    """`b3: {traceid}-{spanid}[-{1|0|d}[-{parentspanid}]]`, or a bare `0`, `1` or `d`."""
    if len(value) == 1:
        decision = _B3_SINGLE_SAMPLED.get(value)
        return None if decision is None else (None, None, decision)
    m = _B3_SINGLE_RE.fullmatch(value)
    if m is None:
        return None
    trace_hex, span_hex, sampling = m.groups()
    if _is_zero(trace_hex) or span_hex == _ZERO_HEX16:
        return None
    return _b3_trace_id(trace_hex), unhexlify(span_hex), _B3_SINGLE_SAMPLED[sampling]


def _parse_b3_multi(found: dict[bytes, bytes]) -> _Parsed | None:
    """`x-b3-traceid` (16 or 32 hex) with `x-b3-spanid` (16 hex), or neither; `x-b3-sampled`; `x-b3-flags: 1`."""
    sampled: bool | None = None
    value = found.get(_B3_SAMPLED)
    if value is not None and (sampled := _B3_MULTI_SAMPLED.get(value)) is None:
        return None
    if found.get(_B3_FLAGS) == b"1":  # debug implies an accept decision, whatever x-b3-sampled says
        sampled = True
    trace_hex = found.get(_B3_TRACEID)
    span_hex = found.get(_B3_SPANID)
    if trace_hex is None and span_hex is None:
        return None if sampled is None else (None, None, sampled)
    if trace_hex is None or span_hex is None:
        return None
    if _B3_TRACEID_RE.fullmatch(trace_hex) is None or _B3_SPANID_RE.fullmatch(span_hex) is None:
        return None
    if _is_zero(trace_hex) or span_hex == _ZERO_HEX16:
        return None
    return _b3_trace_id(trace_hex), unhexlify(span_hex), sampled


def _is_zero(trace_hex: bytes) -> bool:
    return trace_hex == _ZERO_HEX32 or trace_hex == _ZERO_HEX16


def _b3_trace_id(trace_hex: bytes) -> bytes:
    trace_id = unhexlify(trace_hex)
    return trace_id if len(trace_id) == 16 else _ZERO8 + trace_id


def new_trace_id(rng: RandomSource) -> bytes:
    """A random, non-zero 16-byte trace id (one `getrandbits` call)."""
    # All-zero ids are invalid; the substitute is as likely as any other value was (2**-128).
    return (rng.getrandbits(128) or 1).to_bytes(16, "big")


def new_span_id(rng: RandomSource) -> bytes:
    """A random, non-zero 8-byte span id (one `getrandbits` call)."""
    return (rng.getrandbits(64) or 1).to_bytes(8, "big")


def sample(parent: TraceContext | SamplingHint | None, ratio: float, rng: RandomSource) -> bool:
    """Parent-based sampling: the caller's decision if one came, else sampled with probability `ratio` (0.0..1.0)."""
    if parent is not None and parent.sampled is not None:
        return parent.sampled
    return rng.random() < ratio


def format_traceparent(trace_id: bytes, span_id: bytes, sampled: bool | None) -> bytes:
    """A version-00 `traceparent` value; undecided (None) is written as not sampled (flags 00)."""
    return _traceparent(hexlify(trace_id), hexlify(span_id), sampled)


def _traceparent(trace_hex: bytes, span_hex: bytes, sampled: bool | None) -> bytes:
    return b"00-" + trace_hex + b"-" + span_hex + (b"-01" if sampled else b"-00")


def inject(headers: list[tuple[bytes, bytes]], ctx: TraceContext, *, formats: Set[str]) -> None:
    """Replace, in place, every trace header in `headers` by `ctx` (the outgoing trace id, this hop's client span id,
    the decision and tracestate): W3C always, B3 multi and/or single when in `formats`. Other headers keep their
    order; the trace headers are appended."""
    for name, _ in headers:
        if name in _REMOVE:  # the common first hop carries none: then the list is not copied
            headers[:] = [h for h in headers if h[0] not in _REMOVE]
            break
    trace_hex = hexlify(ctx.trace_id)
    span_hex = hexlify(ctx.span_id)
    sampled = ctx.sampled
    headers.append((_TRACEPARENT, _traceparent(trace_hex, span_hex, sampled)))
    if ctx.tracestate:
        headers.append((_TRACESTATE, ctx.tracestate))
    if not formats:
        return
    b3_trace_hex = trace_hex[16:] if ctx.trace_id[:8] == _ZERO8 else trace_hex
    if B3_MULTI in formats:
        headers.append((_B3_TRACEID, b3_trace_hex))
        headers.append((_B3_SPANID, span_hex))
        if sampled is not None:
            headers.append((_B3_SAMPLED, b"1" if sampled else b"0"))
    if B3_SINGLE in formats:
        single = b3_trace_hex + b"-" + span_hex
        if sampled is not None:
            single += b"-1" if sampled else b"-0"
        headers.append((_B3, single))
