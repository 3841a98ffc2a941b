"""Session state one transaction-mode client leaves on a server never reaches the next
client (odissey/session_state.py and the relay's hand-over)."""

from __future__ import annotations

from typing import Any

import psycopg
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from odissey import session_state as s
from odissey.wire import messages as m
from tests.harness import IntegrationTest, Replies, route, trust_login

REPORTED = frozenset({"application_name", "client_encoding", "datestyle", "timezone"})


class TextTests(unittest.TestCase):
    def test_what_texts_may_leave(self):
        cases = {
            b"select 1": 0,
            b"create temp table t (x int)": s.TEMP,
            b"CREATE TEMPORARY TABLE t AS SELECT 1": s.TEMP,
            b"create table pg_temp.t (x int)": s.TEMP,
            b"select attempt, template from items": 0,
            b"listen jobs": s.LISTEN,
            b"unlisten *": 0,
            b"select pg_advisory_lock(1)": s.LOCKS,
            b"select pg_try_advisory_lock_shared(1)": s.LOCKS,
            b"select pg_advisory_xact_lock(1)": 0,
            b"prepare q as select 1": s.PREPARED,
            b"prepare transaction 'x'": 0,
            b"declare c cursor with hold for select 1": s.HOLD,
            b"set work_mem = '8MB'": s.SETTINGS,
            b"SET SESSION statement_timeout = 5": s.SETTINGS,
            b"set local work_mem = '8MB'": 0,
            b"set transaction isolation level serializable": 0,
            b"set application_name = 'x'": 0,  # reported: carried per client
            b"select set_config('work_mem', '8MB', false)": s.SETTINGS,
            b"set role other": s.ROLE,
            b"set session authorization other": s.ROLE,
            b"select 1; set search_path = x": s.SETTINGS,
            b"select offset_value from t": 0,
        }
        for text, flags in cases.items():
            self.assertEqual(s.left_by(text, REPORTED), flags, text)

    def test_marks_remember_answers_per_reported_set_within_bounds(self):
        """A text read again gets left_by's answer for its own set of reported
        parameters; long texts are not kept, and the memo never outgrows its bound."""
        text = b"set work_mem = '8MB' -- memo"
        reported = s.Marks(REPORTED)
        self.assertIsInstance(s.marks(REPORTED), s.Marks if s.MEMO_HERE else s.Reading)
        self.assertIs(s.marks(frozenset(REPORTED)), s.marks(REPORTED))
        self.assertEqual(reported.of(text), s.SETTINGS)
        self.assertEqual(s.Marks(frozenset({"work_mem"})).of(text), 0)
        self.assertEqual(s.Reading(REPORTED).of(text), s.SETTINGS)
        self.assertEqual(reported.of(text), s.SETTINGS)
        self.assertEqual(reported.seen[text], s.SETTINGS)
        long = b"create temp table t (x int) -- " + b"x" * s.MEMO_TEXT
        self.assertEqual(reported.of(long), s.TEMP)
        self.assertNotIn(long, reported.seen)
        for i in range(s.MEMO_SIZE + 10):
            self.assertEqual(reported.of(b"select %d" % i), 0)
        self.assertLessEqual(len(reported.seen), s.MEMO_SIZE)
        self.assertEqual(reported.of(b"listen jobs"), s.LISTEN)

    def test_cleanup_runs_exactly_whats_needed_role_first(self):
        self.assertEqual(s.cleanup(0), [])
        self.assertEqual(s.cleanup(s.TEMP | s.LISTEN), ["DISCARD TEMP", "UNLISTEN *"])
        self.assertEqual(s.cleanup(s.SETTINGS | s.ROLE)[:2], ["RESET ROLE", "SET SESSION AUTHORIZATION DEFAULT"])


class HandOverTests(IntegrationTest):
    """One server (pool size 1) that two clients take in turn."""

    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "transaction", "size": 1})]

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.odissey.dsn(), autocommit=True, connect_timeout=10)

    @inlineCallbacks
    def test_next_client_sees_none_of_the_last_ones_session_state(self):
        """A leaves a SQL-prepared statement, a temp table, a LISTEN, an advisory lock,
        a cursor WITH HOLD and an unreported SET on the server; B, on the same backend,
        sees none of them. A keeps its state as long as nobody else used its server."""
        def run() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            a, b = self.connect(), self.connect()
            try:
                a.execute("prepare mine as select 1")
                a.execute("create temp table scratch (x int)")
                a.execute("listen jobs")
                a.execute("select pg_advisory_lock(77)")
                a.execute("begin; declare held cursor with hold for select 1; commit")
                a.execute("set work_mem = '7MB'")
                seen["a_pid"] = a.execute("select pg_backend_pid()").fetchone()[0]
                seen["a_keeps"] = a.execute("select count(*) from scratch").fetchone()[0]
                seen["b_pid"] = b.execute("select pg_backend_pid()").fetchone()[0]
                seen["prepared"] = b.execute(
                    "select count(*) from pg_prepared_statements where name = 'mine'").fetchone()[0]
                seen["temp"] = b.execute("select count(*) from pg_tables where tablename = 'scratch'").fetchone()[0]
                seen["listening"] = b.execute("select count(*) from pg_listening_channels()").fetchone()[0]
                seen["locks"] = b.execute(
                    "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()").fetchone()[0]
                seen["cursors"] = b.execute("select count(*) from pg_cursors").fetchone()[0]
                seen["work_mem"] = b.execute("show work_mem").fetchone()[0]
            finally:
                a.close()
                b.close()
            return seen

        seen = yield self.thread(run)
        self.assertEqual(seen["a_pid"], seen["b_pid"])  # the same backend, handed over
        self.assertEqual(seen["a_keeps"], 0)  # A's own temp table was still there for A
        self.assertEqual((seen["prepared"], seen["temp"], seen["listening"], seen["locks"], seen["cursors"]),
                         (0, 0, 0, 0, 0))
        self.assertEqual(seen["work_mem"], "4MB")

    @inlineCallbacks
    def test_protocol_statements_of_another_client_are_not_visible_by_name(self):
        """B's pg_prepared_statements holds none of A's own names, only Odissey's."""
        def run() -> list[str]:
            with self.connect() as a:
                a.execute("select %s::int", (1,), prepare=True)
            with self.connect() as b:
                return [r[0] for r in b.execute("select name from pg_prepared_statements")]

        names = yield self.thread(run)
        self.assertEqual([n for n in names if not n.startswith("ODISSEY_")], [])


