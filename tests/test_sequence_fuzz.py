"""A post-login sequence fuzzer against the real PostgreSQL (issue 6).

A fuzz client logs in over a raw socket and sends a random, mutated sequence of the
messages a client may send once logged in (simple queries that open, fail, commit and roll
back transactions and SET things; Parse/Bind/Describe/Execute/Close with names; Sync;
Flush; CopyData/CopyDone/CopyFail inside and outside a COPY; FunctionCall; Terminate;
CancelRequests for itself; truncated messages, wrong lengths, unknown types and malformed
bodies) in random pieces, reading the replies or not,
then leaves normally, vanishes, or stays a while. Then checker clients on the same pool
(size 1: the very server the fuzz client used) must find that server clean:

- transaction status idle: ReadyForQuery ``I``, ``now() = statement_timestamp()``, no
  transaction id assigned;
- every setting as on a fresh server (``statement_timeout``, ``work_mem``, a custom GUC,
  the reported ones), no cursor, advisory lock, LISTEN or temporary table left;
- no pending result: its query's reply is exactly its own (its unique token, nothing
  before or after it);
- nothing the fuzz client left uncommitted is ever committed (unique notes in a table);
- Odissey still serving, and after a short settle no server connection leaked or left
  inside a transaction (pg_stat_activity).

What transaction pooling documents as not following a client (docs/transaction-pooling.md)
is not generated where it would leak by design: a session-level SET of an unreported
setting, LISTEN, session advisory locks, temporary tables and WITH HOLD cursors only come
in the classes whose route resets the server after every transaction (or session).

Every run has a seed, printed; ``ODISSEY_SEQ_SEED=<seed>`` replays that one run (its
choices, not its timing). ``bench/sequence_fuzz.py`` runs the same generator for longer.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from odissey.pool import PoolKey
from odissey.wire import messages as m
from tests.harness import IntegrationTest, direct, route, send_cancel_request

SEED_ENV = "ODISSEY_SEQ_SEED"

TABLE = "seq_fuzz_notes"
USER, DATABASE = "u_trust", "app"

#: Function OIDs for FunctionCall (fixed in pg_proc.dat across versions).
SET_CONFIG, PG_SLEEP, INT4PL = 2078, 2626, 177

#: Settings PostgreSQL reports with ParameterStatus: they follow each client from server
#: to server, so a fuzz client may SET them for its whole session.
FOLLOWING: dict[str, list[str]] = {
    "application_name": ["'fz-app'", "'fz two'"],
    "TimeZone": ["'Asia/Tokyo'", "'America/Lima'", "'UTC'"],
    "DateStyle": ["'SQL, DMY'", "'German'"],
    "IntervalStyle": ["'iso_8601'", "'sql_standard'"],
    "client_encoding": ["'LATIN1'", "'SJIS'", "'UTF8'"],
    "standard_conforming_strings": ["off", "on"],
}
#: Settings PostgreSQL does not report: a session-level SET of one stays on its server
#: (transaction pooling's documented limit), so a fuzz client uses SET LOCAL for them
#: unless the route resets the server after each transaction.
UNREPORTED: dict[str, list[str]] = {
    "work_mem": ["'7MB'", "'64kB'"],
    "statement_timeout": ["'4s'", "'1ms'"],
    "lock_timeout": ["'3s'"],
    "search_path": ["pg_catalog", "'public, pg_temp'"],
    "default_transaction_isolation": ["'serializable'"],
    "default_transaction_read_only": ["on"],
    "fuzz.knob": ["'k1'", "'k two'"],
}

#: What a checker reads from its server, by name; compared with a fresh server's values.
CHECKS = [
    ("idle", "now() = statement_timestamp()"),
    ("no xid", "txid_current_if_assigned() is null"),
    ("statement_timeout", "current_setting('statement_timeout')"),
    ("work_mem", "current_setting('work_mem')"),
    ("lock_timeout", "current_setting('lock_timeout')"),
    ("search_path", "current_setting('search_path')"),
    ("default_transaction_isolation", "current_setting('default_transaction_isolation')"),
    ("default_transaction_read_only", "current_setting('default_transaction_read_only')"),
    ("fuzz.knob", "coalesce(current_setting('fuzz.knob', true), '')"),  # '' once ever SET LOCAL
    ("application_name", "current_setting('application_name')"),
    ("TimeZone", "current_setting('TimeZone')"),
    ("DateStyle", "current_setting('DateStyle')"),
    ("IntervalStyle", "current_setting('IntervalStyle')"),
    ("client_encoding", "current_setting('client_encoding')"),
    ("standard_conforming_strings", "current_setting('standard_conforming_strings')"),
    ("current_user", "current_user"),
    ("cursors", "(select count(*) from pg_cursors)"),
    ("advisory locks", "(select count(*) from pg_locks where pid = pg_backend_pid() and locktype = 'advisory')"),
    ("listening", "(select count(*) from pg_listening_channels())"),
    ("temp tables", "(select count(*) from pg_class where relnamespace = pg_my_temp_schema())"),
]
#: Also checked where the route resets servers (in plain transaction mode named
#: statements stay on their server by design).
RESET_CHECKS = [("prepared statements", "(select count(*) from pg_prepared_statements)")]


# -- client messages ------------------------------------------------------------------------

_H = struct.Struct("!h").pack
_I = struct.Struct("!i").pack


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    return m.message(b"P", m.cstring(name) + m.cstring(sql) + _H(len(types)) + b"".join(_I(t) for t in types))


def bind(portal: str, statement: str, params: tuple[Optional[bytes], ...] = ()) -> bytes:
    values = b"".join(_I(-1) if p is None else _I(len(p)) + p for p in params)
    return m.message(b"B", m.cstring(portal) + m.cstring(statement) + _H(0) + _H(len(params)) + values + _H(0))


def describe(kind: bytes, name: str) -> bytes:
    return m.message(b"D", kind + m.cstring(name))


def execute(portal: str, rows: int = 0) -> bytes:
    return m.message(b"E", m.cstring(portal) + _I(rows))


def close(kind: bytes, name: str) -> bytes:
    return m.message(b"C", kind + m.cstring(name))


def function_call(oid: int, args: tuple[Optional[bytes], ...]) -> bytes:
    values = b"".join(_I(-1) if a is None else _I(len(a)) + a for a in args)
    return m.message(b"F", _I(oid) + _H(0) + _H(len(args)) + values + _H(0))


FLUSH, SYNC, COPY_DONE, TERMINATE = m.message(b"H"), m.sync(), m.message(b"c"), m.terminate()


def copy_data(line: str) -> bytes:
    return m.message(b"d", line.encode())


# -- the generator --------------------------------------------------------------------------

ENDINGS = ["leave", "close", "vanish", "reset"]


@dataclass
class Plan:
    """One fuzz client's session after login, fixed by its seed."""

    tag: str
    data: bytes = b""
    cuts: list[int] = field(default_factory=list)  # the writes end here
    reading: str = "sometimes"  # never, sometimes, eager
    ending: str = "leave"  # leave (Terminate), close (FIN), vanish (shutdown), reset (RST)
    stay: float = 0.0  # seconds it stays connected while the checkers run, then ends
    goodbye: bytes = TERMINATE  # what "leave" sends
    cancels: list[int] = field(default_factory=list)  # a CancelRequest after these writes
    cancel_in_stay: bool = False
    doomed: list[str] = field(default_factory=list)  # notes that must never be committed
    steps: list[str] = field(default_factory=list)

    def describe(self) -> str:
        stay = f" after staying {self.stay:.2f}s" if self.stay else ""
        cancels = f", cancel after writes {self.cancels}" if self.cancels else ""
        cancels += ", a cancel while it stays" if self.cancel_in_stay else ""
        return (f"{self.tag}: {' | '.join(self.steps)} || reading {self.reading}, "
                f"{len(self.data)} bytes in {len(self.cuts)} writes{cancels}, ends: {self.ending}{stay}")


