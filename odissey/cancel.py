"""Cancel keys: the BackendKeyData each client gets, and cancel forwarding.

A client never learns a server's secret. It gets a secret of ours; a CancelRequest
carrying it is mapped back to the client, and from there to the server that client is
using right now. The pid is ours too in transaction mode (the client's server changes
under it); in session mode it is its server's real pid, so that what the driver reports
agrees with ``pg_backend_pid()``. Two servers on different storages may share a pid, so
a key is the pair: one pid may belong to several clients, each with its own secret.

With peers (several Odissey instances behind one load balancer) a cancel may reach an
instance that did not issue its key: the key names its issuer, and the request is
forwarded there as a plain CancelRequest, as PgBouncer's peering does.
"""

from __future__ import annotations

import hmac
from typing import Generic, Mapping, NamedTuple, Protocol as TypingProtocol, TypeVar, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from odissey.config import MAX_PEER_ID, MAX_WORKERS, Address, Peer, Storage
from odissey.entropy import random_bits
from odissey.logs import Logger
from odissey.router import connect_storage
from odissey.wire import messages as m

log = Logger()

Owner = TypeVar("Owner")

#: Peer ids (1..255), in the top bits of every secret once peers are configured.
PEER_BITS = MAX_PEER_ID.bit_length()
#: With peers, the lowest bits of every secret: how many more times the request may be
#: forwarded. Keys are issued with all ones; each forward takes one off, so instances
#: whose peer lists disagree cannot bounce a cancel between them for ever (PgBouncer's
#: CANCELLATION_TTL_MASK: three hops cover a load balancer in front of load balancers).
TTL_BITS = 2
TTL_MASK = (1 << TTL_BITS) - 1


class KeyLayout(NamedTuple):
    """Where a cancel key names its owner, so that any worker of any peer can route it.

    The tag sits in the top bits of the *secret*, not the pid: in session mode the pid is
    the server's real one (drivers compare it with ``pg_backend_pid()``). From the top:
    the peer id (``PEER_BITS``, only when peers are configured, so every peer reads it the
    same way), then the worker number (only as many bits as this instance's workers need,
    read only by this instance); the rest is random, except that with peers its lowest
    ``TTL_BITS`` are the forwarding budget. With neither, all 32 bits are random.
    """

    peer_id: int = 0
    peer_bits: int = 0
    worker: int = 0
    worker_bits: int = 0

    @classmethod
    def of(cls, peer_id: int, peers: bool, worker: int, workers: int) -> "KeyLayout":
        if not 1 <= workers <= MAX_WORKERS or not 0 <= worker < workers:
            raise ValueError("worker number out of range")
        if peers and not 1 <= peer_id < (1 << PEER_BITS):
            raise ValueError("peer id out of range")
        return cls(peer_id if peers else 0, PEER_BITS if peers else 0,
                   worker, (workers - 1).bit_length())

    @property
    def random_bits(self) -> int:
        return 32 - self.peer_bits - self.worker_bits

    @property
    def ttl_mask(self) -> int:
        return TTL_MASK if self.peer_bits else 0

    def secret(self, random: int) -> int:
        """A signed 32-bit secret: this layout's tag over ``random`` (random_bits wide),
        with a full forwarding budget."""
        tag = (self.peer_id << self.worker_bits) | self.worker
        unsigned = (tag << self.random_bits) | random | self.ttl_mask
        return unsigned - (1 << 32) if unsigned >= (1 << 31) else unsigned

    def ttl(self, secret: int) -> int:
        """How many more times a cancel with this secret may be forwarded to a peer."""
        return secret & self.ttl_mask

    def as_issued(self, secret: int) -> int:
        """The secret as this instance issued it: a full forwarding budget again (a
        forwarded request arrives with less). Two's complement keeps it signed 32-bit."""
        return secret | self.ttl_mask

    def peer_of(self, secret: int) -> int | None:
        """The peer that issued ``secret``; None when peers are not configured."""
        if not self.peer_bits:
            return None
        return (secret & 0xFFFFFFFF) >> (32 - self.peer_bits)

    def worker_of(self, secret: int) -> int:
        """The worker of this instance that issued ``secret``."""
        return ((secret & 0xFFFFFFFF) >> self.random_bits) & ((1 << self.worker_bits) - 1)


