"""`mesh ca ...`: argument parsing and handlers for init, issue, inspect, rotate, token and serve."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from ca import tokens
from ca.authority import (
    DEFAULT_BUNDLE_REFRESH_INTERVAL,
    DEFAULT_LEAF_TTL,
    DEFAULT_MAX_LEAF_TTL,
    CAError,
    CertificateAuthority,
    Root,
    fingerprint,
    format_time,
    inspect,
    utc_now,
    write_file,
)
from mesh.config import Address, format_duration, parse_address, parse_duration

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str], prog: str = "mesh ca") -> int:
    """Run `mesh ca` with `argv` (the arguments after `ca`) and return the exit code.

    Usage errors exit 2 after argparse's usage line; a refused or failed operation prints one line on stderr and
    exits 1.
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors: argparse has already printed why
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        return args.handler(args)
    except CAError as exc:
        print(f"{args.prog}: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{args.prog}: {where}{exc.strerror or exc}", file=sys.stderr)
    return 1


def build_parser(prog: str = "mesh ca") -> argparse.ArgumentParser:
    """The `mesh ca` argument parser with every subcommand."""
    parser = _parser(
        argparse.ArgumentParser,
        prog=prog,
        description=(
            "The mesh's certificate authority: it keeps its root keys in a directory and issues the short-lived "
            "certificates (with SPIFFE IDs) that sidecars use for mutual TLS."
        ),
        examples=[
            "mesh ca init --dir ca --trust-domain mesh.local",
            "mesh ca issue --dir ca --service web --out certs/web",
            "mesh ca inspect certs/web/cert.pem",
        ],
    )
    parser.set_defaults(handler=_usage(parser), prog=prog)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_init(commands)
    _add_issue(commands)
    _add_inspect(commands)
    _add_rotate(commands)
    _add_token(commands)
    _add_serve(commands)
    return parser


