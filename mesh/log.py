"""Structured logging: JSON lines through structlog, and the per-request access log."""

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

ACCESS_LOGGER_NAME = "access"

_encode_json_string = json.encoder.encode_basestring_ascii


def _make_compact_json_encoder() -> Callable[[Any], str]:
    """`json.dumps(obj, separators=(",", ":"), default=str)`, minus the cost of building an encoder per call.

    That cost (a Python-level `JSONEncoder.encode` plus a new C encoder) is about half of what encoding a
    small access event takes; the C encoder json itself uses is built once here instead.
    """
    if json.encoder.c_make_encoder is None:  # an interpreter without the _json accelerator
        return json.JSONEncoder(separators=(",", ":"), check_circular=False, default=str).encode
    c_encoder = json.encoder.c_make_encoder(None, str, _encode_json_string, None, ":", ",", False, False, True)
    return lambda obj: "".join(c_encoder(obj, 0))


_encode_compact_json = _make_compact_json_encoder()


class _TimestampFormatter:
    """ISO 8601 UTC with microseconds, `2025-01-31T12:00:00.123456Z`; the date is formatted once a second."""

    __slots__ = ("_second", "_second_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._second_prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return "%s.%06dZ" % (self._second_prefix, (now - second) * 1_000_000)  # noqa: UP031 (faster than f"")


_timestamps = _TimestampFormatter()
_AccessLevelLogger = structlog.make_filtering_bound_logger(logging.INFO)


class _NamedWriteLogger(structlog.WriteLogger):
    """A structlog WriteLogger that remembers the name given to `structlog.get_logger(name)`."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    __slots__ = ("_stream",)

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._stream, args[0] if args else None)


def _add_leading_keys(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    """Add `ts`, `level` and `logger`, and put them and `event` first so that the JSON lines read well."""
    event_dict = {
        "ts": _timestamps.now(),
        "level": method_name,
        "event": event_dict.pop("event"),
        "logger": getattr(logger, "name", None),
        **event_dict,
    }
    if event_dict["logger"] is None:
        del event_dict["logger"]
    return event_dict


def _render_access_event(_logger: Any, method_name: str, event_dict: EventDict) -> str:
    """The access logger's whole processor chain: a fixed head, then one pass of the C JSON encoder."""
    head = (
        f'{{"ts":"{_timestamps.now()}","level":"{method_name}",'
        f'"event":{_encode_json_string(event_dict.pop("event"))},"logger":"{ACCESS_LOGGER_NAME}"'
    )
    return head + "," + _encode_compact_json(event_dict)[1:] if event_dict else head + "}"


class _AccessWriter:
    """Collects rendered access-log lines and writes them in batches: one write per batch, not per request.

    A batch is written when it reaches 64 KiB or when `flush_access_log()` is called (the sidecar does so
    every 200 ms and at exit), so a line appears at most that late."""

    name = ACCESS_LOGGER_NAME
    limit = 65536

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream  # None: standard output, as structlog writes before `configure`
        self.lines: list[str] = []
        self.size = 0

    def msg(self, message: str) -> None:
        self.lines.append(message)
        self.size += len(message)
        if self.size >= self.limit:
            self.flush()

    info = msg

    def flush(self) -> None:
        if self.lines:
            lines, self.lines, self.size = self.lines, [], 0
            stream = self.stream or sys.stdout
            stream.write("\n".join(lines) + "\n")
            stream.flush()


_access_writer = _AccessWriter(None)


def flush_access_log() -> None:
    """Write out the access-log lines collected so far."""
    _access_writer.flush()


def reset_access_stream() -> None:
    """Flush, then send access lines to standard output again, as before `configure` (for tests)."""
    _access_writer.flush()
    _access_writer.stream = None


def _level_number(level: str) -> int:
    try:
        return logging.getLevelNamesMapping()[level.upper()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning, error or critical") from None


RUNTIME_LEVELS = ("debug", "info", "warning", "error")
"""The levels `set_level` takes (`configure` also takes critical)."""

_LevelFilteringLogger: type = type("BoundLoggerFilteringAtRunTimeLevel", (structlog.BoundLoggerBase,), {})
"""The bound-logger class of every logger `configure` makes. Its level methods are those of structlog's filtering
logger for the level in force (those below it do nothing), copied onto it by `_use_level`: as loggers are cached
on first use, a level changed at run time must change the class they already hold, not the configuration."""

_level = "info"


def _use_level(level: str) -> None:
    global _level
    number = _level_number(level)
    for name, method in vars(structlog.make_filtering_bound_logger(number)).items():
        if not name.startswith("_"):
            setattr(_LevelFilteringLogger, name, method)
    _level = logging.getLevelName(number).lower()


_use_level(_level)


def current_level() -> str:
    """The lowest level logged now: the configured one, or the last `set_level`."""
    return _level


def set_level(level: str) -> str:
    """Change the lowest level logged, at run time, for every logger `configure` made (those already in use too);
    returns the level in force before. One of RUNTIME_LEVELS, in any case; ValueError otherwise. The access log
    is not affected (see `get_logger`), and the change lasts until the next `configure` (a restart)."""
    name = level.strip().lower()
    if name not in RUNTIME_LEVELS:
        raise ValueError(f"unknown log level {level!r}; use {', '.join(RUNTIME_LEVELS)}")
    was = _level
    _use_level(name)
    return was


def configure(level: str = "info", stream: TextIO = sys.stderr) -> None:
    """Send every structlog logger's events to `stream` as JSON lines, dropping those below `level`.

    Calling it again replaces the previous configuration, so equal arguments give the same result. Loggers
    keep the configuration they had on first use (configure before logging), but the level is shared: `level`
    and a later `set_level` apply to every logger made by any `configure`.
    """
    processors: list[Processor] = [
        _add_leading_keys,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ]
    _use_level(level)
    _access_writer.flush()
    _access_writer.stream = stream
    structlog.configure(
        processors=processors,
        wrapper_class=_LevelFilteringLogger,
        logger_factory=_NamedWriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A structlog logger whose events carry `logger=name`.

    It takes its configuration on first use, so a module-level `log = get_logger(__name__)` is fine; the
    name travels with the wrapped logger (as in structlog's stdlib integration) because binding it here
    would fix the configuration at import time.

    The logger named `ACCESS_LOGGER_NAME` ("access"), which `AccessLog` writes through, has a processor
    chain of its own: one step that renders its flat events, about 30 % cheaper than the general chain.
    It also ignores the configured level: access logging is switched by `AccessLog(enabled=...)`, so that a
    sidecar logging only warnings can keep its access log.
    """
    if name == ACCESS_LOGGER_NAME:
        return structlog.wrap_logger(
            _access_writer,
            processors=[_render_access_event],
            wrapper_class=_AccessLevelLogger,
        )
    return structlog.get_logger(name)


class AccessLog:
    """Emits exactly one event per proxied HTTP request ("request") or TCP connection ("tcp_connection").

    `logger` is normally `get_logger(ACCESS_LOGGER_NAME)`; any structlog logger works. Durations are logged
    in seconds, rounded to the microsecond.
    """

    __slots__ = ("enabled", "logger")

    def __init__(self, enabled: bool, logger: Any) -> None:
        self.enabled = enabled
        self.logger = logger

    def request(
        self,
        *,
        direction: str,
        upstream: str,
        method: str,
        authority: str,
        path: str,
        status: int,
        duration_s: float,
        endpoint: str | None,
        rx: int,
        tx: int,
        mesh_error: str | None,
        request_id: str | None,
        route: str = "",
        trace_id: str = "",
    ) -> None:
        if self.enabled:
            extra = {"route": route} if route else {}  # only listeners with routes name one
            if trace_id:  # only traced requests have one
                extra["trace_id"] = trace_id
            self.logger.info(
                "request",
                direction=direction,
                upstream=upstream,
                method=method,
                authority=authority,
                path=path,
                status=status,
                duration_s=round(duration_s, 6),
                endpoint=endpoint,
                rx=rx,
                tx=tx,
                mesh_error=mesh_error,
                request_id=request_id,
                **extra,
            )

    def tcp(
        self,
        *,
        direction: str,
        upstream: str,
        peer: str,
        endpoint: str | None,
        duration_s: float,
        rx: int,
        tx: int,
        mesh_error: str | None,
    ) -> None:
        if self.enabled:
            self.logger.info(
                "tcp_connection",
                direction=direction,
                upstream=upstream,
                peer=peer,
                endpoint=endpoint,
                duration_s=round(duration_s, 6),
                rx=rx,
                tx=tx,
                mesh_error=mesh_error,
            )
