"""Metrics: what the Prometheus exposition shows after recording."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.metrics import CONFIG_RELOAD_RESULTS, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_request_done_counts_by_status_class_and_records_duration_and_bytes() -> None:
    metrics = Metrics()
    metrics.request_done("outbound", "api", 200, 0.003, 100, 2000)
    metrics.request_done("outbound", "api", 204, 0.020, 50, 0)
    metrics.request_done("outbound", "api", 503, 1.5, 10, 30)

    assert value(metrics, "mesh_requests_total", direction="outbound", upstream="api", code_class="2xx") == 2
    assert value(metrics, "mesh_requests_total", direction="outbound", upstream="api", code_class="5xx") == 1
    duration = {"direction": "outbound", "upstream": "api"}
    assert value(metrics, "mesh_request_duration_seconds_count", **duration) == 3
    assert value(metrics, "mesh_request_duration_seconds_sum", **duration) == pytest.approx(1.523)
    assert value(metrics, "mesh_request_duration_seconds_bucket", **duration, le="0.005") == 1
    assert value(metrics, "mesh_request_duration_seconds_bucket", **duration, le="0.025") == 2
    assert value(metrics, "mesh_request_duration_seconds_bucket", **duration, le="+Inf") == 3
    assert value(metrics, "mesh_bytes_total", direction="outbound", upstream="api", flow="rx") == 160
    assert value(metrics, "mesh_bytes_total", direction="outbound", upstream="api", flow="tx") == 2030


def test_duration_buckets_span_half_a_millisecond_to_thirty_seconds() -> None:
    metrics = Metrics()
    metrics.request_done("inbound", "web", 200, 0.0001, 0, 0)
    bounds = sorted(
        float(dict(labels)["le"])
        for (name, labels) in samples(metrics)
        if name == "mesh_request_duration_seconds_bucket"
    )
    assert bounds[0] == 0.0005
    assert bounds[-2] == 30
    assert bounds[-1] == float("inf")


def test_tcp_done_counts_connections_and_bytes() -> None:
    metrics = Metrics()
    metrics.tcp_done("inbound", "db", 10, 20)
    metrics.tcp_done("inbound", "db", 5, 0)
    assert value(metrics, "mesh_tcp_connections_total", direction="inbound", upstream="db") == 2
    assert value(metrics, "mesh_bytes_total", direction="inbound", upstream="db", flow="rx") == 15
    assert value(metrics, "mesh_bytes_total", direction="inbound", upstream="db", flow="tx") == 20


def test_active_connections_go_up_and_down() -> None:
    metrics = Metrics()
    metrics.connection_opened("outbound", "api")
    metrics.connection_opened("outbound", "api")
    metrics.connection_closed("outbound", "api")
    assert value(metrics, "mesh_active_connections", direction="outbound", listener="api") == 1


def test_upstream_connection_events() -> None:
    metrics = Metrics()
    for event in ("opened", "reused", "reused", "closed_idle", "stale"):
        metrics.upstream_conn("api", event)
    assert value(metrics, "mesh_upstream_connections_total", upstream="api", event="reused") == 2
    assert value(metrics, "mesh_upstream_connections_total", upstream="api", event="stale") == 1
    with pytest.raises(ValueError, match="unknown upstream connection event 'lost'"):
        metrics.upstream_conn("api", "lost")


def test_requests_a_route_took_by_route_destination_and_status_class() -> None:
    metrics = Metrics()
    metrics.route_done("outbound", "api", "canary", "reviews{version=v2}", 200)
    metrics.route_done("outbound", "api", "canary", "reviews{version=v2}", 204)
    metrics.route_done("outbound", "api", "teapot", "", 418)
    labels = {"direction": "outbound", "listener": "api"}
    canary = {**labels, "route": "canary", "destination": "reviews{version=v2}", "code_class": "2xx"}
    assert value(metrics, "mesh_route_requests_total", **canary) == 2
    teapot = {**labels, "route": "teapot", "destination": "", "code_class": "4xx"}
    assert value(metrics, "mesh_route_requests_total", **teapot) == 1


def test_mirrored_copies_by_outcome() -> None:
    metrics = Metrics()
    for outcome in ("sent", "sent", "skipped"):
        metrics.mirrored("canary", "shadow", outcome)
    assert value(metrics, "mesh_mirrored_requests_total", route="canary", destination="shadow", outcome="sent") == 2
    assert value(metrics, "mesh_mirrored_requests_total", route="canary", destination="shadow", outcome="skipped") == 1


def test_mesh_errors_by_reason() -> None:
    metrics = Metrics()
    metrics.error("outbound", "api", "connect_timeout")
    metrics.error("outbound", "api", "connect_timeout")
    metrics.error("outbound", "api", "no_healthy_endpoints")
    labels = {"direction": "outbound", "upstream": "api"}
    assert value(metrics, "mesh_errors_total", **labels, reason="connect_timeout") == 2
    assert value(metrics, "mesh_errors_total", **labels, reason="no_healthy_endpoints") == 1


def test_error_reasons_are_a_bounded_set_of_codes() -> None:
    """Free text (a caller's SPIFFE ID, a parser message) never becomes a label value: one series per code."""
    metrics = Metrics()
    for n in range(50):
        metrics.error("inbound", "api", f"caller spiffe://mesh.local/ns/default/dc/dc1/svc/s{n} denied")
    metrics.error("inbound", "api", "denied")
    labels = {"direction": "inbound", "upstream": "api"}
    assert value(metrics, "mesh_errors_total", **labels, reason="other") == 50
    assert value(metrics, "mesh_errors_total", **labels, reason="denied") == 1
    series = [line for line in metrics.render()[0].decode().splitlines() if line.startswith("mesh_errors_total{")]
    assert len(series) == 2


def test_instances_do_not_share_samples() -> None:
    first, second = Metrics(), Metrics()
    first.request_done("outbound", "api", 200, 0.01, 1, 1)
    assert value(second, "mesh_requests_total", direction="outbound", upstream="api", code_class="2xx") is None


def test_every_metric_is_described_before_any_sample() -> None:
    body, _ = Metrics().render()
    help_lines = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# HELP")}
    assert help_lines == {
        "mesh_requests_total",
        "mesh_request_duration_seconds",
        "mesh_active_connections",
        "mesh_tcp_connections_total",
        "mesh_bytes_total",
        "mesh_upstream_connections_total",
        "mesh_route_requests_total",
        "mesh_mirrored_requests_total",
        "mesh_spans_total",
        "mesh_errors_total",
        "mesh_protocol_detected_total",
        "mesh_requests_unanswered_total",
        "mesh_tls_refused_total",
        "mesh_config_reloads_total",
        "mesh_config_reloads_created",  # its series exist from the start, so their creation times are shown
        "mesh_config_version",
        "mesh_config_loaded_timestamp_seconds",
    }


def test_config_reloads_are_counted_by_result_from_zero() -> None:
    metrics = Metrics()
    assert {result: value(metrics, "mesh_config_reloads_total", result=result) for result in CONFIG_RELOAD_RESULTS} == {
        "ok": 0,
        "refused": 0,
        "unchanged": 0,
    }
    metrics.config_reloaded("ok")
    metrics.config_reloaded("refused")
    metrics.config_reloaded("refused")
    assert value(metrics, "mesh_config_reloads_total", result="ok") == 1
    assert value(metrics, "mesh_config_reloads_total", result="refused") == 2
    assert value(metrics, "mesh_config_reloads_total", result="unchanged") == 0
    with pytest.raises(ValueError, match="unknown config reload result 'failed'"):
        metrics.config_reloaded("failed")


def test_config_loaded_sets_the_version_and_load_time_gauges() -> None:
    metrics = Metrics()
    metrics.config_loaded(1, 1_700_000_000.5)
    metrics.config_loaded(3, 1_700_000_060.25)
    assert value(metrics, "mesh_config_version") == 3
    assert value(metrics, "mesh_config_loaded_timestamp_seconds") == 1_700_000_060.25
