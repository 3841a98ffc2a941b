"""sd_notify: datagrams to $NOTIFY_SOCKET (a path or an abstract name), the watchdog."""

from __future__ import annotations

import os
import socket

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from odissey.systemd import Notifier, notify_address, watchdog_interval


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


class NotifyTests(SynchronousTestCase):
    def test_addresses(self) -> None:
        """A leading @ names an abstract socket; no NOTIFY_SOCKET, no address."""
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "@odissey/x"}), "\0odissey/x")
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "/run/n"}), "/run/n")
        self.assertIsNone(notify_address({}))

    def test_watchdog_interval(self) -> None:
        """Half of WATCHDOG_USEC, unless WATCHDOG_PID names another process."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "3000000"}, 7), 1.5)
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}, 7), 1.5)
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "soon"}, 7))
        self.assertIsNone(watchdog_interval({}, 7))

    def test_messages_to_a_path_socket(self) -> None:
        """READY=1 (then WATCHDOG=1 each half period), RELOADING=1 with MONOTONIC_USEC,
        READY=1, STOPPING=1 reach a datagram socket bound at $NOTIFY_SOCKET."""
        path = os.path.abspath(self.mktemp())
        sock = receiver(path)
        self.addCleanup(sock.close)
        clock = Clock()
        notifier = Notifier(clock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        notifier.ready()
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=accepting connections")
        self.assertEqual(sock.recv(4096), b"WATCHDOG=1")
        clock.advance(0.5)
        self.assertEqual(sock.recv(4096), b"WATCHDOG=1")
        notifier.reloading()
        lines = sock.recv(4096).decode().split("\n")
        self.assertEqual(lines[0], "RELOADING=1")
        self.assertTrue(lines[1].startswith("MONOTONIC_USEC=") and int(lines[1][15:]) > 0, lines)
        notifier.reloaded()
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=accepting connections")
        notifier.stopping()
        self.assertEqual(sock.recv(4096), b"STOPPING=1\nSTATUS=stopping")
        notifier.stopped()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_abstract_socket(self) -> None:
        """An @name reaches the abstract socket of that name."""
        name = f"odissey-test-{os.getpid()}-{id(self)}"
        sock = receiver("\0" + name)
        self.addCleanup(sock.close)
        Notifier(Clock(), {"NOTIFY_SOCKET": "@" + name}).stopping()
        self.assertEqual(sock.recv(4096), b"STOPPING=1\nSTATUS=stopping")

    def test_nothing_outside_systemd(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and no watchdog runs."""
        clock = Clock()
        notifier = Notifier(clock, {"WATCHDOG_USEC": "1000000"})
        notifier.ready()
        self.assertEqual(clock.getDelayedCalls(), [])
