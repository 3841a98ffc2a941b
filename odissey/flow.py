"""Back-pressure between a client and its server, so no buffer grows without bound.

Once a write from one side to the other cannot complete at once, each transport is
registered as the other's producer (for as long as the server stays attached): a client
that reads a 20 MB result slowly pauses reading from the server, and a server that cannot
keep up with a COPY pauses reading from the client. Short transactions, whose writes
always complete, never pay for registering and unregistering.

Transports are not registered directly: when a consumer transport closes, Twisted calls
``stopProducing`` on its producer, which would close the *other* connection too. A
server outlives its client (it is cleaned and pooled), so each side registers a
:class:`Valve` that passes pause and resume through and ignores stop.
"""

from __future__ import annotations

import select
from typing import Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from twisted.internet.tcp import Connection
from zope.interface import implementer


#: Client bytes held while no server can take them (waiting for one, or still logging
#: in) before the client is paused.
PENDING_LIMIT = 256 * 1024


class HasTransport(TypingProtocol):
    @property
    def transport(self) -> Any: ...


@implementer(IPushProducer)
class Valve:
    def __init__(self, owner: HasTransport) -> None:
        self.owner = owner

    def pauseProducing(self) -> None:
        transport = self.owner.transport
        if transport is not None:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport = self.owner.transport
        if transport is not None and getattr(transport, "connected", False):
            transport.resumeProducing()

    def stopProducing(self) -> None:
        """The consumer went away; the owner's own lifecycle decides what happens next."""


def couple(a: HasTransport, a_valve: Valve, b: HasTransport, b_valve: Valve) -> None:
    """Make each side's transport throttle the other's reading."""
    ta, tb = a.transport, b.transport
    if getattr(ta, "connected", False) and getattr(tb, "connected", False):
        ta.registerProducer(b_valve, True)
        tb.registerProducer(a_valve, True)


def uncouple(a: HasTransport, a_valve: Valve, b: HasTransport, b_valve: Valve) -> None:
    """Undo :func:`couple` and let both sides read again."""
    for transport, valve in ((a.transport, b_valve), (b.transport, a_valve)):
        if transport is not None and _registered(transport, valve):
            transport.unregisterProducer()
    a_valve.resumeProducing()
    b_valve.resumeProducing()


def _registered(transport: Any, valve: Valve) -> bool:
    """Is ``valve`` the transport's producer? After ``startTLS`` the socket's producer is
    Twisted's TLS wrapper (a ``_ProducerMembrane``) holding ours, not ours itself."""
    producer = getattr(transport, "producer", None)
    return producer is valve or getattr(producer, "_producer", None) is valve


def set_nodelay(transport: object) -> None:
    """TCP_NODELAY: Twisted leaves Nagle on, which adds 40 ms to small request/replies."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


def send(transport: object, data: bytes) -> bool:
    """``transport.write(data)``, but straight to the socket when nothing is queued ahead.

    Twisted's ``write`` always queues and registers the socket for writability, sending
    on the next reactor turn: two ``epoll_ctl`` calls and a poll round per write, about a
    fifth of the pooler's time under pgbench (docs/benchmarks.md). When a plain (non-TLS)
    TCP or unix transport has nothing buffered, ``send()`` is tried at once and Twisted
    gets only what the kernel did not take, so ordering and back-pressure are unchanged.
    Returns True when everything went out at once (nothing is queued in Twisted).
    """
    if isinstance(transport, Connection) and not (
        transport._tempDataLen or transport.dataBuffer or transport.TLS
        or transport.disconnecting or not transport.connected
    ):
        # The socket's own send (Twisted's writeSomeData adds a memoryview and an
        # EINTR loop that Python itself has done since PEP 475).
        try:
            sent = transport.socket.send(data)
        except OSError:  # would block, or the connection broke: Twisted's write finds out
            sent = 0
        if sent == len(data):
            return True
        data = data[sent:]
    transport.write(data)  # type: ignore[attr-defined]
    return False


_GONE = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def peer_closed(transport: Any) -> bool:
    """Has the peer of a transport whose reading is paused closed its end?

    A paused transport is not read, so Twisted never sees the peer leave; the close sits
    behind whatever the peer sent last. poll() reports it (POLLRDHUP on Linux) without
    reading anything."""
    try:
        # After startTLS, getHandle() is the TLS object (no fileno): ask the socket.
        fileno = getattr(transport, "socket", None) or transport.getHandle()
        fileno = fileno.fileno()
    except Exception:  # not a socket transport (tests), or already closed
        return False
    if fileno < 0:
        return False
    poller = select.poll()
    poller.register(fileno, _GONE)
    return bool(poller.poll(0))
