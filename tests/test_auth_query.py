"""auth_query and SCRAM pass-through against the real PostgreSQL, through real clients.

The roles live in the shared PostgreSQL: ``aq_lookup`` runs the lookups through a
SECURITY DEFINER function (as docs/security.md recommends), ``aq_user`` is valid,
``aq_expired`` has a VALID UNTIL in the past, ``aq_evil`` is what an attacker's shadowing
function would redirect a lookup to. Every password is stored as SCRAM only
(password_encryption=scram-sha-256), so every server login here is a pass-through.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import psycopg
import scramp
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from odissey.auth_query import NOT_FOUND, found_in, parse_valid_until
from odissey.wire import messages as m
from odissey.wire.scanner import Scanner
from tests.harness import IntegrationTest, direct, read_message, route

LOOKUP_QUERY = "SELECT usename, passwd, valuntil FROM public.odissey_lookup(btrim($1))"
ROLES = {"aq_lookup": "lookup-pw", "aq_user": "aq-pw", "aq_expired": "exp-pw", "aq_evil": "evil-pw",
         "aq_scram": "scram-only"}
_ready = threading.Lock()
_prepared = False


def prepare_roles() -> None:
    """Create the roles, the lookup function and the attacker's schema once per run."""
    global _prepared
    with _ready:
        if _prepared:
            return
        with direct() as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            for role, password in ROLES.items():
                if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            conn.execute("ALTER ROLE aq_expired VALID UNTIL '2001-01-01 00:00:00+00'")
            conn.execute("ALTER ROLE aq_user VALID UNTIL 'infinity'")
            conn.execute(
                "CREATE OR REPLACE FUNCTION public.odissey_lookup(p_user text)"
                " RETURNS TABLE (usename name, passwd text, valuntil timestamptz)"
                " LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS"
                " $$ SELECT usename, passwd, valuntil FROM pg_catalog.pg_shadow WHERE usename = p_user $$")
            conn.execute("REVOKE ALL ON FUNCTION public.odissey_lookup(text) FROM PUBLIC")
            conn.execute("GRANT EXECUTE ON FUNCTION public.odissey_lookup(text) TO aq_lookup")
            # The attack: a function shadowing pg_catalog.btrim in a schema the client
            # names first in its search_path; called, it records that and redirects the
            # lookup to aq_evil, whose password the attacker knows.
            conn.execute("CREATE SCHEMA IF NOT EXISTS evil")
            conn.execute("GRANT USAGE ON SCHEMA evil TO PUBLIC")
            conn.execute("CREATE TABLE IF NOT EXISTS evil.calls (arg text)")
            conn.execute(
                "CREATE OR REPLACE FUNCTION evil.btrim(t text) RETURNS text LANGUAGE sql"
                " SECURITY DEFINER AS $$ INSERT INTO evil.calls VALUES (t) RETURNING 'aq_evil'::text $$")
            conn.execute("GRANT EXECUTE ON FUNCTION evil.btrim(text) TO PUBLIC")
        _prepared = True


def stored_secret(role: str) -> str:
    with direct() as conn:
        return str(conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone()[0])


def scram_login(port: int, user: str, password: str, **params: str) -> tuple[str, str, list[str]]:
    """Log in with SCRAM on a raw socket, the way libpq does (empty SCRAM user name):
    ("ready", "", steps) or the FATAL's (SQLSTATE, message, steps). ``steps`` is the
    shape of the exchange Odissey led: each request's code, and the challenge's
    iteration count and salt length, so that two refusals can be compared."""
    steps: list[str] = []
    client = scramp.ScramClient(["SCRAM-SHA-256"], "placeholder", password)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": user, "database": "app", **params}))
        data = b""
        while True:
            kind, body, data = read_message(sock, data)
            if kind == b"E":
                fields = m.parse_error_fields(body)
                return fields["C"], fields["M"], steps
            if kind == b"Z":
                return "ready", "", steps
            if kind != b"R":
                continue
            code, payload = m.parse_authentication(body)
            steps.append(str(code))
            if code == m.AUTH_SASL:
                first = client.get_client_first().replace("n=placeholder,", "n=,")
                client.client_first_bare = first[3:]
                sock.sendall(m.sasl_initial_response("SCRAM-SHA-256", first.encode()))
            elif code == m.AUTH_SASL_CONTINUE:
                fields = dict(p.split("=", 1) for p in payload.decode().split(","))
                steps.append(f"i={fields['i']} salt={len(fields['s'])}")
                client.set_server_first(payload.decode())
                sock.sendall(m.password_message(client.get_client_final().encode()))


