"""Reload under load: console RELOAD (and SIGHUP, in test_tap) re-read the file and apply
the difference while pgbench and psycopg clients run, with zero failed transactions."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import yaml
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest

from odissey import config
from odissey.service import OdisseyService
from tests.harness import APP_PASSWORD, IntegrationTest, free_port, have, route, server_pids, until


class ReloadTests(IntegrationTest):
    """Odissey started from a file; each test rewrites the file and reloads."""

    top: dict[str, Any] | None = {"admin_users": ["app"]}

    def document(self) -> dict[str, Any]:
        return {
            "listen": ["tcp:0:interface=127.0.0.1"],
            "storages": {"pg": {"host": "127.0.0.1", "port": self.odissey.pg.port,
                                "connect_timeout": "10s"}},
            "routes": [route(pool={"mode": "transaction", "size": 4}),
                       route(user="u_trust", auth={"method": "trust"}, pool={"mode": "session"})],
            "admin_users": ["app"],
        }

    def setUp(self):  # type: ignore[no-untyped-def]
        started = super().setUp()

        @inlineCallbacks
        def from_file(_: object):  # type: ignore[no-untyped-def]
            yield self.odissey.stop()  # the harness's, from a dict: ours reads a file
            self.path = Path(self.mktemp() + ".yaml").resolve()
            self.write(self.document())
            self.odissey.config = config.load(str(self.path))
            self.odissey.service = OdisseyService(self.odissey.config, reactor)
            yield self.odissey.start()

        return started.addCallback(from_file)

    def write(self, document: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(document))

    def reload(self) -> list[str]:
        """RELOAD through the console; the error's detail lines if it was refused."""
        with psycopg.connect(self.odissey.dsn(dbname="odissey"), autocommit=True,
                             cursor_factory=psycopg.ClientCursor, connect_timeout=10) as conn:
            try:
                cur = conn.execute("RELOAD")
            except psycopg.Error as exc:
                assert exc.diag.sqlstate == "F0000", exc
                return (exc.diag.message_detail or "").splitlines()
            assert cur.statusmessage == "RELOAD"
            return []

    def pgbench(self, seconds: int = 4, clients: int = 8) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(
            ["pgbench", "-n", "-S", "-c", str(clients), "-j", "2", "-T", str(seconds),
             "-h", "127.0.0.1", "-p", str(self.odissey.port), "-U", "app", "app"],
            capture_output=True, text=True, env={**os.environ, "PGPASSWORD": APP_PASSWORD,
                                                 "PGSSLMODE": "disable"}, timeout=120)

    @inlineCallbacks
    def under_pgbench(self, change: Any):  # type: ignore[no-untyped-def]
        """Reload ``change`` (applied to the document) once pgbench keeps all four
        servers of the app pool open; pgbench must end with no failed transaction.
        Returns the backend pids of those servers, seen just before the reload."""
        if not have("pgbench"):
            raise SkipTest("pgbench not installed")
        bench = self.thread(self.pgbench)
        yield until(lambda: any(p.key.user == "app" and len(p.idle) + len(p.active) == 4
                                for p in self.odissey.service.pools.pools.values()),
                    10, "pgbench running on four servers")
        before = yield self.thread(server_pids)
        self.assertEqual(len(before), 4)
        document = self.document()
        change(document)
        self.write(document)
        problems = yield self.thread(self.reload)
        self.assertEqual(problems, [])
        done = yield bench
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertIn("number of failed transactions: 0 (0.000%)", done.stdout)
        return before

    def app_pool(self):  # type: ignore[no-untyped-def]
        return next(p for p in self.odissey.service.pools.pools.values() if p.key.user == "app")

    @inlineCallbacks
    def test_pool_size_applies_live(self):
        """A smaller pool size applies under pgbench: surplus servers close as they are
        released, no transaction fails."""
        def smaller(document: dict[str, Any]) -> None:
            document["routes"][0]["pool"]["size"] = 2
        yield self.under_pgbench(smaller)
        pool = self.app_pool()
        self.assertEqual(pool.size, 2)
        self.assertLessEqual(pool.total, 2)

    @inlineCallbacks
    def test_server_login_change_reconnects(self):
        """A changed server login under pgbench: every server of the old login is gone
        afterwards, no transaction fails."""
        def login(document: dict[str, Any]) -> None:
            document["routes"][0]["server"] = {"user": "app", "password": APP_PASSWORD}
        before = yield self.under_pgbench(login)
        after = yield self.thread(server_pids)
        self.assertTrue(after)
        self.assertFalse(before & after, (before, after))

    @inlineCallbacks
    def test_removed_route_lets_its_session_finish(self):
        """A removed route refuses new logins while its session goes on to the end."""
        session = yield self.thread(psycopg.connect, self.odissey.dsn(user="u_trust", password=None),
                                    autocommit=True)
        yield self.thread(session.execute, "begin")
        document = self.document()
        del document["routes"][1]
        self.write(document)
        self.assertEqual((yield self.thread(self.reload)), [])
        yield self.thread(session.execute, "select 1")
        yield self.thread(session.execute, "commit")
        with self.assertRaises(psycopg.OperationalError):
            yield self.thread(psycopg.connect, self.odissey.dsn(user="u_trust", password=None))
        pools = self.odissey.service.pools
        self.assertEqual(len(pools.retired), 1)
        yield self.thread(session.close)
        yield until(lambda: not pools.retired, 5, "the retired pool closed")

    @inlineCallbacks
    def test_mode_change_keeps_sessions(self):
        """A route switched from session to transaction mode: a session open before
        keeps its server (and its session state) on the old pool; a new login gets a
        transaction-mode pool; the old pool closes when the session ends."""
        session = yield self.thread(psycopg.connect, self.odissey.dsn(user="u_trust", password=None),
                                    autocommit=True)
        yield self.thread(session.execute, "set application_name = 'before'")
        pid = yield self.thread(lambda: session.execute("select pg_backend_pid()").fetchone()[0])
        document = self.document()
        document["routes"][1]["pool"]["mode"] = "transaction"
        self.write(document)
        self.assertEqual((yield self.thread(self.reload)), [])
        row = yield self.thread(lambda: session.execute(
            "select pg_backend_pid(), current_setting('application_name')").fetchone())
        self.assertEqual(row, (pid, "before"))
        newcomer = yield self.thread(psycopg.connect, self.odissey.dsn(user="u_trust", password=None),
                                     autocommit=True)
        yield self.thread(newcomer.execute, "select 1")
        pools = self.odissey.service.pools
        current = [p for p in pools.pools.values() if p.key.user == "u_trust"]
        self.assertEqual([p.route.pool.mode for p in current], ["transaction"])
        self.assertEqual([p.route.pool.mode for p in pools.retired], ["session"])
        yield self.thread(session.close)
        yield until(lambda: not pools.retired, 5, "the old pool closed")
        yield self.thread(newcomer.close)

    @inlineCallbacks
    def test_listener_added_and_removed(self):
        """A listener added by a reload accepts logins; the one removed refuses them."""
        port = free_port()
        document = self.document()
        document["listen"] = [f"tcp:{port}:interface=127.0.0.1"]
        self.write(document)
        old = self.odissey.port
        self.assertEqual((yield self.thread(self.reload)), [])
        self.odissey.port = port
        yield until(lambda: self.odissey.service.ports, 5, "listening")
        self.assertEqual((yield self.thread(self.query_outcome)), "served")
        self.odissey.port = old
        with self.assertRaises(psycopg.OperationalError):
            yield self.thread(self.odissey.connect)
        self.odissey.port = port

    @inlineCallbacks
    def test_broken_config_changes_nothing(self):
        """A config with errors: RELOAD gets F0000 listing each problem by key path, and
        the running configuration stays as it was."""
        document = self.document()
        document["routes"][0]["pool"]["size"] = "ten"
        document["routes"][1]["storage"] = "nowhere"
        self.write(document)
        running = self.odissey.service.config
        problems = yield self.thread(self.reload)
        self.assertIn('routes[0].pool.size: must be a positive integer, got "ten"', problems)
        self.assertTrue(any(p.startswith("routes[1].storage: ") for p in problems), problems)
        self.assertIs(self.odissey.service.config, running)
        self.assertEqual((yield self.thread(self.query_outcome)), "served")


