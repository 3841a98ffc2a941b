"""Fakes for tests of Odissey and of code built on it (like ``treq.testing``).

``FakeServers`` stands in for the connector a Pool uses: each connection attempt is a
Deferred the test completes or fails by hand, so pool behaviour can be driven step by
step on a ``MemoryReactorClock`` without any network.

``FakeBackend`` is a PostgreSQL stand-in for one real :class:`ServerConnection`: it reads
what the connection wrote to its ``StringTransport`` and answers through ``dataReceived``,
by a few rules (login, simple and extended queries, SET, transactions, errors, COPY FROM
STDIN, a query held until cancelled). Nothing moves until the test calls
:meth:`FakeBackend.flush`, so every interleaving is the test's choice. ``FakeClient`` is
the relay's side of a client connection, and ``FakeBackends`` a Pool connector that opens
fake backends, so a Relay, its Pool and the reset policy run on one ``MemoryReactorClock``.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from odissey.config import Secret, Storage
from odissey.flow import Valve
from odissey.params import CODECS
from odissey.server import LoginInfo, ServerConnection, ServerState
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError

_ids = itertools.count(1)


def in_this_thread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> "Deferred[Any]":
    """An ``InThread`` that runs the work at once, in the caller's thread."""
    return maybeDeferred(f, *args, **kwargs)


class FakeServer:
    """The parts of a ServerConnection a Pool looks at."""

    def __init__(self, params: list[tuple[str, str]] | None = None, now: float = 0.0) -> None:
        self.id = f"fake{next(_ids)}"
        self.created_at = self.used_at = now
        self.touched = self.retiring = False
        self.state = ServerState.IDLE
        self.last_client: str | None = None
        self.login_params = params or [
            ("application_name", ""), ("server_version", "15.0"), ("TimeZone", "UTC")]
        self.owner: object = None
        self.closed: Deferred[None] = Deferred()

    def close(self) -> None:
        if self.state is not ServerState.CLOSED:
            self.state = ServerState.CLOSED
            self.closed.callback(None)

    def abort(self) -> None:
        self.close()


class FakeServers:
    """A connector whose connection attempts wait for the test to finish them."""

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock = clock
        self.attempts: list[Deferred[FakeServer]] = []

    def __call__(self) -> "Deferred[FakeServer]":
        attempt: Deferred[FakeServer] = Deferred()
        self.attempts.append(attempt)
        return attempt

    def succeed_next(self) -> FakeServer:
        server = FakeServer(now=self.clock.seconds() if self.clock else 0.0)
        self.attempts.pop(0).callback(server)
        return server

    def fail_next(self, error: Exception) -> None:
        self.attempts.pop(0).errback(error)


# -- a fake PostgreSQL -------------------------------------------------------------------

#: What a fresh fake backend reports at login.
DEFAULT_PARAMS = (
    ("application_name", ""), ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"),
    ("server_encoding", "UTF8"), ("server_version", "16.0"), ("TimeZone", "UTC"),
)
#: Parameters PostgreSQL reports with a ParameterStatus when they change.
REPORTED = frozenset(name.lower() for name, _ in DEFAULT_PARAMS)
#: A storage whose cancel requests go to a MemoryReactor's connectTCP.
STORAGE = Storage(name="pg", host="127.0.0.1", port=5432, connect_timeout=2.0)

_SET = re.compile(
    r"""\s*(SET|RESET)\s+(LOCAL\s+)?("(?:[^"]|"")*"(?:\."(?:[^"]|"")*")*|[\w.]+)"""
    r"""(?:\s+TO\s+E?'((?:[^'\\]|''|\\.)*)')?\s*$""", re.I | re.S)


def spelled(name: str, value: str, current: str) -> str:
    """A value as PostgreSQL reports it: client_encoding by its canonical name
    (``utf-8`` is ``UTF8``), DateStyle as both its parts, a part not given kept from
    ``current`` (``iso`` after ``ISO, MDY`` is ``ISO, MDY``); others as given."""
    key = name.lower()
    if key == "client_encoding":
        plain = re.sub(r"[^A-Z0-9]", "", value.upper())
        return "UTF8" if plain == "UNICODE" else _ENCODINGS.get(plain, value)
    if key == "datestyle":
        style, order = (part.strip() for part in (current.split(",") + [""])[:2])
        for part in value.split(","):
            part = part.strip().upper()
            if part in ("ISO", "SQL", "POSTGRES", "GERMAN"):
                style = part.title() if part in ("POSTGRES", "GERMAN") else part
            elif part in ("MDY", "DMY", "YMD"):
                order = part
        return f"{style}, {order}"
    return value


