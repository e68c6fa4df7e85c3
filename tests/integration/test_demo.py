"""`mesh demo` as a user runs it: real processes, the printed curl commands work, Ctrl-C stops everything."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import yaml

from mesh.config import load_config, load_registry
from sidecar import demo as demo_module
from sidecar.demo import EXAMPLES, PORT_COUNT, render_configs
from tests.ports import free_port_range

START_TIMEOUT_S = 60  # generous: four Python processes start on a possibly loaded CI machine
STOP_TIMEOUT_S = 30  # the demo's own bound is 10 s of SIGTERM grace, plus the sidecars' drain

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an environment HTTP proxy


class Demo:
    """`python -m mesh.cli demo` with its stdout and stderr collected line by line by threads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe: IO[bytes], into: list[str]) -> None:
        with pipe:
            for raw in pipe:
                with self._changed:
                    into.append(raw.decode(errors="replace").rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_output(self, text: str, timeout: float = START_TIMEOUT_S) -> None:
        with self._changed:
            self._changed.wait_for(
                lambda: any(text in line for line in self.out) or self.proc.poll() is not None, timeout
            )
            if not any(text in line for line in self.out):
                status = self.proc.poll()
                raise AssertionError(f"{text!r} not printed (exit status {status}):\n{self.output()}")

    def url(self, label: str, path: str) -> str:
        """The URL of the printed `curl` line whose label (or URL path) matches."""
        for line in self.out:
            match = re.search(r"curl -s (http://127\.0\.0\.1:\d+)(/\S*)", line)
            if match and (line.strip().startswith(label) or not label) and match.group(2) == path:
                return match.group(1) + path
        raise AssertionError(f"no printed curl line for {label!r} {path}:\n{self.output()}")

    def output(self) -> str:
        with self._changed:
            return "\n".join(["stdout:", *self.out, "stderr:", *self.err])

    def finish(self, timeout: float = STOP_TIMEOUT_S) -> int:
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"mesh demo did not stop within {timeout}s:\n{self.output()}") from None
        for reader in self._readers:
            reader.join(5)
        return status


