"""Server connections: every server auth method, wrong server passwords, servers dying."""

from __future__ import annotations

import psycopg
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from odissey import config
from odissey.auth.secrets import md5_hash, md5_response, md5_stored, pbkdf2_cache_info
from odissey.config import Secret
from odissey.server import LoginInfo, ServerConnection, ServerState
from odissey.testing import DEFAULT_PARAMS, FakeBackend, command_complete, in_this_thread
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError
from tests.harness import IntegrationTest, direct, route


class HalfClosing(StringTransport):
    """A transport that can shut its writing side only, as a TCP or unix socket can."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

TRUST = {"method": "trust"}


class ServerAuthTests(IntegrationTest):
    """Odissey answers whatever PostgreSQL asks: trust, cleartext, md5, SCRAM."""

    def routes(self) -> list[dict]:
        return [
            route("app", "u_trust", auth=TRUST),
            route("app", "u_clear", auth=TRUST, server={"password": "clear-pw"}),
            route("app", "u_md5", auth=TRUST, server={"password": "md5-pw"}),
            route("app", "u_scram", auth=TRUST, server={"password": "scram-pw"}),
            route("app", "app", auth=TRUST, server={"password": "wrong"}),
            route("*", "u_md5", auth=TRUST, server={"password": md5_hash("md5-pw", "u_md5"),
                                                     "database": "app"}),
            route("wrong", "u_clear", auth=TRUST, server={"password": "bad", "database": "app"}),
            route("wrong", "u_md5", auth=TRUST, server={"password": "bad", "database": "app"}),
        ]

    def who(self, user: str, dbname: str = "app") -> str:
        with self.odissey.connect(user=user, password=None, dbname=dbname) as conn:
            return conn.execute("select current_user || '@' || current_database()").fetchone()[0]

    @inlineCallbacks
    def test_each_server_method(self):
        """Logins through trust, cleartext, md5 and SCRAM servers all succeed."""
        for user in ("u_trust", "u_clear", "u_md5", "u_scram"):
            self.assertEqual((yield self.thread(self.who, user)), f"{user}@app")

    @inlineCallbacks
    def test_md5_hash_answers_md5_server_and_database_remap(self):
        """An md5 hash answers an md5 server; server.database remaps the client's database."""
        self.assertEqual((yield self.thread(self.who, "u_md5", "anything")), "u_md5@app")

    @inlineCallbacks
    def test_wrong_server_password(self):
        """A wrong server password (SCRAM, cleartext or md5 server) reaches the client as
        the server's 28P01, marked as a server login failure."""
        def attempt(user: str, dbname: str) -> str:
            try:
                self.who(user, dbname)
            except psycopg.OperationalError as exc:
                return str(exc)
            return "accepted"

        for user, dbname in (("app", "app"), ("u_clear", "wrong"), ("u_md5", "wrong")):
            msg = yield self.thread(attempt, user, dbname)
            self.assertIn(f'server login failed: password authentication failed for user "{user}"', msg)

    @inlineCallbacks
    def test_scram_key_derivation_cached(self):
        """A second SCRAM server login with the same password reuses the derived key."""
        def two_servers() -> None:
            with self.odissey.connect(user="u_scram", password=None) as a, \
                    self.odissey.connect(user="u_scram", password=None) as b:
                a.execute("select 1")
                b.execute("select 1")

        before = pbkdf2_cache_info().hits
        yield self.thread(two_servers)
        self.assertGreater(pbkdf2_cache_info().hits, before)