_ENCODINGS = {re.sub(r"[^A-Z0-9]", "", name): name for name in CODECS}


def _unquote_name(name: str) -> str:
    return ".".join(part.strip('"').replace('""', '"') for part in re.findall(r'"(?:[^"]|"")*"|[^.]+', name))


def _unquote_value(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value.replace("''", "'"))


def error(sqlstate: str, text: str, severity: str = "ERROR") -> bytes:
    """An ErrorResponse as PostgreSQL sends it."""
    return m.message(b"E", m.error_fields(severity, sqlstate, text))


def command_complete(tag: str) -> bytes:
    return m.message(b"C", m.cstring(tag))


class CancelLine(StringTransport):
    """A cancel connection's transport: a close, by either end, reaches its protocol at once."""

    def __init__(self, protocol: IProtocol) -> None:
        super().__init__()
        self.protocol = protocol

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.disconnected = True
        self.loseConnection()


def answer_cancel(reactor: MemoryReactorClock) -> CancelLine:
    """Accept the newest connection attempt on ``reactor`` (a cancel request's): returns
    its transport, holding what was sent."""
    _host, _port, factory, _timeout, _bind = reactor.tcpClients.pop()
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    line = CancelLine(protocol)
    protocol.makeConnection(line)
    return line


class FakeBackend:
    """One backend: logs a ServerConnection in and answers what it sends.

    Rules: ``BEGIN``/``COMMIT``/``ROLLBACK`` move the transaction status; ``SET``,
    ``SET LOCAL`` and ``RESET`` change parameters as PostgreSQL does (a ROLLBACK undoes
    them, a COMMIT keeps all but the LOCAL ones; values spelled as PostgreSQL spells
    them, see :func:`spelled`), and a reported parameter whose value changed is
    announced before the next ReadyForQuery, as PostgreSQL 14 and later do; a query containing ``1/0`` fails
    with 22012 (status ``E`` inside a transaction); ``COPY … FROM STDIN`` enters copy-in
    (CopyData is swallowed, CopyDone completes, CopyFail fails it); a query containing
    ``pg_sleep`` is held until :meth:`accept_cancel` cancels it or :meth:`finish` ends it;
    anything else completes as ``SELECT 1``. Parse/Bind/Describe/Execute/Close/Sync get
    their replies, and an extended message after an error is skipped until Sync, as
    PostgreSQL does. Every message received is kept in ``received`` as (type, body).
    """

    def __init__(
        self,
        reactor: MemoryReactorClock | None = None,
        params: tuple[tuple[str, str], ...] = DEFAULT_PARAMS,
        key: tuple[int, int] = (4242, 7777),
        secret: Secret | None = None,
        md5_salt: bytes | None = None,
        refuse: str | None = None,
    ) -> None:
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self.params = list(params)  # as they are now, spelled as reported
        self.defaults = list(params)  # what RESET goes back to
        self._reported = {name.lower(): value for name, value in params}  # last announced
        self._session: list[tuple[str, str]] | None = None  # in a transaction: without SET LOCAL
        self._at_begin: list[tuple[str, str]] | None = None  # in a transaction: for ROLLBACK
        self.key = key
        self.md5_salt = md5_salt
        self.refuse = refuse  # a SQLSTATE: the login ends in that FATAL error
        login = LoginInfo(STORAGE, "db", "u", secret)
        self.server = ServerConnection(login, self.reactor, in_this_thread)
        self.transport = StringTransport()
        self.received: list[tuple[bytes, bytes]] = []
        self.status = b"I"
        self.copy_in = False
        self.skipping = False
        self.held: list[str] = []  # queries running until cancelled or finished
        self.cancel_line: CancelLine | None = None
        self.logged_in = False
        self.password: bytes | None = None
        self._started = False
        self._buffer = b""

    # -- driving -------------------------------------------------------------------------

    def start(self) -> ServerConnection:
        """Connect and answer the login; the server is IDLE afterwards (unless refused)."""
        self.server.makeConnection(self.transport)
        self.flush()
        return self.server

    def flush(self) -> None:
        """Answer everything the server connection has written, until it writes no more;
        then deliver the close if it closed its end (it reads nothing after that)."""
        while True:
            data = self.transport.value()
            if not data:
                break
            self.transport.clear()
            self._buffer += data
            replies = b"".join(self._answer_all())
            if not self.transport.disconnecting:
                self.send(replies)
        if self.transport.disconnecting and self.server.state is not ServerState.CLOSED:
            self.close()

    def send(self, data: bytes) -> None:
        """Bytes from the backend, as they would arrive on the socket."""
        if data and self.server.state is not ServerState.CLOSED:
            self.server.dataReceived(data)

    def close(self) -> None:
        """The backend's end goes away."""
        self.server.connectionLost(Failure(ConnectionDone()))

    def queries(self) -> list[str]:
        """The text of every simple query received so far."""
        return [body[:-1].decode() for kind, body in self.received if kind == b"Q"]

    def kinds(self) -> bytes:
        """The type of every message received so far (the startup packet not included)."""
        return b"".join(kind for kind, _ in self.received)

    def finish(self) -> None:
        """The held queries complete."""
        held, self.held = self.held, []
        self.send(b"".join(command_complete("SELECT 1") + self._ready() for _ in held))

    def accept_cancel(self, close: bool = True) -> bytes:
        """The newest cancel request reaches the postmaster: a held query fails with
        57014; with ``close`` the cancel connection is then closed, as PostgreSQL does
        (else see :meth:`close_cancel`). Returns the packet received."""
        self.cancel_line = answer_cancel(self.reactor)
        packet = self.cancel_line.value()
        if packet == m.cancel_request(*self.key) and self.held:
            self.held.pop(0)
            if self.status == b"T":
                self.status = b"E"
            self.send(error("57014", "canceling statement due to user request") + self._ready())
        if close:
            self.close_cancel()
        return packet

    def close_cancel(self) -> None:
        """PostgreSQL closes the cancel connection accepted last."""
        assert self.cancel_line is not None
        self.cancel_line.loseConnection()

    # -- the rules -----------------------------------------------------------------------

    def _ready(self) -> bytes:
        """ReadyForQuery, after the reported parameters that changed since announced."""
        reports = []
        for name, value in self.params:
            key = name.lower()
            if key in REPORTED and self._reported.get(key) != value:
                self._reported[key] = value
                reports.append(m.parameter_status(name, value))
        return b"".join(reports) + m.ready_for_query(self.status)

    def _answer_all(self) -> list[bytes]:
        replies: list[bytes] = []
        if not self._started:
            if len(self._buffer) < 4 or len(self._buffer) < int.from_bytes(self._buffer[:4], "big"):
                return replies
            length = int.from_bytes(self._buffer[:4], "big")
            self._buffer = self._buffer[length:]
            self._started = True
            replies.append(self._login_start())
        while len(self._buffer) >= 5:
            length = int.from_bytes(self._buffer[1:5], "big")
            if len(self._buffer) < 1 + length:
                break
            kind, body = self._buffer[:1], self._buffer[5:1 + length]
            self._buffer = self._buffer[1 + length:]
            self.received.append((kind, body))
            replies.append(self._answer(kind, body))
        return replies

    def _login_start(self) -> bytes:
        if self.md5_salt is not None:
            return m.authentication_md5(self.md5_salt)
        return self._login_done()

    def _login_done(self) -> bytes:
        if self.refuse is not None:
            return error(self.refuse, "login refused", "FATAL")
        self.logged_in = True
        return b"".join(
            [m.authentication_ok()]
            + [m.parameter_status(name, value) for name, value in self.params]
            + [m.backend_key_data(*self.key), self._ready()]
        )

    def _answer(self, kind: bytes, body: bytes) -> bytes:
        if not self.logged_in:
            if kind == b"p":
                self.password = body[:-1]
                return self._login_done()
            return b""
        if self.copy_in:
            return self._copy_message(kind, body)
        if kind == b"Q":
            return self._query(body[:-1].decode())
        if kind == b"S":
            self.skipping = False
            return self._ready()
        if kind == b"X":
            self.transport.loseConnection()
            return b""
        if self.skipping or kind == b"H":
            return b""
        if kind == b"P" and b"1/0" in body:
            self.skipping = True
            self.status = b"E" if self.status == b"T" else self.status
            return error("22012", "division by zero")
        return {b"P": m.message(b"1"), b"B": m.message(b"2"), b"D": m.message(b"n"),
                b"E": command_complete("SELECT 1"), b"C": m.message(b"3")}.get(kind, b"")

    def _copy_message(self, kind: bytes, body: bytes) -> bytes:
        if kind in (b"d", b"S", b"H"):  # data is swallowed; Sync and Flush are ignored
            return b""
        self.copy_in = False
        if kind == b"c":
            return command_complete("COPY 1") + self._ready()
        self.status = b"E" if self.status == b"T" else self.status
        return error("57014", "COPY from stdin failed") + self._ready()

    def _query(self, sql: str) -> bytes:
        if self.status == b"E" and sql.upper() not in ("ROLLBACK", "COMMIT"):
            return error("25P02", "current transaction is aborted") + self._ready()
        if "pg_sleep" in sql:
            self.held.append(sql)
            return b""
        if "1/0" in sql:
            self.status = b"E" if self.status == b"T" else self.status
            return error("22012", "division by zero") + self._ready()
        if re.match(r"\s*COPY\b.*\bFROM\s+STDIN", sql, re.I):
            self.copy_in = True
            return m.message(b"G", b"\0\0\0")
        replies = [self._statement(part) for part in sql.split(";") if part.strip()]
        return b"".join(replies) + self._ready()

    def _statement(self, sql: str) -> bytes:
        word = sql.split()[0].upper()
        if word == "BEGIN":
            if self.status == b"I":
                self.status = b"T"
                self._at_begin, self._session = list(self.params), list(self.params)
        elif word in ("COMMIT", "ROLLBACK"):
            if self._session is not None and self._at_begin is not None:
                committed = word == "COMMIT" and self.status == b"T"  # (COMMIT of a failed one rolls back)
                self.params = self._session if committed else self._at_begin
                self._session = self._at_begin = None
            self.status = b"I"
        elif word in ("SET", "RESET"):
            return self._set(sql)
        else:
            word = "SELECT 1"
        return command_complete(word)

    def _set(self, sql: str) -> bytes:
        match = _SET.match(sql)
        if match is None:
            return error("42601", f"syntax error: {sql}")
        verb, local, name, value = match.groups()
        name = _unquote_name(name)
        key = name.lower()
        if value is None:
            value = next((v for n, v in self.defaults if n.lower() == key), None)
        else:
            current = next((v for n, v in self.params if n.lower() == key), "")
            value = spelled(name, _unquote_value(value), current)
        if not local or self._session is not None:  # SET LOCAL outside a transaction does nothing
            self.params = _with(self.params, name, value)
            if not local and self._session is not None:
                self._session = _with(self._session, name, value)
        return command_complete(verb.upper())


