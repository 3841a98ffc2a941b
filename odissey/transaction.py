"""Where a client's conversation with its server stands: the transaction-boundary logic.

Pure: it is fed the scanner's events for both directions and says when the server may be
detached. Every client request that gets a reply is queued when the client sends it and
leaves the queue when its reply arrives (ParseComplete for a Parse, CommandComplete for an
Execute, ReadyForQuery for a Query or a Sync, ...); the server is free when the queue is
empty and the last status was idle (``I``).

Matching replies to requests, rather than counting ReadyForQuery, is what PostgreSQL's
error rule needs: after an error in an extended-protocol message the server discards
every message up to the next Sync, a Query or FunctionCall among them included, so one
ReadyForQuery then answers several requests. An error in a Query or FunctionCall
discards nothing.

A Sync answered is not always the end of the client's work: a pipelining client may
already have sent its next Parse/Bind/Execute, which the server holds (an Execute even
runs, in an implicit transaction that the next Query would commit). So the tracker also
follows where the forwarded stream ends: the server is free only when that is exactly the
end of a request, or of a message PostgreSQL ignores there (a Flush; CopyData, CopyDone or
CopyFail outside a COPY).

COPY FROM STDIN: PostgreSQL ignores Sync while in copy-in mode (libpq sends one right after
an extended-protocol COPY and another after CopyDone). When the server announces copy-in,
the Syncs queued since the request that started it are dropped, and further Syncs are not
queued until the client ends the copy. A client may send the whole COPY (psql does: Query,
CopyData…, CopyDone) before the server has announced it: a CopyDone/CopyFail sent outside
copy-in mode while a request is pending is queued as a marker, and the announcement that
follows ends the copy there instead of entering copy-in mode. A marker that reaches the
head of the queue unused followed a COPY that failed before it began: PostgreSQL drops it.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Protocol as TypingProtocol

from odissey.wire.errors import ProtocolViolation
import struct

from odissey.wire.scanner import HEADER, Event, Scanner

# Client message types.
Q, F, SYNC, TERMINATE, FLUSH = b"QFSXH"
PARSE, BIND, DESCRIBE, EXECUTE, CLOSE = b"PBDEC"
COPY_DATA, COPY_DONE, COPY_FAIL = b"dcf"
# Server message types.
Z, COPY_IN, ERROR, PARAMETER_STATUS = b"ZGES"
PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE = b"123"
ROW_DESCRIPTION, NO_DATA, COMMAND_COMPLETE, EMPTY_QUERY, PORTAL_SUSPENDED = b"TnCIs"

#: Client message types the tracker needs the scanner to report: all a client may send
#: once logged in, so that each reported message starts where the previous one ended.
CLIENT_WATCH = frozenset(b"QFSXHPBDECdcf")
#: Server message types the tracker reads.
SERVER_WATCH = frozenset(b"ZGE123TnCIs")

#: A queued CopyDone/CopyFail the client sent before the server announced its COPY.
_COPY_END = -1

# Entries the prepared-statement layer (statements.py) queues instead of the client's own
# request: a request type with one of these bits. Each one that leaves the queue is
# reported to the queue's Sink, which edits the reply stream and keeps its books.
#: The pooler's own request, slipped in before the client's: its reply is dropped.
SWALLOWED = 0x100
#: A client request the pooler answers itself: no reply will come from the server.
SYNTHESISED = 0x200
#: A client request forwarded (renamed): its reply is the client's, but if the server
#: refuses or skips it, the layer's bookkeeping is undone.
TRACKED = 0x400
#: A request sent only to make the server fail at this point (its error is replaced).
REPLACED = 0x800
INJECTED_PARSE = PARSE | SWALLOWED
INJECTED_CLOSE = CLOSE | SWALLOWED
TRACKED_PARSE = PARSE | TRACKED
TRACKED_QUERY = Q | TRACKED
SYNTH_PARSE = PARSE | SYNTHESISED
SYNTH_CLOSE = CLOSE | SYNTHESISED
SYNTH_QUERY = Q | SYNTHESISED
FAILING_DESCRIBE = DESCRIBE | REPLACED
FAILING_PARSE = PARSE | REPLACED

#: Extended-protocol requests, and the reply types that complete each one.
_COMPLETES = {
    PARSE: frozenset((PARSE_COMPLETE,)),
    BIND: frozenset((BIND_COMPLETE,)),
    CLOSE: frozenset((CLOSE_COMPLETE,)),
    DESCRIBE: frozenset((ROW_DESCRIPTION, NO_DATA)),  # a statement's ParameterDescription comes first
    EXECUTE: frozenset((COMMAND_COMPLETE, EMPTY_QUERY, PORTAL_SUSPENDED)),
    INJECTED_PARSE: frozenset((PARSE_COMPLETE,)),
    INJECTED_CLOSE: frozenset((CLOSE_COMPLETE,)),
    TRACKED_PARSE: frozenset((PARSE_COMPLETE,)),
    FAILING_DESCRIBE: frozenset((ROW_DESCRIPTION, NO_DATA)),
    FAILING_PARSE: frozenset((PARSE_COMPLETE,)),
    SYNTH_PARSE: frozenset(),
    SYNTH_CLOSE: frozenset(),
}
#: (request << 8 | reply) for each reply that completes the request at the queue's head:
#: one set lookup per reply on the hot path.
_ANSWERS = frozenset(request << 8 | reply for request, replies in _COMPLETES.items() for reply in replies)
_ANSWERED_BY_Z = frozenset((Q, F, SYNC))
#: Command tags of statements that drop every prepared statement of a connection.
DROPS_ALL = frozenset((b"DEALLOCATE ALL\0", b"DISCARD ALL\0"))
#: Server messages that :meth:`Transaction.replies` leaves to the full matching (and
#: ReadyForQuery, which it counts, as Scanner.ready_for_query wants): errors,
#: COPY, ParameterStatus (which the relay reads), and CommandComplete when its length is
#: that of a DROPS_ALL tag. Everything else in a reply changes nothing a ReadyForQuery
#: after it does not settle, while the queue holds only the client's own requests.
STOPS: "dict[int, frozenset[int] | None]" = {
    Z: None, ERROR: None, COPY_IN: None, PARAMETER_STATUS: None,
    COMMAND_COMPLETE: frozenset(4 + len(tag) for tag in DROPS_ALL),
}
#: What the client side queues like a Query: a Sync-like end of the extended batch.
_QUERY_LIKE = _ANSWERED_BY_Z | {SYNTH_QUERY, TRACKED_QUERY}
#: Messages PostgreSQL reads only up to SMALL_LIMIT bytes (it drops a client that sends
#: a longer one); Flush and Sync have no body at all.
_SMALL = frozenset((CLOSE, DESCRIBE, EXECUTE, FLUSH, SYNC, TERMINATE, COPY_DONE, COPY_FAIL))
SMALL_LIMIT = 10000
#: What a client may send between CopyData and the CopyDone/CopyFail that ends it.
#: Anything else is refused: whether PostgreSQL runs it (the COPY failed on an earlier
#: row and left copy-in mode) or consumes it (the COPY is still reading) depends on
#: data the pooler does not parse, and guessing wrong would free a server about to
#: answer it. No driver sends anything there.
_IN_DATA = frozenset((COPY_DATA, COPY_DONE, COPY_FAIL, FLUSH, TERMINATE))

# What the server does with what the client sends next (Transaction.mode).
NORMAL, SKIPPING, COPYING = range(3)


class Sink(TypingProtocol):
    """Told about each special entry (a request type with a flag bit) as it leaves the
    queue, in queue order: the prepared-statement layer."""

    def answered(self, entry: int, kind: int, body: Optional[bytes], end: int) -> None:
        """The server's reply ``kind`` (ending at ``end`` in the chunk) answers ``entry``.
        An ErrorResponse is always followed by :meth:`discarded`."""

    def discarded(self, entries: list[int]) -> None:
        """The server skipped ``entries`` (after an error in their batch): no reply
        comes. What they assumed is undone, last first, and so is what the request that
        failed (just answered) assumed."""

    def command(self, tag: bytes) -> None:
        """DEALLOCATE ALL or DISCARD ALL completed, in order with the replies around it."""

    def due(self, entry: int, end: int) -> None:
        """A SYNTHESISED entry reached the head: its reply goes out now, after the
        server's bytes up to ``end`` (-1: not in answer to a server chunk)."""


