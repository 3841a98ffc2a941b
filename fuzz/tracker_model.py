"""The transaction tracker against a small model of how PostgreSQL processes a client stream.

:class:`ServerModel` reads client requests one at a time, as a backend does, and says what
it answers: which messages fail, what each reply is made of, when it discards everything
up to a Sync (after an error in an extended-protocol message, never after one in a Query or
FunctionCall), copy-in mode in both protocols (Sync and Flush ignored, any other message
failing the copy and consumed by it), transaction blocks (a failed block fails everything
but its end), and the implicit transaction that unsynced extended-protocol work holds
until a Sync, a Query or a FunctionCall. It follows ``postgres.c`` (``SocketBackend``,
``PostgresMain``, the error recovery that sets ``ignore_till_sync`` only when
``doing_extended_query_message``) and ``copyfromparse.c`` (``CopyGetData``).

``check_tracker`` runs one :class:`TrackerCase`: the requests are turned into real client
bytes, cut into chunks and fed to :class:`~odissey.transaction.Transaction` through the
relay's scanner (``CLIENT_WATCH``); the model answers the requests it has received, and
its replies, as real server bytes cut anywhere, go to ``Transaction.server`` through the
server connection's scanner (``SERVER_WATCH``/``SERVER_COLLECT``), several messages in one
call or one message over several. The checks:

safety
    ``server()`` returns True only when the client's stream ends at a message boundary,
    every reply the model produced has been delivered, and the requests received but not
    yet processed would get no reply and leave the model clean (not discarding, not
    copying, no unsynced extended-protocol work, outside a transaction block).
liveness
    whenever the client's stream ends at a boundary and every reply is delivered, ``idle``
    says exactly what the model says (and it is False at any other moment); the end of a
    case is such a moment.
refusals
    the tracker refuses (``ProtocolViolation``) a client that sends other messages inside
    COPY data, where it cannot know whether PostgreSQL will run them or consume them; the
    relay then closes the server. That ends a case, and is a failure when the client sent
    what a driver sends (:func:`discipline` leaves its requests as they are).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, NoReturn, Sequence, Tuple

from fuzz.targets import PropertyFailure
from odissey.server import SERVER_COLLECT
from odissey.transaction import CLIENT_WATCH, SERVER_WATCH, Transaction
from odissey.wire.messages import message
from odissey.wire.errors import ProtocolViolation
from odissey.wire.scanner import Scanner

# Client message types.
Q, F, S, H = b"QFSH"
P, B, D, E, C = b"PBDEC"
COPY_DATA, COPY_DONE, COPY_FAIL = b"dcf"
CLIENT_KINDS = b"QFSHPBDECdcf"
# Server message types.
Z, ERR, NOTICE, PARAM, NOTIFY = b"ZENSA"
PARSE_OK, BIND_OK, CLOSE_OK, ROWS, NO_DATA, PARAMS = b"123Tnt"
DATA_ROW, DONE, EMPTY, SUSPENDED, CALL_OK = b"DCIsV"
COPY_IN, COPY_OUT = b"GH"
EXTENDED = frozenset((P, B, D, E, C))
#: What a backend in copy-in mode ignores (CopyGetData: "for the convenience of client
#: libraries ... that may send those without noticing that the command they just sent
#: was COPY").
COPY_IGNORES = frozenset((S, H))

_BODIES = {
    ERR: b"SERROR\0VERROR\0C42000\0Mfailed\0\0",
    NOTICE: b"SNOTICE\0VNOTICE\0C00000\0Mnote\0\0",
    PARAM: b"application_name\0model\0",
    NOTIFY: b"\0\0\0\x01chan\0\0",
    ROWS: b"\0\x01x\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    PARAMS: b"\0\0",
    DATA_ROW: b"\0\x01\0\0\0\x011",
    DONE: b"SELECT 1\0",
    CALL_OK: b"\xff\xff\xff\xff",
    COPY_IN: b"\0\0\0",
    COPY_OUT: b"\0\0\0",
    COPY_DATA: b"1\n",
}


class Request(NamedTuple):
    """One client message and what the model does with it.

    ``fails``: the message errors (a Sync: the commit of its implicit transaction; a
    CopyData/CopyDone: the copy, when in copy-in mode). ``copies``: a Query or Execute
    that runs COPY FROM STDIN. ``toggles``: a Query or Execute that opens a transaction
    block, or ends the open one. ``variant`` picks the shape of a success (rows, an empty
    query, a suspended portal, COPY TO STDOUT, a statement or a portal Describe ...),
    notices and parameter reports among the replies, and the body length.
    """

    kind: int
    fails: bool = False
    copies: bool = False
    toggles: bool = False
    variant: int = 0

    def describe(self) -> str:
        flags = ("!" if self.fails else "") + (">" if self.copies else "")
        return chr(self.kind) + flags + ("~" if self.toggles else "") + f"{self.variant}"


Reply = Tuple[int, bytes]  # (type, body)


def client_bytes(request: Request) -> bytes:
    """The request as a client sends it (bodies are plausible filler; the tracker reads none)."""
    kind, variant = request.kind, request.variant
    if kind in (S, H, COPY_DONE):
        return message(bytes([kind]))
    if kind == D or kind == C:
        body = (b"S" if variant & 1 else b"P") + b"s" * (variant >> 5) + b"\0"
    elif kind == COPY_DATA and variant >= 240:
        body = b"x" * 300  # a big one, so that chunks end inside bodies too
    else:
        body = b"q" * (variant >> 4) + b"\0"
    return message(bytes([kind]), body)


def reply_bytes(replies: Sequence[Reply]) -> bytes:
    return b"".join(message(bytes([kind]), body) for kind, body in replies)


class ServerModel:
    """What one PostgreSQL backend does with the client's requests, one at a time."""

    __slots__ = ("skipping", "copy", "block", "failed", "held")

    def __init__(self) -> None:
        #: An extended-protocol message failed: discard everything up to a Sync.
        self.skipping = False
        #: In copy-in mode: "simple" (started by a Query) or "extended" (by an Execute).
        self.copy = ""
        self.block = False  # in a transaction block (BEGIN ... COMMIT)
        self.failed = False  # ... that has failed
        #: Extended-protocol messages processed since the last Sync, Query or FunctionCall:
        #: the client's batch is open (and Parse/Bind/Describe/Execute have started an
        #: implicit transaction).
        self.held = False

    def clean(self) -> bool:
        """Nothing a next client could trip over: the server may go."""
        return not (self.skipping or self.copy or self.block or self.held)

    def settles(self, unread: Sequence[Request]) -> bool:
        """Would these requests, received but not processed yet, get no reply and leave
        the server clean?"""
        future = copy.copy(self)
        return not any(future.process(request) for request in unread) and future.clean()

    def state(self) -> str:
        names = [name for name in ("skipping", "block", "failed", "held") if getattr(self, name)]
        return ",".join(names + ([f"copy-{self.copy}"] if self.copy else [])) or "clean"

    def _status(self) -> Reply:
        return (Z, b"E" if self.failed else b"T" if self.block else b"I")

    def _toggle(self) -> None:
        self.block, self.failed = not self.block, False

    def _fail(self) -> List[Reply]:
        if self.block:
            self.failed = True
        return [(ERR, _BODIES[ERR])]

    def process(self, request: Request) -> List[Reply]:
        """The replies to one request, in order; the model's state moves on."""
        kind = request.kind
        if self.copy:
            return self._in_copy(request)
        if self.skipping and kind != S:
            return []
        if kind == S:
            out = []
            if request.fails and self.held and not self.block and not self.skipping:
                out = [(ERR, _BODIES[ERR])]  # the implicit transaction's commit failed
            self.skipping = self.held = False
            return out + [self._status()]
        if kind in (H, COPY_DATA, COPY_DONE, COPY_FAIL):
            return []  # a Flush; copy messages outside copy-in mode are dropped
        variant = request.variant
        out = [(NOTICE, _BODIES[NOTICE])] if variant & 4 else []
        if kind in (Q, F):
            self.held = False  # a Query/FunctionCall commits an implicit transaction too
            if request.fails or (self.failed and not (kind == Q and request.toggles)):
                if kind == Q and variant & 3 == 1:
                    out += [(DONE, _BODIES[DONE])]  # an earlier statement of the string ran
                return out + self._fail() + [self._status()]
            if kind == F:
                return out + [(CALL_OK, _BODIES[CALL_OK]), self._status()]
            if request.toggles:  # BEGIN, COMMIT, ROLLBACK
                self._toggle()
                if variant & 8:
                    out.append((PARAM, _BODIES[PARAM]))
                return out + [(DONE, _BODIES[DONE]), self._status()]
            if request.copies:
                self.copy = "simple"
                return out + [(COPY_IN, _BODIES[COPY_IN])]
            return out + self._results(variant, simple=True) + [self._status()]
        # Parse, Bind, Describe, Execute, Close
        # In a failed block only what ends it may be parsed, bound, described and run.
        blocked = self.failed and kind != C and not request.toggles
        if request.fails or blocked:
            self.skipping = True
            return out + self._fail()
        self.held = True
        if kind == E:
            if request.toggles:
                self._toggle()
                return out + [(DONE, _BODIES[DONE])]
            if request.copies:
                self.copy = "extended"
                return out + [(COPY_IN, _BODIES[COPY_IN])]
            return out + self._results(variant, simple=False)
        if kind == D:
            what = (ROWS, _BODIES[ROWS]) if variant & 2 else (NO_DATA, b"")
            if variant & 1:  # a statement: its parameters first
                return out + [(PARAMS, _BODIES[PARAMS]), what]
            return out + [what]
        return out + [({P: PARSE_OK, B: BIND_OK, C: CLOSE_OK}[kind], b"")]

    def _results(self, variant: int, simple: bool) -> List[Reply]:
        """What a statement that succeeds sends before its Query's ReadyForQuery (or as
        its Execute's whole answer)."""
        shape = variant & 3
        rows = [(DATA_ROW, _BODIES[DATA_ROW])] * (variant >> 6)
        if shape == 1:  # rows (a Query also describes them)
            described = [(ROWS, _BODIES[ROWS])] if simple else []
            return described + rows + [(DONE, _BODIES[DONE])]
        if shape == 2:
            return [(EMPTY, b"")] if simple or not variant & 8 else rows + [(SUSPENDED, b"")]
        if shape == 3:  # COPY TO STDOUT
            out = [(COPY_OUT, _BODIES[COPY_OUT])] + [(COPY_DATA, _BODIES[COPY_DATA])] * 2
            return out + [(COPY_DONE, b""), (DONE, _BODIES[DONE])]
        extra = [(NOTIFY, _BODIES[NOTIFY])] if variant & 8 and simple else []
        return [(DONE, _BODIES[DONE])] + extra

    def _in_copy(self, request: Request) -> List[Reply]:
        kind = request.kind
        if kind in COPY_IGNORES or (kind == COPY_DATA and not request.fails):
            return []
        simple = self.copy == "simple"
        self.copy = ""
        if kind == COPY_DONE and not request.fails:
            out = [(DONE, _BODIES[DONE])]
            if simple and request.variant & 1:  # the Query string had a statement after COPY
                out += self._results(request.variant >> 1, simple=True)
        else:  # bad data, CopyFail, or any other message: the copy fails and consumes it
            out = self._fail()
            if not simple:
                self.skipping = True  # the Execute was an extended-protocol message
        if simple:
            self.held = False
            out.append(self._status())
        return out


