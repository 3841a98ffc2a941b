"""Multi-worker Odissey as a real ``twistd odissey`` process with 2 and 3 workers, in
front of the tests' PostgreSQL, driven by psycopg and raw-protocol clients."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import psycopg
import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.application.service import MultiService
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from odissey import config
from odissey.cancel import KeyLayout
from odissey.commands import Admit, Cancel, Reclaim, Spare, Stop as StopCommand, slots_json
from odissey.slots import CLIENTS
from odissey.wire import messages as m
from tests.harness import (APP_PASSWORD, USERS, Replies, committed, direct, free_port, read_message,
                           ended, login_outcome, shared_postgres, trust_login_keyed, watch_notices)
from odissey.testing import in_this_thread
from odissey.lifecycle import Stop
from odissey.worker import MasterLink
from odissey import lifecycle, workers as workers_module
from odissey.workers import (RECLAIM_RETRY, RESTART_DELAY, SPARE_PATIENCE, STATS_PATIENCE, STOP_PATIENCE, Master, WorkerProcess,
                             WorkerStartFailed)
from tests.test_tap import BOOT, PYPY, ROOT, wait_refused
from tests.test_tls import certs, outcome, serving


def backends(conn: psycopg.Connection | None = None, user: str = "app") -> int:
    """Server connections PostgreSQL has for ``user`` (the pooler's)."""
    if conn is None:
        with direct() as own:
            return backends(own, user)
    return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
                            "AND backend_type = 'client backend'", (user,)).fetchone()[0])


class Process:
    """A ``twistd -n odissey`` process; its output is collected by a thread."""

    def __init__(self, config_path: str, interpreter: str = sys.executable) -> None:
        self.config_path = Path(config_path)
        self.proc = subprocess.Popen(
            [interpreter, *BOOT, "--pidfile=", "-n", "odissey", "-c", config_path],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, patience: float = 30.0, after: int = 0) -> re.Match[str]:
        """The first output line (from line ``after`` on) matching ``pattern``."""
        deadline = time.monotonic() + patience
        while True:
            for line in self.lines[after:]:
                found = re.search(pattern, line)
                if found:
                    return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no line matching {pattern!r} in:\n{self.output[-4000:]}")
            time.sleep(0.05)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=90)
        self.reader.join(timeout=10)
        return self.output


