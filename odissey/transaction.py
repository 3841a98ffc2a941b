"""Where a client's conversation with its server stands: the transaction-boundary logic.

Pure: it is fed the scanner's events for both directions and says when the server may be
detached. Every request that expects a ReadyForQuery (Query, FunctionCall, Sync) is
counted when the client sends it and uncounted when the ReadyForQuery arrives; the server
is free when nothing is outstanding and the last status was idle (``I``).

A Sync answered is not always the end of the client's work: a pipelining client may
already have sent its next Parse/Bind/Execute, which the server holds (an Execute even
runs, in an implicit transaction that the next Query would commit). So the tracker also
follows where the forwarded stream ends: the server is free only when that is exactly the
end of a request that gets a ReadyForQuery (or of a COPY's CopyDone/CopyFail), a Flush
right after one changing nothing (psycopg ends a pipeline with Sync, Flush).

COPY FROM STDIN is the one exception to "one Sync, one ReadyForQuery": PostgreSQL ignores
Sync while in copy-in mode (libpq sends one right after an extended-protocol COPY and
another after CopyDone). When the server announces copy-in, the Syncs the client sent
since the Execute that started it are uncounted, and further Syncs are not counted until
the client ends the copy with CopyDone or CopyFail.

A client may send the whole COPY (psql does: Query, CopyData…, CopyDone) before the server
has announced it. The copy is then over, from the client's side, when the announcement
comes: each CopyDone/CopyFail sent outside copy-in mode is remembered with the Syncs sent
between its Execute and itself, and the next CopyInResponse consumes it instead of
entering copy-in mode. Remembered ends no ReadyForQuery can still need (nothing
outstanding) are forgotten: they followed a COPY that failed before it began.
"""

from __future__ import annotations

from collections import deque

from odissey.wire.scanner import Event

Q, F, E_EXECUTE, SYNC, COPY_DONE, COPY_FAIL, TERMINATE, FLUSH = b"QFEScfXH"
Z, G = b"ZG"

#: Client message types the tracker needs the scanner to report.
CLIENT_WATCH = frozenset(b"QFEScfXH")


#: The stream ends exactly at the end of a request (the ``tail`` when all is settled).
AT_BOUNDARY = 0


class Transaction:
    __slots__ = ("outstanding", "status", "copy_in", "syncs_since_execute", "tail", "early_copy_ends")

    def __init__(self) -> None:
        self.outstanding = 0
        self.status = b"I"
        self.copy_in = False
        self.syncs_since_execute = 0
        #: For each copy the client ended before the server announced it: the Syncs it
        #: sent between that COPY's Execute and its end (which PostgreSQL will ignore).
        self.early_copy_ends: deque[int] = deque()
        #: Where the last request ends, from the end of what the client sent: AT_BOUNDARY,
        #: ahead (> 0: that request is still arriving) or behind (< 0: more was sent after
        #: it, work the server holds unless it turns out to be a Flush).
        self.tail = AT_BOUNDARY

    @property
    def busy(self) -> bool:
        """The server has work of the client's: a request awaiting its ReadyForQuery, or
        messages not synced yet (an Execute followed by Flush may be running)."""
        return self.outstanding > 0 or self.tail != AT_BOUNDARY

    @property
    def idle(self) -> bool:
        """Nothing in flight or half-sent, no transaction open, not in COPY: the server may go."""
        return (self.outstanding <= 0 and self.status == b"I" and not self.copy_in
                and self.tail == AT_BOUNDARY)

    def client(self, events: list[Event], length: int) -> int | None:
        """Count what the client sent in a chunk of ``length`` bytes; return where a
        Terminate starts, if one came (negative when its header began in an earlier chunk)."""
        clean = self.tail  # where, relative to this chunk, the last request ends
        for kind, _body, end in events:
            if kind == Q or kind == F:
                self.outstanding += 1
                self.syncs_since_execute = 0
                clean = end
            elif kind == SYNC:
                if not self.copy_in:
                    self.outstanding += 1
                    self.syncs_since_execute += 1
                clean = end
            elif kind == E_EXECUTE:
                self.syncs_since_execute = 0
            elif kind == COPY_DONE or kind == COPY_FAIL:
                if self.copy_in:
                    self.copy_in = False
                else:
                    self.early_copy_ends.append(self.syncs_since_execute)
                    self.syncs_since_execute = 0
                clean = end
            elif kind == FLUSH:
                if clean == end - 5:  # a Flush right after a request's end holds nothing
                    clean = end
            elif kind == TERMINATE:
                self._settle(clean, max(end - 5, 0))
                return end - 5
        self._settle(clean, length)
        return None

    def _settle(self, clean: int, length: int) -> None:
        """The last request ends ``clean`` bytes into a chunk of ``length``."""
        self.tail = clean - length

    def server(self, events: list[Event]) -> bool:
        """Account for what the server answered; True when a ReadyForQuery just made the
        server idle (an error or a notice in mid-batch never frees it)."""
        ready = False
        for kind, body, _end in events:
            if kind == Z:
                self.outstanding -= 1
                self.status = body  # type: ignore[assignment]
                ready = True
                if self.outstanding <= 0 and self.early_copy_ends:
                    self.early_copy_ends.clear()
            elif kind == G:
                if self.early_copy_ends:
                    self.outstanding -= self.early_copy_ends.popleft()
                else:
                    self.copy_in = True
                    self.outstanding -= self.syncs_since_execute
                    self.syncs_since_execute = 0
        return ready and self.idle
