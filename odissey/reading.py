"""Read events for Odissey's own connections, dispatched without Twisted's logging context.

Twisted's poll loop (``EPollReactor.doPoll``, ``PollReactor.doPoll``) hands every event
to ``log.callWithLogger``, which asks the transport for its ``logPrefix``, copies the
legacy log context's dict, pushes and pops it on the context stack, and only then calls
``_doReadOrWrite`` -> ``doRead`` -> ``_dataReceived`` -> ``protocol.dataReceived``: about
180 bytecodes under CPython for each read, twice per transaction (docs/benchmarks.md).
The context only names the "system" of legacy ``twisted.python.log`` lines; Odissey logs
through ``twisted.logger``, which never reads it.

:func:`install` replaces the reactor's ``doIteration`` with :meth:`Reads.poll`: the same
poll, and the same dispatch for every event but one kind, a plain read event (``IN`` and
nothing else) for a connected TCP or unix transport that is still registered for reading
and whose protocol's exact type is one of those given (Odissey's client and server
connections; a server connection made through an endpoint sits behind Twisted's
``_WrappingProtocol``, a pure proxy, which is looked through). That event is a
``recv_into`` one buffer the size of Twisted's reads (:data:`READ_SIZE`), a copy of what
arrived, and a call of ``protocol.dataReceived``.

Why ``recv_into``: Twisted's ``recv(bufferSize)`` makes a 64 KiB string for every read
and shrinks it to what arrived. CPython's allocator takes that back at once, but PyPy
allocates it in its nursery, so a read of 300 bytes uses 64 KiB of it: a minor
collection every 15 reads, about every 7 transactions, and each one, in a pooler with
thousands of live objects, costs more than the transaction (docs/benchmarks.md). Reading
into one buffer allocates only what arrived; under CPython it costs the same as ``recv``.

A protocol that calls ``loseConnection`` during such a read, with nothing left in its
transport's write buffer (Odissey writes with ``flow.send``, not through the buffer), is
lost right after the read, as the write event Twisted would wait for next would find
nothing to send: a client's Terminate costs no further turn of the reactor.

Anything unusual goes back to Twisted's own code, inside the logging context: an
exception from ``dataReceived`` is logged and loses the connection, EOF is a
(half-)close, a failed ``recv_into`` loses the connection, all through the reactor's
``_disconnectSelectable`` as ``_doReadOrWrite`` would. Writes, hang-ups, errors, the
connecting phase, a paused or aborted transport (no longer registered for reading) and a
connection after ``startTLS`` (its protocol is then Twisted's TLS wrapper) all take
Twisted's path unchanged. Under any other reactor nothing is installed.
"""

from __future__ import annotations

import errno
import select
from typing import Any, Callable, Iterable

from twisted.internet import main, tcp, unix
from twisted.internet.endpoints import _WrappingProtocol
from twisted.python import failure, log

#: The most one read takes: Twisted's own ``bufferSize`` for TCP and unix transports.
READ_SIZE = 65536

#: What a plain read event is: the same bit for epoll and poll.
_IN = select.POLLIN

#: Transports whose own ``doRead`` is a ``recv`` (TCP) or a ``recvmsg`` (unix: file
#: descriptors sent to a protocol that does not take them are closed, by Twisted with a
#: log line, by the kernel when ``recv_into`` leaves the ancillary data unread).
_TRANSPORTS = frozenset({tcp.Server, tcp.Client, unix.Server, unix.Client})


