"""Startup parameters PostgreSQL would refuse at login are refused at login, with its own
SQLSTATE; accepted pairs are remembered per pool."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks

from odissey.server import ServerConnection
from odissey.wire import messages as m
from tests.harness import IntegrationTest, read_message, route


def login(port: int, **params: str) -> tuple[str, str]:
    """Log in as u_trust with these startup parameters: ("ready", "") or the FATAL's
    (SQLSTATE, message)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "u_trust", "database": "app", **params}))
        data = b""
        while True:
            kind, body, data = read_message(sock, data)
            if kind == b"Z":
                return "ready", ""
            if kind == b"E":
                fields = m.parse_error_fields(body)
                return fields["C"], fields["M"]


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
        self.assertIn("SET LOCAL \"TimeZone\" TO E'Europe/Paris'", checks[0][-2])
