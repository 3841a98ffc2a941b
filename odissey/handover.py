"""Online restart: a new Odissey takes the listening sockets of the running one.

The running process serves ``handover_socket`` (a unix socket path). A new process
started with the same configuration connects to it before it listens, and gets every
listening socket as a file descriptor (SCM_RIGHTS), with the ``listen`` entry each
serves, as one JSON line. It adopts those it still has in its own ``listen`` (the same
kernel socket: connections queued in its backlog are not lost, whichever process
accepts them), says ``taken`` and serves the handover path itself (a new socket at the
same path). The old process then stops reading its copies of the listening sockets and
its handover listener, without closing them (closing a unix listener unlinks its path,
which may be the new process's by then; the old process's exit closes them), drains as
on SIGTERM and exits. Nothing more is said: the old process may stop at any moment
after ``taken``. With workers the masters do this (odissey/workers.py), the new one
saying ``taken`` once its workers accept. See docs/architecture.md for why this rather
than SO_REUSEPORT.

Lines: old -> new ``{"listen": [[entry, address family], ...]}`` (one descriptor per
entry, in order), new -> old ``taken``.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Protocol as TypingProtocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IFileDescriptorReceiver, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from odissey.logs import Logger

log = Logger()

#: How long a new process waits for the running one at each step (seconds).
PATIENCE = 10.0
#: The longest line either side sends.
MAX_LINE = 1 << 16


class Giver(TypingProtocol):
    """The running service, as the handover server sees it."""

    def listening(self) -> Sequence[tuple[str, IListeningPort]]:
        """Every listening port, with the ``listen`` entry it serves."""

    def handed_over(self) -> None:
        """Another process has the listening sockets now: stop reading them, drain, exit."""


class _Lines(LineOnlyReceiver):
    """Newline-terminated lines, bounded (Twisted's line receiver): past the bound the
    peer is not an Odissey, and the connection closes."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE


class _Give(_Lines):
    def __init__(self, server: "HandoverServer") -> None:
        self.server = server

    def connectionMade(self) -> None:
        described = []
        for description, port in self.server.giver.listening():
            self.transport.sendFileDescriptor(port.fileno())  # type: ignore[union-attr,attr-defined]
            described.append([description, int(port.socket.family)])  # type: ignore[attr-defined]
        self.transport.write(json.dumps({"listen": described}).encode() + b"\n")  # type: ignore[union-attr]
        log.info("handover: sent {count} listening sockets to a new process", count=len(described))

    def lineReceived(self, line: bytes) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]
        if line == b"taken" and self.server.port is not None:
            self.server.given_up, self.server.port = self.server.port, None
            self.server.given_up.stopReading()  # type: ignore[attr-defined]
            self.server.giver.handed_over()


class HandoverServer(Factory):
    """Serves the handover path while this process runs."""

    noisy = False

    def __init__(self, giver: Giver) -> None:
        self.giver = giver
        self.port: Optional[IListeningPort] = None
        #: The listener after a handover: unread, open until the process exits.
        self.given_up: Optional[IListeningPort] = None

    def buildProtocol(self, addr: object) -> _Give:
        return _Give(self)

    def listen(self, reactor: object, path: str) -> None:
        """Listen on ``path``, taking it over from a process that is gone (checked by
        :func:`take` first: nobody answered there)."""
        if os.path.exists(path):
            os.unlink(path)
        self.port = reactor.listenUNIX(path, self)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()


@implementer(IFileDescriptorReceiver)
class Taken(_Lines):
    """The new process's side: the sockets received, by ``listen`` entry."""

    def __init__(self) -> None:
        self._fds: list[int] = []
        #: ``listen`` entry -> (descriptor, address family); :meth:`adopted` removes them.
        self.sockets: dict[str, tuple[int, int]] = {}
        self.received: Deferred[Taken] = Deferred()

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def lineReceived(self, line: bytes) -> None:
        if not self.received.called:
            try:
                described = json.loads(line)["listen"]
                if len(described) != len(self._fds):
                    raise ValueError(f"{len(described)} sockets described, {len(self._fds)} received")
                for (description, family), fd in zip(described, self._fds):
                    self.sockets[str(description)] = (fd, int(family))
            except (ValueError, KeyError, TypeError) as exc:
                self.received.errback(exc)
                return
            self.received.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.received.called:
            self.received.errback(ConnectionError("the running Odissey closed the handover connection"))

    def confirm(self) -> None:
        """Tell the old process its sockets are ours (it drains and exits); the
        descriptors not adopted are closed."""
        for fd, _family in self.sockets.values():
            os.close(fd)
        self.sockets.clear()
        self.transport.write(b"taken\n")  # type: ignore[union-attr]


def take(reactor: IReactorTime, path: str) -> "Deferred[Optional[Taken]]":
    """Ask the process serving ``path`` for its listening sockets: the :class:`Taken`
    (then call its ``confirm``), or None when nobody serves the path."""
    endpoint = UNIXClientEndpoint(reactor, path, timeout=PATIENCE)
    taker = Taken()
    timer = reactor.callLater(PATIENCE, taker.received.cancel)

    def connected(_: object) -> "Deferred[Taken]":
        return taker.received

    def nobody(failure: Failure) -> Optional[Taken]:
        failure.trap(ConnectError, FileNotFoundError)
        return None

    def done(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    factory = Factory.forProtocol(lambda: taker)
    factory.noisy = False
    d = endpoint.connect(factory)
    return d.addCallbacks(connected, nobody).addBoth(done)
