"""One ordered policy for making a server safe for its next client.

When a client leaves while attached (session end, or a vanished transaction-mode
client), :func:`clean` decides, top to bottom, whether the server can be made clean and
how; any doubt, error or timeout means the server is closed instead. A dirty server never
reaches another client.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.python.failure import Failure

from odissey.logs import Logger
from odissey.server import ServerConnection, ServerState
from odissey.transaction import Transaction
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError

log = Logger()

_S = ord("S")
_COPY_DATA = ord("d")
#: The most we are willing to send to complete a CopyData the client cut short.
MAX_PAD = 1024 * 1024


class _Drain:
    """Swallows a server's replies for a departed client until nothing is outstanding."""

    def __init__(self, server: ServerConnection, tx: Transaction) -> None:
        self.server = server
        self.tx = tx
        self.done: Deferred[None] = Deferred()

    def serverData(self, data: bytes) -> None:
        events = self.server.events(data)
        if events is None:
            return
        for kind, body, _end in events:
            if kind == _S:
                self.server.note_parameter(body)  # type: ignore[arg-type]
        tx = self.tx
        tx.server(events)
        if tx.copy_in:  # a COPY the client started before it left: nobody will feed it
            self.server.transport.write(m.copy_fail("client disconnected") + m.sync())  # type: ignore[union-attr]
            tx.pooler_sent(b"fS")
        elif tx.skipping:  # a batch that failed while draining: only a Sync ends it
            self.server.transport.write(m.sync())  # type: ignore[union-attr]
            tx.pooler_sent(b"S")
        if not tx.pending and not self.done.called:
            self.done.callback(None)

    def serverLost(self) -> None:
        if not self.done.called:
            self.done.errback(PoolerError(errors.CONNECTION_FAILURE, "server lost while draining"))


@inlineCallbacks
def _policy(
    server: ServerConnection,
    tx: Transaction,
    cut: tuple[int, int] | None,
    goodbye: bool,
    reset_query: str,
    cancels: "list[Deferred[bool]]",
):
    # 1. Only a server whose state we know can be cleaned.
    if server.state is not ServerState.ACTIVE:
        return "server state unknown"
    # 2. The client stopped inside a message: only a CopyData can be completed harmlessly
    #    (the COPY is failed right after, so the filler is never stored).
    if cut is not None:
        kind, missing = cut
        if not (kind == _COPY_DATA and tx.copy_in and 0 <= missing <= MAX_PAD):
            return "client stopped in the middle of a message"
        server.transport.write(b"\0" * missing)  # type: ignore[union-attr]
    # 2b. Parse/Bind/Execute sent after the last Sync: the server holds them (an Execute
    #     has even run, in an implicit transaction that a Sync would commit). Unless it
    #     is discarding them after an error: then a Sync only ends the failed batch.
    elif tx.unsynced and not tx.copy_in and not tx.skipping:
        return "client left extended-protocol messages without a Sync"
    # 3. Work in flight: fail a COPY, end a failed batch, cancel a running query (unless
    #    the client said goodbye, which lets its last requests finish), then swallow the
    #    replies.
    drain = _Drain(server, tx)
    server.attach(drain)
    if tx.copy_in:
        server.transport.write(m.copy_fail("client disconnected") + m.sync())  # type: ignore[union-attr]
        tx.pooler_sent(b"fS")
    elif tx.skipping:
        server.transport.write(m.sync())  # type: ignore[union-attr]
        tx.pooler_sent(b"S")
    elif tx.pending and not goodbye:
        cancels = cancels + [server.cancel()]
    if tx.pending:
        yield drain.done
    server.detach()
    # 4. Every cancel sent for this server must have landed before anyone else uses it.
    if cancels:
        problem = yield _settle(server, cancels)
        if problem:
            return problem
    # 5. An open or failed transaction is rolled back.
    if tx.status != b"I":
        failures = yield server.run(["ROLLBACK"])
        if failures or server.status != b"I":
            return "ROLLBACK failed"
    # 6. Session state is reset when the route asks for it.
    if reset_query:
        failures = yield server.run([reset_query])
        if failures or server.status != b"I":
            return f"reset query failed: {failures[0].get('M') if failures else server.status!r}"
    return None


@inlineCallbacks
def _settle(server: ServerConnection, cancels: "list[Deferred[bool]]"):
    """Wait until PostgreSQL has signalled every cancel, then make one round trip (Sync).

    PostgreSQL closes the cancel connection after it has signalled the backend; a
    backend handles a pending signal before it reads its next message, and ignores a
    cancel that arrives while it waits for a command. So once a Sync has been answered,
    the cancel can no longer hit a later client's query. If we had to give up waiting
    for PostgreSQL to close it, the cancel may land at any later moment: the server is
    not reused.
    """
    landed = yield gatherResults(cancels)
    if not all(landed):
        return "the cancel request's outcome is unknown"
    yield server.exchange(m.sync(), 1)
    return None


def _bounded(server: ServerConnection, work: "Deferred[str | None]", timeout: float, what: str) -> "Deferred[bool]":
    """True when ``work`` ended cleanly in time; on timeout the server is aborted."""
    timer = server.reactor.callLater(timeout, server.abort)

    def judged(problem: "str | None | Failure") -> bool:
        if timer.active():
            timer.cancel()
        if isinstance(problem, Failure):
            problem = problem.getErrorMessage()
        if problem is not None:
            log.info("{id}: not reused after {what}: {problem}", id=server.id, what=what, problem=problem)
            return False
        return server.state is ServerState.IDLE

    return work.addBoth(judged)


def clean(
    server: ServerConnection,
    tx: Transaction,
    *,
    cut: tuple[int, int] | None,
    goodbye: bool,
    reset_query: str,
    timeout: float,
    cancels: "list[Deferred[bool]]",
) -> "Deferred[bool]":
    """Clean a server its client left attached; True when it may go back to the pool."""
    work = _policy(server, tx, cut, goodbye, reset_query, cancels)
    return _bounded(server, work, timeout, "client left")


@inlineCallbacks
def _after_transaction(
    server: ServerConnection, cancels: "list[Deferred[bool]]", reset_query: str
):
    if cancels:
        problem = yield _settle(server, cancels)
        if problem:
            return problem
    if reset_query:
        failures = yield server.run([reset_query])
        if failures or server.status != b"I":
            return "reset query failed"
    return None


def after_transaction(
    server: ServerConnection, cancels: "list[Deferred[bool]]", reset_query: str, timeout: float
) -> "Deferred[bool]":
    """A transaction-mode server just went idle, but a cancel was sent for it or the route
    resets after every transaction: True when it is safe for another client."""
    work = _after_transaction(server, cancels, reset_query)
    return _bounded(server, work, timeout, "transaction")
