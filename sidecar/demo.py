"""`mesh demo`: the example services of examples/, each beside its sidecar, as local child processes."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.config import ConfigError, SidecarConfig, dump_config, load_config, load_registry, parse_address

# The source checkout: mesh/, sidecar/ and examples/ side by side.
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DEMO_CONFIGS = ("web.yaml", "api.yaml")
REGISTRY = "registry.yaml"

# The ports the files in examples/demo/ use, in the order `--base-port N` maps them onto N, N+1, ...
PORT_LAYOUT = (
    (8080, "web app"),
    (8081, "api app"),
    (15000, "web sidecar inbound"),
    (15001, "api sidecar inbound"),
    (9001, "web sidecar outbound listener for api"),
    (9901, "web sidecar admin"),
    (9902, "api sidecar admin"),
)
PORT_COUNT = len(PORT_LAYOUT)

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0  # after SIGTERM, children still running this long later are killed
POLL_S = 0.1
LOG_TAIL_LINES = 15

# Readiness probes go straight to 127.0.0.1, never through an HTTP proxy named in the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DemoError(Exception):
    """The demo cannot start or keep running; the message says why in plain words."""


@dataclass
class Child:
    """One process of the demo: an example app (ready once its port accepts) or a sidecar (on /ready)."""

    name: str
    args: list[str]
    log_path: Path
    port: int  # the app's port, or the sidecar's admin port
    sidecar: bool
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        with self.log_path.open("wb") as log:
            # Its own process group: a Ctrl-C in the terminal reaches only `mesh demo`, which then stops
            # the children in order instead of every process handling the same SIGINT at once.
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
            )

    def exited(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def is_ready(self) -> tuple[bool, str]:
        """(ready, what the last probe saw)."""
        if not self.sidecar:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True, "accepting"
            except OSError as exc:
                return False, f"127.0.0.1:{self.port}: {exc.strerror or exc}"
        url = f"http://127.0.0.1:{self.port}/ready"
        try:
            with _opener.open(url, timeout=1) as response:
                return response.status == 200, f"{url}: {response.status}"
        except urllib.error.HTTPError as exc:
            with exc:
                return False, f"{url}: {exc.code} {exc.read().decode(errors='replace').strip()}"
        except OSError as exc:
            return False, f"{url}: {getattr(exc, 'reason', exc)}"

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError as exc:
            return f"    (cannot read {self.log_path}: {exc.strerror})"
        if not lines:
            return f"    ({self.log_path} is empty)"
        return "\n".join(f"    {line}" for line in lines)


def main(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Run the demo until SIGINT, SIGTERM or SIGHUP (or until `stop` is set); return the exit code.

    Without `stop` it installs signal handlers, so it must then run in the main thread."""
    if stop is None:
        stop = threading.Event()
        with _stop_on_signals(stop):
            return _run(args.base_port, stop)
    return _run(args.base_port, stop)


@dataclass(frozen=True)
class Rendered:
    """The demo's configs with ports shifted, written into a directory, and where each part listens."""

    directory: Path
    web: SidecarConfig
    api: SidecarConfig
    web_path: Path
    api_path: Path

    @property
    def web_to_api(self) -> int:
        return next(u.bind.port for u in self.web.upstreams if u.service == "api")


def render_configs(base_port: int, into: Path) -> Rendered:
    """Copy examples/demo/*.yaml into `into`, moving every port of PORT_LAYOUT to base_port + its index."""
    _check_base_port(base_port)
    demo = EXAMPLES / "demo"
    shift = {file_port: base_port + index for index, (file_port, _) in enumerate(PORT_LAYOUT)}
    try:
        registry = load_registry(demo / REGISTRY).model_dump(mode="json")
        configs = {name: dump_config(load_config(demo / name)) for name in DEMO_CONFIGS}
    except ConfigError as exc:
        raise DemoError(f"the demo's own configs in {demo} are broken:\n{exc}") from None
    _write_yaml(into / REGISTRY, _shift_ports(registry, shift, f"{demo / REGISTRY}"))
    for name, data in configs.items():
        data = _shift_ports(data, shift, f"{demo / name}")
        if data.get("discovery") and data["discovery"].get("file"):
            # Absolute, and the rendered registry rather than the original.
            data["discovery"]["file"] = str(into / REGISTRY)
        service = data["service"]["name"]
        data["identity"] = {"files": {k: str(into / "certs" / service / f"{k}.pem") for k in ("cert", "key", "bundle")}}
        _write_yaml(into / name, data)
    _issue_certificates(into, [configs[name]["service"]["name"] for name in DEMO_CONFIGS])
    try:
        web, api = (load_config(into / name) for name in DEMO_CONFIGS)
    except ConfigError as exc:
        raise DemoError(f"the configs rendered for --base-port {base_port} are invalid:\n{exc}") from None
    return Rendered(into, web, api, into / "web.yaml", into / "api.yaml")


