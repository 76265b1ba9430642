"""sd_notify for systemd's Type=notify services; every call is a no-op outside systemd."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send a state line such as READY=1 or WATCHDOG=1; return whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def watchdog_interval_seconds(default: float = 10.0) -> float:
    """Half the watchdog timeout systemd set (WATCHDOG_USEC), or `default` without one."""
    usec = os.environ.get("WATCHDOG_USEC")
    if usec and usec.isdigit() and int(usec) > 0:
        return int(usec) / 2_000_000
    return default