class Generator:
    """Random client messages. ``session_state``: the route resets servers, so the
    client may also change what only a reset undoes (session SETs of unreported
    settings, LISTEN, session advisory locks, temp tables, WITH HOLD cursors).

    A ``tail`` statement or idiom can never commit a transaction that is already open:
    no COMMIT, END or PREPARE TRANSACTION; Bind only of statements parsed with tail-safe
    text (every named statement is)."""

    def __init__(self, rnd: random.Random, tag: str, session_state: bool) -> None:
        self.rnd = rnd
        self.tag = tag
        self.session_state = session_state
        self.n = 0

    def token(self) -> str:
        self.n += 1
        return f"{self.tag}-{self.n}"

    def note(self, kind: str) -> str:
        return f"{kind}-{self.token()}"

    # statements

    def setting(self) -> str:
        r = self.rnd
        name = r.choice(list(FOLLOWING) + list(UNREPORTED))
        value = r.choice(FOLLOWING.get(name) or UNREPORTED[name])
        session_ok = name in FOLLOWING or self.session_state
        text = value if value.startswith("'") else f"'{value}'"
        form = r.choice(["local", "session", "config-local", "config-session", "reset"])
        if form == "session" and session_ok:
            return f"set {name} = {value}"
        if form == "config-session" and session_ok:
            return f"select set_config('{name}', {text}, false)"
        if form.startswith("config"):
            return f"select set_config('{name}', {text}, true)"
        if form == "reset":
            return f"reset {name}"
        return f"set local {name} = {value}"

    def statement(self, tail: bool = False) -> str:
        r = self.rnd
        tok = self.token()
        free = f"insert into {TABLE} (note) values ('{self.note('free')}')"
        choices: list[Callable[[], str]] = [
            lambda: f"select '{tok}'",
            lambda: f"select '{tok}', pg_sleep(0.0{r.randrange(1, 6)})",
            lambda: r.choice(["select 1/0", "select * from no_such_table", "selec 1", "select 'open"]),
            lambda: r.choice(["begin", "start transaction isolation level repeatable read", "begin read only"]),
            lambda: r.choice(["rollback", "abort", "rollback and chain"]),
            lambda: r.choice(["savepoint sp", "rollback to savepoint sp", "release savepoint sp"]),
            lambda: free,
            lambda: f"{free} returning '{tok}'",
            self.setting,
            self.setting,
            lambda: f"copy {TABLE} (note) from stdin",
            lambda: f"copy (select '{tok}' from generate_series(1, {r.choice([1, 3, 2000])})) to stdout",
            lambda: f"select '{tok}', repeat('x', {r.choice([10, 70000, 300000])})",
            lambda: f"select '{tok}'; select 1/0; select 'never'",
            lambda: f"{free}; select 1/0",
            lambda: r.choice(["", " ;"]),
            lambda: r.choice(["declare c1 cursor for select generate_series(1, 5)", "fetch 2 from c1", "close c1"]),
            lambda: r.choice(["notify fz_channel, 'x'", "select pg_advisory_xact_lock(7)", "select txid_current()",
                              f"lock table {TABLE} in row exclusive mode", "reset all"]),
            lambda: r.choice(["create temp table fz_temp (x int) on commit drop",
                              "do $$ begin perform pg_sleep(0.01); end $$",
                              "select pg_cancel_backend(pg_backend_pid())"]),
            lambda: r.choice(["prepare fz_q as select 1", "execute fz_q", "deallocate fz_q"]),
        ]
        if not tail:
            choices += [
                lambda: r.choice(["commit", "end", "commit and chain"]),
                lambda: f"begin; {free}; commit",
                lambda: r.choice(["commit; begin", "prepare transaction 'fz'", "discard all"]),
            ]
        if self.session_state:
            choices.append(lambda: r.choice([
                "listen fz_channel", "select pg_advisory_lock(7)", "create temp table if not exists fz_keep (x int)",
                "declare fz_hold cursor with hold for select 1",
                "set session characteristics as transaction isolation level serializable",
            ]))
        if r.random() < 0.01:
            return "select pg_terminate_backend(pg_backend_pid())"
        return r.choice(choices)()

    # idioms: a few messages that mean something together

    def idiom(self, tail: bool = False) -> tuple[str, list[bytes]]:
        r = self.rnd
        kind = r.choices(
            ["query", "queries", "extended", "named", "param", "describe", "close", "sync", "flush",
             "copy-in", "copy-in-extended", "copy-stray", "function", "terminate", "unknown", "malformed"],
            [14, 5, 10, 6, 3, 2, 2, 4, 2, 5, 3, 2, 3, 1, 1, 1])[0]
        if kind == "query":
            sql = self.statement(tail)
            return f"Q {sql!r}", [m.query(sql)]
        if kind == "queries":
            sqls = [self.statement(tail) for _ in range(r.randrange(2, 4))]
            return f"Q×{len(sqls)} {sqls!r}", [m.query(s) for s in sqls]
        if kind == "extended":  # the unnamed statement: any text, except in a tail
            sql = self.statement(tail)
            msgs = [parse("", sql), bind("", "")]
            if r.random() < 0.3:
                msgs.append(describe(b"P", ""))
            msgs.append(execute("", r.choice([0, 0, 1])))
            end = r.choice(["S", "S", "H", ""])
            msgs += {"S": [SYNC], "H": [FLUSH], "": []}[end]
            return f"PBE{end} {sql!r}", msgs
        if kind == "named":  # named statements are always tail-safe text
            name, portal = r.choice(["s1", "s2"]), r.choice(["", "p1"])
            sql = self.statement(tail=True)
            msgs = [parse(name, sql)]
            if r.random() < 0.5:
                msgs.append(SYNC)
            msgs += [bind(portal, name), execute(portal, r.choice([0, 1, 2]))]
            if r.random() < 0.4:
                msgs.append(execute(portal, 1))
            if r.random() < 0.5:
                msgs.append(close(r.choice([b"S", b"P"]), r.choice([name, portal])))
            if r.random() < 0.8:
                msgs.append(SYNC)
            return f"named {name}/{portal!r} {sql!r} ({len(msgs)} msgs)", msgs
        if kind == "param":
            params = r.choice([(b"41",), (), (b"x",), (None,), (b"1", b"2")])
            return f"param {params!r}", [parse("", "select $1::int + 1", (23,)), bind("", "", params),
                                         execute("", 0), SYNC]
        if kind == "describe":
            which, name = r.choice([(b"S", "s1"), (b"S", ""), (b"P", "p1"), (b"P", ""), (b"X", "")])
            return f"describe {which!r} {name!r}", [describe(which, name)] + [SYNC] * r.randrange(2)
        if kind == "close":
            which, name = r.choice([(b"S", "s1"), (b"S", "s2"), (b"P", "p1"), (b"S", "")])
            return f"close {which!r} {name!r}", [close(which, name)] + [SYNC] * r.randrange(2)
        if kind == "sync":
            return "S", [SYNC]
        if kind == "flush":
            return "H", [FLUSH]
        if kind in ("copy-in", "copy-in-extended"):
            rows = [copy_data(f"{self.note('copied')}\n") for _ in range(r.randrange(3))]
            if r.random() < 0.2:
                rows.append(copy_data("two\tcolumns\n"))
            end = r.choices(["done", "fail", "none"], [6, 2, 1])[0]  # none: Odissey refuses what follows
            ending = {"done": [COPY_DONE], "fail": [m.copy_fail("fz")], "none": []}[end]
            start = f"copy {TABLE} (note) from stdin"
            if kind == "copy-in":
                return f"copy-in {len(rows)} rows, {end}", [m.query(start)] + rows + ending
            return (f"copy-in-extended {len(rows)} rows, {end}",
                    [parse("", start), bind("", ""), execute("", 0), SYNC] + rows + ending + [SYNC])
        if kind == "copy-stray":
            msg = r.choice([copy_data(f"{self.note('stray')}\n"), COPY_DONE, m.copy_fail("stray")])
            return f"stray {msg[:1]!r}", [msg]
        if kind == "function":
            name = r.choice(list(FOLLOWING) + list(UNREPORTED))
            value = r.choice(FOLLOWING.get(name) or UNREPORTED[name]).strip("'")
            local = b"t" if name not in FOLLOWING and not self.session_state else r.choice([b"t", b"f"])
            oid, args = r.choice([
                (SET_CONFIG, (name.encode(), value.encode(), local)),
                (PG_SLEEP, (b"0.01",)),
                (INT4PL, (b"1", b"2")),
                (INT4PL, (b"1",)),
                (99999999, ()),
            ])
            return f"F {oid} {args!r}", [function_call(oid, args)]
        if kind == "terminate":
            return "X", [TERMINATE]
        return self.bad_message()

    def bad_message(self) -> tuple[str, list[bytes]]:
        """A message PostgreSQL rejects only once it reads it."""
        r = self.rnd
        msg = r.choice([
            m.message(r.choice([b"z", b"A", b"0", b"K", b"p"]), b"fz\0"),  # unknown type: FATAL
            m.message(b"H", b"junk"),  # a Flush with a body: ERROR, then wait for a Sync
            m.message(r.choice([b"H", b"c", b"f"]), b"\0" * 10_001),  # over PostgreSQL's limit: FATAL
            m.message(b"S", b"junk"),
        ])
        return f"bad {msg[:1]!r} of {len(msg) - 1}", [msg]

    def mutate(self, msgs: list[bytes], steps: list[str]) -> bool:
        """Mutate one message in place; False when nothing may follow (the framing is
        broken, or the stream holds a message PostgreSQL rejects)."""
        r = self.rnd
        if not msgs:
            return True
        i = r.randrange(len(msgs))
        how = r.choice(["truncate", "length", "type", "duplicate", "drop", "swap"])
        bad = r.choice([0, 3, 2_000_000, 0x7FFFFFFF,  # Odissey refuses these (limit 1MB)
                        None, None, 50_000])  # (None: a little more or less than the body)
        msg = msgs[i]
        steps.append(f"mutation {how} of message {i} ({msg[:1]!r})")
        if how == "truncate":
            msgs[i] = msg[:r.randrange(1, max(2, len(msg)))]
            return False
        if how == "length":
            size = len(msg) - 1
            if bad is None:
                bad = r.choice([size + r.randrange(1, 40), max(4, size - r.randrange(1, 5))])
            steps[-1] += f": {bad}"
            msgs[i] = msg[:1] + struct.pack("!I", bad) + msg[5:]
            return False
        if how == "type":
            msgs[i] = r.choice([b"z", b"\0", b"w", b"Y"]) + msg[1:]
            return False
        elif how == "duplicate":
            msgs.insert(i, msg)
        elif how == "drop":
            del msgs[i]
        elif i + 1 < len(msgs):
            msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
        return True

    def plan(self) -> Plan:
        r = self.rnd
        plan = Plan(self.tag)
        msgs: list[bytes] = []
        for _ in range(r.randrange(1, 9)):
            step, more = self.idiom()
            plan.steps.append(step)
            msgs += more
        framed = True
        for _ in range(r.choice([0, 0, 0, 1, 1, 2])):
            framed = self.mutate(msgs, plan.steps) and framed
        if framed and r.random() < 0.5:
            # Known ground, whatever came before: out of any COPY and failed batch, out
            # of any transaction; then a transaction the client never commits.
            note = self.note("doomed")
            plan.doomed.append(note)
            plan.steps.append(f"doomed {note}")
            msgs += [m.copy_fail("fz"), SYNC, m.query("rollback"),
                     m.query(f"begin; insert into {TABLE} (note) values ('{note}')")]
            tail: list[bytes] = []
            while len(tail) < 1 or r.random() < 0.5:
                step, more = self.idiom(tail=True)
                if any(word in b"".join(more).lower() for word in (b"commit", b"end", b"transaction")):
                    continue  # not even a mutation can make a COMMIT from these bytes
                plan.steps.append(f"tail: {step}")
                tail += more
                if len(tail) > 12:
                    break
            if r.random() < 0.3:
                framed = self.mutate(tail, plan.steps)
            msgs += tail
        if not msgs:
            msgs.append(SYNC)
        plan.data = b"".join(msgs)
        cuts = sorted(r.randrange(1, len(plan.data) + 1) for _ in range(r.randrange(0, 6)))
        plan.cuts = sorted(set(cuts + [len(plan.data)]))
        plan.reading = r.choice(["never", "sometimes", "sometimes", "eager"])
        plan.ending = r.choice(ENDINGS)
        if r.random() < 0.3:
            plan.stay = r.uniform(0.05, 0.6)
            plan.cancel_in_stay = r.random() < 0.3
        plan.cancels = sorted(r.sample(range(len(plan.cuts)), min(len(plan.cuts), r.choice([0, 0, 0, 1, 2]))))
        return plan