class Transaction:
    __slots__ = ("pending", "status", "mode", "unsynced", "in_data", "partial", "edge", "sink")

    def __init__(self) -> None:
        #: Requests sent and not yet answered, oldest first (message types, or _COPY_END).
        self.pending: deque[int] = deque()
        self.status = b"I"
        #: NORMAL; SKIPPING: an extended-protocol message failed and no Sync has been sent
        #: since, so the server discards everything the client sends until one; COPYING:
        #: the server is in copy-in mode.
        self.mode = NORMAL
        #: Extended-protocol messages were sent after the last Sync (or Query): the server
        #: holds that work (an Execute has even run, in an implicit transaction).
        self.unsynced = False
        #: CopyData sent into a COPY (announced, or maybe about to be) that the client has
        #: not ended yet with CopyDone or CopyFail.
        self.in_data = False
        #: The type of a message still arriving: 0 when the stream ends between messages,
        #: -1 when even its header is incomplete.
        self.partial = 0
        #: Where the message still arriving ends (> 0) or starts (< 0, header incomplete),
        #: from the end of what the client sent.
        self.edge = 0
        #: Who is told about special entries (only a relay with prepared statements on
        #: queues any).
        self.sink: Optional[Sink] = None

    @property
    def copy_in(self) -> bool:
        return self.mode == COPYING

    @property
    def skipping(self) -> bool:
        return self.mode == SKIPPING

    @property
    def busy(self) -> bool:
        """The server has work of the client's: a request awaiting its reply, messages not
        synced yet (an Execute followed by Flush may be running), or one still arriving."""
        return bool(self.pending) or self.unsynced or self.partial != 0

    @property
    def idle(self) -> bool:
        """Nothing in flight or half-sent, no transaction open, not in COPY, not discarding
        until a Sync: the server may go."""
        return (not self.pending and self.status == b"I" and self.mode == NORMAL
                and not self.unsynced and self.partial == 0)

    def client(self, events: list[Event], length: int) -> Optional[int]:
        """Queue what the client sent in a chunk of ``length`` bytes; return where a
        Terminate starts, if one came (negative when its header began in an earlier chunk)."""
        start = self.edge  # each message starts where the previous one ended
        pending = self.pending
        unsynced = self.unsynced
        for kind, _body, end in events:
            mode = self.mode
            if self.in_data and kind not in _IN_DATA:
                raise ProtocolViolation(
                    f"message type {chr(kind)!r} sent inside COPY data, before CopyDone or CopyFail")
            if kind in _SMALL:
                size = end - start
                if size > SMALL_LIMIT or (size != 5 and (kind == FLUSH or kind == SYNC)):
                    raise ProtocolViolation(f"invalid message length {size - 1} for message type {chr(kind)!r}")
            if kind in _COMPLETES:
                if mode == NORMAL:
                    pending.append(kind)
                    unsynced = True
                elif mode == COPYING:
                    self.mode = NORMAL  # the copy consumes it as an error, and ends
            elif kind in _QUERY_LIKE:
                if mode == NORMAL:
                    pending.append(kind)
                    unsynced = False
                elif kind == SYNC:
                    if mode == SKIPPING:
                        self.mode = NORMAL
                        pending.append(SYNC)
                        unsynced = False
                    # (copy-in mode ignores a Sync)
                else:
                    if mode == COPYING:
                        self.mode = NORMAL  # the copy consumes it as an error, and ends
            elif kind == COPY_DATA:
                if mode == COPYING or (mode == NORMAL and pending):
                    self.in_data = True
            elif kind == COPY_DONE or kind == COPY_FAIL:
                self.in_data = False
                if mode == COPYING:
                    self.mode = NORMAL
                elif mode == NORMAL and pending:  # the COPY may not have been announced yet
                    pending.append(_COPY_END)
            elif kind == TERMINATE:
                self.unsynced = unsynced
                self.edge, self.partial = end - length, 0
                return start
            # A Flush, and CopyData outside copy-in, change nothing the server holds.
            start = end
        self.unsynced = unsynced
        edge = start - length
        self.edge = edge
        if edge == 0:
            self.partial = 0
        elif edge < 0:  # a header still incomplete: the scanner has not reported it yet
            self.partial = -1
        elif events:
            self.partial = events[-1][0]
        return None

    def query(self) -> bool:
        """A chunk that is one whole Query, seen without events: queued as :meth:`client`
        would queue it, when nothing is in flight, NORMAL mode, no CopyData open and
        the previous chunk ended between messages; False otherwise, nothing changed
        (the caller takes the events' path)."""
        if self.pending or self.mode != NORMAL or self.in_data or self.edge:
            return False
        self.pending.append(Q)
        self.unsynced = False
        return True

    def batch(self, data: bytes, max_length: int) -> bool:
        """One pass over a client chunk whose messages nobody needs whole (session mode):
        its headers walked and its requests queued as :meth:`client` would queue them,
        when it starts between messages (the caller's scanner says so) and is made of
        whole extended-protocol requests, Queries, FunctionCalls, Syncs and Flushes of
        valid lengths, in NORMAL mode with no CopyData open. False otherwise, nothing
        changed: the caller feeds the chunk to its scanner and :meth:`client`, which
        also raises what is wrong with it."""
        if self.mode != NORMAL or self.in_data or self.edge:
            return False
        n = len(data)
        pos = 0
        queued = []
        unsynced = self.unsynced
        try:
            while pos < n:
                kind, length = HEADER(data, pos)
                if length < 4 or length > max_length:
                    return False
                pos += 1 + length
                if kind in _COMPLETES:
                    if length >= SMALL_LIMIT and kind in _SMALL:
                        return False
                    queued.append(kind)
                    unsynced = True
                elif kind == Q or kind == F or kind == SYNC:
                    if kind == SYNC and length != 4:
                        return False
                    queued.append(kind)
                    unsynced = False
                elif kind != FLUSH or length != 4:  # (a Flush changes nothing held)
                    return False  # COPY messages, Terminate, or what is not a request
        except struct.error:
            return False
        if pos != n:
            return False
        self.pending.extend(queued)
        self.unsynced = unsynced
        return True

    def pooler_sent(self, kinds: bytes) -> None:
        """The pooler itself ended the departed client's stream with these messages
        (CopyFail, Sync), right after a complete message; whatever the client was in the
        middle of sending is over."""
        self.edge = self.partial = 0
        self.in_data = False
        self.client([(kind, None, 5 * (i + 1)) for i, kind in enumerate(kinds)], 5 * len(kinds))

    def replies(self, scanner: Scanner, data: bytes) -> Optional[bool]:
        """One pass over a server chunk (the server's ``scanner`` finds its boundaries)
        when its ReadyForQuery messages alone say what :meth:`server` would make of its
        events: the mode is NORMAL, the queue holds only the client's plain requests and
        TRACKED ones (whose replies go to the client as they came), and the chunk ends
        after a ReadyForQuery with nothing of STOPS in it. Then each ReadyForQuery
        retires the queue up to the request it answers (the replies before it could
        only retire requests ahead of that one; a server that keeps to the protocol
        answered each of them, since none failed), and the result is :meth:`server`'s.
        None, with nothing changed, when the chunk needs the events."""
        if self.mode != NORMAL:
            return None
        pending = self.pending
        answered = 0  # the queue's requests that a ReadyForQuery answers
        tracked = False
        if len(pending) == 1 and pending[0] in _ANSWERED_BY_Z:
            answered = 1  # (a lone Query, the usual case, without a loop: see Relay._note)
        else:
            for entry in pending:
                if entry in _ANSWERED_BY_Z:
                    answered += 1
                elif entry < 0 or entry > 0xFF:
                    if entry < 0 or not entry & TRACKED:
                        return None  # a copy end marker, or an entry whose reply the Sink edits
                    tracked = True
                    if entry == TRACKED_QUERY:
                        answered += 1
        count = scanner.ready_for_query(data, STOPS)
        if count < 0:
            return None
        if count >= answered and pending and pending[-1] in _ANSWERED_BY_Z:
            # The usual reply: it answers everything asked.
            if tracked:
                for entry in pending:
                    if entry > 0xFF:
                        self._did(entry, data)
            pending.clear()
            count = 0
        while count and pending:
            entry = pending.popleft()
            if entry in _ANSWERED_BY_Z:
                count -= 1
            elif entry > 0xFF:
                if entry == TRACKED_QUERY:
                    count -= 1
                self._did(entry, data)
        status = self.status = data[-1:]
        return not pending and status == b"I" and not self.unsynced and self.partial == 0  # (idle)

    def _did(self, entry: int, data: bytes) -> None:
        """A TRACKED request the server did, retired by :meth:`replies`: with no error
        in the chunk (nor one before it, which would have taken it out of the queue)
        nothing it answers was skipped or refused."""
        if entry == TRACKED_QUERY:
            self.sink.answered(entry, Z, data[-1:], -1)  # type: ignore[union-attr]
        else:
            self.sink.answered(entry, PARSE_COMPLETE, None, -1)  # type: ignore[union-attr]

    def server(self, events: list[Event]) -> bool:
        """Match what the server answered to what was asked; True when a ReadyForQuery
        just made the server idle (an error or a notice in mid-batch never frees it)."""
        ready = False
        pending = self.pending
        for kind, body, end in events:
            if kind == COMMAND_COMPLETE and self.sink is not None and body in DROPS_ALL:
                self.sink.command(body)
            if kind == Z:
                # Everything up to the request this answers is done (the Sync of a batch).
                skipped = []
                while pending:
                    entry = pending.popleft()
                    if entry in _ANSWERED_BY_Z:
                        break
                    if entry == TRACKED_QUERY:
                        self.sink.answered(entry, kind, body, end)  # type: ignore[union-attr]
                        break
                    if entry > 0xFF:
                        skipped.append(entry)
                if skipped:
                    self.sink.discarded(skipped)  # type: ignore[union-attr]
                self.status = body  # type: ignore[assignment]
                ready = True
            elif kind == ERROR:
                if self.mode == COPYING:
                    # An error ends copy-in: later copy messages are dropped, and what the
                    # client sends from now on (a driver that saw the error may go on
                    # without CopyDone, as older pgjdbc does) is run, not consumed.
                    self.mode = NORMAL
                    self.in_data = False
                if pending and pending[0] in _COMPLETES:  # discard until Sync, as the server does
                    entry = pending.popleft()
                    failed = entry > 0xFF
                    if failed:
                        self.sink.answered(entry, kind, body, end)  # type: ignore[union-attr]
                    skipped = []
                    while pending and pending[0] != SYNC:
                        entry = pending.popleft()
                        if entry > 0xFF:
                            skipped.append(entry)
                    if failed or skipped:
                        self.sink.discarded(skipped)  # type: ignore[union-attr]
                    if not pending:
                        self.mode = SKIPPING
                continue
            elif kind == COPY_IN:
                self._copy_started()
                continue
            elif pending and (pending[0] << 8 | kind) in _ANSWERS:
                entry = pending.popleft()
                if entry > 0xFF:
                    self.sink.answered(entry, kind, body, end)  # type: ignore[union-attr]
            else:
                continue
            while pending and pending[0] == _COPY_END:  # a COPY that failed before it began
                pending.popleft()
            if pending and pending[0] > 0xFF:
                self.settle(end)
        return ready and self.idle

    def settle(self, end: int = -1) -> None:
        """Answer the SYNTHESISED entries at the head of the queue: nothing the server
        was asked before them is outstanding any more."""
        pending = self.pending
        while pending and pending[0] > 0xFF and pending[0] & SYNTHESISED and self.mode == NORMAL:
            self.sink.due(pending.popleft(), end)  # type: ignore[union-attr]

    def _copy_started(self) -> None:
        """CopyInResponse for the request at the head: the Syncs the client sent since are
        ignored by the server; a CopyDone/CopyFail already sent ends the copy, and so does
        any other request, which the copy consumes as an error. A COPY started by an
        Execute leaves its implicit transaction open until a Sync after the copy."""
        pending = self.pending  # changed in place: the caller iterates over this deque
        while pending and pending[0] != Q and pending[0] != EXECUTE:
            self._drop(pending.popleft())  # answered before the copy could start
        if not pending:
            self.mode = COPYING
            return
        owner = pending.popleft()
        ended = False
        while pending:
            entry = pending.popleft()
            if entry != SYNC:  # a copy end, or a request the copy consumes
                self._drop(entry)
                ended = True
                break
        pending.appendleft(owner)
        self.mode = NORMAL if ended else COPYING
        # What the copy consumed no longer counts: judge by what is left.
        self.unsynced = False
        for kind in pending:
            if kind in _COMPLETES:
                self.unsynced = True
            elif kind in _ANSWERED_BY_Z:
                self.unsynced = False

    def _drop(self, entry: int) -> None:
        if entry > 0xFF:
            self.sink.discarded([entry])  # type: ignore[union-attr]