class ServerDeathTests(IntegrationTest):
    """A server killed under a client: that client gets an error, everyone else goes on."""

    @inlineCallbacks
    def test_terminated_backend(self):
        """pg_terminate_backend mid-session: 57P01/08006 to that client, others unaffected."""
        victim = yield self.thread(self.odissey.connect)
        bystander = yield self.thread(self.odissey.connect)
        try:
            pid = yield self.thread(lambda: victim.execute("select pg_backend_pid()").fetchone()[0])
            yield self.thread(lambda: bystander.execute("begin").close())

            def kill() -> None:
                with direct() as su:
                    su.execute("select pg_terminate_backend(%s)", (pid,))

            yield self.thread(kill)

            def use_victim() -> str:
                try:
                    victim.execute("select 1")
                except psycopg.OperationalError as exc:
                    return exc.sqlstate or str(exc)
                return "still alive"

            outcome = yield self.thread(use_victim)
            self.assertIn(outcome, ("57P01", "08006"), outcome)
            row = yield self.thread(lambda: bystander.execute("select 7").fetchone())
            self.assertEqual(row, (7,))
            yield self.thread(lambda: bystander.execute("commit").close())
            fresh = yield self.thread(self.odissey.psql, "select 'fine'")
            self.assertEqual(fresh.stdout.strip(), "fine", fresh.stderr)
        finally:
            yield self.thread(victim.close)
            yield self.thread(bystander.close)


class ParameterReportTests(SynchronousTestCase):
    def server(self) -> ServerConnection:
        cfg = config.parse({"listen": ["tcp:0"], "storages": {"pg": {"host": "127.0.0.1"}},
                            "routes": [{"database": "db", "user": "u", "storage": "pg",
                                        "auth": {"method": "trust"}}]})
        return ServerConnection(LoginInfo(cfg.storages["pg"], "db", "u", None), Clock(), in_this_thread)

    def test_reports_decoded_in_the_encoding_they_came_in(self) -> None:
        """A value reported in the same read as a new client_encoding is decoded in it,
        whichever of the two reports came first."""
        server = self.server()
        server.dataReceived(b"")
        name = m.parameter_status("application_name", "x")[5:].replace(b"x", "caf\u00e9".encode("latin-1"))
        server.note_parameter(name)
        noted = server.note_parameter(m.parameter_status("client_encoding", "LATIN1")[5:])
        self.assertIn(("application_name", "caf\u00e9"), noted)
        self.assertEqual(server.params["application_name"], ("application_name", "caf\u00e9"))
        server.dataReceived(b"")  # a later read: its reports are decoded as LATIN1 from the start
        self.assertEqual(server.note_parameter(name), [("application_name", "caf\u00e9")])


class _Owner:
    """Records what a server tells its owner."""

    def __init__(self) -> None:
        self.lost: list[ServerConnection] = []

    def serverLost(self, server: ServerConnection) -> None:
        self.lost.append(server)


class _Handler:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost = False

    def serverData(self, data: bytes) -> None:
        self.data.append(data)

    def serverLost(self) -> None:
        self.lost = True