class AuthQueryTests(IntegrationTest):
    """A wildcard-user route of database app whose secrets come from auth_query."""

    def routes(self) -> list[dict[str, Any]]:
        prepare_roles()
        return [route("app", "*", auth={
            "method": "scram-sha-256", "query_user": "aq_lookup", "query_password": "lookup-pw",
            "query": LOOKUP_QUERY, "query_cache_ttl": "2s",
        }, pool={"size": 2})]

    def login(self, user: str, password: str, **params: str) -> tuple[str, str, list[str]]:
        return scram_login(self.odissey.port, user, password, **params)

    @inlineCallbacks
    def test_valid_user_logs_in(self):
        """A user found by auth_query logs in with psycopg and its server login passes
        through its SCRAM key (no password configured anywhere)."""
        def work() -> str:
            with self.odissey.connect(user="aq_user", password="aq-pw") as conn:
                return str(conn.execute("select current_user").fetchone()[0])
        self.assertEqual((yield self.thread(work)), "aq_user")

    @inlineCallbacks
    def test_expired_user_refused_like_a_wrong_password(self):
        """VALID UNTIL in the past: the right password gets the same 28P01, after the same
        exchange, as a wrong one."""
        expired = yield self.thread(self.login, "aq_expired", "exp-pw")
        wrong = yield self.thread(self.login, "aq_expired", "nope")
        self.assertEqual(expired[:2], ("28P01", 'password authentication failed for user "aq_expired"'))
        self.assertEqual(expired, wrong)

    @inlineCallbacks
    def test_unknown_user_looks_like_a_wrong_password(self):
        """An unknown user and a known user's wrong password: same SQLSTATE, same words,
        same exchange (SCRAM challenge with the same iteration count and salt size)."""
        unknown = yield self.thread(self.login, "aq_nobody", "aq-pw")
        wrong = yield self.thread(self.login, "aq_user", "nope")
        self.assertEqual(unknown[:2], ("28P01", 'password authentication failed for user "aq_nobody"'))
        self.assertEqual(wrong[:2], ("28P01", 'password authentication failed for user "aq_user"'))
        self.assertEqual(unknown[2], wrong[2])
        self.assertEqual(wrong[2], ["10", "11", "i=4096 salt=24"])

    @inlineCallbacks
    def test_client_search_path_cannot_reach_the_lookup(self):
        """A client whose startup packet names the attacker's schema first (options and a
        search_path parameter) neither gets the shadowing function called nor logs in
        with the attacker's password; the real password still works."""
        with direct() as conn:
            conn.execute("TRUNCATE evil.calls")
            # The trap is armed: with that search_path the shadowing function is what runs.
            conn.execute("SET search_path = evil, pg_catalog")
            row = conn.execute("SELECT usename FROM public.odissey_lookup(btrim(%s::text))", ("aq_user",)).fetchone()
            self.assertEqual(row[0], "aq_evil")
            conn.execute("TRUNCATE evil.calls")
        options = {"options": "-csearch_path=evil,pg_catalog"}
        evil = yield self.thread(self.login, "aq_user", "evil-pw", **options)
        self.assertEqual(evil[0], "28P01")
        evil = yield self.thread(self.login, "aq_user", "evil-pw", search_path="evil, pg_catalog")
        self.assertEqual(evil[0], "28P01")

        def right() -> str:
            with self.odissey.connect(user="aq_user", password="aq-pw", **options) as conn:
                return str(conn.execute("select current_user").fetchone()[0])
        self.assertEqual((yield self.thread(right)), "aq_user")
        with direct() as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM evil.calls").fetchone()[0], 0)

    @inlineCallbacks
    def test_answers_are_cached_briefly(self):
        """A changed password is seen once the cache (2 s here) has expired, not before."""
        ok = yield self.thread(self.login, "aq_user", "aq-pw")
        self.assertEqual(ok[0], "ready")
        with direct() as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute("ALTER ROLE aq_user PASSWORD 'aq-pw-2'")
        try:
            # Odissey still accepts the old password's proof (its SASL final, code 12,
            # was sent). Whether the login then completes depends on whether a server
            # connection is idle: a new one cannot pass through with the old key (08006).
            still = yield self.thread(self.login, "aq_user", "aq-pw")
            self.assertIn("12", still[2])
            self.assertIn(still[0], ("ready", "08006"))
            yield self.thread(__import__("time").sleep, 2.2)
            new = yield self.thread(self.login, "aq_user", "aq-pw-2")
            old = yield self.thread(self.login, "aq_user", "aq-pw")
            self.assertEqual((new[0], old[0]), ("ready", "28P01"))
        finally:
            with direct() as conn:
                conn.execute("SET password_encryption = 'scram-sha-256'")
                conn.execute("ALTER ROLE aq_user PASSWORD 'aq-pw'")


