"""Telling systemd how the service is doing: the sd_notify protocol, written here.

The protocol is one datagram of ``KEY=value`` lines sent to the unix socket named by
``$NOTIFY_SOCKET`` (a name starting with ``@`` is in the abstract namespace); no library
is needed for that. systemd's unit then uses ``Type=notify``: it considers Odissey
started on ``READY=1`` (sent once every listener is open), reloading between
``RELOADING=1`` and the next ``READY=1``, stopping on ``STOPPING=1``, and, with
``WatchdogSec=``, alive while ``WATCHDOG=1`` keeps coming (every half of
``$WATCHDOG_USEC``, from the reactor: a blocked reactor stops it, which is the point).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from odissey.logs import Logger

log = Logger()


def notify_address(environ: Mapping[str, str]) -> Optional[str]:
    """The socket address of ``$NOTIFY_SOCKET`` (abstract names with a leading NUL)."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def watchdog_interval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """Seconds between WATCHDOG=1 messages (half systemd's timeout), or None when the
    watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    usec = environ.get("WATCHDOG_USEC")
    owner = environ.get("WATCHDOG_PID")
    if not usec or (owner and owner != str(pid)):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs, as systemd wants it beside RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends the service's state changes to systemd; does nothing outside systemd."""

    def __init__(self, clock: IReactorTime, environ: Mapping[str, str] = os.environ) -> None:
        self.address = notify_address(environ)
        self._watchdog: Optional[LoopingCall] = None
        interval = watchdog_interval(environ, os.getpid())
        if self.address is not None and interval is not None:
            self._watchdog = LoopingCall(self.send, "WATCHDOG=1")
            self._watchdog.clock = clock
            self._interval = interval

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # systemd gone or the socket unusable: say so, carry on
            log.warn("sd_notify to {address!r} failed: {error}", address=self.address, error=exc)

    def ready(self) -> None:
        self.send("READY=1", "STATUS=accepting connections")
        if self._watchdog is not None and not self._watchdog.running:
            self._watchdog.start(self._interval, now=True)

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading")

    def reloaded(self) -> None:
        self.send("READY=1", "STATUS=accepting connections")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def stopped(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
