"""Drivers' prepared statements in transaction mode, end to end (odissey/statements.py).

The strongest check is differential: random extended-protocol programs (Parse, Bind,
Describe, Close, Execute, Flush, Sync over a few statement names, with errors of every
kind) run once straight against PostgreSQL and once through Odissey on a pool of one
server that another client keeps using between the batches, with its own statements of
the same names. The replies must match message for message (types and SQLSTATEs).
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
from typing import Any, Callable, Sequence

import asyncpg
import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import SkipTest

from odissey.pool import PoolKey
from odissey.wire import messages as m
from odissey.statements import SCRATCH
from tests.harness import (
    APP_PASSWORD, IntegrationTest, direct, have, read_message, route, run_seed, shared_postgres, trust_login,
)

#: Statements the programs choose from: fine, a parameter, an error at Execute, a syntax
#: error at Parse, another result type.
SQL = ["select 1", "select $1::int + 1", "select 1/0", "selec 1", "select 'x'::text, 2"]
NAMES = [b"", b"a", b"b", b"c"]


def parse(name: bytes, sql: str) -> bytes:
    return m.parse(name, sql.encode() + b"\0\0\0")


def bind(name: bytes, params: int) -> bytes:
    values = b"".join(b"\0\0\0\x01" + b"7" for _ in range(params))
    return m.bind(b"", name, b"\0\0" + params.to_bytes(2, "big") + values + b"\0\0")


def execute() -> bytes:
    return m.message(b"E", b"\0\0\0\0\0")


def operation(pick: Callable[[Sequence[Any]], Any]) -> bytes:
    """One step of a program, its choices made by ``pick`` (random or hypothesis)."""
    name = pick(NAMES)
    op = pick(range(9))
    if op < 3:
        return parse(name, pick(SQL))
    if op < 5:
        return bind(name, pick((0, 0, 1))) + execute()
    if op == 5:
        return m.describe(b"S", name)
    if op == 6:
        return m.close(b"S", name)
    if op == 7:
        return pick([m.message(b"H"), m.query("select 3"), m.query("select 1/0"), m.query("deallocate all"),
                     m.query("deallocate a"), m.query("deallocate zz")])
    return bind(name, 0) + m.describe(b"P", b"") + execute()


def program(rnd: random.Random, batches: int) -> list[bytes]:
    """Random batches of extended-protocol messages, each ending with a Sync."""
    return [b"".join(operation(rnd.choice) for _ in range(rnd.randrange(1, 7))) + m.sync()
            for _ in range(batches)]


@st.composite
def programs(draw: Callable[..., Any]) -> list[bytes]:
    """Programs of a few batches, each ending with a Sync, drawn by hypothesis (which
    shrinks a failing one to its core)."""
    def pick(options: Sequence[Any]) -> Any:
        return draw(st.sampled_from(list(options)))

    return [b"".join(operation(pick) for _ in range(draw(st.integers(1, 6)))) + m.sync()
            for _ in range(draw(st.integers(1, 8)))]


#: Ends each batch: a simple query after the Sync, whose row marks the end of the
#: batch's replies (how many ReadyForQuery a batch gets depends on what was skipped).
FENCE = m.query("select 'fence'")


def replies(sock: socket.socket, buffer: bytes) -> tuple[list[str], bytes]:
    """What answers one batch and its fence: message types, an error as its SQLSTATE,
    a ReadyForQuery with its status, up to the fence's row."""
    seen: list[str] = []
    while True:
        kind, body, buffer = read_message(sock, buffer)
        if kind == b"D" and body.endswith(b"fence"):
            break
        if kind == b"E":
            seen.append("E" + m.parse_error_fields(body).get("C", "?"))
        elif kind == b"Z":
            seen.append("Z" + body.decode())
        elif kind not in (b"N", b"S"):
            seen.append(kind.decode())
    while True:
        kind, body, buffer = read_message(sock, buffer)
        if kind == b"Z":
            return seen[:-1], buffer  # less the fence's RowDescription


def run(sock: socket.socket, batches: list[bytes]) -> list[list[str]]:
    out = []
    buffer = b""
    for batch in batches:
        sock.sendall(batch + FENCE)
        seen, buffer = replies(sock, buffer)
        out.append(seen)
    return out


def direct_login() -> socket.socket:
    pg = shared_postgres()
    sock = socket.create_connection(("127.0.0.1", pg.port), timeout=10)
    sock.sendall(m.startup_message({"user": "u_trust", "database": "app"}))
    data = b""
    while not data.endswith(m.ready_for_query(b"I")):
        data += sock.recv(65536)
    return sock


