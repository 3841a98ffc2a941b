"""Client login through real clients: every auth method, refusals and their SQLSTATEs."""

from __future__ import annotations

import socket
import struct

import psycopg
from twisted.internet.defer import inlineCallbacks
from twisted.logger import formatEvent, globalLogPublisher

from odissey.auth.secrets import md5_hash
from odissey.pool import Pool
from odissey.wire import messages as m
from odissey.wire.scanner import Scanner
from tests.harness import IntegrationTest, login_outcome, route, until

SCRAM_SECRET = (
    "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$jnoAddh6TtzfJ9fu4TjjGNWdiR8HivX+MQIbDgD6KrY="
    ":qsLM8ie7ppNJAbNbRo2Vw1Omxmdt4Jg8dRN8tFb/ecs="
)


def raw_exchange(port: int, payload: bytes) -> list[tuple[str, bytes]]:
    """Send raw bytes to Odissey, return the typed messages it answers before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [(chr(k), b or b"") for k, b, _ in Scanner(collect_all=True).feed(data)]


def sqlstate_of(messages: list[tuple[str, bytes]]) -> str:
    errors = [m.parse_error_fields(body) for kind, body in messages if kind == "E"]
    assert errors, messages
    return errors[0]["C"]


class ClientAuthTests(IntegrationTest):
    """Each client auth method accepts the right password and refuses a wrong one."""

    def routes(self) -> list[dict]:
        return [
            route("app", "u_trust", auth={"method": "trust"}, server={"password": "trust-pw"}),
            route("app", "u_clear", auth={"method": "cleartext", "password": "clear-pw"}),
            route("app", "u_md5", auth={"method": "md5", "password": md5_hash("md5-pw", "u_md5")},
                  server={"password": md5_hash("md5-pw", "u_md5")}),
            route("app", "u_scram", auth={"method": "scram-sha-256", "password": SCRAM_SECRET},
                  server={"password": "scram-pw"}),
            route("app", "app"),
        ]

    def login(self, user: str, password: str) -> str:
        with self.odissey.connect(user=user, password=password) as conn:
            return conn.execute("select current_user").fetchone()[0]

    def refused(self, user: str, password: str) -> str:
        try:
            self.login(user, password)
        except psycopg.OperationalError as exc:
            return str(exc)
        raise AssertionError("login was accepted")

    @inlineCallbacks
    def test_trust(self):
        """Trust lets the user in with any password."""
        self.assertEqual((yield self.thread(self.login, "u_trust", "whatever")), "u_trust")

    @inlineCallbacks
    def test_cleartext(self):
        """Cleartext accepts the right password, refuses a wrong one with 28P01."""
        self.assertEqual((yield self.thread(self.login, "u_clear", "clear-pw")), "u_clear")
        msg = yield self.thread(self.refused, "u_clear", "nope")
        self.assertIn('password authentication failed for user "u_clear"', msg)

    @inlineCallbacks
    def test_md5_with_md5_secret(self):
        """md5 works from a stored md5 hash, on both sides, and refuses a wrong password."""
        self.assertEqual((yield self.thread(self.login, "u_md5", "md5-pw")), "u_md5")
        msg = yield self.thread(self.refused, "u_md5", "nope")
        self.assertIn("password authentication failed", msg)

    @inlineCallbacks
    def test_login_and_logout_lines(self):
        """A client that logs in and says goodbye (psycopg's close sends Terminate) gets
        a login line and a logout line, each with its id."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual((yield self.thread(self.login, "u_md5", "md5-pw")), "u_md5")

        def lines() -> list[str]:
            return [formatEvent(e) for e in events if e.get("log_namespace") == "odissey.client"]

        yield until(lambda: any(": logout " in line for line in lines()), 10, "the logout line")
        (login,) = [line for line in lines() if ": login " in line]
        (logout,) = [line for line in lines() if ": logout " in line]
        client_id = login.split(":")[0]
        self.assertRegex(login, r"^c\d+: login u_md5@app from 127\.0\.0\.1 \(pool ")
        self.assertRegex(logout, rf"^{client_id}: logout u_md5@app after \d+\.\ds$")

    @inlineCallbacks
    def test_scram_with_scram_secret(self):
        """SCRAM works from a stored SCRAM secret (no plain password on the client side)."""
        self.assertEqual((yield self.thread(self.login, "u_scram", "scram-pw")), "u_scram")
        msg = yield self.thread(self.refused, "u_scram", "nope")
        self.assertIn("password authentication failed", msg)

    @inlineCallbacks
    def test_scram_plain_password_psql(self):
        """psql logs in with SCRAM from a plain configured password."""
        done = yield self.thread(self.odissey.psql, "select current_user")
        self.assertEqual(done.stdout.strip(), "app", done.stderr)

    @inlineCallbacks
    def test_unknown_user_looks_like_wrong_password(self):
        """An unknown user gets the same SCRAM challenge and the same 28P01 as a wrong password."""
        unknown = yield self.thread(self.refused, "nobody", "x")
        wrong = yield self.thread(self.refused, "app", "x")
        self.assertIn('password authentication failed for user "nobody"', unknown)
        self.assertEqual(unknown.replace("nobody", "app"), wrong)

    @inlineCallbacks
    def test_unknown_database(self):
        """A database no route serves is refused with 3D000, and psql says which."""
        packet = m.startup_message({"user": "app", "database": "nodb"})
        answer = yield self.thread(raw_exchange, self.odissey.port, packet)
        self.assertEqual(sqlstate_of(answer), "3D000")
        done = yield self.thread(self.odissey.psql, "select 1", dbname="nodb")
        self.assertIn('database "nodb" does not exist', done.stderr)



class BackendKeyTests(IntegrationTest):
    """Whose pid a transaction-mode client is told."""

    def routes(self) -> list[dict]:
        return [route(pool={"mode": "transaction"})]

    @inlineCallbacks
    def test_transaction_mode_key_is_odisseys_own(self):
        """In transaction mode the BackendKeyData a client gets is not its server's pid
        (the server changes under the client; session mode's is the real one)."""
        def check() -> tuple[int, int]:
            with self.odissey.connect() as conn:
                return conn.info.backend_pid, conn.execute("select pg_backend_pid()").fetchone()[0]

        fake, real = yield self.thread(check)
        self.assertNotEqual(fake, real)


class MissingDatabaseTests(IntegrationTest):
    """A database the storage does not have, behind a route for any database."""

    def routes(self) -> list[dict]:
        return [route("*", "u_trust", auth={"method": "trust"})]

    @inlineCallbacks
    def test_3D000_in_postgresqls_words_during_back_off(self):
        """Login after login gets PostgreSQL's own 3D000 and wording, also the logins
        answered from the pool's back-off without asking PostgreSQL again."""
        opened: list[Pool] = []
        original = Pool._open

        def counting(pool: Pool) -> None:
            opened.append(pool)
            original(pool)

        self.patch(Pool, "_open", counting)
        outcomes = []
        for _ in range(10):
            outcomes.append((yield self.thread(login_outcome, self.odissey.port, database="nosuch_db")))
        self.assertEqual(set(outcomes), {("3D000", 'database "nosuch_db" does not exist')})
        self.assertLess(len(opened), 10)  # some were answered during the back-off
        done = yield self.thread(self.odissey.psql, "select 1", user="u_trust", dbname="nosuch_db")
        self.assertTrue(done.stderr.endswith('FATAL:  database "nosuch_db" does not exist\n'), done.stderr)


class StartupRefusalTests(IntegrationTest):
    """Bad first packets get an ErrorResponse with a real SQLSTATE, and nothing else breaks."""

    @inlineCallbacks
    def test_malformed_startup_does_not_disturb_others(self):
        """A garbage startup packet gets 08P01 while another client's session goes on."""
        conn = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(conn.execute, "begin; insert into items values (9001, 'kept')")
            garbage = struct.pack("!ii", 20, 196608) + b"user\0x"  # unterminated
            answer = yield self.thread(raw_exchange, self.odissey.port, garbage + b"\0" * 6)
            self.assertEqual(sqlstate_of(answer), "08P01")
            yield self.thread(conn.execute, "commit")
            row = yield self.thread(lambda: conn.execute("select note from items where id = 9001").fetchone())
            self.assertEqual(row, ("kept",))
        finally:
            yield self.thread(conn.execute, "delete from items where id = 9001")
            yield self.thread(conn.close)

    def routes(self) -> list[dict]:
        return [route(), route("app", "u_trust", auth={"method": "trust"})]

    @inlineCallbacks
    def test_two_gigabyte_message_length(self):
        """A 2 GB declared message length gets 08P01; another client keeps working."""
        other = yield self.thread(self.odissey.connect)
        try:
            def attack() -> list[tuple[str, bytes]]:
                with socket.create_connection(("127.0.0.1", self.odissey.port), timeout=10) as sock:
                    sock.sendall(m.startup_message({"user": "u_trust", "database": "app"}))
                    data = b""
                    while not data.endswith(m.ready_for_query(b"I")):
                        data += sock.recv(65536)
                    sock.sendall(b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"select")
                    while chunk := sock.recv(65536):
                        data += chunk
                return [(chr(k), b or b"") for k, b, _ in Scanner(collect_all=True).feed(data)]

            answer = yield self.thread(attack)
            self.assertEqual(answer[-1][0], "E")
            self.assertEqual(sqlstate_of(answer), "08P01")
            row = yield self.thread(lambda: other.execute("select 41 + 1").fetchone())
            self.assertEqual(row, (42,))
        finally:
            yield self.thread(other.close)

    @inlineCallbacks
    def test_protocol_two(self):
        """Protocol 2.0 is refused with 0A000."""
        packet = struct.pack("!ii", 9, 2 << 16) + b"\0"
        answer = yield self.thread(raw_exchange, self.odissey.port, packet)
        self.assertEqual(sqlstate_of(answer), "0A000")

    @inlineCallbacks
    def test_ssl_request_answered_no(self):
        """SSLRequest is answered 'N' and the startup may follow in plaintext."""
        def attempt() -> bytes:
            with socket.create_connection(("127.0.0.1", self.odissey.port), timeout=10) as sock:
                sock.sendall(m.ssl_request())
                return sock.recv(1)

        self.assertEqual((yield self.thread(attempt)), b"N")

    @inlineCallbacks
    def test_data_after_ssl_request(self):
        """Bytes pipelined after an SSLRequest are a protocol violation (08P01)."""
        answer = yield self.thread(raw_exchange, self.odissey.port, m.ssl_request() + b"junk")
        self.assertEqual(sqlstate_of(answer), "08P01")

    @inlineCallbacks
    def test_no_user(self):
        """A startup packet without a user is refused with 28000."""
        answer = yield self.thread(raw_exchange, self.odissey.port, m.startup_message({"database": "app"}))
        self.assertEqual(sqlstate_of(answer), "28000")