class CancelKeys(Generic[Owner]):
    """Issues unique (pid, secret) pairs whose secret carries this worker's tag."""

    def __init__(self, layout: KeyLayout = KeyLayout()) -> None:
        self.layout = layout
        self._owners: dict[int, dict[int, Owner]] = {}  # pid -> secret -> owner

    def issue(self, owner: Owner, pid: int | None = None) -> tuple[int, int]:
        """A fresh key for ``owner``: with ``pid`` (a real backend's), a secret no other
        owner of that pid has; without, a pid of ours that nobody has."""
        while pid is None:
            mine = random_bits(31)
            if mine and mine not in self._owners:
                pid = mine
        entries = self._owners.setdefault(pid, {})
        layout = self.layout
        while True:
            secret = layout.secret(random_bits(layout.random_bits))
            if secret not in entries:
                break
        entries[secret] = owner
        return pid, secret

    def release(self, key: tuple[int, int]) -> None:
        pid, secret = key
        entries = self._owners.get(pid)
        if entries is not None:
            entries.pop(secret, None)
            if not entries:
                del self._owners[pid]

    def find(self, pid: int, secret: int) -> Owner | None:
        """The owner of this key; secrets compared in constant time."""
        wanted = secret.to_bytes(4, "big", signed=True)
        for candidate, owner in self._owners.get(pid, {}).items():
            if hmac.compare_digest(candidate.to_bytes(4, "big", signed=True), wanted):
                return owner
        return None


class Local(NamedTuple):
    """The key is this instance's (or peering is off): look its owner up here."""

    secret: int  # as issued


class Forward(NamedTuple):
    """The key is another instance's: forward the request there, one hop spent."""

    peer: Peer
    secret: int


class Drop(NamedTuple):
    """Nobody known can act on this key."""

    why: str


def route_cancel(layout: KeyLayout, peers: Mapping[int, Peer], secret: int) -> Union[Local, Forward, Drop]:
    """Where a CancelRequest with this secret goes. The owner never forwards its own id,
    so consistent peer lists cannot loop; the budget in the key stops inconsistent ones."""
    owner = layout.peer_of(secret)
    if owner is None:
        return Local(secret)
    if owner == layout.peer_id:
        return Local(layout.as_issued(secret))
    peer = peers.get(owner)
    if peer is None:
        return Drop(f"its key names peer {owner}, which is not configured")
    if not layout.ttl(secret):
        return Drop(f"its key names peer {owner} but was forwarded too often already")
    return Forward(peer, secret - 1)  # the budget sits in the lowest bits: no borrow


class CancelTracker(TypingProtocol):
    """Keeps every cancel connection until it closes (shutdown waits for them)."""

    def cancelling(self, sent: "Deferred[bool]") -> "Deferred[bool]": ...


class Peering:
    """This instance's peers, and the forwarding of cancel requests to them."""

    def __init__(self, reactor: IReactorTime, peers: Mapping[int, Peer],
                 tracker: CancelTracker | None = None) -> None:
        self.reactor = reactor
        self.peers = peers
        self.tracker = tracker

    def forward(self, pid: int, to: Forward) -> "Deferred[bool]":
        """Send the request on to the peer; fires once it closed the connection (it
        does once its PostgreSQL has acted), or once we gave up (then False)."""
        peer = to.peer
        log.debug("forwarding a cancel request to peer {id} ({host}:{port})", id=peer.id,
                  host=peer.host, port=peer.port)
        sent = _send(self.reactor, peer, pid, to.secret)
        return self.tracker.cancelling(sent) if self.tracker is not None else sent


class _CancelSender(Protocol):
    """Sends one CancelRequest; PostgreSQL closes the connection once it has signalled.

    ``closed`` fires True when PostgreSQL closed it (the cancel has landed, or never
    will), False when we gave up waiting: then it may still land, on anything.
    """

    def __init__(self, reactor: IReactorTime, pid: int, secret: int, patience: float) -> None:
        self.reactor = reactor
        self.packet = m.cancel_request(pid, secret)
        self.patience = patience
        self.closed: Deferred[bool] = Deferred()
        self._timer: IDelayedCall | None = None
        self._gave_up = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.packet)
        self._timer = self.reactor.callLater(self.patience, self._give_up)

    def _give_up(self) -> None:
        self._gave_up = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.closed.callback(not self._gave_up)


def _send(reactor: IReactorTime, where: Address, pid: int, secret: int) -> "Deferred[bool]":
    sender = _CancelSender(reactor, pid, secret, where.connect_timeout)

    def connected(_protocol: object) -> "Deferred[bool]":
        return sender.closed

    def never_sent(_failure: Failure) -> bool:
        return True

    connecting = connect_storage(reactor, where, sender)
    return connecting.addCallback(connected).addErrback(never_sent)


def send_cancel(reactor: IReactorTime, storage: Storage, pid: int, secret: int) -> "Deferred[bool]":
    """Forward a cancel to a server. Fires True once it can no longer land later (the
    server acted on it, or it could not even be sent), False when that is unknown."""
    return _send(reactor, storage, pid, secret)