class PassThroughTests(IntegrationTest):
    """Routes that hold only a SCRAM secret (copied from pg_authid) and no server password."""

    def routes(self) -> list[dict[str, Any]]:
        prepare_roles()
        other_salt = scramp.ScramMechanism().make_auth_info("aq-pw", iteration_count=4096)
        salt, stored, server, iterations = other_salt
        import base64
        b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
        return [
            route("app", "aq_scram", auth={"method": "scram-sha-256", "password": stored_secret("aq_scram")},
                  pool={"size": 2}),
            # The same password, but a secret of another salt than PostgreSQL's.
            route("app", "aq_user", auth={
                "method": "scram-sha-256",
                "password": f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}",
            }),
        ]

    @inlineCallbacks
    def test_second_server_logs_in_with_the_kept_key(self):
        """Two concurrent session-mode clients hold two server connections; the second
        server was opened after the first login, with the ClientKey kept from a proof."""
        first = yield self.thread(self.odissey.connect, user="aq_scram", password="scram-only")
        try:
            pid1 = yield self.thread(lambda: first.execute("select pg_backend_pid()").fetchone()[0])

            def second() -> tuple[int, str]:
                with self.odissey.connect(user="aq_scram", password="scram-only") as conn:
                    row = conn.execute("select pg_backend_pid(), current_user").fetchone()
                    return int(row[0]), str(row[1])
            pid2, who = yield self.thread(second)
        finally:
            yield self.thread(first.close)
        self.assertNotEqual(pid1, pid2)
        self.assertEqual(who, "aq_scram")

    @inlineCallbacks
    def test_different_secret_is_a_clear_error(self):
        """Odissey's secret is not PostgreSQL's (another salt): the client, though its
        password is right, gets 08006 saying that the secrets must be the same."""
        def attempt() -> str:
            try:
                psycopg.connect(self.odissey.dsn(user="aq_user", password="aq-pw"), connect_timeout=10).close()
            except psycopg.OperationalError as exc:
                return str(exc)
            return "connected"
        text = yield self.thread(attempt)
        self.assertIn("same SCRAM secret", text)


class LookupParsingTests(SynchronousTestCase):
    """What a lookup sends and how its answer is read, without a network."""

    def test_user_name_is_a_bind_value(self) -> None:
        """The user name travels as Bind's parameter; the SQL is sent exactly as configured."""
        evil = "x' OR '1'='1"
        sent = m.parameterised_query(LOOKUP_QUERY, [evil])
        events = Scanner(collect_all=True).feed(sent)
        self.assertEqual([chr(kind) for kind, _b, _e in events], ["P", "B", "E", "S"])
        parse_body, bind_body = events[0][1] or b"", events[1][1] or b""
        self.assertEqual(parse_body, b"\0" + LOOKUP_QUERY.encode() + b"\0\0\0")
        self.assertNotIn(evil.encode(), parse_body)
        self.assertIn(len(evil).to_bytes(4, "big") + evil.encode(), bind_body)

    def test_valid_until_forms(self) -> None:
        """ISO timestamps (any offset, fractions), dates and infinities are read; BC is long past."""
        self.assertEqual(parse_valid_until("2001-01-01 00:00:00+00"), 978307200.0)
        self.assertEqual(parse_valid_until("2001-01-01 02:00:00.25+02"), 978307200.25)
        self.assertEqual(parse_valid_until("2001-01-01"), 978307200.0)
        self.assertIsNone(parse_valid_until("infinity"))
        self.assertEqual(parse_valid_until("-infinity"), float("-inf"))
        self.assertEqual(parse_valid_until("0044-03-15 00:00:00+00 BC"), float("-inf"))
        self.assertRaises(ValueError, parse_valid_until, "next tuesday")

    def test_rows_to_found(self) -> None:
        """One row with a secret is found; none, several, or a NULL secret are nobody; an
        unreadable expiry counts as expired."""
        def row(*values: bytes | None) -> bytes:
            body = len(values).to_bytes(2, "big")
            for v in values:
                body += (-1).to_bytes(4, "big", signed=True) if v is None else len(v).to_bytes(4, "big") + v
            return body
        secret = b"SCRAM-SHA-256$4096:c2FsdA==$a:b"
        found = found_in([row(b"u", secret, b"2001-01-01 00:00:00+00")], "u")
        self.assertEqual((found.secret.kind, found.expired(978307200.0), found.expired(978307199.0)),
                         ("scram", True, False))
        self.assertFalse(found_in([row(b"u", secret, None)], "u").expired(1e12))
        self.assertFalse(found_in([row(b"u", secret)], "u").expired(1e12))
        self.assertTrue(found_in([row(b"u", secret, b"soon")], "u").expired(0))
        for rows in ([], [row(b"u", secret)] * 2, [row(b"u", None, None)]):
            self.assertIs(found_in(rows, "u"), NOT_FOUND)
