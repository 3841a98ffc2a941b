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

from odissey.cancel import (
    TTL_MASK, CancelKeys, Drop, Forward, KeyLayout, Local, Peering, route_cancel, send_cancel,
)
from odissey.config import Peer, Storage
from odissey.testing import STORAGE, CancelLine, answer_cancel
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


PEERS = {1: Peer(id=1, host="10.0.0.1", port=6432), 3: Peer(id=3, host="/run/o3", port=7000)}


def issued_by(peer_id: int, workers: int = 1) -> tuple[KeyLayout, int]:
    """A secret as instance ``peer_id`` (last worker of ``workers``) hands it out."""
    layout = KeyLayout.of(peer_id, True, workers - 1, workers)
    return layout, CancelKeys(layout).issue("client")[1]


class RouteCancelTests(SynchronousTestCase):
    """Where a CancelRequest goes, decided from its secret alone: here, to the peer that
    issued it (one hop spent), or nowhere."""

    here = KeyLayout.of(2, True, 0, 1)

    def test_issued_with_full_budget(self) -> None:
        """With peers every secret carries the full forwarding budget; without, no bits
        are spent on one."""
        for _ in range(200):
            self.assertEqual(self.here.ttl(issued_by(2)[1]), TTL_MASK)
        self.assertEqual(KeyLayout().ttl(-1), 0)

    def test_other_peers_key_forwarded_with_one_hop_less(self) -> None:
        """A key of a configured peer goes to that peer, the budget one less and every
        other bit (peer, worker, random) unchanged, whichever workers it has."""
        for workers in (1, 4):
            for _ in range(100):
                _layout, secret = issued_by(1, workers)
                where = route_cancel(self.here, PEERS, secret)
                self.assertEqual(where, Forward(PEERS[1], secret - 1))
                self.assertEqual(secret ^ where.secret, 1)  # type: ignore[union-attr]
                self.assertEqual(self.here.peer_of(where.secret), 1)  # type: ignore[union-attr]

    def test_own_key_handled_here_as_issued(self) -> None:
        """A key of this instance is looked up here, also after hops elsewhere: the
        budget is restored to what was issued, so the lookup finds its client."""
        keys: CancelKeys[str] = CancelKeys(self.here)
        pid, secret = keys.issue("victim")
        for hops in range(TTL_MASK + 1):
            where = route_cancel(self.here, PEERS, secret - hops)
            self.assertEqual(where, Local(secret))
            self.assertEqual(keys.find(pid, where.secret), "victim")  # type: ignore[union-attr]
        self.assertEqual(route_cancel(self.here, {**PEERS, 2: Peer(id=2, host="me")}, secret),
                         Local(secret))  # never forwards its own id, whatever the list says

    def test_unknown_peer_and_spent_budget_dropped(self) -> None:
        """A key naming an id nobody configured, or a peer's key whose budget is spent
        (peer lists that disagree), is dropped rather than sent on."""
        _layout, secret = issued_by(9)
        self.assertIsInstance(route_cancel(self.here, PEERS, secret), Drop)
        _layout, secret = issued_by(3)
        spent = secret - TTL_MASK
        self.assertEqual(route_cancel(self.here, PEERS, spent + 1), Forward(PEERS[3], spent))
        self.assertIsInstance(route_cancel(self.here, PEERS, spent), Drop)

    def test_without_peering_everything_is_local(self) -> None:
        """Without a peer id, keys have no owner bits: every cancel is looked up here,
        unchanged."""
        alone = KeyLayout()
        for secret in (0, -1, 2**31 - 1, -(2**31), issued_by(1)[1]):
            self.assertEqual(route_cancel(alone, PEERS, secret), Local(secret))


class _Tracker:
    def __init__(self) -> None:
        self.tracked: list[object] = []

    def cancelling(self, sent):  # type: ignore[no-untyped-def]
        self.tracked.append(sent)
        return sent


class PeeringTests(SynchronousTestCase):
    """Forwarding to a peer: a plain CancelRequest over a new connection, tracked for
    shutdown, done when the peer closes it or its connect_timeout passes."""

    def test_forward_over_tcp(self) -> None:
        """The peer gets the key as forwarded; the result is True once it closes."""
        reactor = MemoryReactorClock()
        tracker = _Tracker()
        sent = Peering(reactor, PEERS, tracker).forward(77, Forward(PEERS[1], 12345))
        self.assertEqual(tracker.tracked, [sent])
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.0.0.1", 6432))
        line = answer_cancel(reactor)
        self.assertEqual(line.value(), m.cancel_request(77, 12345))
        self.assertNoResult(sent)
        line.loseConnection()
        self.assertIs(self.successResultOf(sent), True)

    def test_forward_over_unix_socket_gives_up(self) -> None:
        """A peer on a unix socket is reached there; one that never closes is given up
        after its connect_timeout (False: the cancel may still land)."""
        reactor = MemoryReactorClock()
        sent = Peering(reactor, PEERS).forward(1, Forward(PEERS[3], 2))
        address, factory, _timeout, _check = reactor.unixClients.pop()
        self.assertEqual(address, "/run/o3/.s.PGSQL.7000")
        protocol = factory.buildProtocol(None)
        line = CancelLine(protocol)
        protocol.makeConnection(line)
        self.assertEqual(line.value(), m.cancel_request(1, 2))
        reactor.advance(PEERS[3].connect_timeout)
        self.assertTrue(line.disconnected)
        self.assertIs(self.successResultOf(sent), False)


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
