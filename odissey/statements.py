"""Drivers' prepared statements in transaction mode.

A client's named statements live with the client, not with a server: each distinct
(query, parameter types) of a pool gets one server-side name of Odissey's own
(``ODISSEY_<n>``), and each server remembers which of those it has prepared (an LRU of
``max_prepared_statements``). On the way to a server the client's Parse, Bind, Describe
and Close are rewritten: a Parse the server already has is answered by Odissey, one it
lacks is sent under Odissey's name, and a Bind or Describe of a statement the server
lacks is preceded by a Parse of Odissey's own, whose reply is dropped. A Close is
answered by Odissey (the statement may serve other clients).

Every such request sits in the transaction tracker's queue as a *special entry* (a
request type with a flag bit, see ``transaction.py``) beside the payload this module
keeps for it, in the same order. When the entry leaves the queue the tracker tells this
module (the :class:`~odissey.transaction.Sink`): its reply is dropped, replaced or
synthesised in place, or, when the server skipped it after an earlier error, the
bookkeeping it assumed is undone. So replies stay in order under pipelining, and an
error in the middle of a batch reaches the client exactly where PostgreSQL put it.

PostgreSQL's own errors are made by PostgreSQL: a client that parses a name it already
uses, or binds one it does not have, gets a Describe of a statement that cannot exist
sent in its place, so the server fails right there (aborting the transaction and
skipping to the Sync as it would) and only the error's text is replaced.

The unnamed statement is left unnamed, but a server remembers whose it holds: a Bind or
Describe of the unnamed statement in a later batch (asyncpg parses in one Sync cycle and
binds in the next) re-parses it first when the server was used by someone else since,
or when the Parse that put it there went before the last Sync and may yet be skipped.
What the client's unnamed statement is, is kept as a chain of the changes still in play
(see :class:`Change`): a change the server skips falls out of the chain, and one the server
refuses leaves none, so an undo can never give back a statement that a simple query sent
after it has dropped.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Set, Tuple

from odissey.transaction import (
    BIND, CLOSE, COPY_DATA, COPY_DONE, COPY_FAIL, COPYING, DESCRIBE, ERROR, EXECUTE, FLUSH,
    FAILING_DESCRIBE, FAILING_PARSE, REPLACED, INJECTED_CLOSE, INJECTED_PARSE, NORMAL, PARSE, SKIPPING,
    SMALL_LIMIT, SWALLOWED, SYNC, SYNTHESISED,
    SYNTH_CLOSE, SYNTH_PARSE, SYNTH_QUERY, TRACKED_PARSE, TRACKED_QUERY, Transaction,
)
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError
from odissey.wire.scanner import HEADER, Event

#: Client messages whose bodies the layer reads (the Query for DEALLOCATE).
COLLECT = frozenset(b"PBDCQ")
#: What the tracker queues (in NORMAL mode).
_REQUESTS = frozenset(b"PBDECQFS")
#: Server messages a special entry's reply can be: held back whole when a read ends
#: inside one, so that it can still be dropped or replaced.
_EDITABLE = frozenset(b"13E")
_PORTAL = ord("P")
#: A statement name Odissey never prepares: describing it makes the server fail.
NO_SUCH_STATEMENT = b"ODISSEY_NONE"
#: Where a client's Parse of a name it already uses is tried (see Statements._taken).
SCRATCH = b"ODISSEY_SCRATCH"
_names = itertools.count(1)

#: ``DEALLOCATE [PREPARE] name`` alone in a Query.
_DEALLOCATE = re.compile(
    rb'\s*deallocate\s+(?:prepare\s+)?("(?:[^"]|"")+"|[^\s;"]+)\s*;?\s*\0\Z', re.IGNORECASE
)
#: How a Query that may be one of those starts (most are rejected on this byte).
_MAY_DROP = frozenset(b" \t\n\rdD")
#: ``DISCARD ALL`` alone in a Query (``DEALLOCATE ALL`` matches _DEALLOCATE).
_DISCARD_ALL = re.compile(rb"\s*discard\s+all\s*;?\s*\0\Z", re.IGNORECASE)


class Statement:
    """One distinct Parse of a pool: Odissey's name for it and the Parse body after the
    name (query text and parameter types), to prepare it on any server."""

    __slots__ = ("name", "tail")

    def __init__(self, name: bytes, tail: bytes) -> None:
        self.name = name
        self.tail = tail


class Registry:
    """A pool's statements, by Parse body; bounded (least recently parsed go first: a
    statement dropped here lives on with its users, and the same text parsed again
    simply gets a new name)."""

    def __init__(self, limit: int, capacity: int = 0) -> None:
        #: Statements each server may keep prepared (``max_prepared_statements``).
        self.limit = limit
        self.capacity = capacity or max(1000, 10 * limit)
        self._by_tail: OrderedDict[bytes, Statement] = OrderedDict()
        # Counters for the console and metrics.
        self.client_parses = 0
        self.server_parses = 0
        self.binds = 0

    def statement(self, tail: bytes) -> Statement:
        known = self._by_tail.get(tail)
        if known is not None:
            self._by_tail.move_to_end(tail)
            return known
        made = Statement(b"ODISSEY_%d" % next(_names), tail)
        self._by_tail[tail] = made
        if len(self._by_tail) > self.capacity:
            self._by_tail.popitem(last=False)
        return made


class ServerStatements:
    """What one server connection has prepared, least recently used first."""

    __slots__ = ("prepared", "unnamed", "epoch")

    def __init__(self) -> None:
        #: Odissey's name -> (statement, epoch of its last use).
        self.prepared: OrderedDict[bytes, Tuple[Statement, int]] = OrderedDict()
        #: The Parse body (the very object a client sent) of the unnamed statement the
        #: server holds, or None when unknown or none.
        self.unnamed: Optional[bytes] = None
        #: Counts attachments: statements used during the current one are not evicted
        #: (closing a statement closes the portals bound from it).
        self.epoch = 0

    def forget(self) -> None:
        """The server dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL)."""
        self.prepared.clear()
        self.unnamed = None


class Change:
    """A change of a client's unnamed statement that the server may still skip: a Parse
    of it, or a DEALLOCATE (a simple query, which drops it) that is tracked or answered
    by Odissey. ``body`` is the statement it leaves (None: none), ``before`` the change
    it follows, kept only until the server has done (or refused) this one; a change the
    server skipped is ``skipped``, and the statement is then whatever ``before`` left.
    Any other simple query, and a Close of the unnamed statement, end the chain."""

    __slots__ = ("body", "before", "skipped")

    def __init__(self, body: Optional[bytes], before: "Optional[Change]") -> None:
        self.body = body
        self.before = before
        self.skipped = False


# Payloads kept beside special entries: (entry, what, a, b).
_Payload = Tuple[int, int, Any, Any]
_NAMED, _UNNAMED, _CLIENT, _SCRATCH = range(4)
#: Entries whose replies are edited.
_EDITS = SWALLOWED | SYNTHESISED | REPLACED


class Statements:
    """One client's statements, and the rewriting of its stream for the attached server.

    Implements :class:`odissey.transaction.Sink` for the relay's tracker."""

    def __init__(self, registry: Registry, tx: Transaction) -> None:
        self.registry = registry
        self.tx = tx
        tx.sink = self
        #: The client's statement names -> statements.
        self.named: Dict[bytes, Statement] = {}
        #: The latest change of the client's unnamed statement (None: it has none).
        self._unnamed: Optional[Change] = None
        self.server: Optional[ServerStatements] = None
        #: Payloads of the special entries in the tracker's queue, in its order.
        #: (A list, not a deque: it holds a batch's few entries, and an empty deque
        #: costs 760 bytes per client on CPython against a list's 56.)
        self.payloads: List[_Payload] = []
        #: How many of them have replies to edit (dropped, replaced or synthesised): only
        #: then does a server chunk take the editing path.
        self.editing = 0
        #: Where the next client chunk's first message starts, relative to that chunk.
        self.edge = 0
        #: Server bytes held back (an editable reply cut by a read).
        self.held = b""
        #: Replies due before any server bytes (synthesised while nothing was pending).
        self.immediate: List[bytes] = []
        #: The payload of a request the server refused, undone with those it skipped.
        self._failed: Optional[_Payload] = None
        #: DEALLOCATE ALL / DISCARD ALL sent and not answered yet (see _reclose).
        self._doubt = 0
        #: Syncs the client has sent (in NORMAL and SKIPPING mode).
        self.syncs = 0
        #: The unnamed statement last put on the server by a request that the server
        #: may skip, and self.syncs when it was sent (see _ensure_unnamed).
        self._unsure: Optional[bytes] = None
        self._unsure_at = 0
        self._data = b""
        self._pos = 0
        #: The edited chunk's pieces, None outside begin/finish (a drain after the
        #: client left runs the tracker without editing anything).
        self._out: Optional[List[bytes]] = None

    @property
    def unnamed(self) -> Optional[bytes]:
        """The Parse body of the client's unnamed statement (the very object it sent):
        what the latest change the server did not skip left."""
        change = self._unnamed
        while change is not None and change.skipped:
            change = change.before
        return None if change is None else change.body

    def _change(self, body: Optional[bytes]) -> Change:
        """A tracked change of the client's unnamed statement, now its latest."""
        before = self._unnamed
        while before is not None and before.skipped:
            before = before.before
        change = self._unnamed = Change(body, before)
        return change

    # -- client -> server ----------------------------------------------------------------

    def client(self, data: bytes, events: List[Event], holding: bool) -> Tuple[bytes, List[Event]]:
        """Rewrite a client chunk for the attached server: the bytes to send and the
        server-view events for the tracker (ends relative to those bytes). ``holding``:
        the chunk ends inside a message whose body is collected; its bytes are held
        back, to be sent (rewritten if need be) once whole."""
        # The tracker's own rules (Transaction.client), followed message by message: a
        # message is rewritten only where the tracker will queue it.
        tx = self.tx
        mode = tx.mode
        in_data = tx.in_data
        queued = bool(tx.pending)
        out: List[bytes] = []
        view: List[Event] = []
        size = 0  # bytes in out
        pos = 0  # input bytes copied or replaced so far
        start = self.edge  # where the current message starts
        for kind, body, end in events:
            items = None
            if kind in COLLECT:
                if mode == NORMAL and not in_data:
                    items = self._rewrite(kind, body, queued)  # type: ignore[arg-type]
                if items is None and start < 0:  # its first bytes were held back: rebuild
                    items = [(kind, m.message(bytes((kind,)), body))]  # type: ignore[arg-type]
            if items is None:  # forwarded as it came, copied lazily
                view.append((kind, None, size + end - pos))
                start = end
                if mode == SKIPPING:
                    if kind == SYNC:
                        mode = NORMAL
                        queued = True
                        self.syncs += 1
                elif kind == COPY_DATA:
                    in_data = in_data or mode == COPYING or queued
                elif kind == COPY_DONE or kind == COPY_FAIL:
                    in_data = False
                    if mode == COPYING:
                        mode = NORMAL
                elif kind in _REQUESTS:
                    if mode == COPYING:
                        if kind != SYNC:
                            mode = NORMAL  # the copy consumes it as an error
                    else:
                        queued = True
                        if kind == SYNC:
                            self.syncs += 1
                continue
            if start > pos:
                out.append(data[pos:start])
                size += start - pos
            for entry, piece in items:
                if piece is None:  # the client's message, unchanged
                    piece = data[start:end] if start >= 0 else m.message(bytes((kind,)), body)  # type: ignore[arg-type]
                out.append(piece)
                size += len(piece)
                view.append((entry, None, size))
            pos = start = end
            if mode == COPYING:
                mode = NORMAL
            elif mode == NORMAL:
                queued = True
        n = len(data)
        stop = max(start, 0) if holding else n
        self.edge = start - n
        if pos == 0 and stop == n:
            return data, view
        if stop > pos:
            out.append(data[pos:stop])
        return b"".join(out), view

    def query(self, body: bytes) -> bool:
        """A chunk that is one whole Query with nothing in flight (the relay's fast path):
        True when it goes as it came and is queued, as :meth:`client` and the tracker
        would have it; False, nothing changed, when it needs :meth:`client`."""
        if self.edge or not body or body[0] in _MAY_DROP or not self.tx.query():
            return False
        self._unnamed = self.server.unnamed = None  # type: ignore[union-attr]
        return True

    def batch(self, data: bytes, max_length: int) -> Optional[Tuple[bytes, List[Event]]]:
        """One pass over a client chunk that starts between two messages, when it is
        whole messages of valid lengths that need no reply edited: a Parse of the
        unnamed statement (tracked, as :meth:`client` tracks it), a Bind of the unnamed
        statement the server holds as the client's or of a named statement the server
        has prepared (renamed in place), a Describe of a portal, Execute, Sync and
        Flush, in NORMAL mode with no CopyData open. Rewritten, tracked and queued as
        :meth:`client` and the tracker would: the bytes to send (``data`` itself when
        no Bind names a statement) and the Parse messages, for the relay's
        session-state marks. None, with nothing changed, when a message needs more (a
        named Parse, Close, a statement's Describe, a Query), is cut by the chunk's end
        or is not valid: the caller scans the chunk and takes :meth:`client`'s path,
        which also raises what is wrong."""
        tx = self.tx
        n = len(data)
        if self.edge or tx.mode != NORMAL or tx.in_data or tx.edge or n > max_length:
            return None  # (so no message that ends in the chunk is too long)
        server = self.server
        assert server is not None
        pos = last = 0
        queued = bool(tx.pending)
        unsynced = tx.unsynced
        syncs = self.syncs
        entries: List[int] = []
        pieces: List[bytes] = []  # the chunk with its Binds renamed, when one is
        parses: List[Event] = []
        tails: List[bytes] = []  # the unnamed statements they parse (compared by identity)
        bound: List[Statement] = []
        unnamed = server.unnamed
        unsure = self._unsure
        unsure_at = self._unsure_at
        try:  # (a header cut short raises struct.error)
            while pos < n:
                kind, length = HEADER(data, pos)
                end = pos + 1 + length
                if length < 4 or end > n:
                    return None
                if kind == BIND:
                    i = data.find(b"\0", pos + 5, end)  # the portal's name ends
                    j = data.find(b"\0", i + 1, end) if i >= 0 else -1  # the statement's
                    if j < 0:
                        return None
                    if j == i + 1:  # the unnamed statement: the server must hold the client's
                        mine = tails[-1] if tails else self.unnamed
                        if mine is None or unnamed is not mine or (unsure is mine and unsure_at != syncs):
                            return None
                    else:
                        statement = self.named.get(data[i + 1:j])
                        if statement is None or statement.name not in server.prepared or self._doubt:
                            return None
                        bound.append(statement)
                        pieces.append(data[last:pos])
                        pieces.append(m.bind(data[pos + 5:i], statement.name, data[j + 1:end]))
                        last = end
                    entries.append(BIND)
                    unsynced = queued = True
                elif kind == EXECUTE:
                    if length >= SMALL_LIMIT:
                        return None
                    entries.append(EXECUTE)
                    unsynced = queued = True
                elif kind == SYNC:
                    if length != 4:
                        return None
                    entries.append(SYNC)
                    unsynced = False
                    queued = True
                    syncs += 1
                elif kind == PARSE:
                    if length < 5 or data[pos + 5]:  # a named statement
                        return None
                    body = data[pos + 5:end]
                    unnamed = body[1:]
                    tails.append(unnamed)
                    unsure = unnamed if queued else None
                    unsure_at = syncs
                    parses.append((PARSE, body, end))
                    entries.append(TRACKED_PARSE)
                    unsynced = queued = True
                elif kind == DESCRIBE:  # of a portal
                    if (length >= SMALL_LIMIT or length < 6 or data[pos + 5] != _PORTAL
                            or data.find(b"\0", pos + 6, end) != end - 1):
                        return None
                    entries.append(DESCRIBE)
                    unsynced = queued = True
                elif kind != FLUSH or length != 4:  # (a Flush changes nothing held)
                    return None
                pos = end
        except struct.error:
            return None
        for tail in tails:
            self._queue((TRACKED_PARSE, _UNNAMED, self._change(tail), None))
        if tails:
            server.unnamed = unnamed
            self._unsure = unsure
            self._unsure_at = unsure_at
        self.syncs = syncs
        if bound:
            for statement in bound:
                self._touch(statement)
            self.registry.binds += len(bound)
            pieces.append(data[last:])
            data = b"".join(pieces)
        tx.pending.extend(entries)
        tx.unsynced = unsynced
        return data, parses

    def _rewrite(self, kind: int, body: bytes, queued: bool) -> Optional[List[Tuple[int, Optional[bytes]]]]:
        """What one whole client message becomes for the server, in NORMAL mode: None
        when it goes unchanged, else (queue entry, bytes or None for the message as
        it came) for each message to send in its place (bytes may be empty: answered
        by Odissey). ``queued``: requests went before it that are not answered yet (with
        none, the server cannot skip it: nothing before it can fail any more)."""
        server = self.server
        assert server is not None
        if kind == BIND:
            portal, i = m.cstring_at(body, 0, "Bind")
            name, j = m.cstring_at(body, i, "Bind")
            if not name:
                return self._ensure_unnamed(BIND, queued)
            statement = self.named.get(name)
            if statement is None:
                return self._fail(errors.UNDEFINED_PREPARED_STATEMENT,
                                  f'prepared statement "{_text(name)}" does not exist')
            self.registry.binds += 1
            items = self._ensure(statement)
            items.append((BIND, m.bind(portal, statement.name, body[j:])))
            return items
        if kind == PARSE:
            name, i = m.cstring_at(body, 0, "Parse")
            if not name:
                # Forwarded as it came, but tracked: if the server skips it, the client's
                # unnamed statement is the one it had before; if it refuses it, none.
                tail = server.unnamed = body[i:]
                self._unsure = tail if queued else None
                self._unsure_at = self.syncs
                self._queue((TRACKED_PARSE, _UNNAMED, self._change(tail), None))
                return [(TRACKED_PARSE, None)]
            if name in self.named:
                return self._taken(name, body[i:])
            registry = self.registry
            registry.client_parses += 1
            statement = registry.statement(body[i:])
            self.named[name] = statement
            if statement.name in server.prepared and not self._doubt:
                self._touch(statement)
                self._queue((SYNTH_PARSE, _CLIENT, name, statement))
                return [(SYNTH_PARSE, b"")]
            items = self._reclose(statement)
            items += self._evict()
            registry.server_parses += 1
            server.prepared[statement.name] = (statement, server.epoch)
            self._queue((TRACKED_PARSE, _CLIENT, name, statement))
            items.append((TRACKED_PARSE, m.parse(statement.name, statement.tail)))
            return items
        if kind == DESCRIBE:
            target, name = m.parse_target(body, "Describe")
            if target != b"S":
                return None
            if not name:
                return self._ensure_unnamed(DESCRIBE, queued)
            statement = self.named.get(name)
            if statement is None:
                return self._fail(errors.UNDEFINED_PREPARED_STATEMENT,
                                  f'prepared statement "{_text(name)}" does not exist')
            items = self._ensure(statement)
            items.append((DESCRIBE, m.describe(b"S", statement.name)))
            return items
        if kind == CLOSE:
            target, name = m.parse_target(body, "Close")
            if target != b"S":
                return None
            if not name:
                self._unnamed = server.unnamed = None
                return None
            # Closing a statement that does not exist is no error in PostgreSQL either.
            self._queue((SYNTH_CLOSE, _CLIENT, name, self.named.pop(name, None)))
            return [(SYNTH_CLOSE, b"")]
        # A Query.
        if body and body[0] in _MAY_DROP:
            found = _DEALLOCATE.match(body)
            if found is not None:
                name = _identifier(found.group(1))
                if name in self.named:
                    # Answered here; as a simple query it drops the client's unnamed
                    # statement too (the server, which never sees it, keeps its own).
                    self._queue((SYNTH_QUERY, _CLIENT, name, (self.named.pop(name), self._change(None))))
                    return [(SYNTH_QUERY, b"")]
                if name == b"all":
                    return self._drop_all()
            elif _DISCARD_ALL.match(body):
                return self._drop_all()
        self._unnamed = server.unnamed = None  # a simple query drops the unnamed statement
        return None

    def _drop_all(self) -> List[Tuple[int, Optional[bytes]]]:
        """DEALLOCATE ALL or DISCARD ALL, forwarded: what the client sends after it in
        the same batch already goes without its statements (restored if the server
        skips the query)."""
        self._queue((TRACKED_QUERY, _CLIENT, self.named, self._change(None)))
        self._doubt += 1
        self.named = {}
        self.server.unnamed = None  # type: ignore[union-attr]
        return [(TRACKED_QUERY, None)]

    def _touch(self, statement: Statement) -> None:
        server = self.server
        assert server is not None
        server.prepared[statement.name] = (statement, server.epoch)
        server.prepared.move_to_end(statement.name)

    def _ensure(self, statement: Statement) -> List[Tuple[int, Optional[bytes]]]:
        """Prepare ``statement`` on the server first unless it has it."""
        server = self.server
        assert server is not None
        if statement.name in server.prepared and not self._doubt:
            self._touch(statement)
            return []
        items = self._reclose(statement)
        items += self._evict()
        self.registry.server_parses += 1
        server.prepared[statement.name] = (statement, server.epoch)
        self._queue((INJECTED_PARSE, _NAMED, statement, None))
        items.append((INJECTED_PARSE, m.parse(statement.name, statement.tail)))
        return items

    def _reclose(self, statement: Statement) -> List[Tuple[int, Optional[bytes]]]:
        """While a DEALLOCATE ALL or DISCARD ALL the client sent is unanswered, whether
        the server still has a statement is unknown: it is closed (a Close of a missing
        statement is no error) before it is parsed again."""
        server = self.server
        assert server is not None
        known = server.prepared.pop(statement.name, None)
        if known is None:
            return []
        self._queue((INJECTED_CLOSE, _NAMED, known[0], known[1]))
        return [(INJECTED_CLOSE, m.close(b"S", statement.name))]

    def _ensure_unnamed(self, kind: int, queued: bool) -> Optional[List[Tuple[int, Optional[bytes]]]]:
        """Make the server's unnamed statement the client's own, or none at all, before
        the client's Bind or Describe (``kind``) of it.

        The server is trusted to hold the client's statement unless the request that
        put it there may yet be skipped and was sent before the last Sync: a Bind after
        that Sync is not skipped with it, and would bind whatever the server held before
        (another client's statement, say). The statement is parsed again instead."""
        server = self.server
        assert server is not None
        change = self._unnamed  # (self.unnamed, inlined)
        while change is not None and change.skipped:
            change = change.before
        mine = None if change is None else change.body
        if mine is not None and server.unnamed is mine and (
                self._unsure is not mine or self._unsure_at == self.syncs):
            return None
        server.unnamed = mine
        if mine is not None:
            self._unsure = mine if queued else None
            self._unsure_at = self.syncs
            self._queue((INJECTED_PARSE, _UNNAMED, None, None))
            return [(INJECTED_PARSE, m.parse(b"", mine)), (kind, None)]
        # The client has none, and the server may hold another client's (None on the
        # server means unknown, after an error say): closed, so the client's message
        # fails as PostgreSQL would fail it.
        self._queue((INJECTED_CLOSE, _UNNAMED, None, None))
        return [(INJECTED_CLOSE, m.close(b"S", b"")), (kind, None)]

    def _evict(self) -> List[Tuple[int, Optional[bytes]]]:
        """Close the server's least recently used statements to make room for one more,
        sparing those used while the current client is attached."""
        server = self.server
        assert server is not None
        prepared = server.prepared
        items: List[Tuple[int, Optional[bytes]]] = []
        while len(prepared) >= self.registry.limit:
            name, (statement, epoch) = next(iter(prepared.items()))
            if epoch == server.epoch:
                break
            del prepared[name]
            self._queue((INJECTED_CLOSE, _NAMED, statement, epoch))
            items.append((INJECTED_CLOSE, m.close(b"S", name)))
        return items

    def _taken(self, name: bytes, tail: bytes) -> List[Tuple[int, Optional[bytes]]]:
        """A Parse of a name the client already uses. PostgreSQL parses and analyses
        the query before it finds the name taken, so a bad query gets its own error
        first: the server parses it twice under a scratch name (closed first), and the
        second Parse's 42P05 is reworded for the client's name."""
        error = m.error_response(PoolerError(
            errors.DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{_text(name)}" already exists',
            severity="ERROR"))
        self._queue((INJECTED_CLOSE, _SCRATCH, None, None))
        self._queue((INJECTED_PARSE, _SCRATCH, None, None))
        self._queue((FAILING_PARSE, _CLIENT, error, None))
        return [(INJECTED_CLOSE, m.close(b"S", SCRATCH)), (INJECTED_PARSE, m.parse(SCRATCH, tail)),
                (FAILING_PARSE, m.parse(SCRATCH, tail))]

    def _fail(self, sqlstate: str, text: str) -> List[Tuple[int, Optional[bytes]]]:
        error = m.error_response(PoolerError(sqlstate, text, severity="ERROR"))
        self._queue((FAILING_DESCRIBE, _CLIENT, error, None))
        return [(FAILING_DESCRIBE, m.describe(b"S", NO_SUCH_STATEMENT))]

    # -- server -> client: the tracker's Sink --------------------------------------------

    def begin(self, data: bytes, events: List[Event]) -> Tuple[bytes, List[Event]]:
        """A server chunk is about to be matched against the queue: bytes held back from
        the last one go first."""
        held = self.held
        if held:
            self.held = b""
            data = held + data
            shift = len(held)
            events = [(kind, body, end + shift) for kind, body, end in events]
        self._data = data
        self._pos = 0
        self._out = []
        return data, events

    def finish(self, kind_partial: Optional[int], kept: int) -> bytes:
        """The edited chunk, less a trailing reply still arriving that may need editing."""
        data = self._data
        stop = len(data)
        if self.payloads and kept and kind_partial in _EDITABLE:
            stop -= min(kept, stop)
        self.held = data[stop:]
        self._cut(stop)
        out, self._out = self._out, None
        return b"".join(out)  # type: ignore[arg-type]

    def _cut(self, at: int) -> None:
        """Copy the chunk up to ``at`` (when a chunk is being edited)."""
        if self._out is not None and at > self._pos:
            self._out.append(self._data[self._pos:at])
            self._pos = at

    def _put(self, reply: bytes) -> None:
        if self._out is not None:
            self._out.append(reply)

    def answered(self, entry: int, kind: int, body: Optional[bytes], end: int) -> None:
        payload = self._pop(entry)
        if entry == TRACKED_QUERY:  # its ReadyForQuery: DEALLOCATE ALL has run, or failed
            self._doubt -= 1
            payload[3].before = None
            return
        if kind == ERROR:
            if entry & REPLACED:
                self._cut(end - 5 - len(body or b""))
                self._pos = end
                self._put(payload[2])
            elif payload[1] == _UNNAMED and entry == TRACKED_PARSE:
                # PostgreSQL drops the unnamed statement before it parses the new one.
                change = payload[2]
                change.body = change.before = None
            else:  # a Parse the server refused: it prepared nothing
                self._failed = payload
            return
        if entry & SWALLOWED:
            self._cut(end - 5)
            self._pos = end
        elif entry == TRACKED_PARSE and payload[1] == _UNNAMED:
            payload[2].before = None  # done: what came before no longer matters

    def discarded(self, entries: List[int]) -> None:
        # Undone last first: a statement evicted and then parsed again in the same
        # batch must end up as it was before either.
        payloads = [self._pop(entry) for entry in entries]
        if self._failed is not None:
            payloads.insert(0, self._failed)
            self._failed = None
        for payload in reversed(payloads):
            self._undo(payload)

    def due(self, entry: int, end: int) -> None:
        payload = self._pop(entry)
        if entry == SYNTH_PARSE:
            reply = m.PARSE_COMPLETE
        elif entry == SYNTH_CLOSE:
            reply = m.CLOSE_COMPLETE
        else:
            payload[3][1].before = None
            reply = m.command_complete(b"DEALLOCATE") + m.ready_for_query(self.tx.status)
        if end < 0:
            self.immediate.append(reply)
        else:
            self._cut(end)
            self._put(reply)

    def _queue(self, payload: _Payload) -> None:
        self.payloads.append(payload)
        if payload[0] & _EDITS:
            self.editing += 1

    def _pop(self, entry: int) -> _Payload:
        payload = self.payloads.pop(0)
        if payload[0] != entry:
            raise AssertionError(f"statement queue out of step: {payload[0]:#x} != {entry:#x}")
        if entry & _EDITS:
            self.editing -= 1
        return payload

    def _undo(self, payload: _Payload) -> None:
        """The server never did what this entry assumed."""
        entry, what, a, b = payload
        server = self.server
        if entry == INJECTED_PARSE or entry == INJECTED_CLOSE:
            if what == _NAMED and server is not None:
                if entry == INJECTED_PARSE:
                    server.prepared.pop(a.name, None)
                else:
                    server.prepared[a.name] = (a, b)
                    server.prepared.move_to_end(a.name, last=False)
            elif what == _UNNAMED and server is not None:
                # Whatever it holds now is not known: a simple query sent since may have
                # dropped what it held before (None makes the next user parse or close).
                server.unnamed = None
        elif entry == TRACKED_PARSE and what == _UNNAMED:
            a.skipped = True
            if server is not None:
                server.unnamed = None
        elif entry == TRACKED_PARSE:
            if self.named.get(a) is b:
                del self.named[a]
            if server is not None:
                server.prepared.pop(b.name, None)
        elif entry == SYNTH_PARSE:
            if self.named.get(a) is b:
                del self.named[a]
        elif entry == SYNTH_CLOSE:
            if b is not None:
                self.named[a] = b
        elif entry == SYNTH_QUERY:
            statement, change = b
            if statement is not None:
                self.named[a] = statement
            change.skipped = True
        elif entry == TRACKED_QUERY:
            a.update(self.named)
            self.named = a
            b.skipped = True
            self._doubt -= 1

    # -- what the server reports -----------------------------------------------------------

    def failed(self) -> None:
        """An error from the attached server: whether the unnamed statement Odissey
        believes it holds was parsed or skipped is unknown now."""
        if self.server is not None:
            self.server.unnamed = None

    def command(self, tag: bytes) -> None:
        """DEALLOCATE ALL or DISCARD ALL dropped the server's statements and, for the
        client, its own: all but those parsed by requests sent after it (still queued).
        (The client's unnamed statement went with the simple query at the time it was
        sent, see :class:`Change`.)"""
        # Requests after it, should the server skip them, may give back only what
        # requests after it (and before them) made: what it dropped is gone for good.
        names: Dict[bytes, Statement] = {}  # the client's names, as those requests leave them
        made: Set[bytes] = set()  # Odissey's names they prepare on the server
        payloads: List[_Payload] = []
        for payload in self.payloads:
            entry, what, a, b = payload
            if entry == TRACKED_PARSE or entry == SYNTH_PARSE:
                if what == _CLIENT:
                    names[a] = b
                    if entry == TRACKED_PARSE:
                        made.add(b.name)
            elif entry == INJECTED_PARSE:
                if what == _NAMED:
                    made.add(a.name)
            elif entry == INJECTED_CLOSE:
                if what == _NAMED and a.name not in made:
                    payload = (entry, _SCRATCH, None, None)
            elif entry == SYNTH_CLOSE:
                if b is not None and names.get(a) is b:
                    del names[a]
                else:
                    payload = (entry, what, a, None)
            elif entry == SYNTH_QUERY:
                if names.get(a) is b[0]:
                    del names[a]
                else:
                    payload = (entry, what, a, (None, b[1]))
            elif entry == TRACKED_QUERY:  # another DEALLOCATE ALL, or this one
                payload = (entry, what, {n: s for n, s in a.items() if names.get(n) is s}, b)
                names = {}
            payloads.append(payload)
        self.payloads = payloads
        self.named = {name: statement for name, statement in self.named.items() if names.get(name) is statement}
        server = self.server
        if server is not None:
            for name in [name for name in server.prepared if name not in made]:
                del server.prepared[name]
            server.unnamed = None


def _text(name: bytes) -> str:
    return name.decode("utf-8", "replace")


def _identifier(token: bytes) -> bytes:
    """An SQL identifier as PostgreSQL names it: quoted verbatim, else lower-cased."""
    if token.startswith(b'"'):
        return token[1:-1].replace(b'""', b'"')
    return token.lower()
