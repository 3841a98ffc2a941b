"""Letting clients go at shutdown without losing a transaction.

A graceful shutdown (SIGTERM) ends each transaction-mode client at a transaction
boundary with 57P01, as PostgreSQL's ``pg_terminate_backend`` would end an idle
session. Each client finishes one transaction: the one it is in, or, if it is between
transactions, one it starts within :data:`QUIET` seconds; it is ended at the first
boundary after that (when it sends the first bytes of another transaction: its relay's
``clientData`` is wrapped for that, so the relay's hot path is unchanged for everyone
else), or once it has sat between transactions for QUIET (checked every :data:`POLL`).
The one transaction matters for clients that connect per transaction and had just
logged in when the drain began (``pgbench -C``, and an online restart's last
connections to the old process): their transaction is served, not refused. A
session-mode client keeps its session until it leaves. ``SHUTDOWN WAIT_FOR_CLIENTS``
ends nobody: it waits.

Console clients are not waited for (a monitoring session would hold a shutdown open
forever); they are ended once every other client has gone, so an operator can watch
the drain with ``SHOW CLIENTS``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from odissey.client import ClientConnection, ClientFactory, ClientState
from odissey.relay import Relay, RelayState
from odissey.wire import errors
from odissey.wire.errors import PoolerError

#: How often idle transaction-mode clients are looked for while draining (seconds).
POLL = 0.05
#: How long a transaction-mode client that was between transactions when the drain
#: began may take to start its last one (seconds).
QUIET = 1.0


def terminated() -> PoolerError:
    """What an ended client is told: PostgreSQL's words for an administrator's shutdown."""
    return PoolerError(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command")


def between_transactions(relay: Relay) -> bool:
    """The client has nothing in flight, nothing waiting for a server and no transaction
    open: ending it now loses nothing."""
    return (relay.state is RelayState.IDLE or relay.state is RelayState.ATTACHED) \
        and relay.tx.idle and not relay.pending and not relay.unsent




class Drain:
    """Ends clients at safe points (or waits for them to leave); ``done`` fires once no
    client is left. :meth:`stop` ends the polling (the caller's patience ran out)."""

    def __init__(self, clock: IReactorTime, factory: ClientFactory, end_transactions: bool) -> None:
        self.factory = factory
        #: True: transaction-mode clients are ended at their next boundary (SIGTERM).
        #: False: nobody is ended, clients leave by themselves (WAIT_FOR_CLIENTS).
        self.end_transactions = end_transactions
        self.clock = clock
        #: Transaction-mode clients whose relay is wrapped, and when the drain saw them first.
        self._gated: dict[ClientConnection, float] = {}
        #: Clients that are in (or have had) their last transaction.
        self._served: set[ClientConnection] = set()
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = clock
        self.done: Deferred[None] = factory.drained()
        self.done.addBoth(self._finished)

    def start(self) -> None:
        self._loop.start(POLL, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _finished(self, result: object) -> object:
        self.stop()
        return result

    def sweep(self) -> None:
        """One pass: end the clients that may be ended now; gate the rest."""
        consoles: list[ClientConnection] = []
        others = 0
        now = self.clock.seconds()
        for client in list(self.factory.clients):
            if client.state is ClientState.CONSOLE:
                consoles.append(client)
                continue
            others += 1
            relay = client.relay
            if (not self.end_transactions or client.state is not ClientState.READY
                    or relay is None or not relay.transaction_mode):
                continue  # (a login in progress is looked at again once it is READY)
            seen = self._gated.get(client)
            if seen is None:
                self._gate(client, relay, now)
            elif between_transactions(relay) and (client in self._served or now - seen >= QUIET):
                client.fail(terminated())
        if not others:
            for client in consoles:
                client.fail(terminated())


    def _gate(self, client: ClientConnection, relay: Relay, now: float) -> None:
        """Let ``client`` finish one transaction; end it when it starts another."""
        self._gated[client] = now
        if not between_transactions(relay):
            self._served.add(client)  # inside its last transaction now
        forward = relay.clientData
        served = self._served

        def clientData(data: bytes) -> None:
            if between_transactions(relay):
                if client in served:
                    client.fail(terminated())
                    return
                served.add(client)
            forward(data)

        relay.clientData = clientData


def end_all(factory: ClientFactory) -> None:
    """Shutdown's patience ran out (or it was asked to be immediate): every client is
    told 57P01 and closed, whatever it is doing."""
    for client in list(factory.clients):
        client.fail(terminated())
