"""The `mesh` command line: version, config check output and exit codes, dispatch to sidecar and demo."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import mesh
import sidecar
from mesh.cli import DEFAULT_DEMO_BASE_PORT, main
from mesh.config import SidecarConfig, dump_config, load_config

FIXTURES = Path(__file__).parent.parent / "fixtures" / "configs"


@pytest.fixture
def in_fixtures(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(FIXTURES)
    return FIXTURES


def fake_sidecar_module(monkeypatch: pytest.MonkeyPatch, name: str, **functions: object) -> None:
    """Stand in for sidecar.<name>, whether or not the real module exists or was imported already."""
    module = types.ModuleType(f"sidecar.{name}")
    module.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, f"sidecar.{name}", module)
    monkeypatch.setattr(sidecar, name, module, raising=False)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mesh (triomesh) {mesh.__version__}\n"


@pytest.mark.parametrize("argv", [[], ["config"], ["sidecar"]])
def test_missing_subcommand_shows_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 2
    assert "usage: mesh" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--help"], ["config", "check", "--help"], ["sidecar", "run", "--help"], ["demo", "-h"]]
)
def test_help_has_an_example(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: mesh" in out
    assert "\nexample" in out


def test_config_check_ok(capsys: pytest.CaptureFixture[str], in_fixtures: Path) -> None:
    assert main(["config", "check", "valid-web.yaml"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "valid-web.yaml: ok\n"
    assert yaml.safe_load(captured.out) == dump_config(load_config("valid-web.yaml"))
    assert "timeouts:\n    connect: 250ms\n" in captured.out


def test_config_check_broken(capsys: pytest.CaptureFixture[str], in_fixtures: Path) -> None:
    assert main(["config", "check", "broken-port.yaml"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "broken-port.yaml: upstreams[1].bind: port 99999 out of range\n"


def test_config_check_prints_every_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text("service: {name: web, app: 127.0.0.1:8080, protocol: udp}\nlog: {level: loud}\n")
    assert main(["config", "check", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: service.protocol: must be one of: 'http', 'http2', 'grpc', 'tcp' (got 'udp')",
        f"{path}: log.level: must be one of: 'debug', 'info', 'warning', 'error' (got 'loud')",
    ]


def test_config_check_missing_file(capsys: pytest.CaptureFixture[str], in_fixtures: Path) -> None:
    assert main(["config", "check", "nope.yaml"]) == 1
    assert capsys.readouterr().err == "nope.yaml: cannot read file: No such file or directory\n"


def test_sidecar_run_hands_the_config_to_the_app(monkeypatch: pytest.MonkeyPatch, in_fixtures: Path) -> None:
    received: list[tuple[SidecarConfig, Path | None]] = []

    def run(config: SidecarConfig, source: Path | None = None) -> int:
        received.append((config, source))
        return 3

    fake_sidecar_module(monkeypatch, "app", run=run)
    assert main(["sidecar", "run", "--config", "valid-static.yaml"]) == 3
    assert received == [(load_config("valid-static.yaml"), Path("valid-static.yaml"))]  # the file, for reloads


def test_sidecar_run_with_a_broken_config_never_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, in_fixtures: Path
) -> None:
    fake_sidecar_module(monkeypatch, "app", run=lambda config, source=None: pytest.fail("started with a broken config"))
    assert main(["sidecar", "run", "--config", "broken-missing-discovery.yaml"]) == 1
    assert capsys.readouterr().err == (
        "broken-missing-discovery.yaml: discovery: required when upstreams are configured\n"
    )


@pytest.mark.parametrize(("argv", "base_port"), [([], DEFAULT_DEMO_BASE_PORT), (["--base-port", "28000"], 28000)])
def test_demo(monkeypatch: pytest.MonkeyPatch, argv: list[str], base_port: int) -> None:
    ports: list[int] = []
    fake_sidecar_module(monkeypatch, "demo", main=lambda args: ports.append(args.base_port) or 0)
    assert main(["demo", *argv]) == 0
    assert ports == [base_port]


def test_console_command_reports_a_broken_file_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "config", "check", "broken-unknown-key.yaml"],
        cwd=FIXTURES,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "broken-unknown-key.yaml: upstreams[0].timeout: unknown field 'timeout' "
        "(allowed: service, protocol, mesh_http2, tls, identity, timeouts, pool, balancer, outlier, circuit_breakers, "
        "retries, hedging, health_check, bind, upgrades, limits, routes)\n"
    )


def test_config_check_warns_about_missing_files_and_still_succeeds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "service: {name: web, app: 127.0.0.1:8080}\n"
        "inbound: {bind: 127.0.0.1:15000, allow: [frontend]}\n"
        "identity: {files: {cert: cert.pem, key: key.pem, bundle: bundle.pem}}\n"
    )
    (tmp_path / "key.pem").write_text("a key")
    assert main(["config", "check", str(path)]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["identity"]["files"]["cert"] == str(tmp_path / "cert.pem")
    not_ready = "the sidecar is not ready, and refuses mutual TLS, until it can read it"
    assert captured.err.splitlines() == [
        f"{path}: identity.files.cert: warning: {tmp_path}/cert.pem does not exist: {not_ready}",
        f"{path}: identity.files.bundle: warning: {tmp_path}/bundle.pem does not exist: {not_ready}",
        f"{path}: ok, with 2 warnings",
    ]


def test_config_check_warns_about_an_inbound_that_admits_the_whole_trust_domain(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in ("cert", "key", "bundle"):
        (tmp_path / f"{name}.pem").write_text(name)
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "service: {name: web, app: 127.0.0.1:8080}\n"
        "inbound: {bind: 127.0.0.1:15000}\n"
        "identity: {files: {cert: cert.pem, key: key.pem, bundle: bundle.pem}}\n"
    )
    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: inbound.allow: warning: the inbound listener admits every identity of trust domain 'mesh.local': "
        "inbound.allow is empty and mesh.default_policy is allow; list the callers in inbound.allow, or set "
        "mesh.default_policy: deny to admit none by default",
        f"{path}: ok, with 1 warning",
    ]


def test_config_check_redacts_secrets(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "service: {name: web, app: 127.0.0.1:8080}\n"
        "upstreams: [{service: api, bind: 127.0.0.1:9001, tls: off}]\n"
        "discovery: {consul: {}}\n"
        "consul: {address: 127.0.0.1:8500, token: s3cret-acl-token}\n"
    )
    assert main(["config", "check", str(path)]) == 0
    captured = capsys.readouterr()
    assert "s3cret-acl-token" not in captured.out + captured.err
    assert yaml.safe_load(captured.out)["consul"]["token"] == "<redacted>"


def test_config_check_help_says_warnings_keep_status_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "warning" in help_text and "exit status stays 0" in help_text
    assert "secrets redacted" in help_text