# -- the clients ----------------------------------------------------------------------------


def login(port: int, user: str = USER, deadline: float = 10.0) -> socket.socket:
    """A raw socket logged in as a trust user; raises when Odissey refuses or closes."""
    return login_keyed(port, user, deadline)[0]


def login_keyed(port: int, user: str = USER, deadline: float = 10.0) -> tuple[socket.socket, tuple[int, int]]:
    """:func:`login`, and the cancel key Odissey gave the session."""
    key = (0, 0)
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline)
    sock.sendall(m.startup_message({"user": user, "database": DATABASE}))
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            raise ConnectionError(f"login closed by Odissey after {data!r}")
        data += chunk
        at = 0
        while len(data) - at >= 5:
            kind, size = data[at:at + 1], struct.unpack_from("!I", data, at + 1)[0]
            if len(data) - at < 1 + size:
                break
            if kind == b"E":
                sock.close()
                raise ConnectionError(f"login refused: {m.parse_error_fields(data[at + 5:at + 1 + size])}")
            if kind == b"K":
                key = m.parse_backend_key_data(data[at + 5:at + 13])
            if kind == b"Z":
                if at + 1 + size != len(data):
                    sock.close()
                    raise AssertionError(f"more than the login replies: {data[at + 1 + size:]!r}")
                return sock, key
            at += 1 + size