class ExtendedHandOverTests(IntegrationTest):
    """One server (pool size 1), its first client speaking the extended protocol, with
    prepared statements on and off."""

    statements = 100

    def routes(self) -> list[dict[str, Any]]:
        return [route("app", "u_trust", auth={"method": "trust"},
                      pool={"mode": "transaction", "size": 1, "max_prepared_statements": self.statements})]

    @inlineCallbacks
    def test_a_set_parsed_by_the_extended_protocol_is_cleaned_too(self):
        """A sends SETs as a named and as an unnamed Parse (as JDBC and asyncpg do); B,
        on the same backend, sees neither value. (What is read is the text after the
        statement's name, which once hid a SET at its start.)"""
        def run() -> tuple:
            a = trust_login(self.odissey.port)
            replies = Replies(a)
            try:
                for name, sql in ((b"s1", b"set work_mem = '7MB'"), (b"", b"SET statement_timeout = '17s'")):
                    a.sendall(m.parse(name, sql + b"\0\0\0") + m.bind(b"", name, b"\0\0\0\0\0\0")
                              + m.message(b"E", b"\0\0\0\0\0") + m.sync())
                a.sendall(m.query("select pg_backend_pid()"))
                answer = replies.until(3)
            finally:
                a.close()
            with self.odissey.connect(user="u_trust", password=None, autocommit=True) as b:
                return (answer, replies.errors, int(replies.rows[-1]), b.execute("select pg_backend_pid()").fetchone()[0],
                        b.execute("show work_mem").fetchone()[0], b.execute("show statement_timeout").fetchone()[0])

        answer, errors, a_pid, b_pid, work_mem, timeout = yield self.thread(run)
        self.assertEqual((answer.count(b"C\0\0\0\x08SET\0"), errors), (2, []))
        self.assertEqual(a_pid, b_pid)  # the same backend, handed over
        self.assertEqual((work_mem, timeout), ("4MB", "0"))


    @inlineCallbacks
    def test_state_of_a_client_gone_mid_request_is_cleaned_for_the_server_before(self):
        """W uses the one backend first (so it is W's "last server"); X then sends a SET
        and Terminate in one write, and leaves while its SET runs. The backend, cleaned
        of X's request, still holds X's setting: W, coming back to its last server, must
        not inherit it (the server's last client is X now, not W)."""
        def run() -> tuple:
            with self.odissey.connect(user="u_trust", password=None, autocommit=True) as w:
                w_pid = w.execute("select pg_backend_pid()").fetchone()[0]
                x = trust_login(self.odissey.port)
                try:
                    x.sendall(m.query("set work_mem = '7MB'") + m.terminate())
                    x.recv(1)  # (Odissey closes X once it has sent Terminate on)
                finally:
                    x.close()
                return (w_pid, w.execute("select pg_backend_pid()").fetchone()[0],
                        w.execute("show work_mem").fetchone()[0])

        w_pid, again, work_mem = yield self.thread(run)
        self.assertEqual(w_pid, again)  # the same backend
        self.assertEqual(work_mem, "4MB")


class ExtendedHandOverPlainTests(ExtendedHandOverTests):
    statements = 0


class PinnedListenerTests(IntegrationTest):
    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "transaction", "size": 2, "pin_listeners": True})]

    @inlineCallbacks
    def test_listener_keeps_its_server_and_gets_notifications(self):
        """With pin_listeners a client that LISTENs keeps its server, so a NOTIFY sent
        later from elsewhere reaches it."""
        def run() -> tuple[str, int, int]:
            with psycopg.connect(self.odissey.dsn(), autocommit=True) as listener:
                listener.execute("listen jobs")
                pid = listener.execute("select pg_backend_pid()").fetchone()[0]
                with psycopg.connect(self.odissey.dsn(), autocommit=True) as other:
                    other.execute("notify jobs, 'hello'")
                    other_pid = other.execute("select pg_backend_pid()").fetchone()[0]
                for note in listener.notifies(timeout=5, stop_after=1):
                    return note.payload, pid, other_pid
            return "", pid, other_pid

        payload, pid, other_pid = yield self.thread(run)
        self.assertEqual(payload, "hello")
        self.assertNotEqual(pid, other_pid)
