"""Discovery: a watched registry file and static endpoints, published through watches (mock clock)."""

import os
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import CapturingLogger

from mesh.config import DiscoverySettings, EndpointSpec
from mesh.discovery import Endpoint, EndpointSet, FileDiscovery, StaticDiscovery, discovery_from_settings
from mesh.watch import Watch

POLL = 1.0

API_AND_DB = """
services:
  api:
    - {address: "10.0.0.1:15001", weight: 3, tags: [v1], meta: {zone: a}}
    - "10.0.0.2:15001"
  db:
    - "10.0.0.9:15002"
"""


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(API_AND_DB)
    return path


@pytest.fixture
def capture() -> CapturingLogger:
    return CapturingLogger()


def discovery(path: Path, capture: CapturingLogger) -> FileDiscovery:
    logger = structlog.wrap_logger(capture, processors=[], wrapper_class=structlog.make_filtering_bound_logger(0))
    return FileDiscovery(path, poll_interval=POLL, log=logger)


def replace(path: Path, text: str) -> None:
    """Rewrite atomically, as registry writers should (a new inode, so the change is seen at once)."""
    staging = path.with_suffix(".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def logged(capture: CapturingLogger, level: str) -> list[dict[str, object]]:
    return [call.kwargs for call in capture.calls if call.method_name == level]


async def changed(watch: Watch[EndpointSet | None], since: int) -> tuple[EndpointSet, int]:
    with trio.fail_after(10 * POLL):
        endpoint_set, version = await watch.wait_changed(since)
    assert endpoint_set is not None
    return endpoint_set, version


def addresses(endpoint_set: EndpointSet | None) -> list[str]:
    assert endpoint_set is not None
    return [str(endpoint) for endpoint in endpoint_set.endpoints]


async def test_initial_load_resolves_every_watched_service(
    registry: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = discovery(registry, capture)
    api = source.watch("api")
    assert api.value is None

    await nursery.start(source.run)

    assert api.value is not None
    assert api.value.source == f"file:{registry}"
    assert api.value.endpoints == (
        Endpoint("10.0.0.1", 15001, weight=3, tags=("v1",), meta={"zone": "a"}),
        Endpoint("10.0.0.2", 15001),
    )
    assert addresses(source.watch("db").value) == ["10.0.0.9:15002"]
    assert source.watch("api") is api
    [loaded] = logged(capture, "info")
    assert loaded["event"] == "registry loaded"
    assert loaded["services"] == 2


async def test_service_missing_from_the_file_resolves_to_no_endpoints(
    registry: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = discovery(registry, capture)
    await nursery.start(source.run)
    assert addresses(source.watch("billing").value) == []


async def test_rewriting_the_file_updates_the_watch(
    registry: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = discovery(registry, capture)
    api = source.watch("api")
    await nursery.start(source.run)
    db_version = source.watch("db").version

    replace(registry, API_AND_DB.replace("10.0.0.2", "10.0.0.3"))
    endpoint_set, version = await changed(api, api.version)
    assert addresses(endpoint_set) == ["10.0.0.1:15001", "10.0.0.3:15001"]
    assert source.watch("db").version == db_version  # unchanged services are not republished

    registry.write_text(API_AND_DB.replace('"10.0.0.2:15001"', '"10.0.0.22:15001"'))  # in place, new size
    endpoint_set, _ = await changed(api, version)
    assert addresses(endpoint_set)[1] == "10.0.0.22:15001"


async def test_broken_rewrite_keeps_the_last_good_set_and_warns_once_per_error(
    registry: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = discovery(registry, capture)
    api = source.watch("api")
    await nursery.start(source.run)
    good = api.value

    replace(registry, API_AND_DB.replace("10.0.0.2:15001", "10.0.0.2:99999"))
    await trio.sleep(10 * POLL)
    replace(registry, API_AND_DB.replace("10.0.0.2:15001", "10.0.0.2:99999") + "\n")  # same error again
    await trio.sleep(10 * POLL)

    assert api.value is not None and good is not None
    assert (api.value.endpoints, api.value.updated_at) == (good.endpoints, good.updated_at)
    [warning] = logged(capture, "warning")
    assert warning["event"] == "registry reload failed; keeping the last good endpoints"
    assert warning["file"] == str(registry)
    assert warning["errors"] == [f"{registry}: services.api[1].address: port 99999 out of range"]

    replace(registry, "services: [")
    await trio.sleep(10 * POLL)
    assert len(logged(capture, "warning")) == 2  # a different error is reported

    replace(registry, API_AND_DB.replace("10.0.0.2", "10.0.0.4"))
    endpoint_set, _ = await changed(api, api.version)
    assert addresses(endpoint_set) == ["10.0.0.1:15001", "10.0.0.4:15001"]


async def test_deleted_file_keeps_the_last_good_set(
    registry: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = discovery(registry, capture)
    api = source.watch("api")
    await nursery.start(source.run)
    good = api.value

    registry.unlink()
    await trio.sleep(10 * POLL)

    assert api.value is not None and good is not None
    assert api.value.endpoints is good.endpoints
    assert api.value.error == f"{registry}: cannot read file: No such file or directory"
    [warning] = logged(capture, "warning")
    assert warning["errors"] == [f"{registry}: cannot read file: No such file or directory"]


async def test_a_broken_file_marks_every_kept_set_stale_until_it_is_fixed(
    registry: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = discovery(registry, capture)
    api, db = source.watch("api"), source.watch("db")
    await nursery.start(source.run)
    good = api.value
    assert good is not None and good.error is None
    assert source.errors == {"api": None, "db": None}

    replace(registry, "services: [")
    stale, version = await changed(api, api.version)
    error = stale.error
    assert error is not None and error.startswith(f"{registry}: line 1, column ")  # the YAML error, as logged
    assert (stale.endpoints, stale.updated_at, stale.source) == (good.endpoints, good.updated_at, good.source)
    assert stale.endpoints is good.endpoints  # the same tuple: balancers keep their state
    assert db.value is not None and db.value.error == error
    assert source.errors == {"api": error, "db": error}

    replace(registry, API_AND_DB)  # fixed, with the same endpoints as before
    fresh, _ = await changed(api, version)
    assert fresh.error is None and fresh.endpoints is good.endpoints
    assert db.value is not None and db.value.error is None
    assert source.errors == {"api": None, "db": None}


async def test_removing_a_service_from_the_file_empties_its_set(
    registry: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = discovery(registry, capture)
    db = source.watch("db")
    await nursery.start(source.run)

    replace(registry, API_AND_DB.split("  db:")[0])
    endpoint_set, _ = await changed(db, db.version)
    assert endpoint_set.endpoints == ()


async def test_bad_file_at_start_leaves_services_unresolved_until_fixed(
    registry: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry.write_text("services: {api: [{address: nowhere}]}")
    source = discovery(registry, capture)
    api = source.watch("api")

    await nursery.start(source.run)  # started even though nothing resolved

    assert api.value is None
    [error] = logged(capture, "error")
    assert error["event"] == "registry unusable; its services stay unresolved"
    assert error["errors"] == [f"{registry}: services.api[0].address: expected host:port (got 'nowhere')"]
    assert source.errors == {"api": f"{registry}: services.api[0].address: expected host:port (got 'nowhere')"}

    replace(registry, API_AND_DB)
    endpoint_set, _ = await changed(api, api.version)
    assert len(endpoint_set.endpoints) == 2
    assert source.errors == {"api": None}


async def test_missing_file_at_start_is_reported_and_picked_up_when_created(
    tmp_path: Path,
    capture: CapturingLogger,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = tmp_path / "later.yaml"
    source = discovery(registry, capture)
    api = source.watch("api")
    await nursery.start(source.run)
    assert api.value is None
    assert len(logged(capture, "error")) == 1

    replace(registry, API_AND_DB)
    endpoint_set, _ = await changed(api, api.version)
    assert len(endpoint_set.endpoints) == 2


async def test_static_discovery_publishes_fixed_sets(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = StaticDiscovery({"api": [EndpointSpec(address="127.0.0.1:15001", weight=2)]})
    await nursery.start(source.run)

    api = source.watch("api").value
    assert api is not None
    assert api.source == "static"
    assert api.endpoints == (Endpoint("127.0.0.1", 15001, weight=2),)
    assert addresses(source.watch("unknown").value) == []
    assert source.errors == {}  # the config never fails


def test_discovery_from_settings_picks_the_configured_source(tmp_path: Path) -> None:
    static = discovery_from_settings(DiscoverySettings(static={"api": ["127.0.0.1:15001"]}))
    assert isinstance(static, StaticDiscovery)
    from_file = discovery_from_settings(DiscoverySettings(file=tmp_path / "registry.yaml"))
    assert isinstance(from_file, FileDiscovery)
    assert from_file.path == tmp_path / "registry.yaml"


def test_endpoint_is_hashed_by_address_and_reads_as_host_port() -> None:
    endpoint = Endpoint("::1", 15001, weight=5, meta={"zone": "a"})
    assert endpoint.key == ("::1", 15001)
    assert hash(endpoint) == hash(Endpoint("::1", 15001))
    assert str(endpoint) == "[::1]:15001"
    assert str(Endpoint("10.0.0.1", 80)) == "10.0.0.1:80"
    with pytest.raises(TypeError):
        endpoint.meta["zone"] = "b"  # type: ignore[index]
