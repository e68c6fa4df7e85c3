"""Loopback ports for child processes and fakes to bind, chosen so no outgoing connection can take them first."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed to child processes come from below the kernel's ephemeral range: a port the kernel picked for
# bind(0) is also what it hands the next outgoing connect(), so between the probe and the child's own bind any
# client socket in the suite could take it ("Address already in use"). Below the range only listeners compete.
_PORT_LOW = 15000
_PORT_HIGH = max(_PORT_LOW + 2000, min(_ephemeral_low(), 32768))
_next_port = _PORT_LOW + (os.getpid() * 7919) % (_PORT_HIGH - _PORT_LOW)


def free_port_range(count: int) -> int:
    """The first of `count` consecutive loopback ports, below the ephemeral range, that all bind now."""
    global _next_port
    for _ in range((_PORT_HIGH - _PORT_LOW) // count):
        if _next_port + count > _PORT_HIGH:
            _next_port = _PORT_LOW
        base, _next_port = _next_port, _next_port + count
        probes: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return base
    raise AssertionError(f"no {count} consecutive free loopback ports in {_PORT_LOW}-{_PORT_HIGH}")


def free_port() -> int:
    """A loopback port nothing listens on now and no outgoing connection will be given."""
    return free_port_range(1)