class Logins:
    """psycopg clients logging in again and again (a login, a query, a logout) until
    stopped, 3 threads over TCP and 1 over the unix socket in ``directory``: what an
    online restart must not disturb."""

    def __init__(self, case: "WorkersTests", port: int, directory: Path) -> None:
        self.case, self.port = case, port
        self.served: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._log_in, args=(host,), daemon=True)
                         for host in ("127.0.0.1", "127.0.0.1", "127.0.0.1", str(directory))]
        for thread in self._threads:
            thread.start()

    def _log_in(self, host: str) -> None:
        while not self._stop.is_set():
            try:
                with self.case.connect(self.port, "app", True, host=host) as conn:
                    self.served.append(conn.execute("select 'served'").fetchone()[0])
            except psycopg.Error as exc:
                self.failures.append(f"{host}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def direct_select(port: int) -> str:
    """One psycopg login as app over TCP, and a query."""
    with psycopg.connect(host="127.0.0.1", port=port, user="app", password=APP_PASSWORD, dbname="app",
                         autocommit=True) as conn:
        return str(conn.execute("select 'last'").fetchone()[0])


class WorkersTests(TestCase):
    timeout = 240

    def start(self, workers: int, pool: dict[str, Any] | None = None, listen: list[str] | None = None,
              limits: dict[str, Any] | None = None, interpreter: str = sys.executable,
              top: dict[str, Any] | None = None,
              started: str = r"\[worker {number}\] accepting on") -> tuple[Process, int]:
        """Odissey with ``workers`` workers: route app/app (scram) and u_trust (trust);
        ``top`` adds top-level keys."""
        pg = shared_postgres()
        port = free_port()
        pool_settings = {"mode": "transaction", "size": 4, "wait_timeout": "10s", **(pool or {})}
        document = {
            **({"workers": workers} if workers > 1 else {}),  # (1: a single Odissey, the default)
            "limits": limits or {},
            "listen": listen or [f"tcp:{port}:interface=127.0.0.1"],
            "storages": {"pg": {"host": pg.socket_dir, "port": pg.port}},
            "routes": [
                {"database": "app", "user": "app", "storage": "pg",
                 "auth": {"method": "scram-sha-256", "password": APP_PASSWORD}, "pool": pool_settings},
                {"database": "app", "user": "u_trust", "storage": "pg", "server": {"password": USERS["u_trust"]},
                 "auth": {"method": "trust"}, "pool": pool_settings},
            ],
        }
        document.update(top or {})
        path = Path(self.mktemp() + ".yaml").resolve()
        path.write_text(yaml.safe_dump(document))
        process = Process(str(path), interpreter)
        self.addCleanup(process.stop)
        for number in range(workers):
            process.wait_for(started.format(number=number))
        return process, port

    def connect(self, port: int, user: str = "app", autocommit: bool = True, **extra: Any) -> psycopg.Connection:
        """psycopg as app (scram) or u_trust (trust), over TCP unless ``extra`` says otherwise."""
        password = APP_PASSWORD if user == "app" else None
        return psycopg.connect(**{"host": "127.0.0.1", **extra}, port=port, user=user, password=password,
                               dbname="app", autocommit=autocommit)

    def connect_once_counted(self, port: int, user: str = "app") -> psycopg.Connection:
        """:meth:`connect`, tried until a client that just left has been counted out (a
        worker counts a client's leaving when it sees its connection close), at most 10 s."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.connect(port, user)
            except psycopg.OperationalError:
                self.assertLess(time.monotonic(), deadline, "a client's leaving was never counted")
                time.sleep(0.05)

    def worker_of(self, key: tuple[int, int], workers: int) -> int:
        return KeyLayout.of(0, False, 0, workers).worker_of(key[1])

    @inlineCallbacks
    def test_workers_start_serve_and_stop(self):
        """Two workers start (one log line each, with its pid), clients land on both, and
        SIGTERM stops both workers and the master, logging the totals."""
        process, port = yield deferToThread(self.start, 2)

        def logins() -> set[int]:
            seen = set()
            for _ in range(40):
                sock, key = trust_login_keyed(port)
                seen.add(self.worker_of(key, 2))
                sock.close()
            return seen

        self.assertEqual((yield deferToThread(logins)), {0, 1})
        with (yield deferToThread(self.connect, port)) as conn:
            self.assertEqual(conn.execute("select 42").fetchone()[0], 42)
        out = yield deferToThread(process.stop)
        for number in range(2):
            self.assertRegex(out, rf"worker {number} started, pid \d+")
            self.assertRegex(out, rf"worker {number} stopped, pid \d+")
        self.assertIn("shutting down 2 workers", out)

    def settle(self) -> None:
        """Wait until PostgreSQL has no server connection of app or u_trust left (from earlier tests)."""
        deadline = time.monotonic() + 30
        while backends() or backends(user="u_trust"):
            if time.monotonic() > deadline:
                raise AssertionError("user app's connections from earlier tests did not go")
            time.sleep(0.05)

    @inlineCallbacks
    def test_global_pool_size(self):
        """Pool size 4, 40 psycopg clients on 3 workers: PostgreSQL never sees more than 4
        server connections (sampled while they run), and every transaction succeeds."""
        yield deferToThread(self.settle)
        process, port = yield deferToThread(self.start, 3, {"size": 4})
        seen = yield deferToThread(self.spread, port, 3)
        self.assertEqual(seen, {0, 1, 2})
        samples: list[int] = []
        running = threading.Event()
        running.set()

        def sample() -> None:
            with direct() as conn:
                while running.is_set():
                    samples.append(backends(conn))
                    time.sleep(0.005)

        def client(failures: list[BaseException]) -> None:
            try:
                with self.connect(port) as conn:
                    for _ in range(15):
                        conn.execute("select pg_sleep(0.005)")
            except BaseException as exc:
                failures.append(exc)

        def run() -> list[BaseException]:
            failures: list[BaseException] = []
            sampler = threading.Thread(target=sample)
            sampler.start()
            clients = [threading.Thread(target=client, args=(failures,)) for _ in range(40)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            running.clear()
            sampler.join()
            return failures

        failures = yield deferToThread(run)
        self.assertEqual(failures, [])
        print(f"{len(samples)} samples of app's server connections, max {max(samples)}")
        self.assertLessEqual(max(samples), 4)
        self.assertGreaterEqual(max(samples), 2)  # (the clients did run concurrently)

    def spread(self, port: int, workers: int) -> set[int]:
        """The workers that 30 raw logins landed on."""
        seen = set()
        for _ in range(30):
            sock, key = trust_login_keyed(port)
            seen.add(self.worker_of(key, workers))
            sock.close()
        return seen

    def raw_clients(self, port: int, workers: int, wanted: dict[int, int]) -> dict[int, list[Replies]]:
        """Raw trust logins until each worker named in ``wanted`` has that many clients."""
        found: dict[int, list[Replies]] = {number: [] for number in wanted}
        for _ in range(400):
            if all(len(found[n]) >= count for n, count in wanted.items()):
                return found
            sock, key = trust_login_keyed(port)
            number = self.worker_of(key, workers)
            if number in found and len(found[number]) < wanted[number]:
                found[number].append(Replies(sock))
                self.addCleanup(sock.close)
            else:
                sock.close()
        raise AssertionError(f"logins did not reach every worker: {found}")

    @staticmethod
    def ask(client: Replies, sql: str) -> list[str]:
        """Send one simple query and read its answer: the SQLSTATEs of its errors."""
        client.sock.sendall(m.query(sql))
        before = len(client.errors)
        client.until(client.ready + 1)
        return client.errors[before:]

    @inlineCallbacks
    def test_sigkill_restarts_worker_and_returns_its_leases(self):
        """SIGKILL one of 3 workers while its clients hold 2 of the pool's 4 servers in
        open transactions: it is restarted, the other workers' clients keep working, its
        leases come back (4 servers can be taken again) and PostgreSQL is left with no
        connection the pool does not count."""
        yield deferToThread(self.settle)
        process, port = yield deferToThread(self.start, 3, {"size": 4, "wait_timeout": "5s"})
        pids = {n: int(process.wait_for(rf"worker {n} started, pid (\d+)").group(1)) for n in range(3)}

        def scenario() -> None:
            clients = self.raw_clients(port, 3, {0: 2, 1: 2, 2: 2})
            for victim in clients[0]:
                self.assertEqual(self.ask(victim, "BEGIN; SELECT 1"), [])
            for number in (1, 2):
                for client in clients[number]:
                    self.assertEqual(self.ask(client, "SELECT 1"), [])
            lines = len(process.lines)
            os.kill(pids[0], signal.SIGKILL)
            process.wait_for(rf"worker 0 died, pid {pids[0]}", after=lines)
            restarted = int(process.wait_for(r"worker 0 started, pid (\d+)", after=lines).group(1))
            self.assertNotEqual(restarted, pids[0])
            for victim in clients[0]:
                with self.assertRaises((ConnectionError, OSError)):
                    self.ask(victim, "SELECT 1")
            for number in (1, 2):
                for client in clients[number]:
                    self.assertEqual(self.ask(client, "SELECT 2"), [])
            # All 4 leases are free again: 4 psycopg clients each hold a server at once.
            holders = [self.connect(port, "u_trust", autocommit=False) for _ in range(4)]
            try:
                pids_seen = {conn.execute("select pg_backend_pid()").fetchone()[0] for conn in holders}
                self.assertEqual(len(pids_seen), 4)
                deadline = time.monotonic() + 15
                while backends(user="u_trust") > 4:  # the killed worker's two are gone, none leaked
                    self.assertLess(time.monotonic(), deadline, "the killed worker's servers linger")
                    time.sleep(0.05)
            finally:
                for conn in holders:
                    conn.close()

        yield deferToThread(scenario)
        out = yield deferToThread(process.stop)
        self.assertIn("1 worker restarts", out)

    def cancel_storm(self, port: int, targets: int, rounds: int) -> tuple[list[str], list[str]]:
        """``targets`` psycopg clients each run ``rounds`` pg_sleep(10) that another thread
        cancels (cancel_safe: a new connection each, landing on any worker) once PostgreSQL
        shows it running, while two bystanders run short queries. Returns what went wrong
        for targets (a query not cancelled) and for bystanders (a query cancelled)."""
        lost: list[str] = []
        crossed: list[str] = []
        done = threading.Event()

        def target(i: int) -> None:
            with self.connect(port) as conn, direct() as watcher:
                for r in range(rounds):
                    tag = f"t{i}r{r}x"
                    outcome: list[str] = []
                    runner = threading.Thread(target=self.expect_cancel, args=(conn, tag, outcome))
                    runner.start()
                    deadline = time.monotonic() + 10
                    while not watcher.execute(
                            "select 1 from pg_stat_activity where state = 'active' and query like %s",
                            (f"%{tag} %",)).fetchone():
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.01)
                    conn.cancel_safe(timeout=5)
                    runner.join()
                    if outcome != ["57014"]:
                        lost.append(f"{tag}: {outcome}")

        def bystander(i: int) -> None:
            with self.connect(port) as conn:
                while not done.is_set():
                    try:
                        conn.execute("select pg_sleep(0.05)")
                    except psycopg.errors.QueryCanceled as exc:
                        crossed.append(f"bystander {i}: {exc}")

        watchers = [threading.Thread(target=bystander, args=(i,)) for i in range(2)]
        for t in watchers:
            t.start()
        workers = [threading.Thread(target=target, args=(i,)) for i in range(targets)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        done.set()
        for t in watchers:
            t.join()
        return lost, crossed

    @staticmethod
    def expect_cancel(conn: psycopg.Connection, tag: str, outcome: list[str]) -> None:
        try:
            conn.execute(f"select pg_sleep(10) /* {tag} */")
            outcome.append("finished")
        except psycopg.Error as exc:
            outcome.append(exc.sqlstate or str(exc))

    @inlineCallbacks
    def check_cancels_across_workers(self, mode: str):
        process, port = yield deferToThread(self.start, 3, {"mode": mode, "size": 12})
        lost, crossed = yield deferToThread(self.cancel_storm, port, 8, 7)
        self.assertEqual(lost, [])
        self.assertEqual(crossed, [])
        out = yield deferToThread(process.stop)
        forwarded = int(re.search(r"(\d+) cancels forwarded between workers", out).group(1))
        print(f"{mode} mode: 56 cancels, {forwarded} forwarded between workers")
        self.assertGreater(forwarded, 0)

    def test_cancel_across_workers_transaction_mode(self):
        """Transaction mode, 3 workers: 56 cancels from new connections on any worker,
        each cancels exactly its query (0 lost) and no bystander's (0 crossed)."""
        return self.check_cancels_across_workers("transaction")

    def test_cancel_across_workers_session_mode(self):
        """The same in session mode (the key's pid is the real backend's)."""
        return self.check_cancels_across_workers("session")

    @inlineCallbacks
    def test_no_starvation_across_workers(self):
        """Pool size 2, 2 workers. Idle: worker 0 holds both servers idle, and a client
        on worker 1 gets one within 2 s (wait_timeout is 10 s). Busy: worker 0's two
        clients hold both in transactions while a third of its clients queues; worker
        1's client still gets a server as soon as one of them commits, before worker 0
        hands it on to its own next client."""
        process, port = yield deferToThread(self.start, 2, {"size": 2, "wait_timeout": "10s"})

        def scenario() -> tuple[float, float]:
            clients = self.raw_clients(port, 2, {0: 3, 1: 1})
            a, b, c = clients[0]
            (other,) = clients[1]
            for client in (a, b):
                self.assertEqual(self.ask(client, "BEGIN; SELECT 1"), [])
            for client in (a, b):
                self.assertEqual(self.ask(client, "COMMIT"), [])
            started = time.monotonic()
            self.assertEqual(self.ask(other, "SELECT 1"), [])
            idle_wait = time.monotonic() - started
            # Busy: a and b in transactions (worker 0 takes back the server it gave).
            for client in (a, b):
                self.assertEqual(self.ask(client, "BEGIN; SELECT 1"), [])
            other.sock.sendall(m.query("SELECT 2"))
            time.sleep(0.3)  # (other's request is queued at the master first)
            c.sock.sendall(m.query("SELECT 3"))
            time.sleep(0.3)
            started = time.monotonic()
            self.assertEqual(self.ask(a, "COMMIT"), [])
            other.until(other.ready + 1)
            busy_wait = time.monotonic() - started
            self.assertEqual(self.ask(b, "COMMIT"), [])
            c.until(c.ready + 1)
            self.assertEqual((other.errors, c.errors), ([], []))
            return idle_wait, busy_wait

        idle_wait, busy_wait = yield deferToThread(scenario)
        print(f"idle hand-over {idle_wait * 1000:.0f} ms, busy hand-over {busy_wait * 1000:.0f} ms")
        self.assertLess(idle_wait, 2.0)
        self.assertLess(busy_wait, 2.0)

    @inlineCallbacks
    def test_unix_socket_session_mode(self):
        """A unix-socket listener shared by 2 workers (logins land on both), session mode
        with pool size 3: 12 psycopg clients over the socket, never more than 3 server
        connections; the socket file goes when Odissey stops."""
        yield deferToThread(self.settle)
        directory = Path(tempfile.mkdtemp(prefix="odissey-"))  # (a unix socket path is short)
        self.addCleanup(shutil.rmtree, directory, True)
        port = free_port()
        path = directory / f".s.PGSQL.{port}"
        process, _ = yield deferToThread(
            self.start, 2, {"mode": "session", "size": 3}, [f"unix:{path}:mode=660"])

        def logins() -> set[int]:
            seen = set()
            for _ in range(30):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(10)
                    sock.connect(str(path))
                    sock.sendall(m.startup_message({"user": "u_trust", "database": "app"}))
                    data = b""
                    while True:
                        kind, body, data = read_message(sock, data)
                        if kind == b"K":
                            seen.add(self.worker_of(m.parse_backend_key_data(body), 2))
                            break
            return seen

        self.assertEqual((yield deferToThread(logins)), {0, 1})
        samples: list[int] = []

        def run() -> list[BaseException]:
            failures: list[BaseException] = []

            def client() -> None:
                try:
                    with self.connect(port, host=str(directory)) as conn:
                        for _ in range(3):
                            conn.execute("select pg_sleep(0.05)")
                except BaseException as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=client) for _ in range(12)]
            with direct() as watcher:
                for t in threads:
                    t.start()
                while any(t.is_alive() for t in threads):
                    samples.append(backends(watcher))
                    time.sleep(0.005)
            for t in threads:
                t.join()
            return failures

        self.assertEqual((yield deferToThread(run)), [])
        print(f"{len(samples)} samples, max {max(samples)} server connections")
        self.assertLessEqual(max(samples), 3)
        self.assertGreaterEqual(max(samples), 2)
        yield deferToThread(process.stop)
        self.assertFalse(path.exists())

    @inlineCallbacks
    def test_client_limits_are_global(self):
        """limits.max_clients 6 and app's route max_clients 4 hold over 3 workers: the
        fifth app client and the seventh client in all get 53300, wherever they land;
        once one leaves, a newcomer gets in."""
        _process, port = yield deferToThread(self.start, 3, {"size": 2, "max_clients": 4}, None, {"max_clients": 6})

        def scenario() -> tuple[str, str, list[int]]:
            app = [self.connect(port) for _ in range(4)]
            with self.assertRaises(psycopg.OperationalError) as route_full:
                self.connect(port)
            trusted = [self.connect(port, "u_trust") for _ in range(2)]
            with self.assertRaises(psycopg.OperationalError) as all_full:
                self.connect(port, "u_trust")
            app.pop().close()
            trusted.append(self.connect_once_counted(port, "u_trust"))
            answers = [conn.execute("select 1").fetchone()[0] for conn in app + trusted]
            for conn in app + trusted:
                conn.close()
            return str(route_full.exception), str(all_full.exception), answers

        route_full, all_full, answers = yield deferToThread(scenario)
        self.assertIn('too many clients for database "app" user "app" (max_clients 4)', route_full)
        self.assertIn("sorry, too many clients already", all_full)
        self.assertEqual(answers, [1] * 6)
        seen = yield deferToThread(self.spread, port, 3)
        self.assertEqual(seen, {0, 1, 2})  # (the clients above were spread as these logins are)

    @inlineCallbacks
    def test_client_limits_follow_routes_a_reload_swaps(self):
        """app's and u_trust's routes have max_clients 2 each over 2 workers; with 2 app
        clients in, a reload swaps the two routes in the file: a third app client still
        gets 53300 and two u_trust clients get in (each route's count stays with it, not
        with its place), and once an app client leaves another gets in."""
        process, port = yield deferToThread(self.start, 2, {"max_clients": 2})

        def scenario() -> tuple[str, list[int]]:
            app = [self.connect(port) for _ in range(2)]
            document = yaml.safe_load(process.config_path.read_text())
            document["routes"].reverse()
            process.config_path.write_text(yaml.safe_dump(document))
            mark = len(process.lines)
            process.proc.send_signal(signal.SIGHUP)
            process.wait_for(r"reloaded .* in 2 workers", after=mark)
            with self.assertRaises(psycopg.OperationalError) as full:
                self.connect(port)
            trusted = [self.connect(port, "u_trust") for _ in range(2)]
            app.pop().close()
            app.append(self.connect_once_counted(port))
            answers = [conn.execute("select 1").fetchone()[0] for conn in app + trusted]
            for conn in app + trusted:
                conn.close()
            return str(full.exception), answers

        full, answers = yield deferToThread(scenario)
        self.assertIn('too many clients for database "app" user "app" (max_clients 2)', full)
        self.assertEqual(answers, [1] * 4)

    def pinned(self, port: int, worker: int, count: int) -> list[socket.socket]:
        """``count`` raw trust logins held on ``worker`` of 2 (logins the kernel gives
        the other worker are closed; one refused while the other worker has not yet seen
        such a client go is tried again)."""
        held: list[socket.socket] = []
        deadline = time.monotonic() + 30
        while len(held) < count:
            self.assertLess(time.monotonic(), deadline, f"worker {worker} never got {count} clients")
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(m.startup_message({"user": "u_trust", "database": "app"}))
            data, key = b"", None
            while True:
                kind, body, data = read_message(sock, data)
                if kind == b"K":
                    key = m.parse_backend_key_data(body)
                if kind == b"Z" or kind == b"E":
                    break
            if kind == b"Z" and key is not None and self.worker_of(key, 2) == worker:
                held.append(sock)
                continue
            if kind == b"E":
                self.assertEqual(m.parse_error_fields(body)["C"], "53300")
            sock.close()
        return held

    @inlineCallbacks
    def test_client_slots_move_between_workers(self):
        """limits.max_clients 4 over 2 workers, which hold client slots in blocks: with 4
        clients in, psycopg and raw logins get 53300 wherever they land, whichever worker has
        them; once worker 0's 4 leave, worker 1 takes 4 (worker 0 spares its unused
        slots), and after every logout psycopg logs in 4 again."""
        process, port = yield deferToThread(self.start, 2, {"size": 2}, None, {"max_clients": 4})

        def refused() -> str:
            """psycopg's refusal (libpq keeps the SQLSTATE of a login's FATAL; a raw
            login shows it)."""
            with self.assertRaises(psycopg.OperationalError) as caught:
                self.connect(port, "u_trust")
            self.assertEqual(login_outcome(port), ("53300", "sorry, too many clients already"))
            return str(caught.exception)

        def four() -> list[psycopg.Connection]:
            conns: list[psycopg.Connection] = []
            deadline = time.monotonic() + 10
            while len(conns) < 4:  # (a worker counts a client's leaving when it sees it go)
                try:
                    conns.append(self.connect(port, "u_trust"))
                except psycopg.OperationalError:
                    self.assertLess(time.monotonic(), deadline, "a client's leaving was never counted")
            return conns

        def scenario() -> list[str]:
            messages = []
            conns = four()
            messages.append(refused())
            for conn in conns:
                conn.close()
            for worker in (0, 1):
                held = self.pinned(port, worker, 4)
                messages.append(refused())
                for sock in held:
                    sock.close()
            conns = four()
            self.assertEqual([conn.execute("select 1").fetchone()[0] for conn in conns], [1] * 4)
            messages.append(refused())
            for conn in conns:
                conn.close()
            return messages

        messages = yield deferToThread(scenario)
        self.assertEqual(len(messages), 4)
        for message in messages:
            self.assertIn("sorry, too many clients already", message)
        out = yield deferToThread(process.stop)
        spares = re.search(r"client slots: (\d+) admits, (\d+) spares asked", out)
        assert spares is not None
        self.assertGreater(int(spares.group(2)), 0)  # (worker 1's 4 slots came from worker 0)

    @inlineCallbacks
    def test_sigterm_lets_transactions_in_workers_commit(self):
        """SIGTERM to the master with 6 psycopg transactions in flight (spread over 2
        workers as the kernel hands out connections): the workers drain gracefully, every
        transaction commits, each client's next statement gets 57P01, and the master
        logs both workers stopped and exits 0."""
        process, port = yield deferToThread(self.start, 2, {"size": 6})

        def scenario() -> list[str]:
            conns = [self.connect(port, "u_trust") for _ in range(6)]
            notices = {id(conn): watch_notices(conn) for conn in conns}
            for conn in conns:
                conn.execute("begin")
            for i, conn in enumerate(conns):
                conn.execute("insert into items values (%s, 'workers-sigterm')", (7300 + i,))
                conn.pgconn.send_query(b"select pg_sleep(0.5)")
            process.proc.send_signal(signal.SIGTERM)
            seen = []
            for conn in conns:
                seen.append(str(conn.pgconn.get_result().status))
                while conn.pgconn.get_result() is not None:
                    pass
                conn.execute("commit")
                seen.append(ended(conn, notices[id(conn)]))
                conn.close()
            return seen

        seen = yield deferToThread(scenario)
        out = yield deferToThread(process.stop)
        self.assertEqual(seen, ["2", "57P01"] * 6)  # 2: TUPLES_OK; ended, never served
        with direct() as su:
            self.assertEqual(su.execute("select count(*) from items where note = 'workers-sigterm'")
                             .fetchone()[0], 6)
            su.execute("delete from items where note = 'workers-sigterm'")
        for number in range(2):
            self.assertRegex(out, rf"worker {number} stopped, pid \d+")
        self.assertEqual(process.proc.returncode, 0, out[-3000:])  # (a stop asked for)

    @inlineCallbacks
    def test_log_section_applies_to_workers(self):
        """log: {format: json}: the master's and the workers' lines are JSON objects, each
        worker's naming it in log_system."""
        json_start = (r'("log_system": "worker {number}".*accepting on'
                      r'|accepting on.*"log_system": "worker {number}")')
        process, _port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                             {"log": {"format": "json"}}, json_start)
        out = yield deferToThread(process.stop)
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        systems = {event.get("log_system") for event in events}
        self.assertLessEqual({"worker 0", "worker 1"}, systems)
        started = [event["pid"] for event in events
                   if event.get("log_format", "").startswith("worker {number} started")]
        self.assertEqual(len(started), 2)  # (the master's lines, JSON too)

    @inlineCallbacks
    def test_reload_changes_the_log_section_of_workers(self):
        """log: {connections: true}, then SIGHUP with connections false: logins through
        both workers log no line any more, while each worker's later console login does."""
        process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                            {"log": {"connections": True}, "admin_users": ["u_trust"]})

        def scenario() -> None:
            self.raw_clients(port, 2, {0: 1, 1: 1})
            process.wait_for(r"\[worker 1\] c\d+: login u_trust@app")
            document = yaml.safe_load(process.config_path.read_text())
            document["log"]["connections"] = False
            process.config_path.write_text(yaml.safe_dump(document))
            mark = len(process.lines)
            process.proc.send_signal(signal.SIGHUP)
            process.wait_for(r"reloaded .* in 2 workers", after=mark)
            self.raw_clients(port, 2, {0: 1, 1: 1})
            for number in (0, 1):
                self.console_on(port, 2, number)
                process.wait_for(rf"\[worker {number}\] c\d+: u_trust logged in to the admin console",
                                 after=mark)
            # Each worker's lines after its own "reloaded" line: a line of the first
            # logins may be written after the mark (a worker preempted between a
            # client's ReadyForQuery and the log line; a surplus login's close read
            # late), but none once the worker has the new settings.
            later = process.lines[mark:]
            for number in (0, 1):
                tag = f"[worker {number}] "
                mine = [line for line in later if tag in line]
                applied = next(i for i, line in enumerate(mine) if "reloaded " in line)
                self.assertNotRegex("".join(mine[applied:]), r"c\d+: (login|logout) u_trust@app")

        yield deferToThread(scenario)

    @inlineCallbacks
    def test_workers_stop_when_the_master_dies(self):
        """SIGKILL of the master (no chance to stop anything): its workers notice the
        AMP connection gone and exit by themselves, so nothing keeps accepting."""
        process, _port = yield deferToThread(self.start, 2)
        pids = [int(process.wait_for(rf"worker {n} started, pid (\d+)").group(1)) for n in range(2)]
        process.proc.kill()

        def running(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return False
            return state != "Z"  # (a zombie has exited; its new parent reaps it)

        def gone() -> None:
            deadline = time.monotonic() + 20
            for pid in pids:
                while running(pid):
                    self.assertLess(time.monotonic(), deadline, f"worker pid {pid} outlived its master")
                    time.sleep(0.05)

        yield deferToThread(gone)

    @inlineCallbacks
    def test_client_tls_in_workers(self):
        """tls.mode require with 2 workers: each worker does its clients' handshakes
        (psycopg with sslmode=require is served on both), plaintext is refused."""
        _process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                             {"tls": serving("require")})

        def connect_many() -> tuple[set[str], str]:
            outcomes = {outcome(port, "require") for _ in range(12)}
            return outcomes, outcome(port, "disable")

        outcomes, plain = yield deferToThread(connect_many)
        self.assertEqual(outcomes, {"tls"})
        self.assertIn("refused", plain)
        self.assertEqual((yield deferToThread(self.spread_tls, port)), {0, 1})

    @inlineCallbacks
    def test_worker_that_cannot_start_exits_1_and_is_restarted(self):
        """A worker whose start fails (restarted after SIGKILL while its TLS certificate
        file is gone) logs why and exits 1; the master restarts it until the file is
        back, and then it accepts again."""
        directory = Path(tempfile.mkdtemp(prefix="odissey-certs-"))
        self.addCleanup(shutil.rmtree, directory, True)
        tls = serving("require")
        cert_file = directory / "server.crt"
        shutil.copy(tls["cert_file"], cert_file)
        process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                            {"tls": {**tls, "cert_file": str(cert_file)}})

        def scenario() -> None:
            pid = int(process.wait_for(r"worker 0 started, pid (\d+)").group(1))
            lines = len(process.lines)
            cert_file.rename(directory / "away.crt")
            os.kill(pid, signal.SIGKILL)
            process.wait_for(r"\[worker 0\] Odissey could not start", after=lines)
            process.wait_for(r"worker 0 died, pid \d+ \(.*exit code 1", after=lines)
            (directory / "away.crt").rename(cert_file)
            lines = len(process.lines)
            process.wait_for(r"\[worker 0\] accepting on", after=lines)

        yield deferToThread(scenario)
        self.assertEqual((yield deferToThread(self.spread_tls, port)), {0, 1})

    def spread_tls(self, port: int) -> set[int]:
        """The workers that TLS logins (SSLRequest, handshake, then the startup) land on."""
        context = ssl.create_default_context(cafile=certs().ca_file)
        seen = set()
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(m.ssl_request())
                self.assertEqual(raw.recv(1), b"S")
                with context.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.sendall(m.startup_message({"user": "u_trust", "database": "app"}))
                    data = b""
                    while True:
                        kind, body, data = read_message(sock, data)
                        if kind == b"K":
                            seen.add(self.worker_of(m.parse_backend_key_data(body), 2))
                            break
        return seen

    @inlineCallbacks
    def test_console_shows_every_workers_pools(self):
        """The admin console, reached through either worker, shows the servers of both:
        one client of each worker holds a server in a transaction, and SHOW POOLS says
        sv_active 2 for the pool (the master relays each worker's rows once a second)."""
        _process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                             {"admin_users": ["app"]})

        def scenario() -> list[int]:
            clients = self.raw_clients(port, 2, {0: 1, 1: 1})
            for number in (0, 1):
                self.assertEqual(self.ask(clients[number][0], "BEGIN; SELECT 1"), [])
            seen = []
            deadline = time.monotonic() + 10
            while len(seen) < 6:  # (several console logins, so both workers answer)
                with psycopg.connect(host="127.0.0.1", port=port, user="app", password=APP_PASSWORD,
                                     dbname="odissey", autocommit=True) as console:
                    rows = console.execute("SHOW POOLS").fetchall()
                active = {row[4] for row in rows if row[:2] == ("app", "u_trust")}
                if active == {2}:
                    seen.append(2)
                else:
                    self.assertLess(time.monotonic(), deadline, f"SHOW POOLS said {rows}")
                    time.sleep(0.2)
            return seen

        self.assertEqual((yield deferToThread(scenario)), [2] * 6)

    def console_on(self, port: int, workers: int, number: int) -> psycopg.Connection:
        """A psycopg admin console (u_trust) on worker ``number``: found by its own
        client id in SHOW CLIENTS (worker N numbers its clients N+1, N+1+workers, ...).
        Logins go in concurrent batches: one at a time, the kernel may hand every
        connection to the same idle worker (seen on a quiet machine, 400 in a row)."""
        def probe(name: str) -> tuple[psycopg.Connection, int]:
            console = psycopg.connect(host="127.0.0.1", port=port, user="u_trust", dbname="odissey",
                                      autocommit=True, application_name=name)
            rows = console.execute("SHOW CLIENTS").fetchall()
            return console, [row[-1] for row in rows if row[-2] == name][0]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for batch in range(50):
                found = self.keep_one_on(pool.map(probe, [f"probe{number}.{batch}.{i}" for i in range(8)]),
                                         workers, number)
                if found is not None:
                    return found
        raise AssertionError(f"no console login reached worker {number}")

    def keep_one_on(self, logins: Iterable[tuple[psycopg.Connection, int]], workers: int,
                    number: int) -> psycopg.Connection | None:
        """Of (connection, client id) pairs, keep the first one worker ``number`` serves
        (closed at cleanup), and close the others."""
        found = None
        for conn, client_id in logins:
            if found is None and (client_id - 1) % workers == number:
                found = conn
            else:
                conn.close()
        if found is not None:
            self.addCleanup(found.close)
        return found

    @staticmethod
    def in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
        """Run ``work`` in a thread; its result (or exception) lands in the list."""
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(work())
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, result

    @inlineCallbacks
    def test_console_control_spans_workers(self):
        """PAUSE on worker 0's console while worker 1's client holds a transaction is
        answered only once that client commits (and then no server is left in
        PostgreSQL); while paused, worker 1's client waits; RESUME (from worker 1's
        console) lets it and worker 0's client work. KILL_CLIENT on worker 0's console
        drops a client of worker 1; refusals come back from any worker."""
        yield deferToThread(self.settle)
        process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                            {"admin_users": ["u_trust"]})

        def scenario() -> None:
            clients = self.raw_clients(port, 2, {0: 1, 1: 1})
            holder = clients[1][0]
            self.assertEqual(self.ask(holder, "BEGIN; SELECT 1"), [])
            console0 = self.console_on(port, 2, 0)
            console1 = self.console_on(port, 2, 1)
            pausing, paused = self.in_thread(lambda: console0.execute("PAUSE").statusmessage)
            pausing.join(1.0)  # (it must not answer while the transaction is open)
            self.assertEqual(paused, [])
            self.assertEqual(self.ask(holder, "COMMIT"), [])
            pausing.join(30)
            self.assertEqual(paused, ["PAUSE"])
            self.assertEqual(backends(user="u_trust"), 0)
            with self.assertRaises(psycopg.errors.ObjectNotInPrerequisiteState):
                console1.execute("PAUSE")  # (worker 1 is paused too)
            holder.sock.sendall(m.query("SELECT 1"))
            waiting, _ = self.in_thread(lambda: holder.until(holder.ready + 1))
            waiting.join(0.5)
            self.assertTrue(waiting.is_alive())  # (no server while paused)
            self.assertEqual(console1.execute("RESUME").statusmessage, "RESUME")
            waiting.join(30)
            self.assertFalse(waiting.is_alive())
            self.assertEqual(holder.errors, [])
            for number in (0, 1):
                self.assertEqual(self.ask(clients[number][0], "SELECT 1"), [])
            with self.assertRaises(psycopg.errors.ObjectNotInPrerequisiteState):
                console0.execute("RESUME")
            # KILL_CLIENT: worker 1's client, by the id worker 1 logged for it.
            ids = {found.group(1) for found in re.finditer(r"\[worker 1\] (c\d+): login u_trust@app",
                                                           process.output)}
            gone = {found.group(1) for found in re.finditer(r"(c\d+): logout", process.output)}
            deadline = time.monotonic() + 10
            while len(ids - gone) != 1:
                self.assertLess(time.monotonic(), deadline, f"logins {ids}, logouts {gone}")
                time.sleep(0.05)
                gone = {found.group(1) for found in re.finditer(r"(c\d+): logout", process.output)}
            victim = (ids - gone).pop()
            self.assertEqual(int(victim[1:]) % 2, 0)  # (worker 1's ids are even)
            self.assertEqual(console0.execute(f"KILL_CLIENT {victim}").statusmessage, "KILL_CLIENT")
            self.assertRaises((ConnectionError, OSError, AssertionError), holder.until, holder.ready + 1)
            self.assertIn("57P01", holder.errors)
            with self.assertRaises(psycopg.errors.UndefinedObject):
                console0.execute(f"KILL_CLIENT {victim}")
            self.assertEqual(self.ask(clients[0][0], "SELECT 1"), [])

        yield deferToThread(scenario)

    @staticmethod
    def resize(process: Process, size: object) -> None:
        """Write the process's configuration file again with this pool size."""
        document = yaml.safe_load(process.config_path.read_text())
        for route in document["routes"]:
            route["pool"]["size"] = size
        process.config_path.write_text(yaml.safe_dump(document))

    @inlineCallbacks
    def test_reload_spans_workers(self):
        """Pool size 2 over 2 workers: a third transaction waits. SIGHUP to the master
        after the file says 4: the waiting one gets a server, a fourth too, and PostgreSQL
        sees 4 backends and no fifth (the ledger follows the new size). A file with an
        error is refused as a whole (console RELOAD says why, from any worker; SIGHUP logs
        it) and the size stays 4; console RELOAD of a valid file applies everywhere."""
        yield deferToThread(self.settle)
        process, port = yield deferToThread(self.start, 2, {"size": 2}, None, None, sys.executable,
                                            {"admin_users": ["u_trust"]})

        def scenario() -> None:
            clients = self.raw_clients(port, 2, {0: 3, 1: 2})
            for number in (0, 1):
                self.assertEqual(self.ask(clients[number][0], "BEGIN; SELECT 1"), [])
            third = clients[0][1]
            third.sock.sendall(m.query("BEGIN; SELECT 1"))
            waiting, _ = self.in_thread(lambda: third.until(third.ready + 1))
            waiting.join(0.5)
            self.assertTrue(waiting.is_alive())  # (size 2 over both workers)
            self.assertEqual(backends(user="u_trust"), 2)
            self.resize(process, 4)
            mark = len(process.lines)
            process.proc.send_signal(signal.SIGHUP)
            process.wait_for(r"reloaded .* in 2 workers", after=mark)
            waiting.join(10)
            self.assertFalse(waiting.is_alive())
            self.assertEqual(third.errors, [])
            self.assertEqual(self.ask(clients[1][1], "BEGIN; SELECT 1"), [])
            self.assertEqual(backends(user="u_trust"), 4)
            fifth = clients[0][2]
            fifth.sock.sendall(m.query("SELECT 1"))
            blocked, _ = self.in_thread(lambda: fifth.until(fifth.ready + 1))
            blocked.join(0.5)
            self.assertTrue(blocked.is_alive())  # (size 4 now, over both workers)
            self.assertEqual(backends(user="u_trust"), 4)
            # A broken file: refused everywhere, nothing changes.
            self.resize(process, -1)
            mark = len(process.lines)
            process.proc.send_signal(signal.SIGHUP)
            process.wait_for(r"reload refused: routes\[0\]\.pool\.size", after=mark)
            for number in (0, 1):
                console = self.console_on(port, 2, number)
                with self.assertRaises(psycopg.errors.ConfigFileError) as refused:
                    console.execute("RELOAD")
                self.assertIn("pool.size", refused.exception.diag.message_detail or "")
            self.assertEqual(self.ask(clients[1][0], "COMMIT"), [])
            blocked.join(10)
            self.assertFalse(blocked.is_alive())  # (the freed server, as size 4 allows)
            self.assertEqual(fifth.errors, [])
            self.assertEqual(backends(user="u_trust"), 4)
            self.resize(process, 3)
            mark = len(process.lines)
            self.assertEqual(self.console_on(port, 2, 1).execute("RELOAD").statusmessage, "RELOAD")
            for number in (0, 1):
                process.wait_for(rf"\[worker {number}\] reloaded .*: 2 routes live", after=mark)
            process.wait_for(r"reloaded .* in 2 workers", after=mark)

        yield deferToThread(scenario)

    @inlineCallbacks
    def test_metrics_span_workers(self):
        """The master serves metrics.listen: one client of each worker runs 3 and 5
        queries, and the scrape's pool counters say 8 (summed over both workers), the
        histograms count 8, and the server gauges count both workers' servers; a
        second scrape after more work follows it."""
        metrics_port = free_port()
        process, port = yield deferToThread(
            self.start, 2, None, None, None, sys.executable,
            {"metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}})

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            from prometheus_client.parser import text_string_to_metric_families
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
            return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                    for family in text_string_to_metric_families(text) for sample in family.samples}

        def scenario() -> None:
            process.wait_for(r"serving metrics on .* \(every worker's\)")
            clients = self.raw_clients(port, 2, {0: 1, 1: 1})
            pool = (("database", "app"), ("route", ""), ("user", "u_trust"))
            for number, count in ((0, 3), (1, 5)):
                for _ in range(count):
                    self.assertEqual(self.ask(clients[number][0], "SELECT 1"), [])
            samples = scrape()
            self.assertEqual(samples[("odissey_pool_queries_total", pool)], 8)
            self.assertEqual(samples[("odissey_pool_transactions_total", pool)], 8)
            self.assertEqual(samples[("odissey_pool_query_duration_seconds_count", pool)], 8)
            servers = (samples[("odissey_pool_server_idle_connections", pool)]
                       + samples[("odissey_pool_server_active_connections", pool)])
            self.assertEqual(servers, backends(user="u_trust"))
            self.assertGreaterEqual(servers, 2)  # (one per worker at least)
            self.assertEqual(self.ask(clients[1][0], "BEGIN; SELECT 1; COMMIT"), [])
            self.assertEqual(scrape()[("odissey_pool_transactions_total", pool)], 9)

        yield deferToThread(scenario)

    @inlineCallbacks
    def test_show_clients_and_servers_span_workers(self):
        """SHOW CLIENTS and SHOW SERVERS on either worker's console list both workers'
        clients and servers: one client of each holds a server in a transaction, and
        each console sees two pool clients (one id per worker: worker 0's odd, worker
        1's even) linked to two distinct servers, which link back to them."""
        yield deferToThread(self.settle)
        _process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                             {"admin_users": ["u_trust"]})

        def scenario() -> None:
            clients = self.raw_clients(port, 2, {0: 1, 1: 1})
            for number in (0, 1):
                self.assertEqual(self.ask(clients[number][0], "BEGIN; SELECT 1"), [])
            for number in (0, 1):
                console = self.console_on(port, 2, number)
                shown = console.execute("SHOW CLIENTS")
                names = [d.name for d in shown.description]
                pool_clients = [dict(zip(names, row)) for row in shown.fetchall() if row[2] == "app"]
                self.assertEqual(sorted(row["id"] % 2 for row in pool_clients), [0, 1])
                shown = console.execute("SHOW SERVERS")
                names = [d.name for d in shown.description]
                servers = [dict(zip(names, row)) for row in shown.fetchall()
                           if row[1] == "u_trust" and row[3] == "active"]
                self.assertEqual(len({row["ptr"] for row in servers}), 2)
                self.assertEqual({row["link"] for row in servers}, {row["ptr"] for row in pool_clients})
                self.assertEqual({row["ptr"] for row in servers}, {row["link"] for row in pool_clients})

        yield deferToThread(scenario)

    @inlineCallbacks
    def test_console_shutdown_stops_every_worker(self):
        """SHUTDOWN on worker 0's console is answered, then stops the whole process at
        once, as PgBouncer's does: worker 1's idle client and its client inside a
        transaction get 57P01 (the transaction rolls back), both workers stop (neither
        is restarted) and the master exits with status 0."""
        yield deferToThread(self.settle)
        process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                            {"admin_users": ["u_trust"]})

        def scenario() -> tuple[str, list[list[str]], int]:
            idle, busy = self.raw_clients(port, 2, {1: 2})[1]
            self.assertEqual(self.ask(idle, "SELECT 1"), [])
            self.assertEqual(self.ask(busy, "BEGIN; INSERT INTO items VALUES (7400, 'workers-shutdown')"), [])
            console = self.console_on(port, 2, 0)
            answer = console.execute("SHUTDOWN").statusmessage
            for client in (idle, busy):
                self.assertRaises((ConnectionError, OSError, AssertionError), client.until, client.ready + 1)
            return answer, [idle.errors, busy.errors], process.proc.wait(timeout=60)

        answer, errors, status = yield deferToThread(scenario)
        out = yield deferToThread(process.stop)
        self.assertEqual((answer, errors, status), ("SHUTDOWN", [["57P01"], ["57P01"]], 0), out)
        self.assertIn("[worker 0] asking the master to stop every worker (immediate)", out)
        self.assertIn("[odissey.lifecycle#info] shutdown requested (immediate)", out)
        for number in range(2):
            self.assertRegex(out, rf"worker {number} stopped, pid \d+")
        self.assertNotIn("died", out)
        self.assertFalse(committed("workers-shutdown"))

    @inlineCallbacks
    def test_shutdown_wait_for_clients_spans_workers(self):
        """SHUTDOWN WAIT_FOR_CLIENTS on worker 0's console: new connections are refused
        (the master and both workers have closed the listener) and nobody is ended:
        worker 1's psycopg client inside a transaction commits it and runs another,
        worker 0's idle psycopg client is served too. Worker 1 exits once its client has
        left, the master (status 0) only once worker 0's has too."""
        yield deferToThread(self.settle)
        process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                            {"admin_users": ["u_trust"]})

        def scenario() -> int:
            console = self.console_on(port, 2, 0)
            waiting = self.client_on(port, 2, 0, console)
            busy = self.client_on(port, 2, 1, console)
            busy.execute("BEGIN")
            busy.execute("INSERT INTO items VALUES (7401, 'workers-wait')")
            self.assertEqual(console.execute("SHUTDOWN WAIT_FOR_CLIENTS").statusmessage, "SHUTDOWN")
            wait_refused(port)
            self.assertEqual(busy.execute("SELECT 1").fetchone()[0], 1)
            busy.execute("COMMIT")
            self.assertEqual(busy.execute("SELECT 2").fetchone()[0], 2)
            self.assertEqual(waiting.execute("SELECT 3").fetchone()[0], 3)
            busy.close()
            process.wait_for(r"worker 1 stopped, pid \d+")
            self.assertIsNone(process.proc.poll())
            self.assertEqual(waiting.execute("SELECT 4").fetchone()[0], 4)
            waiting.close()
            return process.proc.wait(timeout=60)

        status = yield deferToThread(scenario)
        out = yield deferToThread(process.stop)
        self.assertEqual(status, 0, out)
        self.assertIn("[odissey.lifecycle#info] shutdown requested (wait_for_clients)", out)
        self.assertRegex(out, r"worker 0 stopped, pid \d+")
        self.assertNotIn("died", out)
        self.assertTrue(committed("workers-wait"))
        with direct() as su:
            su.execute("delete from items where note = 'workers-wait'")

    @inlineCallbacks
    def test_sigterm_hurries_wait_for_clients(self):
        """SHUTDOWN WAIT_FOR_CLIENTS, then SIGTERM to the master (as on one Odissey, a
        later signal hurries the stop): worker 1's client inside a transaction is ended
        (57P01, its transaction rolls back) and the master exits."""
        yield deferToThread(self.settle)
        process, port = yield deferToThread(self.start, 2, None, None, None, sys.executable,
                                            {"admin_users": ["u_trust"]})

        def scenario() -> tuple[list[str], int]:
            console = self.console_on(port, 2, 0)
            busy = self.raw_clients(port, 2, {1: 1})[1][0]
            self.assertEqual(self.ask(busy, "BEGIN; INSERT INTO items VALUES (7402, 'workers-hurried')"), [])
            self.assertEqual(console.execute("SHUTDOWN WAIT_FOR_CLIENTS").statusmessage, "SHUTDOWN")
            wait_refused(port)
            self.assertEqual(self.ask(busy, "SELECT 1"), [])
            process.proc.send_signal(signal.SIGTERM)
            self.assertRaises((ConnectionError, OSError, AssertionError), busy.until, busy.ready + 1)
            return busy.errors, process.proc.wait(timeout=60)

        errors, status = yield deferToThread(scenario)
        out = yield deferToThread(process.stop)
        self.assertEqual((errors, status), (["57P01"], 0), out)
        self.assertIn("signal 15 while stopping: ending every client now", out)
        self.assertFalse(committed("workers-hurried"))

    def client_on(self, port: int, workers: int, number: int, console: psycopg.Connection) -> psycopg.Connection:
        """A psycopg client (u_trust, autocommit) on worker ``number``: found by its id in
        ``console``'s SHOW CLIENTS (which lists every worker's), logging in concurrent
        batches as :meth:`console_on` does."""
        def probe(name: str) -> psycopg.Connection:
            return self.connect(port, "u_trust", application_name=name)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for batch in range(50):
                names = [f"client{number}.{batch}.{i}" for i in range(8)]
                conns = dict(zip(names, pool.map(probe, names)))
                ids = {row[-2]: row[-1] for row in console.execute("SHOW CLIENTS").fetchall()}
                found = self.keep_one_on(((conn, ids[name]) for name, conn in conns.items()), workers, number)
                if found is not None:
                    return found
        raise AssertionError(f"no client login reached worker {number}")

    def restart_listen(self) -> tuple[Path, int, list[str]]:
        """A directory for the unix and handover sockets (a unix path is short), a port,
        and a TCP and a unix ``listen`` entry on it."""
        directory = Path(tempfile.mkdtemp(prefix="odissey-"))
        self.addCleanup(shutil.rmtree, directory, True)
        port = free_port()
        return directory, port, [f"tcp:{port}:interface=127.0.0.1", f"unix:{directory}/.s.PGSQL.{port}:mode=660"]

    def take_over(self, config_path: Path, old: Process, login: str = r"\[worker \d\] c\d+: login app@app",
                  interpreter: str = sys.executable) -> Process:
        """Start a process on ``config_path`` (handover_socket) while ``old`` runs: it
        takes the listening sockets, a login matching ``login`` reaches it, and ``old``
        exits."""
        new = Process(str(config_path), interpreter)
        self.addCleanup(new.stop)
        new.wait_for("took over the listening sockets", 60)
        new.wait_for(login, 60)  # (the logins reach it)
        old.proc.wait(timeout=90)
        return new

    def after_restarts(self, processes: list[Process], logins: Logins, metrics_port: int) -> list[str]:
        """Once every process but the last has handed over to the next: the metrics
        endpoint (taken over by each) counts transactions, every process stops, no login
        failed, and each old process handed over, drained and exited 0. Returns each
        process's output."""
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            scraped = reply.read().decode()
        outs = [process.stop() for process in processes]
        print(f"{len(logins.served)} logins served, {len(logins.failures)} failed")
        self.assertEqual(logins.failures, [], "".join(out[-3000:] for out in outs))
        for old, out in zip(processes[:-1], outs):
            self.assertEqual(old.proc.returncode, 0, out[-3000:])
            self.assertIn("handed the listening sockets over to a new process; draining", out)
        for out in outs[1:]:
            self.assertIn(f"serving metrics on tcp:{metrics_port}:interface=127.0.0.1 (socket taken over)", out)
        counted = re.search(r'odissey_pool_transactions_total\{database="app",route="",user="app"\} (\S+)', scraped)
        self.assertGreaterEqual(float(counted.group(1)) if counted else 0.0, 1.0, scraped)
        return outs

    @inlineCallbacks
    def test_online_restart_with_workers(self):
        """handover_socket with 2 workers, a TCP and a unix listener: while psycopg
        clients log in again and again (a login, a query, a logout: 3 threads over TCP,
        1 over the unix socket), a new master takes the listening sockets from the
        running one and confirms once its workers accept; the old master drains its
        workers and exits (status 0). Twice, each while logins go on: no login or query
        fails, the third master's two workers serve afterwards, and its metrics endpoint
        (taken over too) counts transactions."""
        directory, port, listen = self.restart_listen()
        metrics_port = free_port()
        first, _ = yield deferToThread(self.start, 2, None, listen, None, sys.executable,
                                       {"handover_socket": str(directory / "handover.sock"),
                                        "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}})
        logins = Logins(self, port, directory)
        try:
            yield deferToThread(first.wait_for, r"\[worker \d\] c\d+: login app@app")
            second = yield deferToThread(self.take_over, first.config_path, first)
            third = yield deferToThread(self.take_over, second.config_path, second)
        finally:
            yield deferToThread(logins.stop)
        after = len(third.lines)
        self.assertEqual((yield deferToThread(self.spread, port, 2)), {0, 1})
        outs = yield deferToThread(self.after_restarts, [first, second, third], logins, metrics_port)
        for out in outs[:2]:
            for number in range(2):
                self.assertRegex(out, rf"worker {number} stopped, pid \d+")
            self.assertNotIn("died", out)
        for out in outs[1:]:
            self.assertEqual(out.count("(socket taken over) (for 2 workers)"), 2, out[-3000:])
        for number in range(2):
            self.assertRegex("".join(third.lines[after:]), rf"\[worker {number}\] c\d+: login u_trust@app")

    def test_online_restart_between_single_process_and_master(self):
        """handover_socket across a change of ``workers``: a single Odissey (no
        ``workers``) hands its TCP and unix listeners and its metrics socket to a master
        with 2 workers (a new configuration file, the same listen and handover_socket),
        which hands them to a single Odissey again, while psycopg clients log in again and
        again (3 threads over TCP, 1 over the unix socket): no login or query fails, each
        old process drains and exits 0, both of the master's workers serve, and the last
        process serves and counts transactions on the metrics endpoint."""
        return self.restart_between_single_process_and_master(sys.executable)

    def test_online_restart_between_single_process_and_master_on_pypy(self):
        """The same under PyPy: the handover, the master's workers (started on the same
        interpreter) and each old process's exit status."""
        if not os.access(PYPY, os.X_OK):
            raise SkipTest(f"no PyPy at {PYPY}")
        return self.restart_between_single_process_and_master(PYPY)

    @inlineCallbacks
    def restart_between_single_process_and_master(self, interpreter: str):
        directory, port, listen = self.restart_listen()
        metrics_port = free_port()
        top = {"handover_socket": str(directory / "handover.sock"),
               "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}}
        single_login = r"^\S+ \[odissey\.client#info\] c\d+: login app@app"
        first, _ = yield deferToThread(self.start, 1, None, listen, None, interpreter, top,
                                       "listening on unix:")
        document = yaml.safe_load(first.config_path.read_text())
        self.assertNotIn("workers", document)
        with_workers = Path(self.mktemp() + ".yaml").resolve()
        with_workers.write_text(yaml.safe_dump({**document, "workers": 2}))
        logins = Logins(self, port, directory)
        try:
            yield deferToThread(first.wait_for, single_login)
            master = yield deferToThread(self.take_over, with_workers, first, interpreter=interpreter)
            for number in range(2):
                yield deferToThread(master.wait_for, rf"\[worker {number}\] c\d+: login app@app", 60)
            last = yield deferToThread(self.take_over, first.config_path, master, single_login, interpreter)
        finally:
            yield deferToThread(logins.stop)
        self.assertEqual((yield deferToThread(direct_select, port)), "last")
        outs = yield deferToThread(self.after_restarts, [first, master, last], logins, metrics_port)
        self.assertNotIn("[worker", outs[0] + outs[2])  # (single processes: no workers)
        self.assertEqual(outs[1].count("(socket taken over) (for 2 workers)"), 2, outs[1][-3000:])
        self.assertNotIn("died", outs[1])
        self.assertEqual(outs[2].count("(socket taken over)"), 3, outs[2][-3000:])  # two listeners, metrics

    @inlineCallbacks
    def test_pypy_master_starts_pypy_workers(self):
        """A master running on PyPy starts its workers on the same PyPy, and they serve."""
        if not os.access(PYPY, os.X_OK):
            raise SkipTest(f"no PyPy at {PYPY}")
        process, port = yield deferToThread(self.start, 2, None, None, None, PYPY)
        for number in range(2):
            pid = int(process.wait_for(rf"worker {number} started, pid (\d+)").group(1))
            self.assertEqual(os.path.realpath(f"/proc/{pid}/exe"), os.path.realpath(PYPY))
        with (yield deferToThread(self.connect, port)) as conn:
            self.assertEqual(conn.execute("select 42").fetchone()[0], 42)
        self.assertEqual((yield deferToThread(self.spread, port, 2)), {0, 1})


class _FakeLink:
    """A worker's AMP link as the master sees it: records calls, answers on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any], Deferred[Any]]] = []
        self.transport = None

    def callRemote(self, command: Any, **arguments: Any) -> "Deferred[Any]":
        answer: Deferred[Any] = Deferred()
        self.calls.append((command, arguments, answer))
        return answer


class _Listening:
    """A listening port as the master's start uses it (it only stops reading)."""

    def stopReading(self) -> None:
        pass


class _Signalled:
    """A worker process's transport that exits when it is sent a signal."""

    def __init__(self, process: WorkerProcess, signalled: list[int]) -> None:
        self.process = process
        self.signalled = signalled

    def signalProcess(self, name: str) -> None:
        self.signalled.append(self.process.number)
        self.process.processEnded(Failure(ProcessTerminated(signal=9)))


def two_routes(workers: int, max_clients: int) -> dict[str, Any]:
    """A configuration of ``workers`` with ``limits.max_clients`` and two routes of one
    database: user u limited to 2 clients, user v not."""
    return {
        "workers": workers, "listen": ["tcp:0"], "limits": {"max_clients": max_clients},
        "storages": {"pg": {"host": "127.0.0.1"}},
        "routes": [{"database": "db", "user": "u", "storage": "pg", "auth": {"method": "trust"},
                    "pool": {"max_clients": 2}},
                   {"database": "db", "user": "v", "storage": "pg", "auth": {"method": "trust"}}],
    }


class MasterTests(SynchronousTestCase):
    """The master's bookkeeping on a fake clock, with fake worker links (no processes)."""

    def setUp(self) -> None:
        document = two_routes(workers=3, max_clients=3)
        self.clock = MemoryReactorClock()
        self.master = Master(config.parse(document), self.clock, in_this_thread)
        self.links = {}
        for number in range(3):
            process = WorkerProcess(self.master, number, b"")
            process.link = self.links[number] = _FakeLink()  # type: ignore[assignment]
            self.master.processes[number] = process
        self.spawned: list[int] = []
        self.master.spawn = self.spawned.append  # type: ignore[method-assign]

    def secret_of(self, worker: int) -> int:
        return KeyLayout.of(0, False, worker, 3).secret(12345)

    def test_cancel_goes_to_the_owner_once(self) -> None:
        """A key of worker 2 received by worker 0 is sent to worker 2 only, and the
        sender's answer waits for the owner's; a key of the sender's own is not sent."""
        done = self.master.cancel(0, 77, self.secret_of(2))
        ((command, arguments, answer),) = self.links[2].calls
        self.assertEqual((command, arguments), (Cancel, {"pid": 77, "secret": self.secret_of(2)}))
        self.assertNoResult(done)
        answer.callback({})
        self.successResultOf(done)
        self.successResultOf(self.master.cancel(1, 77, self.secret_of(1)))
        self.assertEqual((self.links[0].calls, self.links[1].calls), ([], []))
        self.assertEqual(self.master.cancels_forwarded, 1)

    def test_starving_worker_gets_a_reclaimed_server(self) -> None:
        """Worker 0 holds the pool's only lease; worker 1's request makes the master ask
        worker 0 for it, and is granted when worker 0 releases it."""
        self.successResultOf(self.master.lease(0, "p", 1, 1))
        waiting = self.master.lease(1, "p", 1, 2)
        ((command, arguments, answer),) = self.links[0].calls
        self.assertEqual((command, arguments), (Reclaim, {"pool": "p", "idle_only": False}))
        answer.callback({"gave": True})
        self.clock.advance(0.25)
        self.assertNoResult(waiting)
        self.master.apply(self.master.ledger.release("p", 0))
        self.successResultOf(waiting)
        self.assertEqual(self.master.lease_waits, [0.25])  # (what the shutdown line reports)

    def test_withdrawn_request_is_answered_and_never_granted(self) -> None:
        """A waiting request the worker withdraws is answered granted=false and the
        lease goes to the next request instead; withdrawing a granted one does nothing."""
        self.successResultOf(self.master.lease(0, "p", 1, 10))
        withdrawn = self.master.lease(1, "p", 1, 11)
        after = self.master.lease(2, "p", 1, 12)
        self.master.withdraw(1, "p", 11)
        self.assertEqual(self.successResultOf(withdrawn), {"granted": False})
        self.master.withdraw(0, "p", 10)  # (granted: stays)
        self.master.apply(self.master.ledger.release("p", 0))
        self.assertEqual(self.successResultOf(after), {"granted": True})
        self.assertEqual(self.master.ledger.held("p"), {2: 1})

    def test_refused_reclaim_is_asked_again(self) -> None:
        """A worker with nothing to give (its server still connecting) is asked again
        after RECLAIM_RETRY while the request waits."""
        self.master.lease(0, "p", 1, 3)
        self.master.lease(1, "p", 1, 4)
        self.links[0].calls[0][2].callback({"gave": False})
        self.assertEqual(len(self.links[0].calls), 1)
        self.clock.advance(RECLAIM_RETRY)
        self.assertEqual(len(self.links[0].calls), 2)

    def test_dead_worker_restarts_and_gives_back(self) -> None:
        """A worker that dies has its leases and clients given back and is restarted,
        at most once a RESTART_DELAY after its previous start."""
        self.master.lease(0, "p", 1, 5)
        waiting = self.master.lease(1, "p", 1, 6)
        self.assertEqual(self.admit(0, {CLIENTS: 3}), "")
        asking = self.master.admit(1, {CLIENTS: 1})  # (worker 0 holds every slot: asked to spare)
        self.assertEqual([command for command, _, _ in self.links[0].calls], [Reclaim, Spare])
        process = self.master.processes[0]
        process.started_at = self.clock.seconds()
        self.master.ended(process, Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.successResultOf(waiting), {"granted": True})
        self.assertEqual(self.successResultOf(asking)["refused"], "")  # (worker 0's clients went with it)
        self.assertEqual(self.spawned, [])
        self.clock.advance(RESTART_DELAY)
        self.assertEqual(self.spawned, [0])
        self.assertEqual(self.master.restarts, 1)

    def run_timers(self) -> None:
        """The master's own services (its timers) run, as stopService expects; its
        startService proper would open listeners and spawn processes."""
        MultiService.startService(self.master)

    def stop_orders(self) -> list[list[str]]:
        """The ``how`` of every Stop each worker was sent, by worker."""
        return [[arguments["how"] for command, arguments, _ in self.links[number].calls if command is StopCommand]
                for number in range(3)]

    def test_shutdown_wait_for_clients_waits_and_is_hurried(self) -> None:
        """A worker's SHUTDOWN WAIT_FOR_CLIENTS stops the reactor; the stop sends every
        worker Stop wait_for_clients and waits for them however long (no kill after
        shutdown_timeout); a later SHUTDOWN sends every worker Stop immediate, and the
        stop ends when the workers have exited, none restarted."""
        self.run_timers()
        self.master.shutdown(Stop.WAIT_FOR_CLIENTS)
        self.assertTrue(self.clock.hasStopped)
        stopping = self.master.stopService()
        self.clock.advance(STATS_PATIENCE)  # (nobody answers Stats: the stop goes on)
        self.assertEqual(self.stop_orders(), [["wait_for_clients"]] * 3)
        self.clock.advance(3600)
        self.assertNoResult(stopping)
        self.master.shutdown(Stop.IMMEDIATE)
        self.assertEqual(self.stop_orders(), [["wait_for_clients", "immediate"]] * 3)
        self.master.shutdown(Stop.GRACEFUL)  # (already stopping: changes nothing)
        for process in list(self.master.processes.values()):
            process.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopping)
        self.clock.advance(RESTART_DELAY)
        self.assertEqual(self.spawned, [])

    def test_signal_stops_workers_gracefully(self) -> None:
        """SIGTERM (the reactor stops, then the service): every worker is sent Stop
        graceful, and is killed if it has not exited shutdown_timeout + STOP_PATIENCE later."""
        self.run_timers()
        self.master.signalled()
        stopping = self.master.stopService()
        self.clock.advance(STATS_PATIENCE)
        self.assertEqual(self.stop_orders(), [["graceful"]] * 3)
        killed: list[int] = []
        for number, process in self.master.processes.items():
            process.transport = _Signalled(process, killed)  # type: ignore[assignment]
        self.clock.advance(self.master.config.shutdown_timeout + STOP_PATIENCE)
        self.assertEqual(sorted(killed), [0, 1, 2])
        self.successResultOf(stopping)

    def admit(self, worker: int, wants: dict[Any, int]) -> str:
        """The master's answer to an Admit it can give at once: "" or what refused it."""
        answer = self.successResultOf(self.master.admit(worker, wants))
        return answer["refused"]

    def test_a_silent_worker_holds_logins_up_only_for_a_while(self) -> None:
        """A worker that does not answer a Spare counts as sparing nothing after
        SPARE_PATIENCE (the waiting login is refused, not held to its login_timeout);
        its late answer is still counted, so the slots it gave back are free again."""
        self.assertEqual(self.admit(0, {CLIENTS: 3}), "")
        waiting = self.master.admit(1, {CLIENTS: 1})
        ((command, _arguments, answer),) = self.links[0].calls
        self.assertEqual(command, Spare)
        self.clock.advance(SPARE_PATIENCE - 0.01)
        self.assertNoResult(waiting)
        self.clock.advance(0.01)
        self.assertEqual(self.successResultOf(waiting)["refused"], "clients")
        answer.callback({"gave": '[["clients", 2]]'})
        self.assertEqual(self.admit(1, {CLIENTS: 2}), "")
        self.assertEqual(len(self.links[0].calls), 1)  # (granted from what it gave: not asked again)

    def test_an_answered_spare_leaves_no_timer(self) -> None:
        """A Spare answered in time cancels its patience timer."""
        self.assertEqual(self.admit(0, {CLIENTS: 3}), "")
        granted = self.master.admit(1, {CLIENTS: 1})
        self.links[0].calls[0][2].callback({"gave": '[["clients", 1]]'})
        self.assertEqual(self.successResultOf(granted)["refused"], "")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_limits_over_workers(self) -> None:
        """The route's max_clients (2) and limits.max_clients (3) count every worker's
        slots: when none are free, the workers holding some are asked to spare theirs;
        the login is refused when they have none unused, granted from what they give."""
        route = self.master.config.routes[0].identity
        self.assertEqual(self.admit(0, {CLIENTS: 1, route: 1}), "")
        self.assertEqual(self.admit(1, {CLIENTS: 1, route: 1}), "")
        refused = self.master.admit(2, {CLIENTS: 1, route: 1})
        for number in (0, 1):
            ((command, arguments, answer),) = self.links[number].calls
            self.assertEqual((command, arguments), (Spare, {"budgets": json.dumps([route])}))
            answer.callback({"gave": "[]"})
        self.assertEqual(self.successResultOf(refused)["refused"], "route")
        self.assertEqual(self.admit(2, {CLIENTS: 1}), "")
        granted = self.master.admit(0, {CLIENTS: 1})
        self.assertEqual([arguments for _, arguments, _ in self.links[1].calls[1:]], [{"budgets": '["clients"]'}])
        self.links[1].calls[1][2].callback({"gave": '[["clients", 1]]'})  # (its client has left)
        self.assertEqual(self.successResultOf(granted), {"refused": "", "slots": '[["clients", 1]]'})
        self.links[2].calls[0][2].callback({"gave": "[]"})
        self.assertEqual(self.master.slots.held(CLIENTS), {0: 2, 2: 1})

    def start(self) -> None:
        """The master's start up to waiting for its workers (listeners faked)."""
        self.patch(workers_module, "listener", lambda *_args: succeed(_Listening()))
        self.master._starting = self.master._start()
        self.master._starting.addErrback(self.master._start_failed)
        self.assertEqual(self.spawned, [0, 1, 2])

    def test_worker_failing_its_start_fails_the_masters(self) -> None:
        """A worker that exits with status 1 before every worker has accepted (its
        certificates unreadable, say) fails the master's start: ready fails, the process
        will exit 1, and no worker is restarted; before, the master restarted it every
        second and never got ready."""
        exits: list[bool] = []
        self.patch(lifecycle, "exit_failed", lambda: exits.append(True))
        self.start()
        self.master.accepted(1)
        self.master.ended(self.master.processes[0], Failure(ProcessTerminated(exitCode=1)))
        self.failureResultOf(self.master.ready, WorkerStartFailed)
        self.flushLoggedErrors(WorkerStartFailed)
        self.assertEqual(exits, [True])
        self.master.ended(self.master.processes[2], Failure(ProcessTerminated(exitCode=1)))
        self.clock.advance(RESTART_DELAY)
        self.assertEqual((self.spawned, self.master.restarts), ([0, 1, 2], 0))

    def test_worker_failing_after_the_start_is_restarted(self) -> None:
        """Once every worker has accepted, a worker that exits with status 1 is
        restarted like any that dies (the master is running; its start is over)."""
        self.start()
        for number in range(3):
            self.master.accepted(number)
        self.successResultOf(self.master.ready)
        self.master.ended(self.master.processes[0], Failure(ProcessTerminated(exitCode=1)))
        self.clock.advance(RESTART_DELAY)
        self.assertEqual((self.spawned, self.master.restarts), ([0, 1, 2, 0], 1))

    def test_route_limit_follows_the_route_across_a_reload(self) -> None:
        """A reload that moves the limited route (the master takes the new configuration
        at once; workers' Admits may still come from before it): its slots keep
        counting against its limit, and the route now at its old place has none."""
        limited, unlimited = (route.identity for route in self.master.config.routes)
        self.assertEqual(self.admit(0, {CLIENTS: 1, limited: 1}), "")
        moved = dataclasses.replace(self.master.config, routes=tuple(
            dataclasses.replace(route, index=1 - route.index) for route in reversed(self.master.config.routes)))
        self.master.config = moved  # (what Master.reload does before sending it to the workers)
        self.assertEqual(self.admit(1, {CLIENTS: 1, limited: 1}), "")
        refused = self.master.admit(2, {CLIENTS: 1, limited: 1})
        for number in (0, 1):
            self.links[number].calls[-1][2].callback({"gave": "[]"})
        self.assertEqual(self.successResultOf(refused)["refused"], "route")
        self.assertEqual(self.master.limit_of(unlimited), 0)
        self.assertEqual(self.master.slots.held(limited), {0: 1, 1: 1})


class MasterLinkTests(SynchronousTestCase):
    """A worker's admissions: into its own client slots without a message, from the
    master only when they are used up."""

    def setUp(self) -> None:
        document = two_routes(workers=2, max_clients=10)
        parsed = config.parse(document)
        self.routes = parsed.routes
        self.link = MasterLink(SimpleNamespace(config=parsed))  # type: ignore[arg-type]
        self.fake = _FakeLink()
        self.link.callRemote = self.fake.callRemote  # type: ignore[method-assign]

    def test_admits_locally_until_the_block_is_used_up(self) -> None:
        """The first login asks for both budgets; the block granted admits the next ones
        with no message until the route's slots run out; a logout's slot is reused."""
        limited, unlimited = self.routes
        first = self.link.admit(limited)
        ((command, arguments, answer),) = self.fake.calls
        self.assertEqual((command, arguments), (Admit, {"wants": slots_json({CLIENTS: 1, limited.identity: 1})}))
        answer.callback({"refused": "", "slots": slots_json({CLIENTS: 3, limited.identity: 1})})
        self.assertEqual(self.successResultOf(first), "")
        self.assertEqual(self.successResultOf(self.link.admit(unlimited)), "")
        self.assertEqual(len(self.fake.calls), 1)
        self.link.admit(limited)
        self.assertEqual(self.fake.calls[1][1], {"wants": slots_json({limited.identity: 1})})
        self.fake.calls[1][2].callback({"refused": "route", "slots": "[]"})
        self.link.left(limited.identity)
        self.assertEqual(self.successResultOf(self.link.admit(limited)), "")
        self.assertEqual(len(self.fake.calls), 2)

    def test_spares_only_unused_slots(self) -> None:
        """Asked to spare, a worker gives back the slots its clients do not use."""
        self.link.admit(self.routes[1])
        self.fake.calls[0][2].callback({"refused": "", "slots": '[["clients", 4]]'})
        self.assertEqual(self.link.spare('["clients", 0]'), {"gave": '[["clients", 3]]'})
        self.assertEqual(self.link.spare('["clients"]'), {"gave": "[]"})