class Reader:
    """Whole backend messages off a raw socket, as (type, body)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.closed = False

    def poll(self, seconds: float) -> list[tuple[bytes, bytes]]:
        """Whatever arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            self._recv()
        return self._split()

    def until_ready(self, seconds: float) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the next ReadyForQuery; raises if none comes."""
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + seconds
        while True:
            for i, (kind, body) in enumerate(self._split(keep_after_ready=True)):
                out.append((kind, body))
                if kind == b"Z":
                    return out
            if self.closed:
                raise ConnectionError(f"closed by Odissey after {out!r}")
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no ReadyForQuery within {seconds}s after {out!r}")
            self._recv()

    def _recv(self) -> None:
        try:
            chunk = self.sock.recv(262144)
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
        self.buffer += chunk

    def _split(self, keep_after_ready: bool = False) -> list[tuple[bytes, bytes]]:
        out = []
        while len(self.buffer) >= 5:
            end = 1 + struct.unpack_from("!I", self.buffer, 1)[0]
            if len(self.buffer) < end:
                break
            out.append((self.buffer[:1], self.buffer[5:end]))
            self.buffer = self.buffer[end:]
            if keep_after_ready and out[-1][0] == b"Z":
                break
        return out


def columns(body: bytes) -> list[Optional[str]]:
    """The text of each column of a DataRow."""
    count = struct.unpack_from("!h", body)[0]
    at, out = 2, list[Optional[str]]()
    for _ in range(count):
        size = struct.unpack_from("!i", body, at)[0]
        at += 4
        if size < 0:
            out.append(None)
        else:
            out.append(body[at:at + size].decode("utf-8", "replace"))
            at += size
    return out


def fuzz_client(target: "Target", plan: Plan, rnd: random.Random, sent: threading.Event, problems: list[str]) -> None:
    """Play ``plan``; set ``sent`` once it has sent everything (and, unless it stays, left)."""
    try:
        sock, key = login_keyed(target.port, target.user)
    except Exception as exc:  # noqa: BLE001 - any failure to log in is a finding
        problems.append(f"{plan.tag}: could not log in: {exc!r}")
        sent.set()
        return
    reader = Reader(sock)
    seen: list[tuple[bytes, bytes]] = []

    def read(seconds: float) -> None:
        seen.extend(reader.poll(seconds))

    try:
        sock.settimeout(3.0)  # a client that never reads may be throttled: that is fine
        start = 0
        for n, end in enumerate(plan.cuts):
            try:
                sock.sendall(plan.data[start:end])
            except OSError:  # dropped by Odissey (a bad message), or throttled
                break
            start = end
            if n in plan.cancels:
                time.sleep(rnd.random() * 0.02)
                send_cancel_request(target.port, key)
            if plan.reading == "eager" or (plan.reading == "sometimes" and rnd.random() < 0.5):
                read(rnd.uniform(0.0, 0.03 if plan.reading == "sometimes" else 0.08))
            elif end < len(plan.data):
                time.sleep(rnd.random() * 0.005)
        if plan.stay:
            sent.set()
            stop = time.monotonic() + plan.stay
            cancel_at = time.monotonic() + rnd.random() * plan.stay if plan.cancel_in_stay else stop + 1
            while time.monotonic() < stop:
                if time.monotonic() > cancel_at:
                    send_cancel_request(target.port, key)  # while the checkers wait or run
                    cancel_at = stop + 1
                if plan.reading == "never":
                    time.sleep(stop - time.monotonic())
                else:
                    read(min(0.05, max(0.0, stop - time.monotonic())))
        elif plan.reading != "never":
            read(0.01)
        end_session(sock, plan.ending, plan.goodbye)
    except Exception as exc:  # noqa: BLE001 - a cancel refused, say: a finding
        problems.append(f"{plan.tag}: {exc!r}")
    finally:
        sent.set()
        sock.close()
        for kind, body in seen:
            if kind == b"D" and b"chk-" in body:
                problems.append(f"{plan.tag}: got a checker's row {body!r}")


def end_session(sock: socket.socket, ending: str, goodbye: bytes) -> None:
    try:
        if ending == "leave":
            sock.sendall(goodbye)
        elif ending == "vanish":
            sock.shutdown(socket.SHUT_RDWR)
        elif ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


# -- the checks -----------------------------------------------------------------------------


@dataclass
class Target:
    """An Odissey route for u_trust in front of a PostgreSQL we can also reach directly."""

    port: int
    pool_size: int
    fuzzers: int  # fuzz clients per run, at once
    session_state: bool  # the route resets servers: the fuzzer may change session state
    direct: Callable[[], psycopg.Connection]
    baseline: dict[str, Optional[str]] = field(default_factory=dict)
    user: str = USER

    @property
    def checks(self) -> list[tuple[str, str]]:
        return CHECKS + (RESET_CHECKS if self.session_state else [])


def check(target: Target, token: str, sleep: float) -> tuple[Optional[str], dict[str, Optional[str]], list[str]]:
    """One checker session: (backend pid, what it read, problems)."""
    problems: list[str] = []
    try:
        sock = login(target.port, target.user)
    except Exception as exc:  # noqa: BLE001
        return None, {}, [f"checker {token} could not log in: {exc!r}"]
    reader = Reader(sock)
    pid: Optional[str] = None
    values: dict[str, Optional[str]] = {}
    try:
        early = reader.poll(0.0)
        if early:
            problems.append(f"checker {token} got messages before asking: {early!r}")
        names = [n for n, _ in target.checks]
        sql = ("select pg_backend_pid(), " + ", ".join(e for _, e in target.checks)
               + f", '{token}'" + (f", pg_sleep({sleep})" if sleep else ""))
        sock.sendall(m.query(sql))
        got = reader.until_ready(20.0)
        kinds = b"".join(k for k, _ in got if k != b"S")
        for kind, body in got:
            if kind == b"S":
                name, value = m.parse_parameter_status(body)
                if target.baseline and value != target.baseline.get(name, value):
                    problems.append(f"checker {token} told {name}={value!r}")
        if kinds != b"TDCZ" or got[-1][1] != b"I":
            problems.append(f"checker {token}: reply {summary(got)} instead of its own row and 'I'")
        rows = [columns(body) for kind, body in got if kind == b"D"]
        if len(rows) == 1 and rows[0][-2 if sleep else -1] == token:
            pid = rows[0][0]
            values = dict(zip(names, rows[0][1:]))
        elif kinds == b"TDCZ":
            problems.append(f"checker {token} got a row not its own: {rows!r}")
        if target.baseline and values:
            for setting, seen in values.items():
                if seen != target.baseline[setting]:
                    problems.append(f"checker {token} on backend {pid}: {setting} is {seen!r}, "
                                    f"not {target.baseline[setting]!r}")
        second = f"{token}-x"  # the extended protocol, the text only in a parameter
        sock.sendall(parse("", "select $1::text") + bind("", "", (second.encode(),)) + execute("") + SYNC)
        got = reader.until_ready(20.0)
        kinds = b"".join(k for k, _ in got if k != b"S")
        rows = [columns(body) for kind, body in got if kind == b"D"]
        if kinds != b"12DCZ" or got[-1][1] != b"I" or rows != [[second]]:
            problems.append(f"checker {token}, second request: {summary(got)}")
        sock.sendall(TERMINATE)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"checker {token}: {exc!r}")
    finally:
        sock.close()
    return pid, values, problems


def summary(got: list[tuple[bytes, bytes]]) -> str:
    out = []
    for kind, body in got:
        if kind == b"E" or kind == b"N":
            fields = m.parse_error_fields(body)
            out.append(f"{kind.decode()}({fields.get('C')} {fields.get('M')})")
        elif kind == b"D":
            out.append(f"D{columns(body)[-2:]}")
        elif kind == b"Z":
            out.append(f"Z{body.decode()}")
        else:
            out.append(kind.decode("latin-1"))
    return " ".join(out)


def baseline(target: Target) -> dict[str, Optional[str]]:
    """What a checker reads from a fresh server."""
    _pid, values, problems = check(target, "chk-baseline", 0)
    if problems or values.get("idle") != "t" or values.get("no xid") != "t":
        raise AssertionError(f"the baseline check failed: {problems} {values}")
    return values


def prepare_table(connect: Callable[[], psycopg.Connection]) -> None:
    with connect() as su:
        su.execute(f"create table if not exists {TABLE} (id bigserial primary key, note text)")
        su.execute(f"grant all on {TABLE} to public; grant all on {TABLE}_id_seq to public")


def settle(target: Target, seconds: float = 5.0) -> list[str]:
    """After a run: at most pool-size server connections, none in a transaction or busy."""
    deadline = time.monotonic() + seconds
    while True:
        with target.direct() as su:
            rows = su.execute(
                "select pid, state, xact_start is not null, left(query, 60) from pg_stat_activity "
                "where usename = %s and pid <> pg_backend_pid()", (target.user,)).fetchall()
        busy = [r for r in rows if r[1] != "idle" or r[2]]
        if len(rows) <= target.pool_size and not busy:
            return []
        if time.monotonic() > deadline:
            return [f"not settled after {seconds}s: {len(rows)} server connections, busy: {busy}"]
        time.sleep(0.05)


def committed(target: Target, notes: list[str]) -> list[str]:
    if not notes:
        return []
    with target.direct() as su:
        return [r[0] for r in su.execute(f"select note from {TABLE} where note = any(%s)", (notes,))]


@dataclass
class Run:
    seed: int
    plans: list[Plan]
    problems: list[str]
    seconds: float
    pids: set[str]

    def report(self) -> str:
        return "\n".join([f"seed {self.seed}: {len(self.problems)} problems ({self.seconds:.2f}s)"]
                         + [f"  problem: {p}" for p in self.problems]
                         + [f"  plan {p.describe()}" for p in self.plans])


def run_once(target: Target, seed: int) -> Run:
    """One run: the fuzz clients, then the checkers, then the settle and commit checks."""
    rnd = random.Random(seed)
    plans = [Generator(random.Random(rnd.random()), f"F{seed}x{i}", target.session_state).plan()
             for i in range(target.fuzzers)]
    return run_plans(target, seed, plans, random.Random(rnd.random()))


def run_plans(target: Target, seed: int, plans: list[Plan], timing: random.Random) -> Run:
    """Play these plans at once, then check (``timing``: pauses, reads, cancel moments)."""
    started = time.monotonic()
    problems: list[str] = []
    events = [threading.Event() for _ in plans]
    threads = [threading.Thread(target=fuzz_client, args=(target, plan, random.Random(timing.random()), sent, problems),
                                daemon=True) for plan, sent in zip(plans, events)]
    for t in threads:
        t.start()
    for sent in events:
        if not sent.wait(30):
            problems.append("a fuzz client did not finish sending within 30 s")
    results: list[tuple[Optional[str], dict[str, Optional[str]], list[str]]] = [(None, {}, [])] * target.pool_size

    def checker(j: int) -> None:
        results[j] = check(target, f"chk-{seed}-{j}", 0.3 if target.pool_size > 1 else 0)

    checkers = [threading.Thread(target=checker, args=(j,), daemon=True) for j in range(target.pool_size)]
    for t in checkers:
        t.start()
    for t in checkers + threads:
        t.join(60)
        if t.is_alive():
            problems.append("a client thread still runs after 60 s")
    pids = set()
    for pid, _values, found in results:
        problems += found
        if pid:
            pids.add(pid)
    problems += settle(target)
    notes = [note for plan in plans for note in plan.doomed]
    for note in committed(target, notes):
        problems.append(f"{note} was committed, though its client never committed it")
    return Run(seed, plans, problems, time.monotonic() - started, pids)


def seeds(count: int) -> list[int]:
    """The runs' seeds: the one in ODISSEY_SEQ_SEED, else ``count`` new ones."""
    given = os.environ.get(SEED_ENV)
    if given:
        return [int(given)]
    first = random.randrange(1 << 40)
    return list(range(first, first + count))