def discipline(requests: Sequence[Request]) -> Tuple[Request, ...]:
    """The requests as a driver sends them: a COPY FROM STDIN that a Query or Execute may
    have started gets only CopyData and Flush (and, after an Execute and before any
    CopyData, libpq's Sync) until its CopyDone or CopyFail, and so does any CopyData; a
    CopyDone is put in before anything else.

    A client that sends other messages into a COPY cannot know whether the server will
    consume them as the copy's error or, when the copy has already failed on its data,
    run them; neither can the tracker (see docs/reliability.md).
    """
    out: List[Request] = []
    section = ""  # "", or the protocol of a COPY that may be open
    data = False  # CopyData sent and not ended: the tracker refuses anything else there
    for request in requests:
        kind = request.kind
        if data and kind not in (COPY_DATA, COPY_DONE, COPY_FAIL, H):
            out.append(Request(COPY_DONE))
            section = ""
        data = kind == COPY_DATA or (data and kind == H)
        if section:
            if kind in (COPY_DONE, COPY_FAIL):
                section = ""
            elif not (kind in (COPY_DATA, H) or (kind == S and section == "extended")):
                out.append(Request(COPY_DONE))
                section = ""
        if kind in (Q, E) and request.copies and not request.toggles:
            section = "simple" if kind == Q else "extended"
        out.append(request)
    return tuple(out)


