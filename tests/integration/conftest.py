"""Integration fixtures: a real backend process and real `mesh sidecar run` processes on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.clients import backend_stats
from tests.ports import free_port

HERE = Path(__file__).parent
START_TIMEOUT = 20


class Process:
    """A child process whose stderr lines are collected by a thread; `wait_for` blocks on a line appearing."""

    def __init__(self, args: list[str], *, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = START_TIMEOUT) -> str:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None, timeout
            )
            for line in self.lines:
                if text in line:
                    return line
        raise AssertionError(
            f"{self.name}: {text!r} not seen (exited={self.proc.poll()}, found={found}):\n"
            + "\n".join(self.lines[-30:])
        )

    def wait_for_count(self, text: str, count: int, timeout: float = START_TIMEOUT) -> None:
        """Block until `text` has appeared in at least `count` lines."""
        with self._changed:
            if not self._changed.wait_for(lambda: sum(text in line for line in self.lines) >= count, timeout):
                raise AssertionError(
                    f"{self.name}: {text!r} seen fewer than {count} times:\n" + "\n".join(self.lines[-30:])
                )

    def events(self, event: str) -> list[dict]:
        out = []
        with self._changed:
            lines = list(self.lines)
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                out.append(record)
        return out

    def memory_kib(self, field: str = "VmRSS") -> int:
        """VmRSS (now) or VmHWM (peak) of the process, in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@pytest.fixture(scope="session")
def backend() -> Iterator[dict[str, int]]:
    proc = subprocess.Popen([sys.executable, str(HERE / "backend.py")], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ports = json.loads(proc.stdout.readline())
    yield ports
    proc.kill()
    proc.wait()
    proc.stdout.close()


class NamedBackend:
    """A backend.py process of its own, started with `--name` (and `--delay`): its `/whoami` answers the name, so a
    test can tell which endpoint served a request; `count(tag)` is how many `/whoami?tag=` requests it saw."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        args = [sys.executable, str(HERE / "backend.py"), "--name", name, "--delay", str(delay)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE)
        self._ports: dict[str, int] | None = None

    @property
    def ports(self) -> dict[str, int]:
        if self._ports is None:
            assert self.proc.stdout is not None
            self._ports = json.loads(self.proc.stdout.readline())
        return self._ports

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    def stats(self) -> dict:
        return backend_stats(self.ports["http"])

    def count(self, tag: str) -> int:
        return self.stats()["whoami"].get(tag, 0)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_backends(*specs: str | tuple[str, float]) -> dict[str, NamedBackend]:
    """Named backends (a name, or (name, delay)), started together; close each when done."""
    started = [NamedBackend(*((spec,) if isinstance(spec, str) else spec)) for spec in specs]
    try:
        for one in started:
            _ = one.ports
    except BaseException:
        for one in started:
            one.close()
        raise
    return {one.name: one for one in started}


def sidecar_config(**overrides: object) -> dict:
    config: dict = {
        "service": {"name": "test", "app": "127.0.0.1:1"},
        "admin": {"bind": f"127.0.0.1:{free_port()}"},
        "shutdown": {"drain_timeout": "10s"},
        "log": {"level": "info", "access_log": True},
    }
    config.update(overrides)
    return config


class Mesh:
    """Starts sidecar processes from config dicts and stops them all at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Process] = []

    def config_path(self, name: str = "sidecar") -> Path:
        """The file the sidecar `name` was started from (what a reload re-reads)."""
        return self.tmp_path / f"{name}.yaml"

    def write_config(self, config: dict, name: str = "sidecar") -> Path:
        """Write (or rewrite, before a reload) the config file of the sidecar `name`."""
        path = self.config_path(name)
        path.write_text(yaml.safe_dump(config))
        return path

    def sidecar(self, config: dict, name: str = "sidecar") -> Process:
        path = self.write_config(config, name)
        proc = Process([sys.executable, "-m", "mesh.cli", "sidecar", "run", "--config", str(path)], name=name)
        self.procs.append(proc)
        proc.wait_for('"event": "sidecar ')  # "sidecar ready", or "sidecar started, not ready" and why
        return proc

    def pair(
        self, app_port: int, *, protocol: str = "http", outbound: dict | None = None, inbound: dict | None = None
    ) -> tuple[int, Process, Process]:
        """outbound sidecar (client app side) → inbound sidecar → app; returns (outbound port, out, in)."""
        in_port, out_port = free_port(), free_port()
        server = sidecar_config(
            service={"name": "api", "app": f"127.0.0.1:{app_port}", "protocol": protocol},
            inbound={"bind": f"127.0.0.1:{in_port}", "tls": "off", **(inbound or {})},
        )
        client = sidecar_config(
            service={"name": "web", "app": "127.0.0.1:1"},
            upstreams=[
                {
                    "service": "api",
                    "bind": f"127.0.0.1:{out_port}",
                    "protocol": protocol,
                    "tls": "off",
                    **(outbound or {}),
                }
            ],
            discovery={"static": {"api": [f"127.0.0.1:{in_port}"]}},
        )
        inbound_proc = self.sidecar(server, "inbound")
        outbound_proc = self.sidecar(client, "outbound")
        return out_port, outbound_proc, inbound_proc

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.close()


os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="module")
def http_pair(backend: dict[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Mesh]]:
    """One outbound → inbound → backend pair shared by a module's tests: (outbound port, mesh)."""
    m = Mesh(tmp_path_factory.mktemp("pair"))
    port, _, _ = m.pair(backend["http"])
    yield port, m
    m.close()
