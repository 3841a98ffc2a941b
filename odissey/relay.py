"""The link between one logged-in client and the server it is using.

A relay goes ``IDLE -> WAITING -> SYNCING -> ATTACHED`` and back to ``IDLE`` each time
a transaction-mode server is released (a session-mode relay stays ATTACHED until the
client leaves), ending in ``CLEANING`` (the client left while attached; its server is
being made safe for the next client) or ``CLOSED``.

The hot path is :meth:`Relay.clientData` / :meth:`Relay.serverData`: each chunk is
scanned for message boundaries and forwarded as it arrived. No Deferred is made unless a
client has to wait for a server.

The relay sees its client only through :class:`RelayClient`; it never touches the
client's transport, so it can be driven by a fake in tests.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from odissey import reset
from odissey.flow import PENDING_LIMIT, Valve, couple, send, uncouple
from odissey.logs import Logger
from odissey.params import Params, differences, set_statements
from odissey.pool import Pool
from odissey.server import ServerConnection, ServerState, server_error
from odissey.session_state import LISTEN, cleanup, left_by, marks
from odissey.statements import COLLECT, Statements
from odissey.transaction import CLIENT_WATCH, Transaction
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation
from odissey.wire.scanner import Event, Scanner

log = Logger()

_TERMINATE = m.terminate()
_S, _E, _Q, _P = b"SEQP"
#: What a transaction-mode relay reads whole even without prepared statements: the
#: texts that may leave session state on a server (session_state.py).
_TEXTS = frozenset(b"PQ")


def _observe(d: "Deferred[bool]") -> "Deferred[None]":
    """A Deferred that fires when ``d`` does, leaving ``d``'s own result alone."""
    seen: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        seen.callback(None)
        return result

    d.addBoth(fire)
    return seen


class RelayClient(TypingProtocol):
    """What a relay needs of its client connection (``ClientConnection`` is one)."""

    id: str
    #: Pauses and resumes the client's reading; registered with the server's transport
    #: as its producer when writes queue.
    valve: Valve

    @property
    def transport(self) -> Any:
        """Only for :func:`odissey.flow.couple`, which registers the producers."""

    def writer(self) -> Callable[[bytes], bool]:
        """A function that writes to the client, True when nothing queued (taken once:
        the hot path calls it directly)."""

    def fail(self, error: PoolerError) -> None:
        """Send one FATAL error and close."""

    def drop(self) -> None:
        """Close without a word (the client has been told, or said goodbye)."""


class RelayState(Enum):
    IDLE = "idle"
    WAITING = "waiting"
    SYNCING = "syncing"
    ATTACHED = "attached"
    CLEANING = "cleaning"
    CLOSED = "closed"