def _issue_certificates(into: Path, services: list[str]) -> None:
    """A fresh mesh CA for this demo run, and a certificate for each service's sidecar."""
    from ca.authority import CAError, CertificateAuthority
    from ca.authority import write_file as write_ca_file

    try:
        authority = CertificateAuthority.init(into / "ca", "mesh.local")
        for service in services:
            issued = authority.issue(service)
            folder = into / "certs" / service
            folder.mkdir(parents=True, exist_ok=True)
            write_ca_file(folder / "cert.pem", issued.cert_pem)
            write_ca_file(folder / "key.pem", issued.key_pem or b"", private=True)
            write_ca_file(folder / "bundle.pem", issued.bundle_pem)
    except CAError as exc:
        raise DemoError(f"cannot create the demo's certificates: {exc}") from None


def _shift_ports(data: Any, shift: dict[int, int], source: str, path: str = "") -> Any:
    if isinstance(data, dict):
        return {
            key: _shift_address(value, shift, source, f"{path}.{key}" if path else str(key))
            if key in ("bind", "app", "address") and isinstance(value, str)
            else _shift_ports(value, shift, source, f"{path}.{key}" if path else str(key))
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [_shift_ports(item, shift, source, f"{path}[{i}]") for i, item in enumerate(data)]
    return data


def _shift_address(value: str, shift: dict[int, int], source: str, path: str) -> str:
    address = parse_address(value)
    if address.port not in shift:
        known = ", ".join(str(port) for port, _ in PORT_LAYOUT)
        raise DemoError(
            f"{source}: {path}: port {address.port} is not one of the demo's ports ({known}); "
            "add it to PORT_LAYOUT in sidecar/demo.py"
        )
    return str(address._replace(port=shift[address.port]))


def _write_yaml(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _check_base_port(base_port: int) -> None:
    if not 1 <= base_port <= 65536 - PORT_COUNT:
        raise DemoError(
            f"--base-port must be between 1 and {65536 - PORT_COUNT} (got {base_port}): "
            f"the demo uses {PORT_COUNT} consecutive ports from there"
        )


def check_ports_free(base_port: int) -> None:
    """Raise DemoError naming the first port of the demo's range that something already uses."""
    _check_base_port(base_port)
    for index, (_, role) in enumerate(PORT_LAYOUT):
        port = base_port + index
        with socket.socket() as probe:
            # Servers set SO_REUSEADDR, so a port only in TIME_WAIT is free for them: test it the same way.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                raise DemoError(
                    f"port {port} ({role}) is not free: {exc.strerror or exc}. The demo uses ports "
                    f"{base_port}-{base_port + PORT_COUNT - 1}; choose others with `mesh demo --base-port N` "
                    f"(uses N to N+{PORT_COUNT - 1})"
                ) from None


def _children(rendered: Rendered) -> list[Child]:
    python = sys.executable
    logs = rendered.directory
    web_app, api_app = rendered.web.service.app.port, rendered.api.service.app.port
    return [
        Child(
            "api app",
            [python, str(EXAMPLES / "api.py"), "--port", str(api_app)],
            logs / "api-app.log",
            api_app,
            sidecar=False,
        ),
        Child(
            "web app",
            [
                python,
                str(EXAMPLES / "web.py"),
                "--port",
                str(web_app),
                "--api-url",
                f"http://127.0.0.1:{rendered.web_to_api}",
            ],
            logs / "web-app.log",
            web_app,
            sidecar=False,
        ),
        Child(
            "api sidecar",
            [python, "-m", "mesh.cli", "sidecar", "run", "--config", str(rendered.api_path)],
            logs / "api-sidecar.log",
            rendered.api.admin.bind.port,
            sidecar=True,
        ),
        Child(
            "web sidecar",
            [python, "-m", "mesh.cli", "sidecar", "run", "--config", str(rendered.web_path)],
            logs / "web-sidecar.log",
            rendered.web.admin.bind.port,
            sidecar=True,
        ),
    ]


def _run(base_port: int, stop: threading.Event) -> int:
    try:
        _find_examples()
        check_ports_free(base_port)
        directory = Path(tempfile.mkdtemp(prefix="triomesh-demo-"))
    except DemoError as exc:
        print(f"mesh demo: {exc}", file=sys.stderr)
        return 1
    try:
        rendered = render_configs(base_port, directory)
    except DemoError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        print(f"mesh demo: {exc}", file=sys.stderr)
        return 1
    children = _children(rendered)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The sidecars run `python -m mesh.cli`: make the checkout importable even when triomesh is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    print(f"mesh demo: starting {len(children)} processes; configs and logs in {directory}", flush=True)
    try:
        for child in children:
            child.start(env)
        if not _wait_ready(children, stop):
            return 0  # stopped while starting
        print(_instructions(rendered), flush=True)
        while not stop.wait(POLL_S * 5):
            for child in children:
                if (status := child.exited()) is not None:
                    raise DemoError(
                        f"{child.name} {_exit_reason(status)}; last lines of {child.log_path}:\n{child.log_tail()}"
                    )
        print("mesh demo: stopping", flush=True)
        return 0
    except DemoError as exc:
        print(f"mesh demo: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        _stop_all(children)
        print(f"mesh demo: stopped; logs are in {directory}", flush=True)


def _find_examples() -> None:
    demo_files = (EXAMPLES / "demo" / name for name in (*DEMO_CONFIGS, REGISTRY))
    needed = [EXAMPLES / "api.py", EXAMPLES / "web.py", *demo_files]
    missing = [path for path in needed if not path.is_file()]
    if missing:
        raise DemoError(
            f"cannot find the demo's example services: {missing[0]} does not exist. `mesh demo` runs the "
            f"files in examples/ of the triomesh source checkout, next to the sidecar/ package "
            f"({ROOT}); install triomesh from a checkout (pip install -e .) to use it"
        )


def _wait_ready(children: list[Child], stop: threading.Event) -> bool:
    """Wait until every child is ready; False if `stop` was set first; DemoError if one exits or times out."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(children)
    last_seen: dict[str, str] = {}
    while pending:
        for child in list(pending):
            if (status := child.exited()) is not None:
                raise DemoError(
                    f"{child.name} {_exit_reason(status)} while starting; last lines of "
                    f"{child.log_path}:\n{child.log_tail()}"
                )
            ready, last_seen[child.name] = child.is_ready()
            if ready:
                pending.remove(child)
        if not pending:
            return True
        if time.monotonic() > deadline:
            child = pending[0]
            raise DemoError(
                f"{child.name} was not ready after {READY_TIMEOUT_S:g}s (last check: "
                f"{last_seen[child.name]}); last lines of {child.log_path}:\n{child.log_tail()}"
            )
        if stop.wait(POLL_S):
            return False
    return True


def _exit_reason(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _stop_all(children: list[Child]) -> None:
    """SIGTERM every running child, then SIGKILL those still running STOP_TIMEOUT_S later; reap them all."""
    running = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for child in running:
        assert child.proc is not None
        child.proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in running:
        assert child.proc is not None
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(
                f"mesh demo: {child.name} did not stop within {STOP_TIMEOUT_S:g}s of SIGTERM; killing it",
                file=sys.stderr,
                flush=True,
            )
            child.proc.kill()
            child.proc.wait()
    for child in children:
        if child.proc is not None:
            child.proc.wait()


def _instructions(r: Rendered) -> str:
    web_app, api_app = r.web.service.app.port, r.api.service.app.port
    web_in = r.web.inbound.bind.port if r.web.inbound else None
    out, web_admin, api_admin = r.web_to_api, r.web.admin.bind.port, r.api.admin.bind.port
    rows = [
        ("web app", f"curl -s http://127.0.0.1:{web_app}/", "web calls api through its sidecar"),
        ("through mesh", f"curl -s http://127.0.0.1:{out}/items", "web's sidecar → api's sidecar → api"),
        ("", f"curl -s http://127.0.0.1:{out}/headers", "what api received, x-mesh-peer-identity included"),
        ("retries", f"curl -s http://127.0.0.1:{out}/flaky", "api fails every other call; the caller sees 200"),
    ]
    if web_in is not None:
        rows.append(("mTLS only", f"curl -s http://127.0.0.1:{web_in}/", "refused: peers need a mesh certificate"))
    requests = "/metrics | grep mesh_requests_total"
    rows += [
        ("api app", f"curl -s http://127.0.0.1:{api_app}/items", "plain, no mesh"),
        ("admin", f"curl -s http://127.0.0.1:{web_admin}{requests}", "web's sidecar"),
        ("", f"curl -s http://127.0.0.1:{web_admin}/metrics | grep mesh_retries", "the retries web's sidecar made"),
        ("", f"curl -s http://127.0.0.1:{web_admin}/clusters", "web's sidecar's view of api"),
        ("", f"curl -s http://127.0.0.1:{web_admin}/certs", "web's identity, expiry and trust bundle"),
        ("", f"curl -s http://127.0.0.1:{api_admin}{requests}", "api's sidecar"),
    ]
    width = max(len(command) for _, command, _ in rows if len(command) <= 45)  # the long ones stick out
    lines = ["triomesh demo is running:"]
    lines += [f"  {label:<13}{command:<{width}}   ({note})" for label, command, note in rows]
    lines += [
        f"  {'configs':<13}{r.directory}/{{web,api}}.yaml",
        f"  {'mesh CA':<13}{r.directory}/ca   (try: mesh ca inspect {r.directory}/certs/web/cert.pem)",
        f"  {'registry':<13}{r.directory}/{REGISTRY}   (watched: edit it to add or remove endpoints)",
        f"  {'logs':<13}{r.directory}/*.log   (tail -f them to watch the access logs)",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """While active, SIGINT, SIGTERM and SIGHUP set `stop` instead of interrupting; then the old handlers."""
    previous = {
        signum: signal.signal(signum, lambda signum, frame: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
