"""The short read path (odissey/reading.py) on the real reactor, over real sockets."""

from __future__ import annotations

import socket
from typing import Any

from OpenSSL import crypto
from twisted.internet import abstract, reactor, ssl, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, _WrappingProtocol, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.pollreactor import PollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger, formatEventAsClassicLogText, globalLogPublisher
from twisted.python import context, failure, log
from twisted.python.log import ILogContext
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from odissey import reading
from odissey.client import ClientConnection
from odissey.flow import send
from odissey.server import ServerConnection
from tests.harness import IntegrationTest, until


def system() -> str:
    """The legacy log context's "system": Twisted's path sets it per event, ours does not."""
    return context.get(ILogContext)["system"]


class Recorder(Protocol):
    """Keeps what it is given, and under which log system it got it."""

    def __init__(self) -> None:
        self.data = b""
        self.systems: set[str] = set()
        #: Fires with the reason for connectionLost (in a list: a Failure would errback).
        self.lost: Deferred[list[failure.Failure]] = Deferred()
        self.made: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.systems.add(system())

    def connectionLost(self, reason: failure.Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback([reason])


class Other(Recorder):
    """Not enrolled: Twisted reads for it as always."""


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.read_closed: Deferred[None] = Deferred()

    def readConnectionLost(self) -> None:
        self.read_closed.callback(None)

    def writeConnectionLost(self) -> None:
        pass


_log = Logger()


class Logs(Recorder):
    """Logs what it reads through twisted.logger, as Odissey's protocols do."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        _log.info("read {n} bytes", n=len(data))


class OtherLogs(Logs):
    """The same, not enrolled."""


class Fails(Recorder):
    def dataReceived(self, data: bytes) -> None:
        raise ValueError("bad bytes")


class Closes(Recorder):
    """Says goodbye as a client's Terminate makes Odissey do: a last reply (written with
    ``flow.send`` like Odissey's, or through Twisted's buffer with ``buffered``), then
    ``loseConnection``; counts the write events Twisted dispatches to it."""

    buffered = False

    def __init__(self) -> None:
        super().__init__()
        self.write_events = 0

    def connectionMade(self) -> None:
        write = self.transport.doWrite

        def counted() -> object:
            self.write_events += 1
            return write()

        self.transport.doWrite = counted
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.buffered:
            self.transport.write(b"bye")
        else:
            send(self.transport, b"bye")
        self.transport.loseConnection()


class ClosesBuffered(Closes):
    buffered = True


class InstallTests(SynchronousTestCase):
    def test_other_reactors_left_alone(self) -> None:
        """A reactor that is not epoll or poll (here a MemoryReactor) gets nothing installed."""
        fake = MemoryReactor()
        self.assertFalse(reading.install(fake, [Recorder]))
        self.assertIsNone(reading.installed(fake))
        self.assertFalse(hasattr(fake, "doIteration"))

    def test_installs_once_and_uninstalls(self) -> None:
        """A second install adds protocols to the same Reads; uninstall restores the
        reactor's own doIteration."""
        poller = PollReactor()
        self.addCleanup(poller.waker.connectionLost, None)
        self.assertTrue(reading.install(poller, [Recorder]))
        reads = reading.installed(poller)
        assert reads is not None
        self.assertTrue(reading.install(poller, [Other]))
        self.assertIs(reading.installed(poller), reads)
        self.assertEqual(reads.protocols, {Recorder, Other})
        reading.uninstall(poller)
        self.assertIsNone(reading.installed(poller))
        self.assertEqual(poller.doIteration, poller.doPoll)

    def test_poll_reactor_reads(self) -> None:
        """Under the poll reactor too, an enrolled protocol's bytes arrive without the
        logging context."""
        poller = PollReactor()
        self.addCleanup(poller.waker.connectionLost, None)
        reading.install(poller, [Recorder])
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        factory = Factory.forProtocol(Recorder)
        transport = poller.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()  # (adopted as a copy)
        protocol = transport.protocol
        self.addCleanup(transport.abortConnection)
        theirs.sendall(b"hello")
        for _ in range(10):
            if protocol.data:
                break
            poller.doIteration(0.1)
        self.assertEqual(protocol.data, b"hello")
        self.assertEqual(protocol.systems, {"-"})

    def test_twisted_private_names(self) -> None:
        """What the short path reads of Twisted's private names is there; if Twisted
        renames one, this fails instead of reads going wrong."""
        for name in ("_selectables", "_reads", "_doReadOrWrite", "_disconnectSelectable", "_poller"):
            self.assertTrue(hasattr(reactor, name), name)
        # (what tells that a transport whose protocol called loseConnection has nothing left to write)
        transport = abstract.FileDescriptor(MemoryReactor())
        for name in ("_tempDataLen", "dataBuffer", "offset", "producer", "streamingProducer", "producerPaused"):
            self.assertTrue(hasattr(transport, name), name)
        self.assertFalse(tcp.Connection._aborting)
        wrapped = Recorder()
        self.assertIs(_WrappingProtocol(Deferred(), wrapped)._wrappedProtocol, wrapped)


