"""Cancel keys: Odissey's own BackendKeyData per client, and cancel forwarding.

A client never learns a server's real key (its server changes under transaction
pooling). It gets a key of ours; a CancelRequest carrying it is mapped back to the
client, and from there to the server that client is using right now.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from odissey.config import Storage
from odissey.router import storage_endpoint
from odissey.wire import messages as m

Owner = TypeVar("Owner")

WORKER_BITS = 7
_LOCAL_BITS = 31 - WORKER_BITS


class CancelKeys(Generic[Owner]):
    """Issues unique (pid, secret) pairs; the pid's top bits name the worker process."""

    def __init__(self, worker: int = 0) -> None:
        if not 0 <= worker < (1 << WORKER_BITS):
            raise ValueError("worker number out of range")
        self.worker = worker
        self._owners: dict[int, tuple[int, Owner]] = {}

    def issue(self, owner: Owner) -> tuple[int, int]:
        while True:
            pid = (self.worker << _LOCAL_BITS) | secrets.randbits(_LOCAL_BITS)
            if pid and pid not in self._owners:
                break
        secret = secrets.randbits(32) - (1 << 31)
        self._owners[pid] = (secret, owner)
        return pid, secret

    def release(self, pid: int) -> None:
        self._owners.pop(pid, None)

    def find(self, pid: int, secret: int) -> Owner | None:
        entry = self._owners.get(pid)
        if entry is None:
            return None
        good = hmac.compare_digest(entry[0].to_bytes(4, "big", signed=True),
                                   secret.to_bytes(4, "big", signed=True))
        return entry[1] if good else None

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
    connecting = connectProtocol(storage_endpoint(reactor, storage), sender)
    connecting.addCallback(lambda _proto: sender.closed)
    connecting.addErrback(lambda _failure: True)
    return connecting
