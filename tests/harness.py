"""Integration harness: one real PostgreSQL per test run, Odissey in-process, real clients.

The PostgreSQL is started on first use and stopped at interpreter exit. Its roles cover
every server-side authentication method; its pg_hba.conf says which method each uses.
Odissey runs on the trial reactor; blocking clients (psycopg, psql, pgbench) run in
threads or subprocesses so the reactor keeps serving them.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import time
from typing import Any, Callable

import psycopg
from psycopg.conninfo import make_conninfo
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from odissey import config
from odissey.auth.secrets import md5_hash
from odissey.postgres import LocalPostgres
from odissey.service import OdisseyService
from odissey.wire import messages as m


APP_PASSWORD = "app-secret"
USERS = {
    "app": APP_PASSWORD,
    "u_trust": "trust-pw",
    "u_clear": "clear-pw",
    "u_md5": md5_hash("md5-pw", "u_md5"),  # stored as md5 by PostgreSQL
    "u_scram": "scram-pw",
}
SERVER_HBA = (
    "host all u_trust 127.0.0.1/32 trust",
    "host all u_clear 127.0.0.1/32 password",
    "host all u_md5 127.0.0.1/32 md5",
)

_postgres: LocalPostgres | None = None
_postgres_failure: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shared_postgres() -> LocalPostgres:
    """The run's PostgreSQL, started on first use (blocking, about a second).

    A start that fails (a port taken between picking and binding it, a slow machine) is
    tried once more on a new port; if that fails too, every later test gets the same
    error at once instead of starting servers of its own.
    """
    global _postgres, _postgres_failure
    if _postgres is None:
        if _postgres_failure is not None:
            raise RuntimeError(f"the tests' PostgreSQL could not start: {_postgres_failure}")
        for attempt in (1, 2):
            pg = LocalPostgres(
                port=free_port(),
                users=USERS,
                databases={"app": "app"},
                hba=SERVER_HBA,
                settings={"listen_addresses": "127.0.0.1", "max_connections": "400"},
            )
            try:
                _prepare(pg)
            except Exception as exc:
                log_tail = _log_tail(pg)
                pg.stop()
                if attempt == 2:
                    _postgres_failure = f"{exc}\n{log_tail}"
                    raise
                continue
            atexit.register(pg.stop)
            _postgres = pg
            break
    assert _postgres is not None
    return _postgres


def _prepare(pg: LocalPostgres) -> None:
    pg.start()
    pg.psql(
        "GRANT ALL ON SCHEMA public TO PUBLIC;"
        "CREATE TABLE items (id int primary key, note text);"
        "GRANT ALL ON items TO PUBLIC;",
        database="app",
    )
    if have("pgbench"):  # tables for the pgbench tests, owned by app
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", "1", "-h", pg.socket_dir, "-p", str(pg.port), "-U", "app", "app"],
            check=True, capture_output=True, env={**os.environ, "PGPASSWORD": APP_PASSWORD},
        )


def _log_tail(pg: LocalPostgres) -> str:
    try:
        with open(os.path.join(pg.data_dir, "server.log")) as log:
            return "".join(log.readlines()[-20:])
    except OSError:
        return ""


def route(
    database: str = "app",
    user: str = "app",
    *,
    auth: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"database": database, "user": user, "storage": "pg"}
    out["auth"] = auth if auth is not None else {"method": "scram-sha-256", "password": APP_PASSWORD}
    if server is not None:
        out["server"] = server
    out["pool"] = {"mode": "session", "size": 4, "wait_timeout": "5s", **(pool or {})}
    return out


class Odissey:
    """An Odissey service on an ephemeral port in front of the shared PostgreSQL."""

    def __init__(
        self, routes: list[dict[str, Any]], limits: dict[str, Any] | None = None, storage_port: int | None = None,
        listen: list[str] | None = None, top: dict[str, Any] | None = None,
    ) -> None:
        self.pg = shared_postgres()
        port = storage_port or self.pg.port
        document = {
            "listen": listen or ["tcp:0:interface=127.0.0.1"],  # the first must be TCP: self.port
            "storages": {"pg": {"host": "127.0.0.1", "port": port, "connect_timeout": "10s"}},
            "routes": routes,
        }
        if limits:
            document["limits"] = limits
        document.update(top or {})  # more top-level keys (admin_users, ...)
        self.config = config.parse(document)
        self.service = OdisseyService(self.config, reactor)
        self.port = 0

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        self.service.startService()
        ports = yield self.service.ready
        self.port = ports[0].getHost().port

    def stop(self) -> "Deferred[None]":
        return self.service.stopService()

    def dsn(self, user: str = "app", password: str | None = APP_PASSWORD, dbname: str = "app", **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": user, "dbname": dbname,
                 "sslmode": "disable", **extra}
        if password is not None:
            parts["password"] = password
        return make_conninfo(**parts)

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        """A psycopg connection through Odissey, with psycopg's defaults (it prepares a
        statement after five executions) except autocommit, on unless asked otherwise."""
        autocommit = kwargs.pop("autocommit", True)
        return psycopg.connect(self.dsn(**kwargs), autocommit=autocommit, connect_timeout=10)

    def env(self, password: str = APP_PASSWORD) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable"}

    def psql(self, sql: str, user: str = "app", password: str = APP_PASSWORD, dbname: str = "app") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", dbname,
             "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            capture_output=True, text=True, env=self.env(password), timeout=60,
        )


def run_seed(test: Any) -> int:
    """The seed of a randomised test's run: ``ODISSEY_SEED`` when set, else a new one.
    Printed, so that a failure seen in CI can be replayed with the same choices."""
    seed = int(os.environ.get("ODISSEY_SEED") or random.randrange(1 << 32))
    print(f"{test.id()}: seed {seed} (replay with ODISSEY_SEED={seed})")
    return seed


def until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> "Deferred[None]":
    """Wait on the reactor until ``condition()`` holds; fail after ``timeout`` seconds."""
    @inlineCallbacks
    def waiting():  # type: ignore[no-untyped-def]
        deadline = reactor.seconds() + timeout
        while not condition():
            if reactor.seconds() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}")
            yield deferLater(reactor, interval, lambda: None)

    return waiting()


def direct(user: str = "postgres", dbname: str = "app", **extra: str) -> psycopg.Connection:
    """A connection straight to PostgreSQL (superuser, over its socket) for checking, or
    for comparing (``extra``: more connection parameters)."""
    pg = shared_postgres()
    return psycopg.connect(host=pg.socket_dir, port=pg.port, user=user, dbname=dbname, autocommit=True, **extra)


def server_pids(user: str = "app") -> set[int]:
    """Backend pids of client connections PostgreSQL sees for ``user``."""
    with direct() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
            (user,),
        ).fetchall()
    return {r[0] for r in rows}


class IntegrationTest(unittest.TestCase):
    """Starts an Odissey with :meth:`routes` before each test and stops it after."""

    timeout = 120
    limits: dict[str, Any] | None = None
    storage_port: int | None = None  # None: the shared PostgreSQL
    #: More top-level configuration keys (admin_users, stats_users, ...).
    top: dict[str, Any] | None = None

    def listeners(self) -> list[str] | None:
        """Odissey's ``listen`` list for this test, the first entry a TCP port (None: one
        TCP port on 127.0.0.1)."""
        return None

    def routes(self) -> list[dict[str, Any]]:
        return [route()]

    def setUp(self) -> Deferred[None]:
        # Blocking clients get their own threads: in the reactor's pool (which Odissey
        # uses for PBKDF2) a hundred blocked clients would starve the pooler they wait for.
        self.clients = ThreadPool(minthreads=0, maxthreads=200, name="test-clients")
        self.clients.start()
        self.odissey = Odissey(self.routes(), self.limits, self.storage_port, self.listeners(),
                               self.top)
        return self.odissey.start()

    @inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.odissey.stop()
        self.clients.stop()

    def thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, self.clients, f, *args, **kwargs)

    def backend_pid(self) -> int:
        """Log in and ask which backend serves us."""
        with self.odissey.connect() as conn:
            return int(conn.execute("select pg_backend_pid()").fetchone()[0])

    def vanish_inside_transaction(self, row_id: int, note: str) -> int:
        """Insert a row inside a transaction, then vanish; return the backend pid used."""
        conn = self.odissey.connect()
        conn.execute("begin")
        conn.execute("insert into items values (%s, %s)", (row_id, note))
        pid = int(conn.execute("select pg_backend_pid()").fetchone()[0])
        vanish(conn)
        return pid

    def vanish_during(self, sql: bytes) -> int:
        """Start ``sql``, vanish 0.3 s later; return the backend pid the client had."""
        conn = self.odissey.connect()
        pid = int(conn.execute("select pg_backend_pid()").fetchone()[0])
        conn.pgconn.send_query(sql)
        time.sleep(0.3)
        vanish(conn)
        return pid

    def query_outcome(self) -> str:
        """Log in and run one query: "served", or the refusal's SQLSTATE and message."""
        with self.odissey.connect() as conn:
            try:
                conn.execute("select 1")
            except psycopg.OperationalError as exc:
                return f"{exc.sqlstate} {exc}"
        return "served"


