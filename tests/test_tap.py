"""The twistd plugin and the .tac file, run as real processes, and ``--check``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import direct, ended, free_port, shared_postgres, watch_notices

ROOT = Path(__file__).resolve().parent.parent


#: twistd on this checkout's code (``-c`` puts the working directory, ROOT, first on the path).
BOOT = ["-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
#: PyPy with Odissey's dependencies, as .ci/install sets it up (or named by ODISSEY_PYPY).
PYPY = os.environ.get("ODISSEY_PYPY") or str(ROOT / ".ci" / "pypy" / "bin" / "python")


def psql_until_up(port: int, sql: str, user: str, password: str, dbname: str, patience: float = 30) -> str:
    deadline = time.monotonic() + patience
    while True:
        done = subprocess.run(
            ["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", dbname, "-Atc", sql],
            capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password}, timeout=30,
        )
        if done.returncode == 0 or time.monotonic() > deadline:
            return done.stdout.strip() or done.stderr
        time.sleep(0.3)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


def scrape(port: int) -> str:
    """The metrics endpoint's text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


class TapTests(TestCase):
    timeout = 120
    #: The interpreter Odissey runs on in these tests.
    interpreter = sys.executable

    def twistd_command(self) -> list[str]:
        return [self.interpreter, *BOOT]

    def twistd(self, *args: str, env: dict[str, str] | None = None,
               output: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        """twistd -n; its output to a pipe read at the end (or to ``output``, a file, for
        a process that logs more than a pipe holds before anyone reads it)."""
        return subprocess.Popen(
            [*self.twistd_command(), "--pidfile=", "-n", *args],
            stdout=output, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, cwd=ROOT,
        )

    def write_config(self, document: dict) -> str:
        path = Path(self.mktemp() + ".yaml").resolve()
        path.write_text(yaml.safe_dump(document))
        return str(path)

    def test_check_good_and_bad(self) -> None:
        """--check exits 0 on a good config and 1 listing every problem on a bad one."""
        good = subprocess.run([*self.twistd_command(), "odissey", "-c",
                               str(ROOT / "docs/examples/demo.yaml"), "--check"],
                              capture_output=True, text=True, cwd=ROOT)
        self.assertEqual(good.returncode, 0, good.stderr)
        self.assertIn("configuration OK", good.stdout)
        bad_doc = yaml.safe_load((ROOT / "docs/examples/demo.yaml").read_text())
        bad_doc["routes"][0]["pool"]["size"] = "ten"
        bad_doc["routes"][0]["storage"] = "elsewhere"
        bad = subprocess.run([*self.twistd_command(), "odissey", "-c",
                              self.write_config(bad_doc), "--check"],
                             capture_output=True, text=True, cwd=ROOT)
        self.assertEqual(bad.returncode, 1)
        self.assertIn('routes[0].pool.size: must be a positive integer, got "ten"', bad.stderr)
        self.assertIn('routes[0].storage: names unknown storage "elsewhere"', bad.stderr)

    def test_bad_config_never_listens(self) -> None:
        """Starting with a bad config exits non-zero without listening."""
        port = free_port()
        path = self.write_config({"listen": [f"tcp:{port}:interface=127.0.0.1"], "routes": []})
        proc = self.twistd("odissey", "-c", path)
        out, _ = proc.communicate(timeout=60)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("storages: is required", out)

    def exits_failed(self, document: dict, tac: bool = False) -> str:
        """Start with ``document`` (with the plugin, or ``tac``: odissey.tac, as systemd
        does), which fails once the reactor runs: the process exits 1 (not twistd's 0)
        within seconds, after twistd's clean-up; returns its output."""
        path = self.write_config(document)
        proc = (self.twistd("-y", str(ROOT / "odissey.tac"), env={"ODISSEY_CONFIG": path}) if tac
                else self.twistd("odissey", "-c", path))
        out, _ = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 1, out)
        self.assertIn("Odissey could not start", out)
        self.assertIn("Server Shut Down.", out)
        return out

    def test_address_in_use_exits_1(self) -> None:
        """A listen address in use, of a single process (started with the plugin or the
        .tac) or of a workers' master, or a metrics.listen address in use: the error is
        logged and the process exits 1."""
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        taken = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        document = yaml.safe_load(Path(self.app_config(free_port())).read_text())
        for workers, tac in ((1, False), (2, False), (1, True)):
            out = self.exits_failed({**document, "workers": workers, "listen": [taken]}, tac)
            self.assertIn("Address already in use", out)
        out = self.exits_failed({**document, "metrics": {"listen": taken}})
        self.assertIn(f"Couldn't listen on 127.0.0.1:{busy.getsockname()[1]}: [Errno 98] Address already in use",
                      out)

    def test_managed_postgres_that_cannot_start_exits_1(self) -> None:
        """A managed PostgreSQL that does not start (its TCP port is in use): the error
        is logged, its data directory removed, and the process exits 1."""
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        demo = yaml.safe_load((ROOT / "docs/examples/demo.yaml").read_text())
        demo["listen"] = [f"tcp:{free_port()}:interface=127.0.0.1"]
        del demo["metrics"]
        demo["storages"]["local"]["port"] = busy.getsockname()[1]
        demo["storages"]["local"]["managed"]["settings"] = {"listen_addresses": "127.0.0.1"}
        out = self.exits_failed(demo)
        self.assertIn("starting managed PostgreSQL for storage local", out)
        self.assertIn("could not start server", out)
        data_dirs = set(re.findall(r"-D (/\S+odissey-pg-\w+)", out))
        self.assertTrue(data_dirs, out)
        self.assertFalse([d for d in data_dirs if Path(d).exists()], "managed PostgreSQL data dir left behind")

    @inlineCallbacks
    def test_demo_config_end_to_end(self):
        """The README's demo: twistd starts a managed PostgreSQL, psql logs in as demo, SIGTERM stops both."""
        port = free_port()
        demo = yaml.safe_load((ROOT / "docs/examples/demo.yaml").read_text())
        demo["listen"] = [f"tcp:{port}:interface=127.0.0.1"]
        demo["storages"]["local"]["port"] = free_port()
        metrics_port = free_port()
        demo["metrics"]["listen"] = f"tcp:{metrics_port}:interface=127.0.0.1"
        proc = self.twistd("odissey", "-c", self.write_config(demo))
        try:
            answer = yield deferToThread(psql_until_up, port, "select current_user || '/' || current_database()",
                                         "demo", "demo", "demo")
            self.assertEqual(answer, "demo/demo")
            answer = yield deferToThread(psql_until_up, port, "select current_user || '/' || current_database()",
                                         "demo", "demo", "demo_tx")
            self.assertEqual(answer, "demo/demo")  # demo_tx is served by database demo
            scraped = yield deferToThread(scrape, metrics_port)
            self.assertIn('odissey_pool_transactions_total{database="demo_tx",route="",user="demo"} 1.0',
                          scraped)
        finally:
            out = yield deferToThread(stop, proc)
        self.assertEqual(proc.returncode, 0, out)  # (a stop asked for, not twistd's re-raised SIGTERM)
        self.assertIn("Server Shut Down.", out)
        data_dir = [line.split("socket in ")[1].rstrip(")") for line in out.splitlines() if "socket in " in line]
        self.assertTrue(data_dir, out)
        self.assertFalse(Path(data_dir[0]).exists(), "managed PostgreSQL data dir left behind")

    @inlineCallbacks
    def test_tac_reads_config_from_environment(self):
        """odissey.tac (for systemd) runs the config named by ODISSEY_CONFIG."""
        pg = shared_postgres()
        port = free_port()
        path = self.write_config({
            "listen": [f"tcp:{port}:interface=127.0.0.1"],
            "storages": {"pg": {"host": pg.socket_dir, "port": pg.port}},
            "routes": [{"database": "app", "user": "app", "storage": "pg",
                        "auth": {"method": "md5", "password": "app-secret"}}],
        })
        # (with the environment docs/operations.md's unit gives PyPy)
        proc = self.twistd("-y", str(ROOT / "odissey.tac"), env={"ODISSEY_CONFIG": path, "PYPY_GC_NURSERY": "16M"})
        try:
            answer = yield deferToThread(psql_until_up, port, "select 40 + 2", "app", "app-secret", "app")
            self.assertEqual(answer, "42")
        finally:
            out = yield deferToThread(stop, proc)
        self.assertNotIn("PYPY_GC_NURSERY", out)

    @inlineCallbacks
    def test_pgbench_through_the_process(self):
        """pgbench, simple and with prepared statements, through a transaction-mode pool
        of the process: no failed transaction."""
        if not shutil.which("pgbench"):
            raise SkipTest("pgbench not installed")
        pg = shared_postgres()
        port = free_port()
        path = self.write_config({
            "listen": [f"tcp:{port}:interface=127.0.0.1"],
            "storages": {"pg": {"host": pg.socket_dir, "port": pg.port}},
            "routes": [{"database": "app", "user": "app", "storage": "pg",
                        "auth": {"method": "md5", "password": "app-secret"},
                        "pool": {"mode": "transaction", "size": 4}}],
        })
        proc = self.twistd("odissey", "-c", path, env={"PYPY_GC_NURSERY": ""})

        def bench(mode: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["pgbench", "-n", "-S", "-M", mode, "-c", "8", "-j", "2", "-t", "300",
                 "-h", "127.0.0.1", "-p", str(port), "-U", "app", "app"],
                capture_output=True, text=True, env={**os.environ, "PGPASSWORD": "app-secret"}, timeout=120)

        try:
            yield deferToThread(psql_until_up, port, "select 1", "app", "app-secret", "app")
            for mode in ("simple", "prepared"):
                done = yield deferToThread(bench, mode)
                self.assertEqual(done.returncode, 0, done.stderr[-2000:])
                self.assertIn("number of failed transactions: 0 (0.000%)", done.stdout)
        finally:
            out = yield deferToThread(stop, proc)
        # twistd's own text lines (no log section; odissey.logs.speed_up_twistd_text):
        # pgbench's 8 logins and logouts each, in Twisted's classic format.
        logins = re.findall(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[odissey\.client#info\] "
                            r"c\d+: login app@app from 127\.0\.0\.1 \(pool app/app\)$", out, re.M)
        logouts = re.findall(r"^\S+ \[odissey\.client#info\] c\d+: logout app@app after \d+\.\ds$", out, re.M)
        self.assertGreaterEqual((len(logins), len(logouts)), (17, 17), out[-3000:])
        # Without PYPY_GC_NURSERY, PyPy's Odissey says what to set (odissey/pypy.py).
        advised = "PYPY_GC_NURSERY is not set" in out
        self.assertEqual(advised, "pypy" in os.path.basename(os.path.realpath(self.interpreter)), out[-3000:])


    def app_config(self, port: int, **top: object) -> str:
        """A config for the shared PostgreSQL's app database, in transaction mode, and
        trust user u_trust in session mode (trusted by PostgreSQL over TCP)."""
        pg = shared_postgres()
        return self.write_config({
            "listen": [f"tcp:{port}:interface=127.0.0.1"],
            "storages": {"pg": {"host": "127.0.0.1", "port": pg.port}},
            "routes": [{"database": "app", "user": "app", "storage": "pg",
                        "auth": {"method": "md5", "password": "app-secret"},
                        "pool": {"mode": "transaction", "size": 4}},
                       {"database": "app", "user": "u_trust", "storage": "pg",
                        "pool": {"mode": "session"}}],
            **top,
        })

    @inlineCallbacks
    def test_sigterm_lets_transaction_commit(self):
        """SIGTERM with a psycopg transaction in flight: the listener closes, the
        transaction commits, the client's next statement gets 57P01, the process exits."""
        port = free_port()
        proc = self.twistd("odissey", "-c", self.app_config(port))
        with direct() as su:  # (the PyPy run of this test comes after the CPython one)
            su.execute("delete from items where note = 'sigterm-commit'")

        def scenario() -> list[str]:
            psql_until_up(port, "select 1", "app", "app-secret", "app")
            seen = []
            with psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                 dbname="app", sslmode="disable", autocommit=True) as conn:
                notices = watch_notices(conn)
                conn.execute("begin")
                conn.execute("insert into items values (7201, 'sigterm-commit')")
                conn.pgconn.send_query(b"select pg_sleep(0.5)")  # in flight at the signal
                proc.send_signal(signal.SIGTERM)
                wait_refused(port)
                seen.append(str(conn.pgconn.get_result().status))
                while conn.pgconn.get_result() is not None:
                    pass
                conn.execute("commit")
                seen.append("committed")
                seen.append(ended(conn, notices))
            return seen

        try:
            seen = yield deferToThread(scenario)
            out, _ = yield deferToThread(proc.communicate, timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        self.assertEqual(seen, ["2", "committed", "57P01"])  # 2: TUPLES_OK
        with direct() as su:
            self.assertEqual(su.execute("select count(*) from items where note = 'sigterm-commit'")
                             .fetchone()[0], 1)
        self.assertEqual(proc.returncode, 0, out)

    @inlineCallbacks
    def test_second_sigterm_exits_at_once(self):
        """During a graceful stop that waits for a session, a second SIGTERM ends the
        session (57P01) and the process exits long before shutdown_timeout."""
        port = free_port()
        proc = self.twistd("odissey", "-c", self.app_config(port, shutdown_timeout="5m"))

        def scenario() -> str:
            psql_until_up(port, "select 1", "u_trust", "", "app")
            with psycopg.connect(host="127.0.0.1", port=port, user="u_trust", dbname="app",
                                 sslmode="disable", autocommit=True) as conn:
                proc.send_signal(signal.SIGTERM)
                wait_refused(port)
                conn.execute("select 1")  # the session goes on
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
                try:
                    conn.execute("select 1")
                except psycopg.errors.AdminShutdown:
                    return "57P01"
                except psycopg.OperationalError as exc:
                    return f"closed: {exc}"
            return "served"

        try:
            told = yield deferToThread(scenario)
            out, _ = yield deferToThread(proc.communicate, timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        self.assertEqual(told, "57P01", out)
        self.assertIn("ending every client now", out)
        self.assertEqual(proc.returncode, 0, out)

    @inlineCallbacks
    def test_sighup_reloads(self):
        """SIGHUP with a broken file logs each problem and changes nothing; with a good
        one that moves the listener, the new port serves and the old one refuses."""
        port, moved = free_port(), free_port()
        path = self.app_config(port)
        proc = self.twistd("odissey", "-c", path)
        document = yaml.safe_load(Path(path).read_text())

        def scenario() -> str:
            psql_until_up(port, "select 1", "app", "app-secret", "app")
            broken = {**document, "shutdown_timeout": "soon"}
            Path(path).write_text(yaml.safe_dump(broken))
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)  # (nothing to await: the proof is that nothing changes)
            served = psql_until_up(port, "select 'still'", "app", "app-secret", "app")
            Path(path).write_text(yaml.safe_dump({**document, "listen": [
                f"tcp:{moved}:interface=127.0.0.1"]}))
            proc.send_signal(signal.SIGHUP)
            wait_refused(port)
            return served + "/" + psql_until_up(moved, "select 'moved'", "app", "app-secret", "app")

        try:
            answer = yield deferToThread(scenario)
        finally:
            out = yield deferToThread(stop, proc)
        self.assertEqual(answer, "still/moved", out)
        self.assertIn('reload refused: shutdown_timeout: must be a duration like 30s, got "soon"', out)
        self.assertIn("no longer listening on", out)

    @inlineCallbacks
    def test_systemd_notify_and_socket_activation(self):
        """Started the way systemd starts a Type=notify, socket-activated unit (the
        listening socket inherited as fd 3 with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, NOTIFY_SOCKET an
        abstract name, a watchdog): clients are served on the inherited socket, and
        READY=1, WATCHDOG=1, RELOADING=1 (SIGHUP) then READY=1, STOPPING=1 (SIGTERM)
        arrive in that order."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        name = f"odissey-tap-{os.getpid()}-{port}"
        notes = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notes.bind("\0" + name)
        notes.settimeout(30)
        self.addCleanup(notes.close)
        path = self.app_config(port)
        document = yaml.safe_load(Path(path).read_text())
        document["listen"] = ["systemd:domain=INET:name=odissey"]
        Path(path).write_text(yaml.safe_dump(document))
        proc = subprocess.Popen(
            ["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=odissey; exec "$@" 3<&0 0</dev/null', "sh",
             *self.twistd_command(), "--pidfile=", "-n", "odissey", "-c", path],
            stdin=listener.fileno(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"}, cwd=ROOT)
        listener.close()  # (the child has it)

        def received() -> str:
            while True:
                message = notes.recv(4096).decode()
                if message != "WATCHDOG=1":
                    return message.split("\n")[0]

        def scenario() -> list[str]:
            seen = [notes.recv(4096).decode().split("\n")[0]]  # READY=1, before any client
            seen.append(notes.recv(4096).decode())  # the watchdog starts with it
            seen.append(psql_until_up(port, "select 'activated'", "app", "app-secret", "app"))
            proc.send_signal(signal.SIGHUP)
            seen += [received(), received()]
            proc.send_signal(signal.SIGTERM)
            seen.append(received())
            return seen

        try:
            seen = yield deferToThread(scenario)
            out, _ = yield deferToThread(proc.communicate, timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        self.assertEqual(seen, ["READY=1", "WATCHDOG=1", "activated", "RELOADING=1", "READY=1",
                                "STOPPING=1"], out)

    @inlineCallbacks
    def test_online_restart_under_pgbench(self):
        """A second process started with the same configuration (handover_socket) takes
        the listening socket while ``pgbench -C`` (a new connection per transaction) runs
        against the first: the first drains and exits, pgbench sees no failed
        transaction, and a third process takes over from the second the same way. The
        metrics endpoint's socket goes along (the old process holds its address until
        it exits): the third process serves it."""
        if not shutil.which("pgbench"):
            raise SkipTest("pgbench not installed")
        port = free_port()
        directory = tempfile.mkdtemp(prefix="odissey-handover-")  # (unix paths are short)
        self.addCleanup(shutil.rmtree, directory, True)
        socket_path = os.path.join(directory, "handover.sock")
        metrics_port = free_port()
        path = self.app_config(port, handover_socket=socket_path,
                               metrics={"listen": f"tcp:{metrics_port}:interface=127.0.0.1"})
        logs: list[Path] = []

        def start() -> subprocess.Popen[str]:
            # (a login and a logout line per pgbench -C transaction: more than a pipe holds)
            logs.append(Path(directory) / f"odissey-{len(logs)}.log")
            with logs[-1].open("w") as output:
                return self.twistd("odissey", "-c", path, output=output)

        first = start()
        processes = [first]

        def bench() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["pgbench", "-n", "-S", "-C", "-c", "4", "-j", "2", "-T", "8",
                 "-h", "127.0.0.1", "-p", str(port), "-U", "app", "app"],
                capture_output=True, text=True, env={**os.environ, "PGPASSWORD": "app-secret"},
                timeout=120)

        def restart(old: subprocess.Popen[str]) -> subprocess.Popen[str]:
            new = start()
            processes.append(new)
            old.wait(timeout=60)
            return new

        try:
            yield deferToThread(psql_until_up, port, "select 1", "app", "app-secret", "app")
            running = deferToThread(bench)
            yield deferToThread(time.sleep, 2)
            second = yield deferToThread(restart, first)
            yield deferToThread(time.sleep, 2)
            yield deferToThread(restart, second)
            done = yield running
            answer = yield deferToThread(psql_until_up, port, "select 'third'", "app", "app-secret", "app")
            scraped = yield deferToThread(scrape, metrics_port)
        finally:
            for proc in processes:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                yield deferToThread(proc.wait, timeout=60)
            outs = [log.read_text() for log in logs]
        self.assertEqual(done.returncode, 0, done.stderr[-2000:] + "\n".join(outs))
        self.assertIn("number of failed transactions: 0 (0.000%)", done.stdout)
        self.assertEqual(answer, "third", "\n".join(outs))
        self.assertIn("handed the listening sockets over to a new process", outs[0])
        self.assertIn("(socket taken over)", outs[1])
        self.assertIn("(socket taken over)", outs[2])
        self.assertIn(f"serving metrics on tcp:{metrics_port}:interface=127.0.0.1 (socket taken over)", outs[2])
        served = re.search(r'odissey_pool_transactions_total\{database="app",route="",user="app"\} (\S+)', scraped)
        self.assertGreaterEqual(float(served.group(1)) if served else 0.0, 1.0, scraped)
        self.assertEqual((first.returncode, second.returncode), (0, 0), outs[0])

    @inlineCallbacks
    def test_failed_takeover_leaves_the_old_process_listening(self):
        """A new process that takes the listening sockets but fails before it confirms
        (here its metrics address is taken) gives them back untouched: the old process
        still accepts on TCP and on its unix socket, whose path is still there."""
        port = free_port()
        directory = tempfile.mkdtemp(prefix="odissey-takeover-")  # (unix paths are short)
        self.addCleanup(shutil.rmtree, directory, True)
        listen = [f"tcp:{port}:interface=127.0.0.1", f"unix:{directory}/.s.PGSQL.{port}"]
        handover = os.path.join(directory, "handover.sock")
        old = self.twistd("odissey", "-c", self.app_config(port, listen=listen, handover_socket=handover))
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        broken = self.app_config(port, listen=listen, handover_socket=handover,
                                 metrics={"listen": f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"})

        def over_unix() -> str:
            done = subprocess.run(
                ["psql", "-X", "-h", directory, "-p", str(port), "-U", "app", "-d", "app", "-Atc", "select 'unix'"],
                capture_output=True, text=True, env={**os.environ, "PGPASSWORD": "app-secret"}, timeout=30)
            return done.stdout.strip() or done.stderr

        try:
            self.assertEqual((yield deferToThread(psql_until_up, port, "select 1", "app", "app-secret", "app")), "1")
            new = self.twistd("odissey", "-c", broken)
            out, _ = yield deferToThread(new.communicate, timeout=60)
            self.assertIn("Odissey could not start", out)
            self.assertEqual(new.returncode, 1, out)
            self.assertIn("(socket taken over)", out)
            self.assertEqual((yield deferToThread(psql_until_up, port, "select 'tcp'", "app", "app-secret", "app", 5)),
                             "tcp")
            self.assertEqual((yield deferToThread(over_unix)), "unix")
            self.assertIsNone(old.poll())
        finally:
            yield deferToThread(stop, old)

    @inlineCallbacks
    def test_log_section(self):
        """With log {format: json, connections: off} every line of the process is a JSON
        object; a wrong password gives one login-failure line with user, database and
        address (not the password), a good login none (connections off), and no
        "Starting factory" line appears for server connections."""
        port = free_port()
        proc = self.twistd("odissey", "-c", self.app_config(
            port, log={"format": "json", "level": "info", "connections": False}))
        try:
            answer = yield deferToThread(psql_until_up, port, "select 'up'", "app", "app-secret", "app")
            refused = yield deferToThread(psql_until_up, port, "select 1", "app", "not-it", "app", 0)
        finally:
            out = yield deferToThread(stop, proc)
        self.assertEqual(answer, "up")
        self.assertIn("password authentication failed", refused)
        events = []
        for line in out.splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
            else:  # only twistd's own lines before and after logging starts may be text
                self.assertRegex(line, r"^\S+ \[twisted\.", line)
        formats = [e.get("log_format", "") for e in events]
        failures = [e for e in events if e.get("log_format", "").startswith("{id}: login failed for")]
        self.assertEqual(len(failures), 1, formats)
        self.assertEqual((failures[0]["user"], failures[0]["database"], failures[0]["client"],
                          failures[0]["sqlstate"]), ("app", "app", "127.0.0.1", "28P01"))
        # (as Twisted's eventAsJSON writes an event: flattened fields, the level by name)
        self.assertEqual((failures[0]["log_flattened"]["user!s:"], failures[0]["log_level"]["name"],
                          failures[0]["log_logger"]), ("app", "info", {"unpersistable": True}))
        self.assertNotIn("not-it", out)
        self.assertFalse([f for f in formats if f.startswith("{id}: login {user}")], formats)
        self.assertNotIn("Starting factory", out)


def wait_refused(port: int, patience: float = 20) -> None:
    """Block until nothing listens on ``port``."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise AssertionError(f"port {port} still accepts connections")


class PyPyTapTests(TapTests):
    """The same, with Odissey under PyPy 3 (the tests' clients stay on CPython)."""

    interpreter = PYPY

    def setUp(self) -> None:
        if not os.access(PYPY, os.X_OK):
            raise SkipTest(f"no PyPy at {PYPY} (.ci/install test sets it up where pypy3 can be installed)")
        ready = subprocess.run([PYPY, "-c", "import twisted, yaml, scramp, OpenSSL, service_identity"],
                               capture_output=True, text=True)
        if ready.returncode != 0:
            raise SkipTest(f"PyPy at {PYPY} lacks Odissey's dependencies: {ready.stderr.strip()[-200:]}")