class Reads:
    """Installed on one epoll or poll reactor as its ``doIteration``."""

    def __init__(self, reactor: Any, wait: Callable[[Any, Any], Any]) -> None:
        self.reactor = reactor
        #: The reactor's poll call (epoll and poll differ in its arguments).
        self.wait = wait
        #: Exact protocol types whose reads take the short path.
        self.protocols: set[type] = set()
        #: Every short-path read lands here first (one reactor, one read at a time).
        self.buffer = memoryview(bytearray(READ_SIZE))

    def poll(self, timeout: float | None) -> None:
        """One reactor iteration: wait for events, then dispatch them."""
        try:
            events = self.wait(self.reactor, timeout)
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        reactor = self.reactor
        selectables = reactor._selectables
        reads = reactor._reads
        twisted_path = reactor._doReadOrWrite
        protocols = self.protocols
        buffer = self.buffer
        plain, transports, wrapping = _IN, _TRANSPORTS, _WrappingProtocol
        for fd, event in events:
            try:
                selectable = selectables[fd]
            except KeyError:  # an earlier event's handler closed it
                continue
            if event == plain and fd in reads and type(selectable) in transports and selectable.connected:
                protocol = selectable.protocol
                if type(protocol) is wrapping:  # connected through an endpoint
                    protocol = protocol._wrappedProtocol
                if type(protocol) in protocols:
                    try:
                        size = selectable.socket.recv_into(buffer)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self._lose(selectable, main.CONNECTION_LOST)
                        continue
                    if not size:
                        self._lose(selectable, main.CONNECTION_DONE)
                        continue
                    try:
                        protocol.dataReceived(buffer[:size].tobytes())
                    except BaseException:
                        log.callWithLogger(selectable, self._failed, selectable, failure.Failure())
                        continue
                    if selectable.disconnecting and _done_writing(selectable):
                        self._lose(selectable, main.CONNECTION_DONE, False)
                    continue
            log.callWithLogger(selectable, twisted_path, selectable, fd, event)

    def _lose(self, selectable: Any, why: Exception, reading: bool = True) -> None:
        """EOF (a half-close where the transport supports it) or a failed ``recv_into``, as
        ``_doReadOrWrite`` would hand them on; or (``reading`` False) the end of a
        ``loseConnection`` with nothing left to write, as ``doWrite`` would."""
        log.callWithLogger(selectable, self.reactor._disconnectSelectable, selectable, why, reading)

    def _failed(self, selectable: Any, reason: failure.Failure) -> None:
        """``dataReceived`` raised: logged, and the connection lost with it, as Twisted does."""
        log.err(reason)
        self.reactor._disconnectSelectable(selectable, reason.value, True)


def _done_writing(transport: Any) -> bool:
    """The protocol called ``loseConnection`` during the read and nothing is left to
    write: the write event that Twisted waits for next (``loseConnection`` registers for
    it) would find an empty buffer, ``send`` nothing, and lose the connection. Lost now,
    without that turn of the reactor (a ``send`` of no bytes, and the event's dispatch
    inside the logging context): a client's Terminate, once per ``pgbench -C`` login.
    Not with a producer that ``doWrite`` would resume first, nor once aborted (the
    abort's own ``connectionLost`` is on its way)."""
    producer = transport.producer
    return (transport.connected and not transport._aborting and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
            and not getattr(transport, "_sendmsgQueue", None)  # (unix: descriptors to send)
            and (producer is None or (transport.streamingProducer and not transport.producerPaused)))


def _epoll_wait(reactor: Any, timeout: float | None) -> Any:
    return reactor._poller.poll(-1 if timeout is None else timeout, len(reactor._selectables))


def _poll_wait(reactor: Any, timeout: float | None) -> Any:
    return reactor._poller.poll(None if timeout is None else int(timeout * 1000))


def _wait_for(reactor: Any) -> Callable[[Any, Any], Any] | None:
    """The poll call of an epoll or poll reactor; None for any other reactor."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        EPollReactor = None  # type: ignore[assignment,misc]
    from twisted.internet.pollreactor import PollReactor

    if EPollReactor is not None and isinstance(reactor, EPollReactor):
        return _epoll_wait
    if isinstance(reactor, PollReactor):
        return _poll_wait
    return None


def installed(reactor: Any) -> Reads | None:
    """The :class:`Reads` installed on ``reactor``, if any."""
    reads = getattr(getattr(reactor, "doIteration", None), "__self__", None)
    return reads if isinstance(reads, Reads) else None


def install(reactor: Any, protocols: Iterable[type]) -> bool:
    """Read for ``protocols`` (exact types) on ``reactor``'s short path from now on.

    Installing again (another service on the same reactor) adds the protocols. Returns
    False, changing nothing, when the reactor is not an epoll or poll reactor (tests'
    ``MemoryReactor``, the select or asyncio reactors)."""
    reads = installed(reactor)
    if reads is None:
        wait = _wait_for(reactor)
        if wait is None:
            return False
        reads = Reads(reactor, wait)
        reactor.doIteration = reads.poll
    reads.protocols.update(protocols)
    return True


def uninstall(reactor: Any) -> None:
    """Give the reactor its own ``doIteration`` back."""
    if installed(reactor) is not None:
        del reactor.doIteration
