"""The `mesh` command line: argument parsing and dispatch to the config checker, the sidecar and the demo."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mesh import __version__
from mesh.config import (
    ConfigError,
    SidecarConfig,
    dump_config,
    inbound_default,
    load_config,
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
        examples=["mesh config check sidecar.yaml", "mesh sidecar run --config sidecar.yaml", "mesh demo"],
    )
    parser.add_argument("--version", action="version", version=f"mesh (triomesh) {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    parser.set_defaults(handler=_usage(parser))
    # `mesh gateway ...` and `mesh status` get their own _add_* function here when they exist.
    _add_ca(commands)
    _add_config(commands)
    _add_sidecar(commands)
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
        help="run a sidecar proxy",
        description="Run the sidecar proxy that sits beside one service.",
        examples=["mesh sidecar run --config sidecar.yaml"],
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


def _demo(args: argparse.Namespace) -> int:
    from sidecar import demo  # lazily: mesh/ must not import sidecar/ at module level

    return demo.main(args)


if __name__ == "__main__":
    sys.exit(main())