def sqlstates(conn: psycopg.Connection) -> list[str]:
    """Collect every result of a query sent with ``conn.pgconn.send_query``: the SQLSTATE of
    each error, "" for each success. libpq's PQgetResult blocks while holding the GIL
    when its answer has not fully arrived, which would freeze the in-process Odissey
    that must send it; so each result is fetched only once PQisBusy says it is there."""
    states = []
    pgconn = conn.pgconn
    while True:
        while pgconn.is_busy():
            pgconn.consume_input()
            time.sleep(0.002)
        result = pgconn.get_result()
        if result is None:
            return states
        state = result.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
        states.append(state.decode() if state else "")


def watch_notices(conn: psycopg.Connection) -> list[str | None]:
    """The SQLSTATEs of the notices ``conn`` receives from now on (see :func:`ended`)."""
    seen: list[str | None] = []
    conn.add_notice_handler(lambda diagnostic: seen.append(diagnostic.sqlstate))
    return seen


def ended(conn: psycopg.Connection, notices: list[str | None], sql: str = "select 1") -> str:
    """Run ``sql`` on a connection Odissey is ending: "57P01", or what happened instead.

    libpq turns a FATAL it reads while idle, before it sends ``sql``, into a notice, and
    ``sql`` then meets only the closed connection (as after PostgreSQL's own
    pg_terminate_backend of an idle session): that counts as 57P01 when the notice was
    57P01 (``notices`` from :func:`watch_notices`)."""
    try:
        conn.execute(sql)
    except psycopg.errors.AdminShutdown:
        return "57P01"
    except psycopg.OperationalError as exc:
        if "closed the connection unexpectedly" in str(exc) and notices == ["57P01"]:
            return "57P01"
        return f"{type(exc).__name__}: {exc}; notices {notices}"
    return "served"


