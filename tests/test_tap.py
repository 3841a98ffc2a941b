"""The twistd plugin and the .tac file, run as real processes, and ``--check``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import free_port, shared_postgres

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

    def twistd(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.twistd_command(), "--pidfile=", "-n", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), out)  # twistd re-raises SIGTERM
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
        proc = self.twistd("-y", str(ROOT / "odissey.tac"), env={"ODISSEY_CONFIG": path})
        try:
            answer = yield deferToThread(psql_until_up, port, "select 40 + 2", "app", "app-secret", "app")
            self.assertEqual(answer, "42")
        finally:
            yield deferToThread(stop, proc)

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
        proc = self.twistd("odissey", "-c", path)

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
            yield deferToThread(stop, proc)


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
