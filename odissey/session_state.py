"""What a transaction-mode client may leave on a server for the next one, and how to
clean exactly that.

Session-level state outlives a transaction: a temp table, a LISTEN, a session advisory
lock, an SQL-level prepared statement, a cursor WITH HOLD, a SET of a parameter the
server does not report (reported ones are carried per client, see ``params.py``), a SET
ROLE or SET SESSION AUTHORIZATION. The relay reads each Query and Parse a client sends
and marks its server with what the text may create (erring towards "may": a false alarm
costs one statement at hand-over, a miss would hand the state to a stranger). A marked
server that goes to a different client is cleaned first; a client that gets its own
server back keeps its state, and a clean server costs nothing.

Pure: text in, flags out; flags in, statements out.
"""

from __future__ import annotations

import re
import sys
from typing import Dict, FrozenSet, List

TEMP, LISTEN, LOCKS, PREPARED, HOLD, SETTINGS, ROLE = (1 << i for i in range(7))

#: Cheap first look, on the lower-cased text (a case-insensitive search costs four
#: times as much): most statements mention none of these.
_HINT = re.compile(rb"temp|listen|advisory_lock|prepare|hold|set|role|authorization")
# The closer looks, on lower-cased text.
_TEMP = re.compile(rb"\btemp(?:orary)?\b|\bpg_temp")
_LISTEN = re.compile(rb"(?<!un)listen\s")
_LOCKS = re.compile(rb"advisory_lock")  # not the _xact_ ones
_PREPARE = re.compile(rb"(?:^|;)\s*prepare\s+(?!transaction\b)")
_HOLD = re.compile(rb"\bwith\s+hold\b")
_SET = re.compile(rb"(?:^|;)\s*set\s+(?:session\s+)?([a-z_][a-z0-9_.]*)")
_SET_CONFIG = re.compile(rb"\bset_config\s*\(")
#: What each closer look marks.
_MARKS = ((_TEMP, TEMP), (_LISTEN, LISTEN), (_LOCKS, LOCKS), (_PREPARE, PREPARED), (_HOLD, HOLD),
          (_SET_CONFIG, SETTINGS))
#: SET forms that end with the transaction (or are not parameters).
_TRANSIENT = frozenset((b"local", b"transaction", b"constraints"))

#: The statements that undo each kind of state, in the order they run (the role first:
#: the rest may need the connection's own privileges).
_CLEANUP = (
    (ROLE, ("RESET ROLE", "SET SESSION AUTHORIZATION DEFAULT")),
    (SETTINGS, ("RESET ALL",)),
    (PREPARED, ("DEALLOCATE ALL",)),
    (HOLD, ("CLOSE ALL",)),
    (TEMP, ("DISCARD TEMP",)),
    (LISTEN, ("UNLISTEN *",)),
    (LOCKS, ("SELECT pg_advisory_unlock_all()",)),
)


def left_by(text: bytes, reported: FrozenSet[str]) -> int:
    """The kinds of session state a Query's or Parse's text may leave on its server.
    ``reported``: lower-case names of the parameters the server reports (a SET of one
    of those is carried per client, not left behind)."""
    text = text.lower()
    if _HINT.search(text) is None:
        return 0
    flags = 0
    for pattern, flag in _MARKS:
        if pattern.search(text):
            flags |= flag
    for found in _SET.finditer(text):
        name = found.group(1)
        if name == b"role" or name == b"authorization":
            flags |= ROLE
        elif name not in _TRANSIENT and name.decode("ascii", "replace") not in reported:
            flags |= SETTINGS
    return flags


class Marks:
    """:func:`left_by` for one set of reported parameters, remembering its answers: for
    the texts of Parse messages, which drivers send again and again with placeholders.

    Reading a text (lower-casing it, the searches) costs CPython ~10,000 instructions,
    a fifteenth of a whole transaction through the pooler; looking it up costs a few
    hundred. Texts up to MEMO_TEXT bytes are kept, at most MEMO_SIZE of them (then all
    are forgotten at once). Not for simple queries: those often carry literals (pgbench
    -M simple sends a new one each time), and a memo that only ever missed made
    Odissey 6 % dearer under PyPy. Keyed by the text alone: under PyPy a key that hashed
    the reported set as well cost more than the read itself."""

    __slots__ = ("reported", "seen")

    def __init__(self, reported: FrozenSet[str]) -> None:
        self.reported = reported
        self.seen: Dict[bytes, int] = {}

    def of(self, text: bytes) -> int:
        flags = self.seen.get(text)
        if flags is None:
            flags = left_by(text, self.reported)
            if len(text) <= MEMO_TEXT:
                if len(self.seen) >= MEMO_SIZE:
                    self.seen.clear()
                self.seen[text] = flags
        return flags


class Reading(Marks):
    """:class:`Marks` without the memo: every text read (PyPy)."""

    __slots__ = ()

    def of(self, text: bytes) -> int:
        return left_by(text, self.reported)


MEMO_TEXT = 1024
MEMO_SIZE = 4096
#: The memo is CPython's: under PyPy, whose regular expressions are compiled, reading
#: costs ~120 ns, and Odissey with the memo spent 3.6 % more CPU per -M extended
#: transaction (bench/ab.py, every round of 5), against 6 % fewer instructions under
#: CPython (bench/instructions.py).
MEMO_HERE = sys.implementation.name == "cpython"
_BY_REPORTED: Dict[FrozenSet[str], Marks] = {}


def marks(reported: FrozenSet[str]) -> Marks:
    """The one :class:`Marks` of a set of reported parameters (pools of one PostgreSQL
    version share it); one that reads every text where the memo does not pay."""
    found = _BY_REPORTED.get(reported)
    if found is None:
        found = _BY_REPORTED[reported] = Marks(reported) if MEMO_HERE else Reading(reported)
    return found


def cleanup(flags: int) -> List[str]:
    """Statements that clean what ``flags`` say a server holds."""
    return [sql for flag, statements in _CLEANUP if flags & flag for sql in statements]