def trust_login(port: int) -> socket.socket:
    """A raw socket logged in as the trust user u_trust, ready for queries."""
    return trust_login_keyed(port)[0]


def trust_login_keyed(port: int) -> tuple[socket.socket, tuple[int, int]]:
    """:func:`trust_login`, and the cancel key (pid, secret) Odissey gave the session."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(m.startup_message({"user": "u_trust", "database": "app"}))
    data = b""
    while not data.endswith(m.ready_for_query(b"I")):
        data += sock.recv(65536)
    at = data.index(b"K\0\0\0\x0c") + 5
    return sock, m.parse_backend_key_data(data[at:at + 8])


def login_outcome(port: int, user: str = "u_trust", database: str = "app", **params: str) -> tuple[str, str]:
    """Log in as a trust user with these startup parameters: ("ready", "") or the FATAL's
    (SQLSTATE, message), which libpq does not give its callers at login."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": user, "database": database, **params}))
        data = b""
        while True:
            kind, body, data = read_message(sock, data)
            if kind == b"Z":
                return "ready", ""
            if kind == b"E":
                fields = m.parse_error_fields(body)
                return fields["C"], fields["M"]


def send_cancel_request(port: int, key: tuple[int, int]) -> None:
    """Send a CancelRequest to Odissey and wait until it has closed that connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(m.cancel_request(*key))
        while sock.recv(1024):
            pass


def read_message(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes, bytes]:
    """The next whole backend message on a raw socket: (type, body, what is left over)."""
    while len(buffer) < 5 or len(buffer) < 1 + int.from_bytes(buffer[1:5], "big"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by Odissey")
        buffer += chunk
    end = 1 + int.from_bytes(buffer[1:5], "big")
    return buffer[:1], buffer[5:end], buffer[end:]


class Replies:
    """Reads a raw connection's replies: first-column text of each DataRow (or line of
    COPY data), how many ReadyForQuery came, the SQLSTATE of each ErrorResponse."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.rows: list[str] = []
        self.ready = 0
        self.errors: list[str] = []  # SQLSTATE of each ErrorResponse

    def until(self, ready: int) -> bytes:
        """Read until ``ready`` ReadyForQuery in all have come; the messages read now."""
        read = []
        while self.ready < ready:
            kind, body, self.buffer = read_message(self.sock, self.buffer)
            read.append(kind + (len(body) + 4).to_bytes(4, "big") + body)
            if kind == b"D":
                size = int.from_bytes(body[2:6], "big")
                self.rows.append(body[6:6 + size].decode())
            elif kind == b"d":  # COPY TO STDOUT: one text line per row
                self.rows.append(body.decode().rstrip("\n"))
            elif kind == b"Z":
                self.ready += 1
            elif kind == b"E":
                self.errors.append(m.parse_error_fields(body).get("C", ""))
        return b"".join(read)


def vanish(conn: psycopg.Connection) -> None:
    """Cut a client's TCP connection the way a crashed process would."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()


def committed(note: str) -> bool:
    """Did any row with this note reach the table (checked directly on PostgreSQL)?"""
    with direct() as su:
        return bool(su.execute("select count(*) from items where note = %s", (note,)).fetchone()[0])


def have(program: str) -> bool:
    return shutil.which(program) is not None