class TLSReloadTests(IntegrationTest):
    """A reload reads the certificate files again: new connections get the new one."""

    @inlineCallbacks
    def test_new_certificate_for_new_connections(self):
        """tls.cert_file switched from a certificate for the wrong name to the right one:
        verify-full fails before the reload and succeeds after it, and a TLS session
        opened before the reload goes on."""
        from tests.test_tls import certs, document, outcome

        yield self.odissey.stop()
        c = certs()
        doc = document(client_tls={"mode": "allow", "cert_file": c.wrong[0], "key_file": c.wrong[1]},
                       storage_port=self.odissey.pg.port)
        doc["admin_users"] = ["app"]
        path = Path(self.mktemp() + ".yaml").resolve()
        path.write_text(yaml.safe_dump(doc))
        service = self.odissey.service = OdisseyService(config.load(str(path)), reactor)
        service.startService()
        port = (yield service.ready)[0].getHost().port
        self.assertIn("refused", (yield self.thread(outcome, port, "verify-full")))
        before = yield self.thread(psycopg.connect, host="127.0.0.1", port=port, user="app",
                                   dbname="app", password=APP_PASSWORD, sslmode="require",
                                   autocommit=True)
        doc["tls"].update(cert_file=c.server[0], key_file=c.server[1])
        path.write_text(yaml.safe_dump(doc))
        self.assertEqual(service.reload(), [])
        self.assertEqual((yield self.thread(outcome, port, "verify-full")), "tls")
        row = yield self.thread(lambda: before.execute("select 1").fetchone())
        self.assertEqual(row, (1,))
        before.close()
