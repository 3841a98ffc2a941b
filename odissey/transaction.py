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
from typing import Optional

from odissey.wire.scanner import Event

# Client message types.
Q, F, SYNC, TERMINATE, FLUSH = b"QFSXH"
PARSE, BIND, DESCRIBE, EXECUTE, CLOSE = b"PBDEC"
COPY_DATA, COPY_DONE, COPY_FAIL = b"dcf"
# Server message types.
Z, COPY_IN, ERROR = b"ZGE"
PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE = b"123"
ROW_DESCRIPTION, NO_DATA, COMMAND_COMPLETE, EMPTY_QUERY, PORTAL_SUSPENDED = b"TnCIs"

#: Client message types the tracker needs the scanner to report: all a client may send
#: once logged in, so that each reported message starts where the previous one ended.
CLIENT_WATCH = frozenset(b"QFSXHPBDECdcf")
#: Server message types the tracker reads.
SERVER_WATCH = frozenset(b"ZGE123TnCIs")

#: A queued CopyDone/CopyFail the client sent before the server announced its COPY.
_COPY_END = -1
#: Extended-protocol requests, and the reply types that complete each one.
_COMPLETES = {
    PARSE: frozenset((PARSE_COMPLETE,)),
    BIND: frozenset((BIND_COMPLETE,)),
    CLOSE: frozenset((CLOSE_COMPLETE,)),
    DESCRIBE: frozenset((ROW_DESCRIPTION, NO_DATA)),  # a statement's ParameterDescription comes first
    EXECUTE: frozenset((COMMAND_COMPLETE, EMPTY_QUERY, PORTAL_SUSPENDED)),
}
_ANSWERED_BY_Z = frozenset((Q, F, SYNC))
#: What copy-in mode reads as copy messages (Sync and Flush it ignores); anything else
#: fails the COPY and is consumed.
_IN_COPY = frozenset((COPY_DATA, COPY_DONE, COPY_FAIL, SYNC, FLUSH))

class Transaction:
    __slots__ = ("pending", "status", "copy_in", "skipping", "unsynced", "partial", "edge")

    def __init__(self) -> None:
        #: Requests sent and not yet answered, oldest first (message types, or _COPY_END).
        self.pending: deque[int] = deque()
        self.status = b"I"
        self.copy_in = False
        #: An extended-protocol message failed and no Sync has been sent since: the server
        #: discards everything the client sends until one.
        self.skipping = False
        #: Extended-protocol messages were sent after the last Sync (or Query): the server
        #: holds that work (an Execute has even run, in an implicit transaction).
        self.unsynced = False
        #: The type of a message still arriving: 0 when the stream ends between messages,
        #: -1 when even its header is incomplete.
        self.partial = 0
        #: Where the message still arriving ends (> 0) or starts (< 0, header incomplete),
        #: from the end of what the client sent.
        self.edge = 0

    @property
    def busy(self) -> bool:
        """The server has work of the client's: a request awaiting its reply, messages not
        synced yet (an Execute followed by Flush may be running), or one still arriving."""
        return bool(self.pending) or self.unsynced or self.partial != 0

    @property
    def idle(self) -> bool:
        """Nothing in flight or half-sent, no transaction open, not in COPY, not discarding
        until a Sync: the server may go."""
        return (not self.pending and self.status == b"I" and not self.copy_in
                and not self.skipping and not self.unsynced and self.partial == 0)

    def client(self, events: list[Event], length: int) -> Optional[int]:
        """Queue what the client sent in a chunk of ``length`` bytes; return where a
        Terminate starts, if one came (negative when its header began in an earlier chunk)."""
        start = self.edge  # each message starts where the previous one ended
        pending = self.pending
        for kind, _body, end in events:
            if kind == TERMINATE:
                self.edge, self.partial = end - length, 0
                return start
            start = end
            if self.skipping:  # the server discards all but Sync
                if kind == SYNC:
                    self.skipping = self.unsynced = False
                    pending.append(SYNC)
            elif self.copy_in and kind not in _IN_COPY:
                self.copy_in = False  # the copy consumes it as an error, and ends
            elif kind in _COMPLETES:
                pending.append(kind)
                self.unsynced = True
            elif kind in _ANSWERED_BY_Z:
                if kind != SYNC or not self.copy_in:
                    pending.append(kind)
                    self.unsynced = False
            elif kind == COPY_DONE or kind == COPY_FAIL:
                if self.copy_in:
                    self.copy_in = False
                elif pending:  # the COPY may not have been announced yet
                    pending.append(_COPY_END)
            # A Flush, and CopyData outside copy-in, change nothing the server holds.
        edge = start - length
        self.edge = edge
        if edge == 0:
            self.partial = 0
        elif edge < 0:  # a header still incomplete: the scanner has not reported it yet
            self.partial = -1
        elif events:
            self.partial = events[-1][0]
        return None

    def pooler_sent(self, kinds: bytes) -> None:
        """The pooler itself ended the departed client's stream with these messages
        (CopyFail, Sync), right after a complete message."""
        self.edge = self.partial = 0
        self.client([(kind, None, 5 * (i + 1)) for i, kind in enumerate(kinds)], 5 * len(kinds))

    def server(self, events: list[Event]) -> bool:
        """Match what the server answered to what was asked; True when a ReadyForQuery
        just made the server idle (an error or a notice in mid-batch never frees it)."""
        ready = False
        pending = self.pending
        for kind, body, _end in events:
            head = pending[0] if pending else 0
            if kind == Z:
                # Everything up to the request this answers is done (the Sync of a batch).
                while pending and pending.popleft() not in _ANSWERED_BY_Z:
                    pass
                self.status = body  # type: ignore[assignment]
                ready = True
            elif kind == ERROR:
                self.copy_in = False  # an error ends copy-in; later copy messages are dropped
                if head in _COMPLETES:  # discard until Sync, as the server now does
                    while pending and pending[0] != SYNC:
                        pending.popleft()
                    self.skipping = not pending
                continue
            elif kind == COPY_IN:
                self._copy_started()
                continue
            elif head in _COMPLETES and kind in _COMPLETES[head]:
                pending.popleft()
            else:
                continue
            while pending and pending[0] == _COPY_END:  # a COPY that failed before it began
                pending.popleft()
        return ready and self.idle

    def _copy_started(self) -> None:
        """CopyInResponse for the request at the head: the Syncs the client sent since are
        ignored by the server; a CopyDone/CopyFail already sent ends the copy, and so does
        any other request, which the copy consumes as an error. A COPY started by an
        Execute leaves its implicit transaction open until a Sync after the copy."""
        pending = self.pending  # changed in place: the caller iterates over this deque
        while pending and pending[0] != Q and pending[0] != EXECUTE:
            pending.popleft()  # answered before the copy could start
        if not pending:
            self.copy_in = True
            return
        owner = pending.popleft()
        ended = False
        while pending:
            if pending.popleft() != SYNC:  # a copy end, or a request the copy consumes
                ended = True
                break
        pending.appendleft(owner)
        self.copy_in = not ended
        # What the copy consumed no longer counts: judge by what is left.
        self.unsynced = False
        for kind in pending:
            if kind in _COMPLETES:
                self.unsynced = True
            elif kind in _ANSWERED_BY_Z:
                self.unsynced = False
