"""Cancel keys: unique, worker-tagged, and only the right secret finds a client; sending
a cancel and knowing whether it can still land."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from odissey.cancel import CancelKeys, KeyLayout, send_cancel
from odissey.config import Storage
from odissey.testing import STORAGE, answer_cancel
from odissey.wire import messages as m
from tests.harness import free_port


class CancelKeyTests(SynchronousTestCase):
    def test_issue_find_release(self) -> None:
        """A key finds its owner only with the right secret, and not after release."""
        keys: CancelKeys[str] = CancelKeys()
        pid, secret = keys.issue("client-a")
        self.assertEqual(keys.find(pid, secret), "client-a")
        self.assertIsNone(keys.find(pid, secret ^ 1))
        keys.release((pid, secret))
        self.assertIsNone(keys.find(pid, secret))

    def test_real_pid_shared_by_two_owners(self) -> None:
        """Two session clients whose servers (on different storages) have the same real
        pid get different secrets; each key finds its own client, before and after the
        other is released."""
        keys: CancelKeys[str] = CancelKeys()
        a = keys.issue("client-a", pid=4242)
        b = keys.issue("client-b", pid=4242)
        self.assertEqual((a[0], b[0]), (4242, 4242))
        self.assertNotEqual(a[1], b[1])
        self.assertEqual((keys.find(*a), keys.find(*b)), ("client-a", "client-b"))
        keys.release(a)
        self.assertIsNone(keys.find(*a))
        self.assertEqual(keys.find(*b), "client-b")

    def test_full_entropy_without_workers_or_peers(self) -> None:
        """One worker, no peers: the secret is all random, signed like PostgreSQL's."""
        keys: CancelKeys[int] = CancelKeys()
        secrets_ = [keys.issue(i)[1] for i in range(2000)]
        self.assertTrue(all(-(2**31) <= s < 2**31 for s in secrets_))
        self.assertTrue(any(s < 0 for s in secrets_) and any(s > 0 for s in secrets_))
        pids = {keys.issue(i)[0] for i in range(1000)}
        self.assertTrue(all(0 < p < 2**31 for p in pids))

    def test_owner_in_secret(self) -> None:
        """Peer id and worker number are read back from the secret alone, in any layout;
        the pid may be a real backend's (session mode), so it carries nothing."""
        for peers, peer_id, workers in ((False, 0, 1), (False, 0, 3), (True, 255, 1),
                                        (True, 7, 64), (True, 1, 2)):
            for worker in {0, workers - 1, workers // 2}:
                layout = KeyLayout.of(peer_id, peers, worker, workers)
                keys: CancelKeys[int] = CancelKeys(layout)
                for i in range(300):
                    _pid, secret = keys.issue(i, pid=4242 if i % 2 else None)
                    self.assertEqual(layout.worker_of(secret), worker)
                    self.assertEqual(layout.peer_of(secret), peer_id if peers else None)
                    self.assertTrue(-(2**31) <= secret < 2**31)

    def test_layout_bounds(self) -> None:
        self.assertEqual(KeyLayout.of(0, False, 0, 1).random_bits, 32)
        self.assertEqual(KeyLayout.of(0, False, 0, 2).random_bits, 31)
        self.assertEqual(KeyLayout.of(3, True, 0, 16).random_bits, 20)
        for bad in ((0, False, 0, 0), (0, False, 2, 2), (0, False, 0, 65), (0, True, 0, 1),
                    (256, True, 0, 1)):
            with self.assertRaises(ValueError):
                KeyLayout.of(*bad)


class _Listener(Protocol):
    """Stands in for PostgreSQL's postmaster: records the packet, closes or keeps quiet."""

    def __init__(self, received: list[bytes], close: bool) -> None:
        self.received = received
        self.close = close

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.close:
            self.transport.loseConnection()


class SendCancelTests(TestCase):
    """send_cancel tells whether a cancel can still land later: the reset policy closes a
    server rather than hand it on while its cancel's fate is unknown."""

    @inlineCallbacks
    def outcome(self, close: bool, port: int | None = None):  # type: ignore[no-untyped-def]
        received: list[bytes] = []
        listening = None
        if port is None:
            factory = Factory.forProtocol(lambda: _Listener(received, close))
            listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
            port = listening.getHost().port
        storage = Storage(name="pg", host="127.0.0.1", port=port, connect_timeout=0.5)
        try:
            landed = yield send_cancel(reactor, storage, 1234, 5678)
        finally:
            if listening is not None:
                yield listening.stopListening()
        return landed, received

    @inlineCallbacks
    def test_closed_by_server(self):
        landed, received = yield self.outcome(close=True)
        self.assertTrue(landed)
        self.assertEqual(b"".join(received), m.cancel_request(1234, 5678))

    @inlineCallbacks
    def test_server_silent_past_patience(self):
        landed, _received = yield self.outcome(close=False)
        self.assertFalse(landed)

    @inlineCallbacks
    def test_nobody_listening(self):
        landed, _received = yield self.outcome(close=True, port=free_port())
        self.assertTrue(landed)  # it was never delivered, so it can never land


class SendCancelClockTests(SynchronousTestCase):
    """send_cancel on a memory reactor: the outcome decided by the clock and the close."""

    def test_true_once_postgres_closes(self) -> None:
        """The packet carries the key; the result is True once PostgreSQL closes."""
        reactor = MemoryReactorClock()
        sent = send_cancel(reactor, STORAGE, 1234, 5678)
        line = answer_cancel(reactor)
        self.assertEqual(line.value(), m.cancel_request(1234, 5678))
        self.assertNoResult(sent)
        line.loseConnection()
        self.assertIs(self.successResultOf(sent), True)

    def test_false_on_giving_up(self) -> None:
        """Silent past the storage's connect_timeout: aborted, and False (it may still land)."""
        reactor = MemoryReactorClock()
        sent = send_cancel(reactor, STORAGE, 1, 2)
        line = answer_cancel(reactor)
        reactor.advance(STORAGE.connect_timeout - 0.1)
        self.assertNoResult(sent)
        reactor.advance(0.1)
        self.assertTrue(line.disconnected)
        self.assertIs(self.successResultOf(sent), False)

    def test_true_when_never_delivered(self) -> None:
        """A connection that fails outright delivered nothing, so nothing can land: True."""
        reactor = MemoryReactorClock()
        sent = send_cancel(reactor, STORAGE, 1, 2)
        _host, _port, factory, _timeout, _bind = reactor.tcpClients.pop()
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertIs(self.successResultOf(sent), True)