# -- running a case -------------------------------------------------------------------------

#: Send client bytes: this many, or through the end of the message under way (-1), or all
#: (-2 or less). An empty chunk is fed too.
SEND = "c"
#: The server processes this many more of the requests it has whole (fewer if it has fewer).
PROCESS = "p"
#: Deliver this many reply bytes, or through the end of the next reply message (-1), or
#: all produced so far (-2 or less), in one ``server()`` call (none when the chunk holds no
#: event).
DELIVER = "s"

Action = Tuple[str, int]


class TrackerFailure(PropertyFailure):
    """A disagreement with the model; ``label`` names its kind for the run's counts."""

    def __init__(self, label: str, what: str) -> None:
        super().__init__(what)
        self.label = label


@dataclass(frozen=True)
class TrackerCase:
    """Client requests and a schedule; the rest of everything is sent, processed and
    delivered after the schedule."""

    requests: Tuple[Request, ...]
    actions: Tuple[Action, ...] = ()

    def describe(self) -> str:
        return (
            f"requests={' '.join(r.describe() for r in self.requests)} "
            f"actions={' '.join(f'{op}{n}' for op, n in self.actions)}"
        )


TransactionFactory = Callable[[], Transaction]


def _stop(n: int, done: int, ends: List[int], total: int) -> int:
    """Where a piece of ``n`` bytes of a stream (-1: through the end of the message under
    way; less: all) that has gone up to ``done`` stops; ``ends`` are its message ends."""
    if n < -1:
        return total
    if n == -1:
        return next((end for end in ends if end > done), total)
    return min(total, done + n)