def children_of(pid: int) -> list[int]:
    """The pids of `pid`'s direct children, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; field 2, the command name, may contain spaces, so split after its ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], object]:
    with _opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        return response.status, dict(response.headers.items()), json.load(response)


@pytest.fixture
def demo() -> Iterator[tuple[Demo, int]]:
    base = free_port_range(PORT_COUNT)
    running = Demo("--base-port", str(base))
    yield running, base
    if running.proc.poll() is None:  # the test failed before stopping it: still leave nothing behind
        running.proc.send_signal(signal.SIGINT)
        running.finish()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the demo's children through /proc")
def test_demo_serves_through_the_mesh_and_stops_cleanly_on_ctrl_c(demo: tuple[Demo, int]) -> None:
    running, base = demo
    running.wait_for_output("Press Ctrl-C to stop.")
    assert any("triomesh demo is running:" in line for line in running.out)
    children = children_of(running.proc.pid)
    assert len(children) == 4, running.output()  # two example apps, two sidecars

    # app → web's sidecar → api's sidecar → api, exactly as printed for the user
    status, _, items = get(running.url("through mesh", "/items"))
    assert status == 200
    _, _, direct_items = get(running.url("api app", "/items"))
    assert items == direct_items and isinstance(items, list) and items

    forged = {"x-mesh-hop-count": "forged", "x-request-id": "demo-test-1"}
    status, _, seen = get(running.url("", "/headers"), forged)
    assert status == 200 and isinstance(seen, dict)
    received = {name.lower(): value for name, value in seen["headers"].items()}
    assert received["x-request-id"] == "demo-test-1"  # a caller's request id travels unchanged
    assert "127.0.0.1" in received["x-forwarded-for"]
    # The forged header was stripped; the only x-mesh-* header is the caller's identity, verified over mTLS.
    assert [name for name in received if name.startswith("x-mesh-")] == ["x-mesh-peer-identity"]
    assert received["x-mesh-peer-identity"] == "spiffe://mesh.local/ns/default/dc/dc1/svc/web"

    _, _, seen = get(running.url("", "/headers"))
    assert isinstance(seen, dict)
    made_by_the_mesh = {"x-request-id", "x-forwarded-for"}
    assert {name.lower() for name in seen["headers"]} >= made_by_the_mesh

    # api's /flaky fails every other call; through the mesh each call succeeds, the failures retried
    flaky = [get(running.url("retries", "/flaky"))[0] for _ in range(4)]
    assert flaky == [200] * 4
    with _opener.open(f"http://127.0.0.1:{base + PORT_COUNT - 2}/metrics", timeout=10) as response:
        retries = [line for line in response.read().decode().splitlines() if line.startswith("mesh_retries_total")]
    assert retries and retries[0].startswith('mesh_retries_total{reason="status_503",upstream="api"}')

    # the web app calls api through its own sidecar
    status, _, page = get(running.url("web app", "/"))
    assert status == 200 and isinstance(page, dict)
    assert page["service"] == "web" and page["api_said"]["service"] == "api"

    # web's inbound speaks mutual TLS only: a plaintext caller gets no answer at all
    with pytest.raises((ConnectionError, OSError)):
        get(running.url("mTLS only", "/"))

    with _opener.open(f"http://127.0.0.1:{base + PORT_COUNT - 2}/ready", timeout=10) as response:
        assert response.status == 200  # web's sidecar admin: the last two ports are the admin listeners

    running.proc.send_signal(signal.SIGINT)
    assert running.finish() == 0, running.output()
    assert any("stopped" in line for line in running.out)
    assert [pid for pid in children if alive(pid)] == []
    assert not [line for line in running.err if "Traceback" in line], running.output()


def test_demo_names_a_taken_port_and_suggests_base_port() -> None:
    base = free_port_range(PORT_COUNT)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 4))
        squatter.listen()
        running = Demo("--base-port", str(base))
        assert running.finish() == 1
    stderr = "\n".join(running.err)
    assert f"port {base + 4} (web sidecar outbound listener for api) is not free" in stderr
    assert "--base-port" in stderr


def test_rendered_configs_move_every_port_into_the_base_port_range(tmp_path: Path) -> None:
    base = 31000
    rendered = render_configs(base, tmp_path)
    expected = set(range(base, base + PORT_COUNT))
    ports = set()
    for name in ("web.yaml", "api.yaml"):
        config = load_config(tmp_path / name)  # valid as written, not just as returned
        ports |= {config.service.app.port, config.admin.bind.port}
        ports |= {config.inbound.bind.port} if config.inbound else set()
        ports |= {upstream.bind.port for upstream in config.upstreams}
    assert ports == expected
    assert rendered.web.discovery is not None and rendered.web.discovery.file == tmp_path / "registry.yaml"
    registry = load_registry(tmp_path / "registry.yaml")
    assert rendered.api.inbound is not None
    assert [e.address for e in registry.services["api"]] == [rendered.api.inbound.bind]
    # every mesh hop runs mutual TLS with certificates the demo's own CA issued
    assert yaml.safe_load((tmp_path / "web.yaml").read_text())["inbound"]["tls"] == "mutual"
    assert rendered.web.identity is not None and rendered.web.identity.files is not None
    assert b"BEGIN CERTIFICATE" in rendered.web.identity.files.cert.read_bytes()


def test_example_configs_are_valid_as_shipped() -> None:
    for name in ("web.yaml", "api.yaml"):
        load_config(EXAMPLES / "demo" / name)
    load_registry(EXAMPLES / "demo" / "registry.yaml")


def test_demo_without_example_files_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo_module, "EXAMPLES", Path("/nonexistent/examples"))
    args = argparse.Namespace(base_port=free_port_range(PORT_COUNT))
    assert demo_module.main(args, stop=threading.Event()) == 1
    err = capsys.readouterr().err
    assert "/nonexistent/examples/api.py does not exist" in err
    assert "source checkout" in err