def _parser(
    factory: Callable[..., argparse.ArgumentParser], *args: Any, description: str, examples: list[str], **kwargs: Any
) -> argparse.ArgumentParser:
    epilog = ("examples:\n" if len(examples) > 1 else "example:\n") + "\n".join(f"  {e}" for e in examples)
    return factory(
        *args,
        description=textwrap.fill(description, width=80),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show_usage(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show_usage


def _duration(text: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _show(span: timedelta) -> str:
    return format_duration(span.total_seconds())


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, type=Path, metavar="DIR", help="the CA directory")


def _subcommand(commands: Any, name: str, handler: Callable[[argparse.Namespace], int], **kwargs: Any) -> Any:
    parser = _parser(commands.add_parser, name, **kwargs)
    parser.set_defaults(handler=handler, prog=parser.prog)
    return parser


# --- init ---


def _add_init(commands: Any) -> None:
    init = _subcommand(
        commands,
        "init",
        _init,
        help="create a new CA (its first root) in a directory",
        description=(
            "Create a certificate authority in DIR (which must be new or empty; an existing CA is never "
            "overwritten): an ECDSA P-256 root valid for 10 years, optionally with an intermediate that signs the "
            "leaves. Private keys are written with mode 0600."
        ),
        examples=[
            "mesh ca init --dir ca --trust-domain mesh.local",
            "mesh ca init --dir ca --trust-domain mesh.local --intermediate",
        ],
    )
    _add_dir(init)
    init.add_argument("--trust-domain", required=True, metavar="TD", help="the SPIFFE trust domain, e.g. mesh.local")
    init.add_argument("--intermediate", action="store_true", help="sign leaves with an intermediate under the root")
    init.add_argument(
        "--max-leaf-ttl",
        type=_duration,
        default=DEFAULT_MAX_LEAF_TTL,
        metavar="DURATION",
        help=f"the longest lifetime a leaf certificate may get (default: {_show(DEFAULT_MAX_LEAF_TTL)})",
    )
    init.add_argument(
        "--bundle-refresh",
        type=_duration,
        default=DEFAULT_BUNDLE_REFRESH_INTERVAL,
        metavar="DURATION",
        help="how often sidecars re-read the trust bundle; a rotated root signs two of these after it was published "
        f"(default: {_show(DEFAULT_BUNDLE_REFRESH_INTERVAL)})",
    )


def _init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(
        args.dir,
        args.trust_domain,
        intermediate=args.intermediate,
        max_leaf_ttl=args.max_leaf_ttl,
        bundle_refresh_interval=args.bundle_refresh,
    )
    root = ca.root(1)
    signer = "its intermediate" if ca.intermediate else "the root"
    print(f"created a CA for trust domain {ca.trust_domain} in {ca.directory}")
    print(f"  root 1: SHA-256 {fingerprint(root.certificate)}, valid until {format_time(root.not_valid_after)}")
    print(f"  leaves are signed by {signer}, for at most {_show(ca.max_leaf_ttl)}")
    print(f"next: mesh ca issue --dir {ca.directory} --service NAME --out DIR")
    return 0


# --- issue ---


def _add_issue(commands: Any) -> None:
    issue = _subcommand(
        commands,
        "issue",
        _issue,
        help="issue a certificate and key for a service into a directory",
        description=(
            "Issue a leaf certificate for a service with a new P-256 key, and write OUT/cert.pem (the certificate, "
            "then the intermediate if the CA has one), OUT/key.pem (mode 0600) and OUT/bundle.pem (the CA roots "
            "to trust). The certificate's only name is the SPIFFE ID "
            "spiffe://<trust-domain>/ns/<namespace>/dc/<datacenter>/svc/<service>."
        ),
        examples=[
            "mesh ca issue --dir ca --service web --out certs/web",
            "mesh ca issue --dir ca --service api --out certs/api --ttl 72h",
        ],
    )
    _add_dir(issue)
    issue.add_argument("--service", required=True, metavar="NAME", help="the service the certificate identifies")
    issue.add_argument("--out", required=True, type=Path, metavar="OUTDIR", help="where to write the three files")
    issue.add_argument(
        "--ttl",
        type=_duration,
        default=DEFAULT_LEAF_TTL,
        metavar="DURATION",
        help=f"lifetime, capped at the CA's maximum (default: {_show(DEFAULT_LEAF_TTL)})",
    )
    issue.add_argument("--namespace", default="default", help="namespace part of the SPIFFE ID (default: default)")
    issue.add_argument("--datacenter", default="dc1", help="datacenter part of the SPIFFE ID (default: dc1)")


def _issue(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.dir)
    issued = ca.issue(args.service, namespace=args.namespace, datacenter=args.datacenter, ttl=args.ttl)
    out: Path = args.out
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    assert issued.key_pem is not None  # issue() always makes a key
    write_file(out / "key.pem", issued.key_pem, private=True)
    write_file(out / "cert.pem", issued.cert_pem)
    write_file(out / "bundle.pem", issued.bundle_pem)
    until = format_time(issued.certificate.not_valid_after_utc)
    print(f"issued {issued.spiffe_id} (root {issued.root}), valid until {until}")
    print(f"  wrote {out / 'cert.pem'}, {out / 'key.pem'} (private, mode 0600), {out / 'bundle.pem'}")
    if issued.capped:
        print(f"note: the lifetime was shortened to fit {issued.capped}", file=sys.stderr)
    return 0


# --- inspect ---


def _add_inspect(commands: Any) -> None:
    inspect_ = _subcommand(
        commands,
        "inspect",
        _inspect,
        help="describe the certificates in a PEM file",
        description=(
            "Describe each certificate in a PEM file in plain words: subject, SPIFFE ID, validity (and whether it "
            "is valid now), issuer, SHA-256 fingerprint, whether it is a CA, key type and usage. Private keys in "
            "the file are never shown."
        ),
        examples=["mesh ca inspect certs/web/cert.pem", "mesh ca inspect ca/roots/1/cert.pem"],
    )
    inspect_.add_argument("file", type=Path, metavar="FILE", help="a PEM file (cert.pem, bundle.pem, ...)")


def _inspect(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise CAError(f"{args.file}: cannot read: {exc.strerror or exc}") from None
    try:
        text = inspect(data)
    except CAError as exc:
        raise CAError(f"{args.file}: {exc}") from None
    sys.stdout.write(text)
    return 0


# --- rotate ---


def _add_rotate(commands: Any) -> None:
    rotate = _subcommand(
        commands,
        "rotate",
        _rotate,
        help="publish a new root, or (--activate) start signing with it",
        description=(
            "Root rotation in two steps that never break a peer. `rotate` creates a new root and publishes it in "
            "the trust bundle at once, while leaves are still signed under the current root. The new root starts "
            "signing after two bundle refresh intervals, or as soon as `rotate --activate` is run. The old root "
            "stays in the bundle until the last leaf it signed has expired."
        ),
        examples=["mesh ca rotate --dir ca", "mesh ca rotate --dir ca --activate"],
    )
    _add_dir(rotate)
    rotate.add_argument(
        "--activate", action="store_true", help="sign with the root published by the last rotate from now on"
    )


def _rotate(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.dir)
    now = utc_now()
    old = ca.signing_root(now)
    if args.activate:
        new = ca.activate(now=now)
        print(f"root {new.id} signs from now on")
        _print_retirement(ca, old, new)
        return 0
    new = ca.rotate(now=now)
    print(f"published root {new.id} (SHA-256 {fingerprint(new.certificate)}) in the trust bundle")
    print(
        f"  root {old.id} keeps signing until {format_time(new.signs_from)} (two bundle refresh intervals of "
        f"{_show(ca.bundle_refresh_interval)}), or until `mesh ca rotate --dir {ca.directory} --activate`"
    )
    _print_retirement(ca, old, new)
    return 0


def _print_retirement(ca: CertificateAuthority, old: Root, new: Root) -> None:
    retires = ca.root(old.id).retires
    if old.id != new.id and retires is not None:
        print(f"  root {old.id} stays in the bundle until {format_time(retires)}, when its last leaf has expired")


# --- token ---


def _add_token(commands: Any) -> None:
    token = _subcommand(
        commands,
        "token",
        _token,
        help="make, revoke or list bootstrap tokens",
        description=(
            "Bootstrap tokens let a sidecar obtain its first certificate from the CA: a token names one service "
            "and can only obtain that service's identity. The token is printed once; the CA keeps only its "
            "SHA-256. Tokens expire, and can be revoked by id."
        ),
        examples=[
            "mesh ca token --dir ca --service web > web.token",
            "mesh ca token --dir ca --list",
            "mesh ca token --dir ca --revoke 3f2a9c01b7d4",
        ],
    )
    _add_dir(token)
    action = token.add_mutually_exclusive_group(required=True)
    action.add_argument("--service", metavar="NAME", help="make a token for this service")
    action.add_argument("--revoke", metavar="ID", help="revoke the token with this id (or this secret)")
    action.add_argument("--list", action="store_true", help="list the tokens: ids, services, expiry, never secrets")
    token.add_argument(
        "--ttl",
        type=_duration,
        metavar="DURATION",
        help=f"how long a new token is valid (default: {_show(tokens.DEFAULT_TOKEN_TTL)})",
    )


def _token(args: argparse.Namespace) -> int:
    if args.ttl is not None and args.service is None:
        raise CAError("--ttl applies only when making a token with --service")
    if args.list:
        now = utc_now()
        known = tokens.list(args.dir)
        if not known:
            print(f"no tokens in {args.dir}", file=sys.stderr)
        for info in known:
            print(f"{info.id}  {info.service:<20}  expires {format_time(info.expires)}  {info.status(now)}")
        return 0
    if args.revoke is not None:
        info = tokens.revoke(args.dir, args.revoke)
        print(f"revoked token {info.id} for service {info.service} (at {format_time(info.revoked or utc_now())})")
        return 0
    ttl = args.ttl if args.ttl is not None else tokens.DEFAULT_TOKEN_TTL
    secret = tokens.create(args.dir, args.service, ttl)
    print(secret)
    print(
        f"token {tokens.token_id(secret)} for service {args.service}, valid for {_show(ttl)}; "
        "the secret above is shown only this once",
        file=sys.stderr,
    )
    return 0


# --- serve ---

_DEFAULT_BIND = "127.0.0.1:8400"  # ca.server.DEFAULT_BIND, without importing the server for every ca command
_DEFAULT_MAX_CONNECTIONS = 1024  # ca.server.ServerLimits' default, likewise


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_serve(commands: Any) -> None:
    serve = _subcommand(
        commands,
        "serve",
        _serve,
        help="run the HTTPS API that serves the trust bundle and signs CSRs",
        description=(
            "Serve the CA over HTTPS: GET /v1/bundle returns the trust bundle to anyone; POST /v1/certificate "
            "signs a CSR for the identity the caller proves, with a bootstrap token (Authorization: Bearer) or "
            "with its current, still-valid certificate. The server's own certificate is issued by the CA for "
            "the service mesh-ca. Rotations and tokens made while it runs take effect at once. It prints where it "
            "listens and the fingerprints of the bundle's roots, and runs until SIGINT or SIGTERM."
        ),
        examples=[
            "mesh ca serve --dir ca",
            "mesh ca serve --dir ca --bind 0.0.0.0:8400 --max-connections 4096",
        ],
    )
    _add_dir(serve)
    serve.add_argument(
        "--bind",
        type=_address,
        default=_address(_DEFAULT_BIND),
        metavar="ADDR",
        help=f"host:port to listen on (default: {_DEFAULT_BIND})",
    )
    serve.add_argument(
        "--max-connections",
        type=_connections,
        default=_DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections open at once; when three quarters of them are in their handshake, sending a request or "
        f"idle, a new one closes the one that has waited longest (default: {_DEFAULT_MAX_CONNECTIONS})",
    )


def _connections(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 2, got {text!r}")
    return count


def _serve(args: argparse.Namespace) -> int:
    from ca import server  # lazily: the other ca commands need neither trio nor the server

    limits = server.ServerLimits(max_connections=args.max_connections, max_waiting=args.max_connections * 3 // 4)
    return server.run(args.dir, args.bind, limits)