class _Run:
    """One case in progress: the client, the model and the tracker between them."""

    def __init__(self, case: TrackerCase, factory: TransactionFactory) -> None:
        self.requests = case.requests
        parts = [client_bytes(r) for r in case.requests]
        self.client = b"".join(parts)
        self.ends: List[int] = []  # where each request ends in the client stream
        pos = 0
        for part in parts:
            pos += len(part)
            self.ends.append(pos)
        self.boundaries = frozenset([0, *self.ends])
        self.sent = 0  # client bytes sent
        self.received = 0  # requests whole at the server
        self.processed = 0  # requests the model has answered
        self.replies = bytearray()
        self.reply_ends: List[int] = []
        self.delivered = 0
        self.model = ServerModel()
        self.tx = factory()
        self.client_scanner = Scanner(watch=CLIENT_WATCH)
        self.server_scanner = Scanner(watch=SERVER_WATCH, collect=SERVER_COLLECT)
        self.releases = 0
        self.log: List[str] = []

    def fail(self, what: str, label: str = "error") -> NoReturn:
        raise TrackerFailure(
            label,
            f"{what} [after {' '.join(self.log[-12:])}; client {self.sent}/{len(self.client)} "
            f"bytes, requests received {self.received} processed {self.processed}, replies "
            f"delivered {self.delivered}/{len(self.replies)}, model {self.model.state()}, "
            f"tracker pending={list(self.tx.pending)} status={self.tx.status!r} "
            f"copy_in={self.tx.copy_in} skipping={self.tx.skipping} "
            f"unsynced={self.tx.unsynced} partial={self.tx.partial}]"
        )

    def send(self, n: int) -> None:
        stop = _stop(n, self.sent, self.ends, len(self.client))
        chunk = self.client[self.sent : stop]
        self.log.append(f"c{len(chunk)}")
        try:
            terminate = self.tx.client(self.client_scanner.feed(chunk), len(chunk))
        except ProtocolViolation:
            raise  # refused: the relay drops the client and closes the server
        except Exception as exc:
            self.fail(f"Transaction.client raised {type(exc).__name__}: {exc}")
        if terminate is not None:
            self.fail(f"Transaction.client reported a Terminate at {terminate}")
        self.sent = stop
        while self.received < len(self.ends) and self.ends[self.received] <= stop:
            self.received += 1

    def process(self, n: int) -> None:
        stop = min(self.received, self.processed + max(n, 0))
        self.log.append(f"p{stop - self.processed}")
        for request in self.requests[self.processed : stop]:
            for kind, body in self.model.process(request):
                self.replies += message(bytes([kind]), body)
                self.reply_ends.append(len(self.replies))
        self.processed = stop

    def deliver(self, n: int) -> None:
        stop = _stop(n, self.delivered, self.reply_ends, len(self.replies))
        chunk = bytes(self.replies[self.delivered : stop])
        self.delivered = stop
        events = self.server_scanner.feed(chunk)
        self.log.append(f"s{len(chunk)}:{bytes(k for k, _, _ in events).decode('latin-1')}")
        if not events:
            return  # the relay calls the tracker only with events
        try:
            free = self.tx.server(events)
        except Exception as exc:
            self.fail(f"Transaction.server raised {type(exc).__name__}: {exc}")
        if free:
            self.releases += 1
            self.check_release()

    def check_release(self) -> None:
        """Safety: the server is handed back only when it is really done with this client."""
        if self.sent not in self.boundaries:
            self.fail("server() freed the server while a client message was half-sent", "unsafe")
        if self.delivered != len(self.replies):
            self.fail("server() freed the server with replies still to come", "unsafe")
        unread = self.requests[self.processed : self.received]
        if not self.model.settles(unread):
            self.fail(
                "server() freed the server the model has not finished with "
                f"(unread: {' '.join(r.describe() for r in unread) or 'none'})",
                "unsafe",
            )

    def check_idle(self) -> None:
        """Liveness (and the safety of ``idle``): at every moment, ``idle`` is what the
        model says."""
        quiet = self.sent in self.boundaries and self.delivered == len(self.replies)
        truth = quiet and self.model.settles(self.requests[self.processed : self.received])
        if self.tx.idle != truth:
            if truth:
                self.fail("idle is False where the model's server is clean", "kept")
            self.fail("idle is True where the model's server is not done", "unsafe")


def check_tracker(case: TrackerCase, factory: TransactionFactory = Transaction) -> str:
    """Run one case; return its outcome (``"free"``/``"held"`` at the end, ``+released``
    when ``server()`` freed the server on the way; ``"refused"`` when the tracker refused
    a client that sent other messages inside COPY data), or raise PropertyFailure."""
    run = _Run(case, factory)
    do = {SEND: run.send, PROCESS: run.process, DELIVER: run.deliver}
    try:
        for op, n in case.actions:
            do[op](n)
            run.check_idle()
        run.send(-2)
    except ProtocolViolation as exc:
        # Messages sent inside COPY data: the tracker refuses them, and the relay closes
        # the server rather than guess whether PostgreSQL will run them. Safe by design,
        # but only for such clients: a driver's stream must never be refused.
        if discipline(case.requests) == case.requests:
            run.fail(f"a driver's stream was refused: {exc}", "refused")
        return "refused"
    run.process(len(case.requests))
    run.deliver(-2)
    run.check_idle()
    return ("free" if run.tx.idle else "held") + ("+released" if run.releases else "")
