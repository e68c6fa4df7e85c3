"""`mesh ca ...` through mesh.cli.main: files written, exit codes, one-line errors, help with examples."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from ca import tokens
from ca.authority import CertificateAuthority
from mesh.cli import main

WEB_ID = "spiffe://mesh.local/ns/default/dc/dc1/svc/web"


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main(["ca", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, *parts: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert run(capsys, "init", "--dir", tmp_path / "ca", "--trust-domain", "mesh.local")[0] == 0
    return tmp_path / "ca"


def test_mesh_does_not_load_the_ca_until_a_ca_command_runs() -> None:
    code = "import sys, mesh.cli; mesh.cli._build_parser(); print(sorted({'ca', 'cryptography'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


@pytest.mark.parametrize("command", [[], ["init"], ["issue"], ["inspect"], ["rotate"], ["token"]])
def test_help_at_every_level_has_a_description_and_an_example(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert out.startswith(f"usage: mesh ca{''.join(' ' + c for c in command)} ")
    assert "\nexample" in out
    assert "\n  mesh ca " in out


def test_mesh_help_lists_ca_and_bare_ca_shows_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "    ca  " in capsys.readouterr().out
    code, out, err = run(capsys)
    assert code == 2 and out == ""
    assert "usage: mesh ca" in err and "rotate" in err and "token" in err


def test_init_then_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "init", "--dir", tmp_path / "ca", "--trust-domain", "mesh.local", "--intermediate")
    assert code == 0 and err == ""
    assert out.startswith(f"created a CA for trust domain mesh.local in {tmp_path / 'ca'}\n")
    assert "leaves are signed by its intermediate" in out
    assert CertificateAuthority.load(tmp_path / "ca").intermediate

    code, out, err = run(capsys, "init", "--dir", tmp_path / "ca", "--trust-domain", "other")
    assert code == 1 and out == ""
    one_line_error(err, f"mesh ca init: {tmp_path / 'ca'} already holds a CA")


def test_init_settings_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    code, _, err = run(capsys, "init", "--dir", d, "--trust-domain", "mesh.local", "--max-leaf-ttl", "12h")
    assert code == 0
    assert CertificateAuthority.load(d).max_leaf_ttl.total_seconds() == 12 * 3600
    code, _, err = run(
        capsys, "init", "--dir", tmp_path / "x", "--trust-domain", "mesh.local", "--bundle-refresh", "5x"
    )
    assert code == 2 and "argument --bundle-refresh: invalid duration '5x'" in err
    code, _, err = run(capsys, "init", "--dir", tmp_path / "y", "--trust-domain", "Bad Domain")
    assert code == 1
    one_line_error(err, "mesh ca init: invalid trust domain 'Bad Domain'")


def test_issue_writes_cert_key_and_bundle(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "certs" / "web"
    code, out, err = run(capsys, "issue", "--dir", ca_dir, "--service", "web", "--out", out_dir, "--ttl", "2h")
    assert code == 0 and err == ""
    assert out.startswith(f"issued {WEB_ID} (root 1), valid until ")
    assert stat.S_IMODE((out_dir / "key.pem").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in (out_dir / "cert.pem").read_bytes() and "PRIVATE" not in out
    leaf = x509.load_pem_x509_certificate((out_dir / "cert.pem").read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [WEB_ID]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 2 * 3600 + 60
    assert (out_dir / "bundle.pem").read_bytes() == CertificateAuthority.load(ca_dir).bundle_pem()

    # a re-issue replaces the files, and the key stays private
    (out_dir / "key.pem").chmod(0o644)
    argv = ["issue", "--dir", ca_dir, "--service", "api", "--out", out_dir, "--ttl", "100h", "--namespace", "prod"]
    code, out, err = run(capsys, *argv, "--datacenter", "eu-1")
    assert code == 0 and out.startswith("issued spiffe://mesh.local/ns/prod/dc/eu-1/svc/api (root 1)")
    assert err == "note: the lifetime was shortened to fit the CA's maximum leaf TTL of 72h\n"
    assert stat.S_IMODE((out_dir / "key.pem").stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate((out_dir / "cert.pem").read_bytes())
    assert leaf.subject.rfc4514_string() == "CN=api"


def test_issue_mistakes_are_one_line(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "issue", "--dir", tmp_path / "nope", "--service", "web", "--out", tmp_path / "o")
    assert code == 1
    one_line_error(err, "mesh ca issue: ", "nope does not exist; create a CA there with `mesh ca init")
    code, _, err = run(capsys, "issue", "--dir", ca_dir, "--service", "Web!", "--out", tmp_path / "o")
    assert code == 1
    one_line_error(err, "invalid service name 'Web!'")
    code, _, err = run(capsys, "issue", "--dir", ca_dir, "--service", "web", "--out", tmp_path / "o", "--ttl", "soon")
    assert code == 2 and "argument --ttl: invalid duration 'soon'" in err
    (tmp_path / "taken").write_text("a file")
    code, _, err = run(capsys, "issue", "--dir", ca_dir, "--service", "web", "--out", tmp_path / "taken")
    assert code == 1
    one_line_error(err, "mesh ca issue: ", "taken")


def test_inspect(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "issue", "--dir", ca_dir, "--service", "web", "--out", tmp_path / "web")
    code, out, err = run(capsys, "inspect", tmp_path / "web" / "cert.pem")
    assert code == 0 and err == ""
    assert f"SPIFFE ID:   {WEB_ID}\n" in out and "status:      valid now" in out and "fingerprint: SHA-256 " in out

    code, out, err = run(capsys, "inspect", tmp_path / "web" / "key.pem")
    assert code == 1 and out == ""
    one_line_error(err, f"mesh ca inspect: {tmp_path / 'web' / 'key.pem'}: it holds a private key and no certificate")
    code, _, err = run(capsys, "inspect", tmp_path / "missing.pem")
    assert code == 1
    one_line_error(err, "missing.pem: cannot read: No such file or directory")


def test_rotate_then_activate(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "rotate", "--dir", ca_dir)
    assert code == 0 and err == ""
    assert out.startswith("published root 2 (SHA-256 ")
    assert "root 1 keeps signing until" in out and "--activate" in out
    ca = CertificateAuthority.load(ca_dir)
    assert [r.id for r in ca.bundle()] == [1, 2] and ca.signing_root().id == 1

    code, _, err = run(capsys, "rotate", "--dir", ca_dir)
    assert code == 1
    one_line_error(err, "mesh ca rotate: root 2 is already waiting to take over")

    code, out, err = run(capsys, "rotate", "--dir", ca_dir, "--activate")
    assert code == 0 and out.startswith("root 2 signs from now on\n")
    assert "root 1 stays in the bundle until" in out
    assert CertificateAuthority.load(ca_dir).signing_root().id == 2

    code, _, err = run(capsys, "rotate", "--dir", ca_dir, "--activate")
    assert code == 1
    one_line_error(err, "mesh ca rotate: no new root is waiting to be activated")


def test_token_create_list_revoke(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "token", "--dir", ca_dir, "--service", "web", "--ttl", "1h")
    assert code == 0
    secret = out.strip()
    assert out == secret + "\n" and tokens.verify(ca_dir, secret) == "web"
    token_id = tokens.token_id(secret)
    assert err.startswith(f"token {token_id} for service web, valid for 1h;")

    code, out, err = run(capsys, "token", "--dir", ca_dir, "--list")
    assert code == 0 and secret not in out
    assert out.startswith(f"{token_id}  web ") and out.rstrip().endswith("active")

    code, out, _ = run(capsys, "token", "--dir", ca_dir, "--revoke", token_id)
    assert code == 0 and out.startswith(f"revoked token {token_id} for service web")
    with pytest.raises(tokens.TokenError, match="was revoked"):
        tokens.verify(ca_dir, secret)
    assert run(capsys, "token", "--dir", ca_dir, "--list")[1].rstrip().endswith("revoked")


def test_token_mistakes(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "token", "--dir", ca_dir)
    assert code == 2 and "one of the arguments --service --revoke --list is required" in err
    code, _, err = run(capsys, "token", "--dir", ca_dir, "--list", "--ttl", "1h")
    assert code == 1
    one_line_error(err, "mesh ca token: --ttl applies only when making a token with --service")
    code, _, err = run(capsys, "token", "--dir", ca_dir, "--revoke", "0123456789ab")
    assert code == 1
    one_line_error(err, "matches id 0123456789ab")
    code, out, err = run(capsys, "token", "--dir", ca_dir, "--list")
    assert code == 0 and out == "" and err == f"no tokens in {ca_dir}\n"
