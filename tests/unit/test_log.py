"""JSON-lines logging and the access log: what lands on the stream."""

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from mesh import log

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

REQUEST_FIELDS: dict[str, Any] = {
    "direction": "outbound",
    "upstream": "api",
    "method": "GET",
    "authority": "api.mesh",
    "path": '/items/\u00fc"quoted"\n',
    "status": 503,
    "duration_s": 0.0123456789,
    "endpoint": "10.0.0.7:15001",
    "rx": 120,
    "tx": 4096,
    "mesh_error": "upstream connect timeout",
    "request_id": "0af7651916cd43dd8448eb211c80319c",
}

TCP_FIELDS: dict[str, Any] = {
    "direction": "inbound",
    "upstream": "db",
    "peer": "10.0.0.9:41000",
    "endpoint": None,
    "duration_s": 2.5,
    "rx": 10,
    "tx": 0,
    "mesh_error": None,
}


@pytest.fixture(autouse=True)
def _restore_structlog_defaults() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    log.reset_access_stream()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    log.flush_access_log()  # access lines are written in batches
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_events_are_json_lines_with_timestamp_level_event_and_logger_name() -> None:
    stream = io.StringIO()
    log.configure("info", stream)
    log.get_logger("mesh.discovery").info("endpoints changed", service="api", count=2)

    [event] = lines(stream)
    assert ISO_UTC.match(event.pop("ts"))
    assert event == {
        "level": "info",
        "event": "endpoints changed",
        "logger": "mesh.discovery",
        "service": "api",
        "count": 2,
    }
    assert list(event)[:3] == ["level", "event", "logger"]


def test_logger_made_before_configure_uses_the_configuration_in_force_at_first_use() -> None:
    module_level_logger = log.get_logger("early")
    stream = io.StringIO()
    log.configure("info", stream)
    module_level_logger.info("hello")
    assert lines(stream)[0]["logger"] == "early"


def test_level_filtering() -> None:
    stream = io.StringIO()
    log.configure("warning", stream)
    logger = log.get_logger("t")
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    assert [(e["level"], e["event"]) for e in lines(stream)] == [("warning", "w"), ("error", "e")]


def test_unknown_level_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown log level 'loud'.*debug, info"):
        log.configure("loud", io.StringIO())


def test_configure_twice_still_writes_each_event_once() -> None:
    stream = io.StringIO()
    log.configure("info", stream)
    log.configure("info", stream)
    log.get_logger("t").info("once")
    assert [e["event"] for e in lines(stream)] == ["once"]


def test_exception_is_rendered_into_the_event() -> None:
    stream = io.StringIO()
    log.configure("info", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.get_logger("t").exception("handler crashed")
    [event] = lines(stream)
    assert event["level"] == "error"
    assert "RuntimeError: boom" in event["exception"]


def test_access_log_request_emits_exactly_one_event_with_every_field() -> None:
    stream = io.StringIO()
    log.configure("info", stream)
    log.AccessLog(True, log.get_logger(log.ACCESS_LOGGER_NAME)).request(**REQUEST_FIELDS)

    [event] = lines(stream)
    assert ISO_UTC.match(event.pop("ts"))
    assert event == {
        "level": "info",
        "event": "request",
        "logger": "access",
        **REQUEST_FIELDS,
        "duration_s": 0.012346,
    }


def test_access_log_tcp_emits_one_tcp_connection_event() -> None:
    stream = io.StringIO()
    log.configure("info", stream)
    log.AccessLog(True, log.get_logger(log.ACCESS_LOGGER_NAME)).tcp(**TCP_FIELDS)

    [event] = lines(stream)
    del event["ts"]
    assert event == {"level": "info", "event": "tcp_connection", "logger": "access", **TCP_FIELDS}


def test_disabled_access_log_writes_nothing() -> None:
    stream = io.StringIO()
    log.configure("info", stream)
    access_log = log.AccessLog(False, log.get_logger(log.ACCESS_LOGGER_NAME))
    access_log.request(**REQUEST_FIELDS)
    access_log.tcp(**TCP_FIELDS)
    assert stream.getvalue() == ""


def test_access_log_is_kept_when_the_level_hides_info() -> None:
    stream = io.StringIO()
    log.configure("error", stream)
    log.AccessLog(True, log.get_logger(log.ACCESS_LOGGER_NAME)).request(**REQUEST_FIELDS)
    assert [e["event"] for e in lines(stream)] == ["request"]


def test_access_log_built_before_configure_writes_to_the_configured_stream() -> None:
    access_log = log.AccessLog(True, log.get_logger(log.ACCESS_LOGGER_NAME))
    stream = io.StringIO()
    log.configure("info", stream)
    access_log.tcp(**TCP_FIELDS)
    assert [e["event"] for e in lines(stream)] == ["tcp_connection"]


def test_access_log_accepts_any_structlog_logger() -> None:
    with structlog.testing.capture_logs() as captured:
        log.AccessLog(True, structlog.get_logger()).tcp(**TCP_FIELDS)
    assert captured == [{"event": "tcp_connection", "log_level": "info", **TCP_FIELDS}]


def test_access_log_without_configure_still_writes_json(capsys: pytest.CaptureFixture[str]) -> None:
    log.AccessLog(True, log.get_logger(log.ACCESS_LOGGER_NAME)).tcp(**TCP_FIELDS)
    log.flush_access_log()
    assert json.loads(capsys.readouterr().out)["event"] == "tcp_connection"