def prepared_on_server(sock: socket.socket) -> str:
    """Odissey's statements the client's current server has prepared, by name (asked
    with a simple query through Odissey, so on that server)."""
    sock.sendall(m.query("select coalesce(string_agg(name, ',' order by name), '') from pg_prepared_statements"
                         f" where name like 'ODISSEY%' and name <> '{SCRATCH.decode()}'"))
    buffer, value = b"", ""
    while True:
        kind, body, buffer = read_message(sock, buffer)
        if kind == b"D":
            value = body[6:6 + int.from_bytes(body[2:6], "big")].decode()
        elif kind == b"Z":
            return value


class DifferentialTests(IntegrationTest):
    """One server for everyone (pool size 1), two statements per server at most."""

    def routes(self) -> list[dict[str, Any]]:
        return [route("app", "u_trust", auth={"method": "trust"},
                      pool={"mode": "transaction", "size": 1, "max_prepared_statements": 2})]

    def compare(self, batches: list[bytes], other: list[bytes], check_cache: bool) -> None:
        """A program straight to PostgreSQL and through Odissey, with a second client
        running ``other`` on the same server between its batches."""
        with direct_login() as sock:
            expected = run(sock, batches)
        ours, theirs = trust_login(self.odissey.port), trust_login(self.odissey.port)
        try:
            buffer = b""
            for n, mine in enumerate(batches):
                ours.sendall(mine + FENCE)
                got, buffer = replies(ours, buffer)
                assert got == expected[n], (n, batches[: n + 1], expected[n], got)
                if check_cache:
                    # What Odissey believes the server holds is what it holds. (Read from
                    # this thread once the server is back in the pool, just after its reply:
                    # awaited, a few tries.)
                    pool = self.odissey.service.pools.pools[PoolKey("app", "u_trust")]
                    deadline = time.monotonic() + 5
                    while True:
                        on_server = prepared_on_server(ours)
                        while not pool.idle and time.monotonic() < deadline:
                            time.sleep(0.001)
                        believed = ",".join(sorted(name.decode() for server in pool.idle
                                                   for name in server.statements.prepared))
                        if on_server == believed or time.monotonic() > deadline:
                            break
                        time.sleep(0.01)
                    assert on_server == believed, (n, batches[: n + 1], on_server, believed)
                if n < len(other):
                    run(theirs, [other[n]])
        finally:
            ours.close()
            theirs.close()

    @inlineCallbacks
    def test_programs_answer_as_postgresql_does(self):
        """Programs drawn by hypothesis get, batch for batch, the replies PostgreSQL
        itself gives them, and after each batch the server holds exactly the statements
        Odissey believes it holds (eviction, skipped requests, DEALLOCATE ALL included)."""
        @settings(max_examples=60, deadline=None, database=None)
        @given(programs(), programs())
        def check(mine: list[bytes], other: list[bytes]) -> None:
            self.compare(mine, other, check_cache=True)

        yield self.thread(check)

    @inlineCallbacks
    def test_what_a_simple_query_dropped_stays_dropped(self):
        """What the interleaved test found, shrunk: requests skipped after an error
        (a Parse of the unnamed statement, a DEALLOCATE, a Close) are undone without
        undoing the fence's simple query sent after them, and a refused Parse of the
        unnamed statement leaves none (PostgreSQL drops the old one first)."""
        S = m.sync()
        fail = bind(b"zz", 0)  # 26000: the client has no "zz"
        unnamed = bind(b"", 0) + execute() + S
        cases = [
            [parse(b"", "select 1") + bind(b"", 0) + execute() + parse(b"", "selec 1") + S, unnamed],
            [parse(b"", "select 1") + fail + parse(b"", "select 2") + S, unnamed],
            [parse(b"a", "select 1") + parse(b"", "select 2") + fail + m.query("deallocate a") + S, unnamed],
            [parse(b"", "select 2") + fail + m.query("deallocate all") + S, unnamed],
            [m.query("deallocate all") + parse(b"c", "select 1") + fail + m.close(b"S", b"c") + S,
             m.describe(b"S", b"c") + S],
        ]

        def check() -> None:
            for batches in cases:
                self.compare(batches, [], False)

        yield self.thread(check)

    @inlineCallbacks
    def test_a_bind_pipelined_behind_a_failed_batch_never_runs_another_clients_statement(self):
        """Another client leaves its unnamed statement on the one server; a client
        pipelines a batch that fails before its Parse of the unnamed statement and,
        behind that batch's Sync, a Bind of it: never the other client's row."""
        def run() -> list[bytes]:
            other, mine = trust_login(self.odissey.port), trust_login(self.odissey.port)
            try:
                other.sendall(parse(b"", "select 42") + m.sync())
                kind, buffer = b"", b""
                while kind != b"Z":
                    kind, _body, buffer = read_message(other, buffer)
                mine.sendall(bind(b"zz", 0) + parse(b"", "select 1") + m.sync() + bind(b"", 0) + execute() + m.sync())
                rows, ready, buffer = [], 0, b""
                while ready < 2:
                    kind, body, buffer = read_message(mine, buffer)
                    ready += kind == b"Z"
                    if kind == b"D":
                        rows.append(body[6:])
                return rows
            finally:
                other.close()
                mine.close()

        rows = yield self.thread(run)
        self.assertNotIn(b"42", rows)

    @inlineCallbacks
    def test_programs_interleaved(self):
        """Twelve random programs at once on the one server: the same replies as
        PostgreSQL's."""
        seed = run_seed(self)
        yield gatherResults([
            self.thread(self.compare, program(random.Random(seed + i), 8), program(random.Random(-seed - i), 8), False)
            for i in range(12)])