# -- the tests ------------------------------------------------------------------------------


class TransactionPoolOfOneTests(IntegrationTest):
    """Transaction mode, one server: each checker gets the server the fuzz client used."""

    pool_size = 1
    fuzzers = 1
    session_state = False
    runs = 30
    budget = 6.0  # seconds; stop early past it on a slow machine
    limits = {"max_message_size": "1MB"}
    pool: dict[str, object] = {"mode": "transaction"}

    def routes(self) -> list[dict]:
        return [route("app", USER, auth={"method": "trust"},
                      pool={"size": self.pool_size, "wait_timeout": "20s", "reset_timeout": "3s", **self.pool})]

    @inlineCallbacks
    def test_servers_handed_on_clean(self):
        """After random post-login sequences, however the client left, the next client
        finds its server idle, at default settings, with no result pending; nothing left
        uncommitted was committed; no server leaked; Odissey still serves."""
        yield self.thread(prepare_table, direct)
        target = Target(self.odissey.port, self.pool_size, self.fuzzers, self.session_state, direct)
        target.baseline = yield self.thread(baseline, target)
        run_seeds = seeds(self.runs)
        print(f"{self.id()}: seeds {run_seeds[0]}..{run_seeds[-1]} "
              f"(replay one with {SEED_ENV}=<seed>)")
        pool = self.odissey.service.pools.pools[PoolKey("app", USER)]
        started = time.monotonic()
        done = 0
        for seed in run_seeds:
            run = yield self.thread(run_once, target, seed)
            done += 1
            # Checkers and cleanups have let go of every server. (5 s, not 2: a cleanup is a
            # cancel and a ROLLBACK round trip; one run on a machine loaded 10 deep failed
            # here with a seed that passes on replay, which fits, though it was not proven.)
            for _ in range(250):
                if not pool.active:
                    break
                yield deferLater(reactor, 0.02, lambda: None)
            if pool.active or pool.total > self.pool_size:
                run.problems.append(f"pool: {len(pool.active)} active, {pool.total} in all")
            if run.problems:
                self.fail(f"{type(self).__name__}: {run.report()}\n"
                          f"replay: {SEED_ENV}={seed} python -m twisted.trial {self.id()}")
            if time.monotonic() - started > self.budget:
                break
        print(f"{self.id()}: {done} runs in {time.monotonic() - started:.1f}s")

        def served() -> int:
            with psycopg.connect(self.odissey.dsn(user=USER, password=None), autocommit=True) as conn:
                return int(conn.execute("select 11").fetchone()[0])  # type: ignore[index]

        self.assertEqual((yield self.thread(served)), 11)


class ResetAfterTransactionTests(TransactionPoolOfOneTests):
    """Transaction mode resetting after every transaction: the fuzz client may also
    change session state (session SETs, LISTEN, advisory locks, temp tables, WITH HOLD
    cursors, prepared statements), none of which may reach the next client."""

    session_state = True
    budget = 5.0
    pool = {"mode": "transaction", "reset_after_transaction": True}


class SessionPoolOfOneTests(TransactionPoolOfOneTests):
    """Session mode, one server: the server is reset (DISCARD ALL) when the client leaves."""

    session_state = True
    runs = 20
    budget = 4.0
    pool = {"mode": "session"}


class TransactionPoolOfTwoTests(TransactionPoolOfOneTests):
    """Transaction mode, two servers, two fuzz clients at once: two checkers at once
    (each holding its server a moment) cover both servers."""

    pool_size = 2
    fuzzers = 2
    runs = 12
    budget = 5.0
