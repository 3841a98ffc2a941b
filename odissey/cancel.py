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
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from odissey.config import Storage
from odissey.router import connect_storage
from odissey.wire import messages as m

Owner = TypeVar("Owner")

WORKER_BITS = 7
_LOCAL_BITS = 31 - WORKER_BITS


class CancelKeys(Generic[Owner]):
    """Issues unique (pid, secret) pairs; a pid of ours has the worker number in its top
    bits."""

    def __init__(self, worker: int = 0) -> None:
        if not 0 <= worker < (1 << WORKER_BITS):
            raise ValueError("worker number out of range")
        self.worker = worker
        self._owners: dict[int, dict[int, Owner]] = {}  # pid -> secret -> owner

    def issue(self, owner: Owner, pid: int | None = None) -> tuple[int, int]:
        """A fresh key for ``owner``: with ``pid`` (a real backend's), a secret no other
        owner of that pid has; without, a pid of ours that nobody has."""
        while pid is None:
            mine = (self.worker << _LOCAL_BITS) | secrets.randbits(_LOCAL_BITS)
            if mine and mine not in self._owners:
                pid = mine
        entries = self._owners.setdefault(pid, {})
        while True:
            secret = secrets.randbits(32) - (1 << 31)
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

    @staticmethod
    def worker_of(pid: int) -> int:
        return pid >> _LOCAL_BITS


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
    connecting = connect_storage(reactor, storage, sender)
    connecting.addCallback(lambda _proto: sender.closed)
    connecting.addErrback(lambda _failure: True)
    return connecting