class DriverDefaultsTests(IntegrationTest):
    """Real drivers with their default settings, fifty at a time on four servers."""

    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "transaction", "size": 4, "wait_timeout": "30s"})]

    @property
    def registry(self):  # type: ignore[no-untyped-def]
        return self.odissey.service.pools.pools[PoolKey("app", "app")].statements

    def psycopg(self) -> psycopg.Connection:
        """psycopg as an application gets it: prepare_threshold 5, autocommit off."""
        return psycopg.connect(self.odissey.dsn(), connect_timeout=10)

    @inlineCallbacks
    def test_psycopg_defaults_fifty_clients_four_servers(self):
        """Fifty psycopg clients with the default prepare_threshold run the same five
        statements twenty times each (so each is prepared after five) on four servers:
        every answer is right, and the servers parsed each statement at most once
        each (at most 20 server-side Parses in all)."""
        statements = [f"select %s::int + {k}" for k in range(5)]

        def client(c: int) -> int:
            wrong = 0
            with self.psycopg() as conn:
                for round_ in range(20):
                    for k, sql in enumerate(statements):
                        if conn.execute(sql, (c * 100 + round_,)).fetchone()[0] != c * 100 + round_ + k:
                            wrong += 1
                    conn.commit()
            return wrong

        wrong = yield gatherResults([self.thread(client, c) for c in range(50)])
        self.assertEqual(sum(wrong), 0)
        self.assertLessEqual(self.registry.server_parses, 20)
        self.assertGreaterEqual(self.registry.client_parses, 250)  # five per client at least

    @inlineCallbacks
    def test_two_fresh_connections_prepare_the_same_name(self):
        """Two connections in a row each run ``execute(sql, prepare=True)``: psycopg
        names both statements ``_pg3_0``; the second works as it does against
        PostgreSQL, and sees none of the first's statements under its own names."""
        def once(i: int) -> tuple[int, list[str]]:
            with self.psycopg() as conn:
                value = conn.execute("select %s::int * 2", (i,), prepare=True).fetchone()[0]
                names = [r[0] for r in conn.execute("select name from pg_prepared_statements")]
                return value, names

        first = yield self.thread(once, 1)
        second = yield self.thread(once, 2)
        self.assertEqual((first[0], second[0]), (2, 4))
        self.assertNotIn("_pg3_0", second[1])
        self.assertTrue(all(name.startswith("ODISSEY_") for name in second[1]), second[1])

    @inlineCallbacks
    def test_psycopg_pipeline_executemany_cursor_and_copy(self):
        """Prepared statements in psycopg's pipeline mode, executemany, a server-side
        cursor and COPY, on clients that keep changing servers."""
        def client(c: int) -> tuple[list[int], int, list[int], int]:
            with self.psycopg() as conn:
                with conn.pipeline():
                    cursors = [conn.execute("select %s::int + 1", (c * 10 + k,), prepare=True) for k in range(6)]
                piped = [cur.fetchone()[0] for cur in cursors]
                conn.commit()
                with conn.cursor() as cur:
                    cur.executemany("select %s::int", [(k,) for k in range(10)], returning=True)
                    many = 0
                    while True:
                        many += cur.fetchone()[0]
                        if not cur.nextset():
                            break
                conn.commit()
                with conn.cursor(name=f"big{c}") as cur:  # server-side cursor, in a transaction
                    cur.execute("select g from generate_series(1, 5) g")
                    fetched = [row[0] for row in cur.fetchall()]
                conn.commit()
                with conn.cursor().copy("copy (select generate_series(1, 100)) to stdout") as copy:
                    copied = sum(1 for _ in copy.rows())
                conn.commit()
                return piped, many, fetched, copied

        results = yield gatherResults([self.thread(client, c) for c in range(12)])
        for c, (piped, many, fetched, copied) in enumerate(results):
            self.assertEqual(piped, [c * 10 + k + 1 for k in range(6)])
            self.assertEqual((many, fetched, copied), (45, [1, 2, 3, 4, 5], 100))

    @inlineCallbacks
    def test_asyncpg_defaults_and_its_pool(self):
        """asyncpg with its statement cache on (every query prepared), fifty
        connections on four servers, and an asyncpg pool of five connections."""
        async def main() -> tuple[int, list[int]]:
            async def one(c: int) -> int:
                conn = await asyncpg.connect(host="127.0.0.1", port=self.odissey.port, user="app",
                                             password=APP_PASSWORD, database="app", ssl=False)
                try:
                    wrong = 0
                    for round_ in range(10):
                        for k in range(5):
                            if await conn.fetchval(f"select $1::int + {k}", c + round_) != c + round_ + k:
                                wrong += 1
                    statement = await conn.prepare("select $1::int * 3")
                    if [await statement.fetchval(i) for i in range(3)] != [0, 3, 6]:
                        wrong += 1
                    return wrong
                finally:
                    await conn.close()

            wrong = sum(await asyncio.gather(*(one(c) for c in range(50))))
            pool = await asyncpg.create_pool(host="127.0.0.1", port=self.odissey.port, user="app",
                                             password=APP_PASSWORD, database="app", ssl=False,
                                             min_size=5, max_size=5)
            try:
                values = await asyncio.gather(*(pool.fetchval("select $1::int - 1", i) for i in range(200)))
            finally:
                await pool.close()
            return wrong, list(values)

        wrong, values = yield self.thread(lambda: asyncio.run(main()))
        self.assertEqual(wrong, 0)
        self.assertEqual(values, [i - 1 for i in range(200)])

    @inlineCallbacks
    def test_deallocate_and_discard_all_drop_the_clients_statements(self):
        """``DEALLOCATE ALL`` and ``DISCARD ALL`` sent as SQL drop the client's
        statements (psycopg then prepares again), ``DEALLOCATE name`` of a
        protocol-level statement is answered as PostgreSQL answers it."""
        def run() -> list[Any]:
            with self.psycopg() as conn:
                conn.autocommit = True
                seen = [conn.execute("select %s::int", (1,), prepare=True).fetchone()[0]]
                conn.execute("deallocate all")
                seen.append(conn.execute("select %s::int", (2,), prepare=True).fetchone()[0])
                conn.execute("discard all")
                seen.append(conn.execute("select %s::int", (3,), prepare=True).fetchone()[0])
                pgconn = conn.pgconn
                pgconn.prepare(b"mine", b"select 42")
                pgconn.get_result()
                seen.append(conn.execute("deallocate mine").statusmessage)
                result = pgconn.exec_prepared(b"mine", [])
                seen.append(result.error_field(psycopg.pq.DiagnosticField.SQLSTATE))
                return seen

        seen = yield self.thread(run)
        self.assertEqual(seen, [1, 2, 3, "DEALLOCATE", b"26000"])

    @inlineCallbacks
    def test_ddl_that_changes_a_result_type(self):
        """A statement whose table changed shape: PostgreSQL's own 0A000 (cached plan
        must not change result type) from the server that had it prepared, as directly;
        the same query unprepared sees the new shape."""
        def run() -> list[str]:
            with direct() as su:
                su.execute("drop table if exists shape; create table shape (a int); grant all on shape to app")
            states = []
            with self.psycopg() as conn:
                conn.autocommit = True
                conn.execute("select * from shape", prepare=True)
                with direct() as su:
                    su.execute("alter table shape add column b int")
                try:
                    conn.execute("select * from shape", prepare=True)
                    states.append("ok")
                except psycopg.Error as exc:
                    states.append(exc.sqlstate or "")
                states.append(len(conn.execute("select * from shape", prepare=False).description))
            return states

        states = yield self.thread(run)
        self.assertIn(states[0], ("0A000", "ok"))  # "ok" when the query landed on a fresh server
        self.assertEqual(states[1], 2)

    @inlineCallbacks
    def test_pgbench_prepared_fifty_clients_four_servers(self):
        """pgbench -M prepared (its simple-update script: named statements, explicit
        transactions) with fifty clients on four servers: no failed transaction, and the
        servers parsed each of its statements at most once each."""
        if not have("pgbench"):
            raise SkipTest("pgbench not installed")

        def bench() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                # One thread per client: pgbench prepares with the synchronous PQprepare, so a
                # thread blocked on a client that waits for a server would stall the clients
                # holding the servers (through any transaction pooler, PgBouncer's included).
                ["pgbench", "-n", "-N", "-M", "prepared", "-c", "50", "-j", "50", "-T", "5",
                 "-h", "127.0.0.1", "-p", str(self.odissey.port), "-U", "app", "app"],
                capture_output=True, text=True, env=self.odissey.env(), timeout=120)

        done = yield self.thread(bench)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertIn("number of failed transactions: 0 (0.000%)", done.stdout)
        self.assertLessEqual(self.registry.server_parses, 4 * 5)  # five statements in the script
