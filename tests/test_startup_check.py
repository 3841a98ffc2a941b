"""Startup parameters PostgreSQL would refuse at login are refused at login, with its own
SQLSTATE; accepted pairs are remembered per pool."""

from __future__ import annotations

from typing import Any, Callable

import psycopg
from twisted.internet.defer import inlineCallbacks

from odissey.server import ServerConnection
from tests.harness import IntegrationTest, direct, login_outcome as login, route


class StartupCheckTests(IntegrationTest):
    def routes(self) -> list[dict[str, Any]]:
        return [route("app", "u_trust", auth={"method": "trust"}, pool={"mode": "transaction", "size": 2})]

    @inlineCallbacks
    def test_refused_as_postgresql_refuses(self):
        """A bad value, an unknown parameter and one the user may not set are refused at
        login with PostgreSQL's own SQLSTATE."""
        port = self.odissey.port
        self.assertEqual((yield self.thread(login, port, options="-c work_mem=garbage"))[0], "22023")
        self.assertEqual((yield self.thread(login, port, nosuch_setting="1"))[0], "42704")
        self.assertEqual((yield self.thread(login, port, options="-c log_statement=all"))[0], "42501")
        self.assertEqual((yield self.thread(login, port, DateStyle="Martian"))[0], "22023")

    @inlineCallbacks
    def test_accepted_pairs_checked_once(self):
        """A good pair costs one check per pool; later logins with it cost none, and
        application_name is never checked."""
        runs: list[list[str]] = []
        original = ServerConnection.run

        def counting(server: ServerConnection, statements: list[str]):  # type: ignore[no-untyped-def]
            runs.append(statements)
            return original(server, statements)

        self.patch(ServerConnection, "run", counting)
        port = self.odissey.port
        for name in ("a", "b", "c"):
            self.assertEqual((yield self.thread(login, port, TimeZone="Europe/Paris", application_name=name)),
                             ("ready", ""))
        checks = [r for r in runs if "BEGIN" in r]
        self.assertEqual(len(checks), 1)
        self.assertIn("SET LOCAL \"TimeZone\" TO E'Europe/Paris'", checks[0][-1])


class ToldValuesTests(IntegrationTest):
    """A login is told the values PostgreSQL would report for what it asked, before its
    first query, in both modes; what it is told later agrees."""

    def routes(self) -> list[dict[str, Any]]:
        return [route("app", "u_trust", auth={"method": "trust"}, pool={"mode": "session"}),
                route(pool={"mode": "transaction"})]

    def told(self, connect: Callable[..., psycopg.Connection]) -> tuple[tuple[str, ...], ...]:
        """What a login asking for client_encoding=utf-8 and DateStyle=iso is told at
        login, what the server shows, and what it has been told after a query."""
        names = ("client_encoding", "DateStyle")
        with connect(client_encoding="utf-8", options="-c DateStyle=iso") as conn:
            at_login = tuple(conn.info.parameter_status(name) or "" for name in names)
            shown = tuple(conn.execute("select current_setting('client_encoding'), "
                                       "current_setting('DateStyle')").fetchone())
            after = tuple(conn.info.parameter_status(name) or "" for name in names)
        return at_login, shown, after

    @inlineCallbacks
    def test_canonical_values_at_login(self):
        """client_encoding=utf-8 and DateStyle=iso are told UTF8 and ISO, MDY at login,
        exactly as PostgreSQL itself tells them, in session and transaction mode."""
        postgresql = yield self.thread(self.told, lambda **kw: direct(**kw))
        self.assertEqual(postgresql, (("UTF8", "ISO, MDY"),) * 3)
        session = yield self.thread(self.told, lambda **kw: self.odissey.connect(user="u_trust", password=None, **kw))
        transaction = yield self.thread(self.told, lambda **kw: self.odissey.connect(**kw))
        self.assertEqual(session, postgresql)
        self.assertEqual(transaction, postgresql)
