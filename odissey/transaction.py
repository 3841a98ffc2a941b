"""Where a client's conversation with its server stands: the transaction-boundary logic.

Pure: it is fed the scanner's events for both directions and says when the server may be
detached. Every request that expects a ReadyForQuery (Query, FunctionCall, Sync) is
counted when the client sends it and uncounted when the ReadyForQuery arrives; the server
is free when nothing is outstanding and the last status was idle (``I``).

COPY FROM STDIN is the one exception to "one Sync, one ReadyForQuery": PostgreSQL ignores
Sync while in copy-in mode (libpq sends one right after an extended-protocol COPY and
another after CopyDone). When the server announces copy-in, the Syncs the client sent
since the Execute that started it are uncounted, and further Syncs are not counted until
the client ends the copy with CopyDone or CopyFail.
"""

from __future__ import annotations

from odissey.wire.scanner import Event

Q, F, E_EXECUTE, SYNC, COPY_DONE, COPY_FAIL, TERMINATE = b"QFEScfX"
Z, G = b"ZG"

#: Client message types the tracker needs the scanner to report.
CLIENT_WATCH = frozenset(b"QFEScfX")


class Transaction:
    __slots__ = ("outstanding", "status", "copy_in", "syncs_since_execute")

    def __init__(self) -> None:
        self.outstanding = 0
        self.status = b"I"
        self.copy_in = False
        self.syncs_since_execute = 0

    @property
    def idle(self) -> bool:
        """Nothing in flight, no transaction open, not in COPY: the server may go."""
        return self.outstanding <= 0 and self.status == b"I" and not self.copy_in

    def client(self, events: list[Event]) -> int | None:
        """Count what the client sent; return where a Terminate starts, if one came
        (negative when its header began in an earlier chunk)."""
        for kind, _body, end in events:
            if kind == Q or kind == F:
                self.outstanding += 1
                self.syncs_since_execute = 0
            elif kind == SYNC:
                if not self.copy_in:
                    self.outstanding += 1
                    self.syncs_since_execute += 1
            elif kind == E_EXECUTE:
                self.syncs_since_execute = 0
            elif kind == COPY_DONE or kind == COPY_FAIL:
                self.copy_in = False
            elif kind == TERMINATE:
                return end - 5
        return None

    def server(self, events: list[Event]) -> bool:
        """Account for what the server answered; True when a ReadyForQuery just made the
        server idle (an error or a notice in mid-batch never frees it)."""
        ready = False
        for kind, body, _end in events:
            if kind == Z:
                self.outstanding -= 1
                self.status = body  # type: ignore[assignment]
                ready = True
            elif kind == G:
                self.copy_in = True
                self.outstanding -= self.syncs_since_execute
                self.syncs_since_execute = 0
        return ready and self.outstanding <= 0 and self.status == b"I" and not self.copy_in
