"""The `mesh` command line: argument parsing and dispatch to the config checker, the sidecar and the demo."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mesh import __version__, status
from mesh.config import (
    Address,
    ConfigError,
    SidecarConfig,
    dump_config,
    inbound_default,
    load_config,
    parse_address,
    parse_duration,
    redact,
    unreadable_files,
)

DEFAULT_DEMO_BASE_PORT = 18000

_Commands = argparse._SubParsersAction  # what add_subparsers() returns


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `mesh` command with `argv` (default: sys.argv[1:]) and return the process exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has already printed why
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    return args.handler(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = _parser(
        argparse.ArgumentParser,
        prog="mesh",
        description="triomesh: a service mesh whose data plane is a Trio sidecar.",
        examples=[
            "mesh config check sidecar.yaml",
            "mesh sidecar run --config sidecar.yaml",
            "mesh status --admin 127.0.0.1:9901",
            "mesh demo",
        ],
    )
    parser.add_argument("--version", action="version", version=f"mesh (triomesh) {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    parser.set_defaults(handler=_usage(parser))
    # `mesh gateway ...` gets its own _add_* function here when it exists.
    _add_ca(commands)
    _add_config(commands)
    _add_sidecar(commands)
    _add_status(commands)
    _add_demo(commands)
    return parser


def _add_ca(commands: _Commands) -> None:
    # `mesh ca` hands every argument, --help included, to ca.commands, which parses them itself: ca/ (and the
    # cryptography library) is imported only when a `mesh ca` command runs, never by mesh/ at module level.
    ca = commands.add_parser(
        "ca", help="run the mesh's certificate authority (see: mesh ca --help)", add_help=False, prefix_chars="\0"
    )
    ca.add_argument("ca_args", nargs=argparse.REMAINDER)
    ca.set_defaults(handler=_ca)


def _ca(args: argparse.Namespace) -> int:
    from ca import commands  # lazily: mesh/ must not import ca/ at module level

    return commands.main(args.ca_args)


def _add_config(commands: _Commands) -> None:
    config = _parser(
        commands.add_parser,
        "config",
        help="check configuration files",
        description="Work with sidecar configuration files.",
        examples=["mesh config check sidecar.yaml"],
    )
    config.set_defaults(handler=_usage(config))
    actions = config.add_subparsers(title="commands", metavar="COMMAND")
    check = _parser(
        actions.add_parser,
        "check",
        help="validate a sidecar config and print it normalised",
        description=(
            "Validate a sidecar configuration file. On success print the normalised configuration "
            "(every default filled in, secrets redacted) as YAML on stdout and 'FILE: ok' on stderr; "
            "otherwise print one line per problem, 'FILE: path.to.field: what is wrong', on stderr and exit "
            "with status 1. A valid configuration may still earn warnings on stderr, 'FILE: path.to.field: "
            "warning: ...' (a file it names does not exist yet, an inbound that admits every identity of the "
            "trust domain); the exit status stays 0."
        ),
        examples=["mesh config check sidecar.yaml"],
    )
    check.add_argument("file", metavar="FILE", help="the sidecar configuration file (YAML)")
    check.set_defaults(handler=_config_check)


def _add_sidecar(commands: _Commands) -> None:
    sidecar = _parser(
        commands.add_parser,
        "sidecar",
        help="run a sidecar proxy, or wait until one is ready",
        description="Run the sidecar proxy that sits beside one service, or wait until a running one is ready.",
        examples=[
            "mesh sidecar run --config sidecar.yaml",
            "mesh sidecar wait-ready --admin 127.0.0.1:9901 --timeout 30",
        ],
    )
    sidecar.set_defaults(handler=_usage(sidecar))
    actions = sidecar.add_subparsers(title="commands", metavar="COMMAND")
    run = _parser(
        actions.add_parser,
        "run",
        help="run a sidecar from a config file",
        description=(
            "Load the configuration and run the sidecar (its inbound listener, upstream listeners and admin "
            "listener) until it is stopped with SIGINT or SIGTERM, which drain it first. SIGHUP (or POST /reload "
            "on the admin listener) reloads the file: a valid change applies without dropping connections, an "
            "invalid one is refused and logged while the running configuration keeps serving."
        ),
        examples=["mesh sidecar run --config sidecar.yaml"],
    )
    run.add_argument("--config", required=True, metavar="FILE", help="the sidecar configuration file (YAML)")
    run.set_defaults(handler=_sidecar_run)
    wait_ready = _parser(
        actions.add_parser,
        "wait-ready",
        help="wait until a sidecar is ready (for start-up ordering in scripts)",
        description=(
            "Ask a running sidecar's admin listener for /ready every --interval until it answers 200, then print "
            "'ready' and exit 0. Until then print, on stderr, each new reason it gives for not being ready "
            "(e.g. 'starting', 'no usable certificate', or 'unreachable: connection refused' while it is not "
            "listening yet). When --timeout passes first, print the last reason and exit 1."
        ),
        examples=[
            "mesh sidecar wait-ready --admin 127.0.0.1:9901 --timeout 30",
            "mesh sidecar wait-ready --admin 127.0.0.1:9901 --timeout 2m --interval 1 && ./start-app",
        ],
    )
    wait_ready.add_argument(
        "--admin", required=True, type=_admin_address, metavar="HOST:PORT", help="the sidecar's admin listener"
    )
    wait_ready.add_argument(
        "--timeout",
        required=True,
        type=_positive_seconds,
        metavar="S",
        help="give up after this long: seconds, or a duration such as 500ms, 2m",
    )
    wait_ready.add_argument(
        "--interval",
        type=_positive_seconds,
        default=0.5,
        metavar="S",
        help="time between two requests to /ready (default: 0.5)",
    )
    wait_ready.set_defaults(handler=_sidecar_wait_ready)


def _add_status(commands: _Commands) -> None:
    status_command = _parser(
        commands.add_parser,
        "status",
        help="show what running sidecars report: readiness, config, certificate, clusters, traffic",
        description=(
            "Read the admin listener of each sidecar and show, per sidecar: its service; whether it is ready, and "
            "why not; the config version in use and when it was loaded; when its certificate expires; its clusters "
            "(discovery source and age, why their endpoints may be stale, circuit breaker counts) and their "
            "endpoints (healthy, ejected or unhealthy and why, EWMA latency, requests in flight, idle connections); "
            "and its requests since it started, by upstream and status class and by route, with the errors the "
            "mesh made itself by reason. A sidecar that cannot be read is one line saying why, and the exit status "
            "is then 1; otherwise it is 0, ready or not. Colours are used only on a terminal (and not with NO_COLOR)."
        ),
        examples=[
            "mesh status --admin 127.0.0.1:9901",
            "mesh status --admin 127.0.0.1:9901 --admin 127.0.0.1:9902 --interval 5",
            "mesh status --registry registry.yaml --json",
        ],
    )
    status_command.add_argument(
        "--admin",
        action="append",
        default=[],
        type=_admin_address,
        metavar="HOST:PORT",
        help="a sidecar's admin listener (admin.bind in its config); repeat for several sidecars",
    )
    status_command.add_argument(
        "--registry",
        metavar="FILE",
        help="also read each sidecar whose entry in this file registry advertises its admin address in meta, "
        "e.g. meta: {admin: 10.0.0.5:9901} (entries without one are skipped)",
    )
    status_command.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status_command.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=status.DEFAULT_TIMEOUT,
        metavar="S",
        help=f"time each request to an admin listener may take (default: {status.DEFAULT_TIMEOUT:g})",
    )
    status_command.add_argument(
        "--interval",
        type=_positive_seconds,
        metavar="S",
        help="read everything twice, S seconds apart, and add req/s and the share of 5xx responses over that time "
        "(default: totals since start only)",
    )
    status_command.set_defaults(handler=_status)


def _add_demo(commands: _Commands) -> None:
    demo = _parser(
        commands.add_parser,
        "demo",
        help="run a small demo mesh on this machine",
        description=(
            "Start a few example services, each with its own sidecar, on local ports, using the built-in "
            "file registry, so that requests through the mesh can be tried without any other setup."
        ),
        examples=["mesh demo", "mesh demo --base-port 28000"],
    )
    demo.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_DEMO_BASE_PORT,
        metavar="N",
        help=f"first of the consecutive local ports the demo uses (default: {DEFAULT_DEMO_BASE_PORT})",
    )
    demo.set_defaults(handler=_demo)


def _parser(
    factory: Callable[..., argparse.ArgumentParser],
    *args: Any,
    description: str,
    examples: list[str],
    **kwargs: Any,
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
    """A handler for a command given without its subcommand: show that command's help and fail."""

    def show_usage(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show_usage


def _admin_address(text: str) -> Address:
    """An argparse type: "host:port" of an admin listener (an http:// prefix is allowed), else a usage error."""
    try:
        return parse_address(text.removeprefix("http://").rstrip("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    """An argparse type: seconds, or a duration such as 500ms or 2m, above 0."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0 (got {text!r})")
    return seconds


def _load(path: str) -> SidecarConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def _config_check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return 1
    sys.stdout.write(yaml.safe_dump(redact(dump_config(config)), sort_keys=False))
    warnings = unreadable_files(config)
    default = inbound_default(config)
    if default is not None:
        warnings.append((default.setting, f"the inbound listener admits {default.admits}; {default.restrict}"))
    for setting, message in warnings:
        print(f"{args.file}: {setting}: warning: {message}", file=sys.stderr)
    if not warnings:
        print(f"{args.file}: ok", file=sys.stderr)
    else:
        print(f"{args.file}: ok, with {len(warnings)} warning{'s' if len(warnings) > 1 else ''}", file=sys.stderr)
    return 0


def _sidecar_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from sidecar import app  # lazily: mesh/ must not import sidecar/ at module level

    return app.run(config, source=Path(args.config))


def _sidecar_wait_ready(args: argparse.Namespace) -> int:
    try:
        return status.wait_ready(args.admin, timeout=args.timeout, interval=args.interval)
    except KeyboardInterrupt:
        return 130


def _status(args: argparse.Namespace) -> int:
    addresses: list[Address] = list(args.admin)
    if args.registry is not None:
        try:
            advertised = status.registry_admins(args.registry)
        except ConfigError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            return 1
        if not advertised:
            print(f"{args.registry}: no entry advertises an admin address (meta admin: HOST:PORT)", file=sys.stderr)
        addresses.extend(advertised)
    addresses = list(dict.fromkeys(addresses))
    if not addresses:
        print("mesh status: no sidecar to read: give --admin HOST:PORT, or --registry FILE", file=sys.stderr)
        return 2
    try:
        return status.show_status(addresses, timeout=args.timeout, interval=args.interval, as_json=args.json)
    except KeyboardInterrupt:
        return 130


def _demo(args: argparse.Namespace) -> int:
    from sidecar import demo  # lazily: mesh/ must not import sidecar/ at module level

    return demo.main(args)


if __name__ == "__main__":
    sys.exit(main())
