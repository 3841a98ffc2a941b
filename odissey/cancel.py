"""Cancel keys: the BackendKeyData each client gets, and cancel forwarding.

A client never learns a server's secret. It gets a secret of ours; a CancelRequest
carrying it is mapped back to the client, and from there to the server that client is
using right now. The pid is ours too in transaction mode (the client's server changes
under it); in session mode it is its server's real pid, so that what the driver reports
agrees with ``pg_backend_pid()``. Two servers on different storages may share a pid, so
a key is the pair: one pid may belong to several clients, each with its own secret.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Generic, NamedTuple, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from odissey.config import MAX_WORKERS, Storage
from odissey.router import storage_endpoint
from odissey.wire import messages as m

Owner = TypeVar("Owner")

PEER_BITS = 8  # peer ids 1..255, in the top bits of every secret once peers are configured


class KeyLayout(NamedTuple):
    """Where a cancel key names its owner, so that any worker of any peer can route it.

    The tag sits in the top bits of the *secret*, not the pid: in session mode the pid is
    the server's real one (drivers compare it with ``pg_backend_pid()``). From the top:
    the peer id (``PEER_BITS``, only when peers are configured, so every peer reads it the
    same way), then the worker number (only as many bits as this instance's workers need,
    read only by this instance); the rest is random. With neither, all 32 bits are random.
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

    def secret(self, random: int) -> int:
        """A signed 32-bit secret: this layout's tag over ``random`` (random_bits wide)."""
        tag = (self.peer_id << self.worker_bits) | self.worker
        unsigned = (tag << self.random_bits) | random
        return unsigned - (1 << 32) if unsigned >= (1 << 31) else unsigned

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
            mine = secrets.randbits(31)
            if mine and mine not in self._owners:
                pid = mine
        entries = self._owners.setdefault(pid, {})
        layout = self.layout
        while True:
            secret = layout.secret(secrets.randbits(layout.random_bits))
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


def send_cancel(reactor: IReactorTime, storage: Storage, pid: int, secret: int) -> "Deferred[bool]":
    """Forward a cancel to a server. Fires True once it can no longer land later (the
    server acted on it, or it could not even be sent), False when that is unknown."""
    sender = _CancelSender(reactor, pid, secret, storage.connect_timeout)
    connecting = connectProtocol(storage_endpoint(reactor, storage), sender)
    connecting.addCallback(lambda _proto: sender.closed)
    connecting.addErrback(lambda _failure: True)
    return connecting
