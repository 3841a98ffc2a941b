"""Cleartext login against a SCRAM secret through real clients, and the work each refusal costs.

The cost is asserted by counting PBKDF2 derivations, not by timing: a wrong password and
an unknown user must each cost exactly one, so the two cannot be told apart by the clock.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.defer import inlineCallbacks

from odissey.auth import secrets
from odissey.wire import messages as m
from odissey.wire.scanner import Scanner
from tests.harness import IntegrationTest, route
from tests.test_auth import scram_text

SALT = os.urandom(16)
ITERATIONS = 10000  # not PostgreSQL's default, so a fixed count would be refused


class CleartextScramSecretTests(IntegrationTest):
    """A cleartext route whose password is a SCRAM secret made with 10,000 iterations."""

    def routes(self) -> list[dict]:
        return [
            route("app", "u_clear", server={"password": "clear-pw"},
                  auth={"method": "cleartext", "password": scram_text(b"clear-pw", SALT, ITERATIONS)}),
        ]

    def sqlstate(self, user: str, password: str) -> str:
        """Log in on a raw socket (libpq does not expose a login's SQLSTATE); the refusal's."""
        scanner = Scanner(collect_all=True)
        with socket.create_connection(("127.0.0.1", self.odissey.port), timeout=10) as sock:
            sock.sendall(m.startup_message({"user": user, "database": "app"}))
            sent = False
            while chunk := sock.recv(65536):
                for kind, body, _end in scanner.feed(chunk):
                    if kind == ord("E"):
                        return m.parse_error_fields(body or b"")["C"]
                    self.assertEqual((kind, sent), (ord("R"), False))
                    self.assertEqual(m.parse_authentication(body or b"")[0], m.AUTH_CLEARTEXT)
                    sock.sendall(m.password_message(m.cstring(password)))
                    sent = True
        raise AssertionError("closed without an error")

    @inlineCallbacks
    def test_right_wrong_and_unknown(self):
        """psql logs in with the right password and is refused a wrong one; a wrong password
        and an unknown user get 28P01 after one derivation each, with the same iteration
        count (the known user's secret's; the mock copies it), so the clock cannot tell
        them apart."""
        derivations: list[tuple[bytes, int]] = []
        real = secrets.salted_password

        def counted(password: bytes, salt: bytes, iterations: int) -> bytes:
            derivations.append((salt, iterations))
            return real(password, salt, iterations)

        self.patch(secrets, "salted_password", counted)
        done = yield self.thread(self.odissey.psql, "select current_user", user="u_clear", password="clear-pw")
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "u_clear"), done.stderr)
        wrong = yield self.thread(self.odissey.psql, "select 1", user="u_clear", password="clear-PW")
        self.assertIn('password authentication failed for user "u_clear"', wrong.stderr)
        self.assertEqual(derivations, [(SALT, ITERATIONS)] * 2)

        self.assertEqual((yield self.thread(self.sqlstate, "u_clear", "clear-PW")), "28P01")
        self.assertEqual(derivations[2:], [(SALT, ITERATIONS)])

        self.assertEqual((yield self.thread(self.sqlstate, "nobody", "clear-pw")), "28P01")
        self.assertEqual([count for _salt, count in derivations[3:]], [ITERATIONS])
