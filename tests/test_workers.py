"""Multi-worker Odissey as a real ``twistd odissey`` process with 2 and 3 workers, in
front of the tests' PostgreSQL, driven by psycopg and raw-protocol clients."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from odissey.cancel import KeyLayout
from tests.harness import APP_PASSWORD, direct, free_port, shared_postgres, trust_login_keyed
from tests.test_tap import BOOT, ROOT


def app_backends() -> int:
    """Server connections PostgreSQL has for user app (the pooler's)."""
    with direct() as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'"
        ).fetchone()[0]


class Process:
    """A ``twistd -n odissey`` process; its output is collected by a thread."""

    def __init__(self, config_path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *BOOT, "--pidfile=", "-n", "odissey", "-c", config_path],
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


class WorkersTests(TestCase):
    timeout = 240

    def start(self, workers: int, pool: dict[str, Any] | None = None, listen: list[str] | None = None) -> tuple[Process, int]:
        """Odissey with ``workers`` workers: route app/app (scram) and u_trust (trust)."""
        pg = shared_postgres()
        port = free_port()
        pool_settings = {"mode": "transaction", "size": 4, "wait_timeout": "10s", **(pool or {})}
        document = {
            "workers": workers,
            "listen": listen or [f"tcp:{port}:interface=127.0.0.1"],
            "storages": {"pg": {"host": pg.socket_dir, "port": pg.port}},
            "routes": [
                {"database": "app", "user": "app", "storage": "pg",
                 "auth": {"method": "scram-sha-256", "password": APP_PASSWORD}, "pool": pool_settings},
                {"database": "app", "user": "u_trust", "storage": "pg", "server": {"user": "app", "password": APP_PASSWORD},
                 "auth": {"method": "trust"}, "pool": pool_settings},
            ],
        }
        path = Path(self.mktemp() + ".yaml").resolve()
        path.write_text(yaml.safe_dump(document))
        process = Process(str(path))
        self.addCleanup(process.stop)
        for number in range(workers):
            process.wait_for(rf"\[worker {number}\] accepting on")
        return process, port

    def connect(self, port: int, **extra: Any) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=port, user="app", password=APP_PASSWORD,
                               dbname="app", autocommit=True, **extra)

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