class ServerLoginTests(SynchronousTestCase):
    """A ServerConnection against the fake backend: login, its own statements, closes."""

    def test_login_collects_parameters_and_key(self) -> None:
        """Login ends IDLE with the backend's ParameterStatus set and BackendKeyData."""
        backend = FakeBackend(key=(11, 22))
        server = backend.start()
        self.assertIs(self.successResultOf(server.ready), server)
        self.assertEqual(server.state, ServerState.IDLE)
        self.assertEqual(server.login_params, list(DEFAULT_PARAMS))
        self.assertEqual(server.key, (11, 22))
        self.assertEqual(server.params["timezone"], ("TimeZone", "UTC"))

    def test_md5_login_answers_with_the_secret(self) -> None:
        """An md5 request is answered from the route's server password and the salt."""
        backend = FakeBackend(secret=Secret("plain", "pw"), md5_salt=b"salt")
        server = backend.start()
        self.successResultOf(server.ready)
        self.assertEqual(backend.password, md5_response(md5_stored(Secret("plain", "pw"), "u"), b"salt"))

    def test_login_refused(self) -> None:
        """A FATAL during login fails ``ready`` with the server's SQLSTATE and aborts."""
        backend = FakeBackend(md5_salt=b"salt", secret=Secret("plain", "pw"), refuse="28P01")
        server = backend.start()
        failure = self.failureResultOf(server.ready, PoolerError)
        self.assertEqual(failure.value.sqlstate, "28P01")
        self.assertIn("server login failed: ", failure.value.message)
        self.assertTrue(backend.transport.disconnected)

    def test_missing_database_in_postgresqls_words(self) -> None:
        """A 3D000 at login keeps PostgreSQL's own message: it answers the client's
        request, so no "server login failed" is put in front of it."""
        backend = FakeBackend(refuse="3D000")
        failure = self.failureResultOf(backend.start().ready, PoolerError)
        self.assertEqual((failure.value.sqlstate, failure.value.message), ("3D000", "login refused"))

    def test_closed_during_login(self) -> None:
        """A backend that closes during login fails ``ready`` with 08006."""
        backend = FakeBackend(md5_salt=b"salt", secret=Secret("plain", "pw"))
        backend.server.makeConnection(backend.transport)
        backend.close()
        self.assertEqual(self.failureResultOf(backend.server.ready, PoolerError).value.sqlstate, "08006")

    def test_run_swallows_replies_and_collects_errors(self) -> None:
        """The pooler's own statements go out pipelined; their errors come back, nothing else."""
        backend = FakeBackend()
        server = backend.start()
        done = server.run(["SET application_name TO E'x'", "SELECT 1/0"])
        self.assertEqual(server.state, ServerState.QUERY)
        backend.flush()
        failures = self.successResultOf(done)
        self.assertEqual([f["C"] for f in failures], ["22012"])
        self.assertEqual(server.state, ServerState.IDLE)
        self.assertEqual(server.params["application_name"], ("application_name", "x"))

    def test_exchange_waits_for_each_ready(self) -> None:
        """exchange() ends only after the given number of ReadyForQuery."""
        backend = FakeBackend()
        server = backend.start()
        done = server.exchange(m.sync() + m.sync(), 2)
        backend.send(m.ready_for_query(b"I"))
        self.assertNoResult(done)
        backend.send(m.ready_for_query(b"I"))
        self.assertEqual(self.successResultOf(done), [])

    def test_closed_while_running_statements(self) -> None:
        """A close while the pooler's statements run fails them, and the owner hears of it."""
        backend = FakeBackend()
        server = backend.start()
        owner = _Owner()
        server.owner = owner
        done = server.run(["SELECT pg_sleep(1)"])
        backend.flush()
        backend.close()
        self.assertEqual(self.failureResultOf(done, PoolerError).value.sqlstate, "08006")
        self.assertEqual(owner.lost, [server])
        self.successResultOf(server.closed)

    def test_closed_while_active_tells_the_handler(self) -> None:
        """A close while attached goes to the handler, then to the owner."""
        backend = FakeBackend()
        server = backend.start()
        owner, handler = _Owner(), _Handler()
        server.owner = owner
        server.attach(handler)
        backend.send(m.ready_for_query(b"I"))
        backend.close()
        self.assertEqual(handler.data, [m.ready_for_query(b"I")])
        self.assertTrue(handler.lost)
        self.assertEqual(owner.lost, [server])

    def test_idle_server_answering_nothing_asked_is_aborted(self) -> None:
        """An idle server that sends a reply nobody asked for is out of step: aborted."""
        backend = FakeBackend()
        backend.start()
        backend.send(command_complete("SELECT 1"))
        self.assertTrue(backend.transport.disconnected)

    def test_close_waits_for_postgresql_to_close(self) -> None:
        """On a socket that can half-close, close() sends Terminate, shuts only its
        writing side, and ``closed`` fires once PostgreSQL has closed (its backend is
        gone from pg_stat_activity by then); a PostgreSQL that never closes is cut
        after the storage's connect timeout."""
        for peer_closes in (True, False):
            backend = FakeBackend()
            backend.transport = HalfClosing()
            server = backend.start()
            server.close()
            self.assertEqual(backend.transport.value()[-5:], m.terminate())
            self.assertTrue(backend.transport.write_closed)
            self.assertFalse(backend.transport.disconnecting)
            self.assertNoResult(server.closed)
            if peer_closes:
                backend.close()
            else:
                backend.reactor.advance(server.login.storage.connect_timeout)
                self.assertTrue(backend.transport.disconnecting)
                backend.close()
            self.successResultOf(server.closed)
            self.assertEqual(backend.reactor.getDelayedCalls(), [])

    def test_close_says_terminate(self) -> None:
        """close() sends Terminate before closing."""
        backend = FakeBackend()
        server = backend.start()
        server.close()
        backend.flush()
        self.assertEqual(backend.kinds(), b"X")
        self.assertEqual(server.state, ServerState.CLOSED)
