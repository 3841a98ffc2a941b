"""A throwaway local PostgreSQL: initdb, start, create roles and databases, stop.

Used by the demo configuration (a storage with ``managed:``) and by the test suite. The
server listens on a unix socket inside its own directory (and on TCP only when asked), so
it never collides with a PostgreSQL already running on the machine. ``initdb`` and
``postgres`` refuse to run as root, so when Odissey runs as root they run as the
``postgres`` OS user. Every call here blocks: the service runs them in a thread.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

DEFAULT_HBA = (
    "local all postgres trust",
    "local all all scram-sha-256",
    "host all all 127.0.0.1/32 scram-sha-256",
)


class PostgresError(Exception):
    """A PostgreSQL binary failed; the message holds its output."""


def find_bindir() -> str:
    """Where initdb/pg_ctl live: ``pg_config --bindir``, else Debian's newest version."""
    candidates = []
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        candidates.append(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for bindir in candidates:
        if os.path.exists(os.path.join(bindir, "initdb")) and os.path.exists(
            os.path.join(bindir, "pg_ctl")
        ):
            return bindir
    raise PostgresError(
        "PostgreSQL server binaries not found (install the postgresql package)"
    )


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _quote_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class LocalPostgres:
    """One managed PostgreSQL cluster.

    ``data_dir=None`` makes a temporary directory that :meth:`stop` removes.
    ``settings`` go to postgresql.conf (``listen_addresses`` turns TCP on).
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        port: int = 5432,
        users: Mapping[str, str] | None = None,
        databases: Mapping[str, str] | None = None,
        hba: Iterable[str] = (),
        settings: Mapping[str, str] | None = None,
        bindir: str | None = None,
    ) -> None:
        self.port = port
        self.users = dict(users or {})
        self.databases = dict(databases or {})
        self.hba = tuple(hba)
        self.settings = dict(settings or {})
        self.bindir = bindir
        self._given_dir = data_dir
        self.data_dir = data_dir or ""
        self.running = False

    @property
    def socket_dir(self) -> str:
        return self.data_dir

    @property
    def run_as(self) -> str | None:
        """The OS user the server runs as: ``postgres`` when we are root, else ourselves."""
        return "postgres" if os.geteuid() == 0 else None

    def _run(self, args: list[str], as_server: bool = True) -> str:
        user = self.run_as if as_server else None
        try:
            done = subprocess.run(
                args, capture_output=True, text=True, user=user, cwd="/", timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresError(f"{args[0]}: {exc}") from None
        if done.returncode != 0:
            raise PostgresError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        bindir = self.bindir or find_bindir()
        self.bindir = bindir
        if not self.data_dir:
            self.data_dir = tempfile.mkdtemp(prefix="odissey-pg-")
        path = Path(self.data_dir)
        path.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            info = pwd.getpwnam(self.run_as)
            os.chown(path, info.pw_uid, info.pw_gid)
        path.chmod(0o700)
        fresh = not (path / "PG_VERSION").exists()
        if fresh:
            self._run([
                f"{bindir}/initdb", "-D", self.data_dir, "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--no-sync",
            ])
            self._write_config()
        self._run([
            f"{bindir}/pg_ctl", "-D", self.data_dir, "-l", f"{self.data_dir}/server.log",
            "-w", "-t", "60", "start",
        ])
        self.running = True
        if fresh:
            self._create_objects()

    def _write_config(self) -> None:
        settings = {
            "port": str(self.port),
            "unix_socket_directories": _quote_literal(self.data_dir),
            "listen_addresses": "''",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
        }
        for key, value in self.settings.items():
            settings[key] = _quote_literal(value) if key == "listen_addresses" else value
        conf = "".join(f"{key} = {value}\n" for key, value in settings.items())
        with open(f"{self.data_dir}/postgresql.auto.conf", "a") as fh:
            fh.write(conf)
        hba = "\n".join((*self.hba, *DEFAULT_HBA)) + "\n"
        Path(f"{self.data_dir}/pg_hba.conf").write_text(hba)

    def _create_objects(self) -> None:
        statements = []
        for user, password in self.users.items():
            statements.append(
                f"CREATE ROLE {_quote_ident(user)} LOGIN PASSWORD {_quote_literal(password)}"
            )
        if statements:
            self.psql(";\n".join(statements))
        for database, owner in self.databases.items():
            self.psql(f"CREATE DATABASE {_quote_ident(database)} OWNER {_quote_ident(owner)}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; returns unaligned tuples."""
        return self._run(
            [
                f"{self.bindir}/psql", "-X", "-q", "-h", self.socket_dir, "-p", str(self.port),
                "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql,
            ],
            as_server=False,
        )

    def stop(self) -> None:
        if self.running:
            self.running = False
            try:
                self._run([f"{self.bindir}/pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "stop"])
            except PostgresError:
                self._run([f"{self.bindir}/pg_ctl", "-D", self.data_dir, "-m", "immediate", "stop"])
        if self._given_dir is None and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = ""