def _with(params: list[tuple[str, str]], name: str, value: str | None) -> list[tuple[str, str]]:
    """``params`` with ``name`` set to ``value`` (in its place, spelled as before), or
    without it when ``value`` is None."""
    key = name.lower()
    spelled = next((n for n, _ in params if n.lower() == key), name)
    out = [(n, v) for n, v in params if n.lower() != key or value is not None]
    if value is None:
        return out
    if any(n.lower() == key for n, _ in out):
        return [(n, value if n.lower() == key else v) for n, v in out]
    return out + [(spelled, value)]


class FakeBackends:
    """A Pool connector that opens a :class:`FakeBackend` per attempt, logged in at once."""

    def __init__(self, reactor: MemoryReactorClock, **options: Any) -> None:
        self.reactor = reactor
        self.options = options
        self.opened: list[FakeBackend] = []

    def __call__(self) -> "Deferred[ServerConnection]":
        backend = FakeBackend(self.reactor, **self.options)
        self.opened.append(backend)
        return succeed(backend.start())

    def __getitem__(self, index: int) -> FakeBackend:
        return self.opened[index]

    def flush(self) -> None:
        """Every backend answers what it was sent."""
        for backend in self.opened:
            backend.flush()


class FakeClient:
    """The relay's view of a client connection (:class:`odissey.relay.RelayClient`),
    recording what it is sent and how it is closed."""

    def __init__(self) -> None:
        self.id = f"c-fake{next(_ids)}"
        self.transport = StringTransport()
        self.valve = Valve(self)
        self.errors: list[PoolerError] = []
        self.dropped = False
        #: Each write the relay made, as made (pipelining: how many sends a reply took).
        self.writes: list[bytes] = []

    def writer(self) -> Callable[[bytes], bool]:
        def write(data: bytes) -> bool:
            self.writes.append(data)
            self.transport.write(data)
            return True

        return write

    def fail(self, error: PoolerError) -> None:
        self.errors.append(error)

    def drop(self) -> None:
        self.dropped = True

    def received(self) -> bytes:
        """What the client was sent since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data