class ShortPathTests(TestCase):
    """Each test enrolls its own protocol types on the running reactor."""

    def setUp(self) -> None:
        if reading.installed(reactor) is None:
            if not reading.install(reactor, []):
                raise self.skipTest("the reactor is neither epoll nor poll")
            self.addCleanup(reading.uninstall, reactor)
        reads = reading.installed(reactor)
        assert reads is not None
        fresh = {Recorder, HalfCloser, Fails, Logs, Closes, ClosesBuffered} - reads.protocols
        reads.protocols.update(fresh)
        self.addCleanup(reads.protocols.difference_update, fresh)

    @inlineCallbacks
    def accepted(self, protocol: type = Recorder) -> Any:
        """A TCP connection: the reactor's end (a ``tcp.Server`` with ``protocol``) and a
        blocking socket for the other end."""
        made: list[Recorder] = []

        def build(_addr: object) -> Recorder:
            made.append(protocol())
            return made[-1]

        factory = Factory()
        factory.buildProtocol = build  # type: ignore[method-assign]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        yield until(lambda: made, 5, "the connection is accepted")
        server = made[0]
        self.addCleanup(lambda: server.transport.abortConnection() if server.transport.connected else None)
        return server, peer

    @inlineCallbacks
    def test_data_delivered(self):
        """Bytes from the peer reach the protocol's dataReceived, outside the logging context."""
        server, peer = yield self.accepted()
        peer.sendall(b"first")
        yield until(lambda: server.data == b"first", 5, "the bytes arrive")
        peer.sendall(b" second")
        yield until(lambda: server.data == b"first second", 5, "more bytes arrive")
        self.assertEqual(server.systems, {"-"})

    @inlineCallbacks
    def test_others_take_twisteds_path(self):
        """A protocol not enrolled is read by Twisted, inside its logging context."""
        server, peer = yield self.accepted(Other)
        peer.sendall(b"x")
        yield until(lambda: server.data, 5, "the byte arrives")
        self.assertEqual(len(server.systems), 1)
        self.assertNotIn("-", server.systems)
        self.assertIn("Other", server.systems.pop())

    @inlineCallbacks
    def test_through_a_client_endpoint(self):
        """A connection made through an endpoint (behind Twisted's _WrappingProtocol) is
        read on the short path too."""
        listener, peer_holder = Factory.forProtocol(Other), []
        listener.buildProtocol = lambda addr: peer_holder.append(Other()) or peer_holder[-1]  # type: ignore
        port = reactor.listenTCP(0, listener, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = Recorder()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        self.addCleanup(client.transport.abortConnection)
        self.assertIsInstance(client.transport.protocol, _WrappingProtocol)
        yield until(lambda: peer_holder, 5, "accepted")
        peer_holder[0].transport.write(b"reply")
        yield until(lambda: client.data == b"reply", 5, "the reply arrives")
        self.assertEqual(client.systems, {"-"})

    @inlineCallbacks
    def test_eof_loses_the_connection(self):
        """The peer's close ends the connection cleanly (ConnectionDone)."""
        server, peer = yield self.accepted()
        peer.sendall(b"last")
        peer.close()
        [reason] = yield server.lost
        self.assertIsInstance(reason.value, ConnectionDone)
        self.assertEqual(server.data, b"last")

    @inlineCallbacks
    def test_half_close(self):
        """A half-closeable protocol is told its reading side ended, and can still write."""
        server, peer = yield self.accepted(HalfCloser)
        peer.shutdown(socket.SHUT_WR)
        yield server.read_closed
        server.transport.write(b"still here")
        peer.setblocking(False)
        received = []

        def got() -> bool:
            try:
                received.append(peer.recv(100))
            except BlockingIOError:
                pass
            return b"".join(received) == b"still here"

        yield until(got, 5, "the write arrives")
        self.assertFalse(server.lost.called)

    @inlineCallbacks
    def test_exception_loses_the_connection_and_is_logged(self):
        """An exception in dataReceived is logged under the connection's log prefix and
        loses the connection with that exception, as Twisted's own path does."""
        logged: list[dict[str, Any]] = []
        log.addObserver(logged.append)
        self.addCleanup(log.removeObserver, logged.append)
        server, peer = yield self.accepted(Fails)
        peer.sendall(b"boom")
        [reason] = yield server.lost
        self.assertIsInstance(reason.value, ValueError)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        errors = [event for event in logged if event.get("isError")]
        self.assertEqual(len(errors), 1)
        self.assertIn("Fails", errors[0]["system"])

    def received(self, peer: socket.socket) -> bytes:
        """What the peer gets until the connection's end."""
        peer.settimeout(5)
        chunks = []
        while True:
            chunk = peer.recv(100)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    @inlineCallbacks
    def goodbye(self, protocol: type) -> Any:
        """A ``Closes`` protocol told goodbye: the write events it had, once it is lost
        cleanly and the peer has its last bytes, then the end of the stream."""
        server, peer = yield self.accepted(protocol)
        peer.sendall(b"goodbye")
        [reason] = yield server.lost
        self.assertIsInstance(reason.value, ConnectionDone)
        self.assertEqual(self.received(peer), b"bye")
        return server.write_events

    @inlineCallbacks
    def test_lose_connection_with_nothing_to_write_is_lost_at_once(self):
        """A protocol that calls loseConnection during a read, with everything it wrote
        already sent, is lost right after that read: no write event first."""
        self.assertEqual((yield self.goodbye(Closes)), 0)

    @inlineCallbacks
    def test_lose_connection_with_bytes_buffered_writes_them_first(self):
        """With bytes still in Twisted's write buffer, loseConnection takes Twisted's own
        way: the write event sends them, then the connection is lost."""
        self.assertGreater((yield self.goodbye(ClosesBuffered)), 0)

    @inlineCallbacks
    def test_log_lines_read_the_same(self):
        """Odissey's log lines (twisted.logger) never carried the legacy context's
        "system": a line logged inside dataReceived reads the same on either path."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for protocol in (Logs, OtherLogs):
            server, peer = yield self.accepted(protocol)
            peer.sendall(b"abc")
            yield until(lambda: server.data, 5, "the bytes arrive")
        lines = [formatEventAsClassicLogText(e) for e in events if e.get("log_format") == "read {n} bytes"]
        self.assertEqual(len(lines), 2)
        self.assertEqual({line.split(" ", 1)[1] for line in lines},  # (after the time)
                         {"[tests.test_reading#info] read 3 bytes\n"})

    @inlineCallbacks
    def test_paused_transport_not_read(self):
        """A paused transport is not read; once resumed, what waited arrives."""
        paused, paused_peer = yield self.accepted()
        other, other_peer = yield self.accepted()
        paused.transport.pauseProducing()
        paused_peer.sendall(b"held")
        # Sent after: by the time it is read, the poll that saw it has dispatched
        # every readable connection, the paused one too if it were still watched.
        other_peer.sendall(b"marker")
        yield until(lambda: other.data == b"marker", 5, "the other connection is read")
        self.assertEqual(paused.data, b"")
        self.assertEqual(other.systems, {"-"})
        paused.transport.resumeProducing()
        yield until(lambda: paused.data == b"held", 5, "the held bytes arrive")

    @inlineCallbacks
    def test_tls_takes_twisteds_path(self):
        """After startTLS the transport's protocol is Twisted's TLS layer: reads go through
        it (and so Twisted's path), and the enrolled protocol gets the plaintext."""
        from tests.test_tls import certs

        cert_file, key_file = certs().server
        with open(cert_file) as c, open(key_file) as k:
            server_options = ssl.PrivateCertificate.fromCertificateAndKeyPair(
                ssl.Certificate.loadPEM(c.read()), ssl.KeyPair.load(k.read(), crypto.FILETYPE_PEM)).options()
        server, peer = yield self.accepted()
        server.transport.startTLS(server_options)
        # The peer's end on the reactor as well, as a TLS client.
        client = reactor.adoptStreamConnection(peer.fileno(), socket.AF_INET, Factory.forProtocol(Other))
        peer.close()  # (adopted as a copy)
        self.addCleanup(client.abortConnection)
        client.startTLS(ssl.CertificateOptions(), False)  # (an accepted socket: the client side)
        client.write(b"secret")
        yield until(lambda: server.data == b"secret", 5, "the plaintext arrives")
        self.assertNotIn("-", server.systems)



class RelayTests(IntegrationTest):
    @inlineCallbacks
    def test_client_and_server_read_on_the_short_path(self):
        """Through psycopg and real PostgreSQL: once Odissey runs, its client and server
        connections are read on the short path, and queries are answered."""
        reads = reading.installed(reactor)
        assert reads is not None
        self.assertLessEqual({ClientConnection, ServerConnection}, reads.protocols)
        conn = yield self.thread(self.odissey.connect)
        self.addCleanup(conn.close)
        yield self.thread(conn.execute, "select 1")  # a server is opened and pooled
        systems: set[str] = set()
        for protocol in [*self.odissey.service.factory.clients, *self.odissey.service.live.servers]:
            self._spy(protocol, systems)
        rows = yield self.thread(lambda: conn.execute("select 40 + 2").fetchall())
        self.assertEqual(rows, [(42,)])
        self.assertEqual(systems, {"-"})

    @staticmethod
    def _spy(protocol: Any, systems: set[str]) -> None:
        received = protocol.dataReceived

        def spied(data: bytes) -> None:
            systems.add(system())
            received(data)

        protocol.dataReceived = spied