class Relay:
    def __init__(
        self,
        client: RelayClient,
        pool: Pool,
        wanted: Params,
        told: dict[str, str],
        max_message_size: int,
        fingerprint: frozenset | None = None,
    ) -> None:
        self.client = client
        self._to_client = client.writer()
        self.pool = pool
        self.wanted = wanted
        #: ``wanted``'s fingerprint (params.Fingerprints; the login's, if it knew it),
        #: None after a change.
        self._wanted_print = fingerprint
        self.told = told
        self.reported = pool.reported
        #: What the client's Parse texts may leave on a server (CPython: each distinct text read once).
        self._marks = marks(self.reported)
        self.transaction_mode = pool.route.pool.mode == "transaction"
        self.state = RelayState.IDLE
        self.tx = Transaction()
        #: Prepared statements carried across servers (transaction mode), or None.
        self.statements = Statements(pool.statements, self.tx) if pool.statements is not None else None
        #: The hot path's entry for client bytes, chosen once (one call per chunk fewer).
        self.clientData: Callable[[bytes], None] = (
            self._client_statements if self.statements is not None else self._client_plain)
        self.scanner = Scanner(
            watch=CLIENT_WATCH,
            collect=COLLECT if self.statements is not None else _TEXTS if self.transaction_mode else frozenset(),
            max_length=max_message_size, strict=True)
        #: Session state this client's texts may have left, not yet marked on a server.
        self.leaving = 0
        #: Transaction mode, pin_listeners: the client LISTENs, so it keeps its server.
        self.pinned = False
        #: What a ReadyForQuery that leaves the server idle does, chosen when the answer
        #: changes rather than asked on each: a transaction-mode server goes.
        self._ready: Callable[[], None] = self._detach if self.transaction_mode else self._kept_ready
        self.server: ServerConnection | None = None
        self.coupled = False  # transports registered as each other's producers
        #: Client bytes waiting for a server. With prepared statements on, the chunks
        #: with :meth:`_forward`'s arguments: they are rewritten for the server they
        #: reach. Each is looked at as it arrives, so that a chunk the scanner refuses
        #: fails its client before it can cost a server: a lone Query is known whole,
        #: a chunk of whole messages is only checked (``Scanner.complete``, which
        #: leaves the scanner as it was) and walked once, by ``Statements.batch``,
        #: when it is sent; any other is scanned.
        self.pending: list[bytes] = []
        self.unsent: list[tuple[bytes, list[Event] | None, bool, bool]] = []
        self.pending_size = 0
        self.paused = False
        self.goodbye = False  # the client sent Terminate
        self.violated = False  # the client broke the protocol: it has been failed
        self.server_fatal = False  # the server sent a FATAL error: it is about to close
        self.stream_cut = False  # the server's stream may stop inside a message: close it, never clean it
        #: Cancels forwarded for the attached server: each must have landed before the
        #: server serves anyone else (fires True when PostgreSQL closed its connection).
        self.cancels: list[Deferred[bool]] = []
        self._cancel_on_way: Deferred[bool] | None = None  # sent, PostgreSQL not done with it
        self.cancel_wanted = False  # a cancel came while the query waited for a server
        self._attached: Deferred[ServerConnection] | None = None  # see attach_at_login
        #: Set on every client chunk and server event; the janitor turns it into
        #: ``heard_at`` on its next pass, so the hot path never reads the clock.
        self.heard = False
        self.heard_at = pool.reactor.seconds()
        #: Counters (stats.py), and when the query and transaction being timed began
        #: (None: none is): read at a query's start and end only, never per chunk.
        self.stats = pool.stats
        self._clock = pool.clock_ns
        self._query_at: int | None = None
        self._xact_at: int | None = None

    # -- client side -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """The client has requests in flight, or waiting for a server."""
        return self.tx.busy or bool(self.unsent)

    def _client_plain(self, data: bytes) -> None:
        """clientData without prepared statements: the chunk goes as it came."""
        self.heard = True
        if data[0] == _Q and self.scanner.whole(data) and self.tx.query():
            # The usual chunk, one whole Query: queued without scanning it.
            events: list[Event] = [(_Q, data[5:], len(data))] if self.transaction_mode else []
            end = None
        elif not self.transaction_mode and self.scanner.between() and self.tx.batch(data, self.scanner.max_length):
            # Session mode reads no text: a batch of whole requests, queued in one pass.
            events = []
            end = None
        else:
            try:
                events = self.scanner.feed(data)
                end = self.tx.client(events, len(data))
            except ProtocolViolation as exc:
                self._violation(exc)
                return
        self.stats.received += len(data)
        if self._query_at is None and self.tx.pending:  # a query starts (PgBouncer's query_start)
            self._query_at = now = self._clock()
            if self._xact_at is None:
                self._xact_at = now
        if end is not None:
            self.goodbye = True
            if end < 0:  # Terminate's header began in the previous chunk, already sent
                self.stream_cut = True
            data = data[: max(end, 0)]
        if self.transaction_mode:
            self._note(events)
        if self.state is RelayState.ATTACHED:
            if data and not send(self.server.transport, data) and not self.coupled:  # type: ignore[union-attr]
                self._couple()
        elif data and not (self.state is RelayState.IDLE and self.tx.idle):
            # (an idle client's lone Flush has nothing to flush: it needs no server)
            self.pending.append(data)
            self._waits_for_server(len(data))
        if self.goodbye:
            self.client.drop()

    def _client_statements(self, data: bytes) -> None:
        """clientData with prepared statements on: the chunk is rewritten for the server
        it goes to, so the tracker sees it (as that server will) only when it is sent."""
        self.heard = True
        events: list[Event] | None = None
        holding = checked = False
        if data[0] == _Q and self.scanner.whole(data):
            events = [(_Q, data[5:], len(data))]
        elif self.state is RelayState.ATTACHED or (self.state is RelayState.IDLE and not self.unsent):
            # Sent in this call (a server is attached, or taken now if one is idle):
            # Statements.batch walks it then, and the scanner only if it must.
            pass
        elif self.scanner.complete(data):
            checked = True  # waits, whole: see self.unsent
        else:
            scanned = self._scan(data)
            if scanned is None:
                return
            events, holding = scanned
        self.stats.received += len(data)
        if self._query_at is None:  # (the tracker sees the chunk only once it is sent)
            self._query_at = now = self._clock()
            if self._xact_at is None:
                self._xact_at = now
        if self.state is RelayState.ATTACHED:
            self._forward(data, events, holding)
            if self.state is RelayState.ATTACHED:
                self._after_forward()
            return
        if self.state is RelayState.IDLE and not self.unsent and data == _TERMINATE:
            self.goodbye = True
            self.client.drop()
            return
        self.unsent.append((data, events, holding, checked))
        self._waits_for_server(len(data))
        if events is None and not checked and self.unsent:
            # No server yet: checked or scanned now, before the client's next chunk is.
            if self.scanner.complete(data):
                self.unsent[-1] = (data, None, False, True)
            else:
                scanned = self._scan(data)
                if scanned is not None:
                    self.unsent[-1] = (data, *scanned, False)

    def _scan(self, data: bytes) -> tuple[list[Event], bool] | None:
        """The scanner's events for a client chunk, and whether it ends inside a message
        the rewriting needs whole; None when the chunk broke the protocol (the client
        is dropped)."""
        between = self.scanner.between()
        try:
            events = self.scanner.feed(data)
        except ProtocolViolation as exc:
            # None of it goes out: an attached server's stream is cut only if it
            # already stopped inside a message (a chunk taken when the client had no
            # server is scanned only once one is attached, and must not cost it).
            self.stream_cut = self.state is RelayState.ATTACHED and not between
            self.violated = True
            self.client.fail(exc)
            return None
        partial = self.scanner.in_message()
        return events, partial is not None and partial[0] in COLLECT

    def _waits_for_server(self, size: int) -> None:
        """``size`` more bytes wait for a server: take one if the client has none coming
        (or queue for one), and stop reading the client past PENDING_LIMIT.

        Once per transaction in transaction mode: the pool's take is called from here
        and an idle server that needs nothing first is attached by :meth:`_attach`,
        three calls in all (there were eight)."""
        self.pending_size += size
        if self.state is RelayState.IDLE:
            server = self.pool.take(self.client.id)
            if server is None:
                self.state = RelayState.WAITING
                self.pool.queue(self.client.id, self)
            else:
                self._attach(server)
        if self.pending_size > PENDING_LIMIT and not self.paused:
            self.paused = True
            self.client.valve.pauseProducing()

    def _forward(self, data: bytes, events: list[Event] | None, holding: bool, checked: bool = False) -> None:
        """Rewrite one client chunk for the attached server, track it, send it, and
        send the client the replies Odissey owes it at once. ``holding``: the chunk
        ends inside a message the rewriting needs whole. ``events`` None: the chunk is
        not scanned yet, and nothing has been fed to the scanner since, or it is
        ``checked``: whole messages from between two, which the scanner skipped."""
        statements = self.statements
        server = self.server
        assert statements is not None and server is not None
        if events is None:
            batch = statements.batch(data, self.scanner.max_length)
            if batch is not None:
                # The usual extended-protocol chunk: rewritten and queued in one pass.
                out, parses = batch
                if parses:
                    self._note(parses)
                if not send(server.transport, out) and not self.coupled:
                    self._couple()
                return
            if checked:
                # (the relay's scanner may be past later chunks by now: one of its own)
                scanner = self.scanner
                events = Scanner(scanner.watch, scanner.collect, max_length=scanner.max_length,
                                 strict=True).feed(data)
            else:
                scanned = self._scan(data)
                if scanned is None:
                    return
                events, holding = scanned
        if len(events) == 1 and events[0][0] == _Q and events[0][2] == len(data) \
                and statements.query(events[0][1]):  # type: ignore[arg-type]
            # The usual chunk, one whole Query with nothing in flight: as it came.
            self._note(events)
            if not send(server.transport, data) and not self.coupled:
                self._couple()
            return
        try:
            out, view = statements.client(data, events, holding)
            end = self.tx.client(view, len(out))
        except ProtocolViolation as exc:
            self._violation(exc)
            return
        if end is not None:
            self.goodbye = True
            if end < 0:
                self.stream_cut = True
            out = out[: max(end, 0)]
        self._note(events)
        if out and not send(server.transport, out) and not self.coupled:
            self._couple()
        self.tx.settle()
        if statements.immediate:
            replies, statements.immediate = statements.immediate, []
            if not self._to_client(b"".join(replies)) and not self.coupled:
                self._couple()

    def _after_forward(self) -> None:
        """A client that said goodbye goes; a transaction-mode server whose client has
        nothing in flight (a lone Flush, requests Odissey answered) is released."""
        if self.goodbye:
            self.client.drop()
        elif self.transaction_mode and self.tx.idle and not self.pinned:
            self._detach()

    def _note(self, events: list[Event]) -> None:
        """Mark the server with the session state the client's Query and Parse texts
        may leave on it (transaction mode), so that it is cleaned before it serves
        anyone else.

        One event, the usual case, is read without a loop (its Query or Parse always
        has its body: both are collected wherever this is called): under PyPy, entering a
        loop in a function the JIT has inlined costs a frame of its own (and a bridge
        out of it), which for one pass cost more than the pass (docs/architecture.md,
        "Loops on the hot path")."""
        if len(events) == 1:
            kind, body, _end = events[0]
            if kind == _Q:  # (often with literals in it: read each time)
                flags = left_by(body, self.reported)  # type: ignore[arg-type]
            elif kind == _P:  # the text after the statement's name
                flags = self._marks.of(body[body.find(b"\0") + 1:])  # type: ignore[index,union-attr]
            else:
                return
        else:
            flags = 0
            for kind, body, _end in events:
                if body is not None:
                    if kind == _P:
                        flags |= self._marks.of(body[body.find(b"\0") + 1:])
                    elif kind == _Q:
                        flags |= left_by(body, self.reported)
        if flags:
            if flags & LISTEN and self.pool.route.pool.pin_listeners:
                self.pinned = True
                self._ready = self._kept_ready
            if self.state is RelayState.ATTACHED:
                self.server.left |= flags  # type: ignore[union-attr]
            else:
                self.leaving |= flags

    def _violation(self, exc: ProtocolViolation) -> None:
        """Drop the client; none of the chunk goes to the server, whose stream may then
        stop inside a message (its bad one, or one this chunk would have completed), so
        an attached server is closed rather than cleaned.

        Forwarding the good messages before the bad one would send the server requests
        the tracker never counted: a BEGIN among them would leave the server inside a
        transaction that the cleanup believes closed."""
        self.stream_cut = self.state is RelayState.ATTACHED
        self.violated = True
        self.client.fail(exc)

    def clientGone(self) -> None:
        """The client connection closed, for whatever reason."""
        state, self.state = self.state, RelayState.CLOSED
        self.pending = []
        self.unsent = []
        if state is RelayState.WAITING:
            self.pool.leave(self)
        elif state is RelayState.ATTACHED and self.server is not None:
            self._clean(self.server)

    def cancelRequest(self) -> "Deferred[None]":
        """A CancelRequest with this client's key: cancel its server's current work, if
        the client has a request in flight. Fires once PostgreSQL has closed the cancel
        connection we opened (it has signalled the backend by then), so that the client's
        cancel connection can close after it, the ordering libpq relies on: a client's
        next query never overtakes its cancel.

        A query still waiting for a server is cancelled as soon as it has one (PgBouncer
        drops such a cancel, and the query then runs to the end)."""
        if not self.busy:
            return succeed(None)
        if self.state is RelayState.ATTACHED and self.server is not None:
            return _observe(self._cancel_server(self.server))
        if self.state in (RelayState.WAITING, RelayState.SYNCING):
            self.cancel_wanted = True
        return succeed(None)

    def _cancel_server(self, server: ServerConnection) -> "Deferred[bool]":
        """Forward one cancel, unless one is still on its way: a client's cancels are
        coalesced, never one PostgreSQL connection each."""
        if self._cancel_on_way is not None:
            return self._cancel_on_way
        sent = server.cancel()
        self.stats.cancels += 1
        self.cancels.append(sent)
        self._cancel_on_way = sent

        def landed(result: bool) -> bool:
            # (``sent.called`` will not do: it is true as soon as the connection is made)
            if self._cancel_on_way is sent:
                self._cancel_on_way = None
            return result

        sent.addBoth(landed)
        return sent

    # -- getting a server ----------------------------------------------------------------

    # (the pool's Waiter: a client that leaves while waiting leaves the queue, so neither
    # comes after clientGone)

    def refused(self, error: PoolerError) -> None:
        self.client.fail(error)  # (staying WAITING: nothing more is queued)

    def _prepare(self, server: ServerConnection) -> None:
        """Make a server fit for this client before it is attached: clean it of another
        client's session state, then give it the client's parameters."""
        self.server = server
        if server.left and server.last_client != self.client.id:
            # Another client's session state is on it: cleaned first.
            self.state = RelayState.SYNCING
            cleaning = server.run(cleanup(server.left))
            cleaning.addCallbacks(self._cleaned, self._sync_lost, callbackArgs=(server,))
            return
        self._sync(server)

    def _cleaned(self, failures: list[dict[str, str]], server: ServerConnection) -> None:
        if self.state is RelayState.CLOSED or failures:
            self.server = None
            self.pool.discard(server)  # cannot be made clean: never reused
            if self.state is not RelayState.CLOSED:
                self.state = RelayState.IDLE
                self._waits_for_server(0)  # (another server, the same way)
            return
        server.left = 0
        self._sync(server)

    def _sync(self, server: ServerConnection) -> None:
        """Give the server the client's parameters, if they differ, then attach."""
        wanted = self._wanted_print
        if wanted is None:
            wanted = self._wanted_print = self.pool.fingerprints.of(self.wanted)
        current = server.params_print
        if current is None:
            current = server.params_print = self.pool.fingerprints.of(server.params)
        if wanted is current:  # the usual case
            self._attach(server, True)
            return
        changes = differences(self.wanted, server.params, self.reported)
        if not changes:
            self._attach(server, True)
            return
        self.state = RelayState.SYNCING
        syncing = server.run(set_statements(changes, self.wanted, server.params))
        syncing.addCallbacks(self._synced, self._sync_lost, callbackArgs=(server, changes))

    def _synced(
        self, failures: list[dict[str, str]], server: ServerConnection, changes: list[tuple[str, str | None]]
    ) -> None:
        if self.state is RelayState.CLOSED or failures:
            self.server = None
            self.pool.release(server)
            if failures and self.state is not RelayState.CLOSED:
                self.client.fail(server_error(failures[0], "invalid client parameter: "))
            return
        self._wanted_print = server.params_print = None
        updates = []
        for name, value in changes:
            key = name.lower()
            if key in self.reported:
                name, value = server.params.get(key, (name, value or ""))
                self.wanted[key] = (name, value)
                if self.told.get(key) != value:
                    self.told[key] = value
                    updates.append(m.parameter_status(name, value))
            elif value is None:
                server.params.pop(key, None)
            else:
                server.params[key] = (name, value)
        if updates:
            self._to_client(b"".join(updates))
        self._attach(server, True)

    def _sync_lost(self, failure: Failure) -> None:
        self.server = None
        if self.state is not RelayState.CLOSED:
            self.client.fail(PoolerError(errors.CONNECTION_FAILURE, "server connection lost"))

    def _attach(self, server: ServerConnection, prepared: bool = False) -> None:
        """A server just taken or granted becomes the client's, and what waited for it
        goes out: at once in the usual case, the client's own parameters (the same
        fingerprint) and no other client's session state on it; else once
        :meth:`_prepare` has made it fit (``prepared``)."""
        if not prepared:
            wanted = self._wanted_print
            if wanted is None or server.params_print is not wanted or (
                    server.left and server.last_client != self.client.id):
                self._prepare(server)
                return
        server.state = ServerState.ACTIVE  # (ServerConnection.attach, written out: once
        server.handler = self  # per transaction, and a call costs more than its two lines)
        self.server = server
        self.state = RelayState.ATTACHED
        if self.leaving:
            server.left |= self.leaving
            self.leaving = 0
        statements = self.statements
        if statements is None:
            if self.pending:
                if not send(server.transport, b"".join(self.pending)):
                    self._couple()
                self.pending = []
                self.pending_size = 0
        else:
            statements.server = server.statements
            server.statements.epoch += 1
            unsent, self.unsent = self.unsent, []
            self.pending_size = 0
            if len(unsent) == 1:  # (the usual case, without a loop: see _note)
                self._forward(*unsent[0])
            else:
                for data, events, holding, checked in unsent:
                    self._forward(data, events, holding, checked)
                    if self.state is not RelayState.ATTACHED or self.goodbye or self.violated:
                        break  # (what the client sent after its Terminate or a bad message never runs)
            if self.state is not RelayState.ATTACHED:
                return
        if self.cancel_wanted or self.paused or self._attached is not None:
            self._attached_late(server)
        if statements is not None:
            self._after_forward()

    #: The pool's Waiter: a server granted after a wait is attached as one taken at once.
    granted = _attach  # (an alias, not a method calling it: one call fewer per wait)

    def _attached_late(self, server: ServerConnection) -> None:
        """What an attach owes a client that waited long: a cancel that came meanwhile,
        reading resumed, a session-mode login told."""
        if self.cancel_wanted:
            self.cancel_wanted = False
            self._cancel_server(server)
        if self.paused:
            self.paused = False
            self.client.valve.resumeProducing()
        if self._attached is not None:
            attached, self._attached = self._attached, None
            attached.callback(server)

    def _couple(self) -> None:
        """A write had to be queued: from now on each side throttles the other's reading."""
        server = self.server
        if server is not None:
            couple(self.client, self.client.valve, server, server.valve)
            self.coupled = True

    def _uncouple(self, server: ServerConnection) -> None:
        if self.coupled:
            uncouple(self.client, self.client.valve, server, server.valve)
            self.coupled = False

    # -- server side (the server calls these while attached) -----------------------------

    def serverData(self, data: bytes) -> None:
        statements = self.statements
        # With replies of Odissey's own in the queue, the chunk is edited on its way.
        edited = statements is not None and bool(statements.editing or statements.held)
        self.stats.sent += len(data)
        if not edited:
            # The usual reply: one pass finds its ReadyForQuery, no events.
            quick = self.tx.replies(self.server.scanner, data)  # type: ignore[union-attr]
            if quick is not None:
                self.heard = True
                if not self._to_client(data) and not self.coupled:
                    self._couple()
                if self._query_at is not None and not self.tx.pending and not self.tx.unsynced:
                    self._xact_at = self.stats.ended(self._query_at, self._xact_at, self.tx.status)  # type: ignore[arg-type]
                    self._query_at = None
                if quick:
                    self._ready()
                return
        events = self.server.events(data)  # type: ignore[union-attr]
        if events is None:
            return
        if edited:
            data, events = statements.begin(data, events)  # type: ignore[union-attr]
        elif not self._to_client(data) and not self.coupled:
            self._couple()
        ready = False
        if events:
            self.heard = True
            for kind, body, _end in events:
                if kind == _S:
                    self._wanted_print = None
                    for name, value in self.server.note_parameter(body):  # type: ignore[union-attr,arg-type]
                        self.wanted[name.lower()] = (name, value)
                        self.told[name.lower()] = value
                elif kind == _E:
                    if b"VFATAL\0" in body or b"VPANIC\0" in body:  # type: ignore[operator]
                        self.server_fatal = True
                    if statements is not None:
                        statements.failed()
            ready = self.tx.server(events)
            if self._query_at is not None and not self.tx.pending and not self.tx.unsynced:
                self._xact_at = self.stats.ended(self._query_at, self._xact_at, self.tx.status)  # type: ignore[arg-type]
                self._query_at = None
        if edited:
            scanner = self.server.scanner  # type: ignore[union-attr]
            partial = scanner.in_message()
            out = statements.finish(partial[0] if partial else None, scanner.kept())  # type: ignore[union-attr]
            if out and not self._to_client(out) and not self.coupled:
                self._couple()
        if ready:
            self._ready()

    def _kept_ready(self) -> None:
        """``_ready`` of a client that keeps its server (session mode, a pinned
        listener): only this client's next query is at stake in its cancels."""
        if self.cancels:
            self.cancels = [sent for sent in self.cancels if sent is self._cancel_on_way]

    def serverLost(self) -> None:
        server, self.server = self.server, None
        self.state = RelayState.IDLE
        if server is not None:
            self._uncouple(server)
        if self.server_fatal:  # the client already has PostgreSQL's own FATAL: one is all
            self.client.drop()
            return
        self.client.fail(PoolerError(
            errors.CONNECTION_FAILURE, "server closed the connection unexpectedly"))

    # -- timeouts (the janitor calls this about twice a second) --------------------------

    def enforce_timeouts(self, now: float) -> None:
        """Query timeout (cancel), idle-in-transaction and client idle timeouts (FATAL).

        Quiet time counts from the first pass that found the relay had heard something
        since the previous one: a timeout fires up to two periods late, never early."""
        if self.heard:
            self.heard = False
            self.heard_at = now
        settings = self.pool.route.pool
        quiet = now - self.heard_at
        if self.busy:
            if (settings.query_timeout and quiet > settings.query_timeout
                    and not self.cancels and self.server is not None
                    and self.state is RelayState.ATTACHED):
                log.info("{id}: query timeout, cancelling", id=self.client.id)
                self._cancel_server(self.server)
        elif self.tx.status != b"I":
            if settings.idle_in_transaction_timeout and quiet > settings.idle_in_transaction_timeout:
                self.client.fail(PoolerError(
                    errors.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                    "terminating connection due to idle-in-transaction timeout"))
        elif settings.client_idle_timeout and quiet > settings.client_idle_timeout:
            self.client.fail(PoolerError(
                errors.IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout"))

    # -- letting go ----------------------------------------------------------------------

    def _detach(self) -> None:
        """Give the server back to the pool (transaction mode), through a reset when
        cancels were sent for it or the route resets after each transaction."""
        server = self.server
        assert server is not None
        self.server = None
        self.state = RelayState.IDLE
        if self.coupled:
            self._uncouple(server)
        server.state = ServerState.IDLE  # (ServerConnection.detach, written out as attach is)
        server.handler = None
        server.touched = True
        server.last_client = self.client.id
        if self.statements is not None:
            self.statements.server = None
        if not self.cancels and not self.pool.route.pool.reset_after_transaction:
            self.pool.release(server)  # (no cancel, so none on its way either)
            return
        cancels, self.cancels, self._cancel_on_way = self.cancels, [], None
        settings = self.pool.route.pool
        self.stats.resets += 1
        settling = reset.after_transaction(
            server,
            cancels,
            settings.reset_query if settings.reset_after_transaction else "",
            settings.reset_timeout,
        )
        settling.addCallback(self._settled, server)

    def _settled(self, safe: bool, server: ServerConnection) -> None:
        if safe:
            self.pool.release(server)
        else:
            self.pool.discard(server)

    def _clean(self, server: ServerConnection) -> None:
        self.server = None
        self.state = RelayState.CLEANING
        # Whatever session state is on it now is this client's: the client before it
        # must not take it back as its own last server, uncleaned.
        server.last_client = self.client.id
        self._uncouple(server)
        route = self.pool.route
        cut = self.scanner.in_message()
        if self.stream_cut:
            cut = (0, -1)
        self.stats.resets += 1
        cleaning = reset.clean(
            server,
            self.tx,
            cut=cut,
            goodbye=self.goodbye,
            reset_query=route.pool.reset_query
            if not self.transaction_mode or route.pool.reset_after_transaction else "",
            timeout=route.pool.reset_timeout,
            cancels=self.cancels,
        )
        cleaning.addCallback(self._settled, server)

    # -- session mode: the server taken at login -----------------------------------------

    def attach_at_login(self) -> "Deferred[ServerConnection]":
        """Take and attach a server before the client has sent anything, the way its
        first query would (take or wait, wait_timeout, parameter sync): a session-mode
        client learns its server's real pid in its BackendKeyData. Fires with the
        server once attached. If none can be had the client is failed as for a query,
        and the Deferred is left to the client to cancel when it goes."""
        self._attached = Deferred()
        attached = self._attached
        self._waits_for_server(0)  # (nothing waits yet, but a server is taken the same way)
        return attached
