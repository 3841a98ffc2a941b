"""The backend side: one connection to PostgreSQL, from login to close.

A server connection goes ``CONNECTING -> LOGIN -> IDLE``, then alternates between
``IDLE`` (in its pool), ``ACTIVE`` (bytes go to a handler: the relay of the client it is
attached to, or the cleanup draining it) and ``QUERY`` (running the pooler's own
statements: parameter SETs, ROLLBACK, reset), until ``CLOSED``.

With ``storages.*.tls`` on, ``CONNECTING`` is followed by ``TLS``: an SSLRequest is sent,
and the answer must be the single byte ``S`` (anything after it was not encrypted by the
server and may be an injection: CVE-2021-23222) before ``startTLS``; ``N`` continues in
plaintext only in ``prefer`` mode. The StartupMessage goes out once the handshake is done
and the certificate checked, so a user name never reaches a server that failed the check.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Mapping, Optional, Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from odissey.auth.passthrough import Credentials, PassThrough
from odissey.auth.responders import ServerAuthenticator
from odissey.auth.secrets import InThread
from odissey.cancel import send_cancel
from odissey.config import Route, Secret, Storage
from odissey.flow import Valve, set_nodelay
from odissey.logs import Logger
from odissey.params import Params, codec_for
from odissey.router import connect_storage
from odissey.statements import ServerStatements
from odissey.tls import Connector, ServerSide, describe_failure, peer_certificate
from odissey.transaction import DROPS_ALL, SERVER_WATCH
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation
from odissey.wire.scanner import Event, Scanner

log = Logger()
_ids: Iterator[int] = itertools.count(1)


def number_ids(ids: Iterator[int]) -> None:
    """Where server connection ids' numbers (s4) come from: a worker takes every Nth,
    so that an id names one server over all workers (SHOW SERVERS spans them)."""
    global _ids
    _ids = ids

R, S, K, Z, E, G = b"RSKZEG"
#: Server messages whose bodies the pooler reads: login, parameters, status, errors,
#: command tags (DISCARD ALL drops prepared statements).
SERVER_COLLECT = frozenset(b"RSKZEvC")
C, D = b"CD"
_ROWS = frozenset(b"D")


class ServerState(Enum):
    CONNECTING = "connecting"
    TLS = "tls"
    LOGIN = "login"
    IDLE = "idle"
    ACTIVE = "active"
    QUERY = "query"
    CLOSED = "closed"


class Handler(TypingProtocol):
    """Whoever receives an ACTIVE server's bytes. It scans them as it needs: with
    :meth:`ServerConnection.events`, or (the relay's fast path) with the connection's
    scanner directly."""

    def serverData(self, data: bytes) -> None: ...

    def serverLost(self) -> None: ...


class ServerOwner(TypingProtocol):
    """Who is told when a server connection closes under it (its Pool), so that the
    server, a lower module, never calls into the pool."""

    def serverLost(self, server: "ServerConnection") -> None: ...


class Tracker(TypingProtocol):
    """Who keeps count of connections so that shutdown can wait for them (the
    service's ``Live``)."""

    def add(self, server: "ServerConnection") -> None: ...

    def cancelling(self, sent: "Deferred[bool]") -> "Deferred[bool]": ...


@dataclass(frozen=True)
class LoginInfo:
    storage: Storage
    database: str
    user: str
    secret: Secret | None
    #: SCRAM pass-through keys, used when the server asks for SCRAM and no plain password
    #: is configured (auth/passthrough.py).
    passthrough: PassThrough | None = None
    #: More startup parameters (the pooler's own connections: auth_query's lookups).
    options: tuple[tuple[str, str], ...] = ()


def server_error(fields: dict[str, str], prefix: str = "") -> PoolerError:
    """A server's ErrorResponse fields as a PoolerError, keeping its SQLSTATE."""
    return PoolerError(
        fields.get("C", errors.INTERNAL_ERROR),
        prefix + fields.get("M", "unknown server error"),
        severity=fields.get("V", fields.get("S", "ERROR")),
        detail=fields.get("D"),
        hint=fields.get("H"),
    )


class _Statements:
    """The pooler's own statements in flight: counts ReadyForQuery, keeps errors."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.errors: list[dict[str, str]] = []
        self.rows: list[bytes] = []  # DataRow bodies, on connections that collect them
        self.done: Deferred[list[dict[str, str]]] = Deferred()


@implementer(IHandshakeListener)
class ServerConnection(Protocol):
    def __init__(
        self,
        login: LoginInfo,
        reactor: IReactorTime,
        threads: InThread,
        tracker: Tracker | None = None,
        collect_rows: bool = False,
        tls: Optional[ServerSide] = None,
    ) -> None:
        self.id = f"s{next(_ids)}"
        self.login = login
        self.reactor = reactor
        self.state = ServerState.CONNECTING
        #: Which of the pool's prepared statements this connection holds.
        self.statements = ServerStatements()
        self.scanner = Scanner(
            watch=SERVER_WATCH, collect=SERVER_COLLECT | _ROWS if collect_rows else SERVER_COLLECT)
        self.valve = Valve(self)
        self.params: Params = {}
        #: ``params``' fingerprint (params.Fingerprints), None after a change.
        self.params_print: frozenset | None = None
        self.codec = "utf-8"  # of the connection's client_encoding: how its reports are written
        self._recent: list[tuple[str, str, bytes]] = []  # reports in this read, raw
        self.login_params: list[tuple[str, str]] = []
        self.key: tuple[int, int] | None = None
        self.status = b"I"
        self.handler: Handler | None = None
        self.owner: ServerOwner | None = None
        self.last_client: str | None = None
        #: Session state (session_state flags) the last client may have left on it.
        self.left = 0
        self.created_at = reactor.seconds()
        self.used_at = self.created_at
        self.touched = False  # released since the janitor last looked
        self.retiring = False  # past server_lifetime: closed when released
        self.ready: Deferred[ServerConnection] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._auth = ServerAuthenticator(login.user, login.secret, threads, login.passthrough)
        self._statements: _Statements | None = None
        self.tracker = tracker
        #: TLS to this storage (None: plaintext); unix sockets never speak TLS.
        self.tls = tls if tls is not None and not login.storage.is_unix else None
        self._connector: Connector | None = None
        self.encrypted = False
        #: After Terminate, while PostgreSQL has yet to close (see close).
        self._closing: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<server {self.id} {self.login.user}@{self.login.database} {self.state.value}>"

    # -- lifecycle ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        if self.tls is not None:
            self.state = ServerState.TLS
            self.transport.write(m.ssl_request())  # type: ignore[union-attr]
            return
        self._send_startup()

    def _send_startup(self) -> None:
        self.state = ServerState.LOGIN
        self.transport.write(  # type: ignore[union-attr]
            m.startup_message(
                {"user": self.login.user, "database": self.login.database, **dict(self.login.options)})
        )

    def _tls_answer(self, data: bytes) -> None:
        """The server's answer to our SSLRequest: ``S`` alone, or ``N`` (prefer only)."""
        tls = self.tls
        assert tls is not None
        if data == b"S":
            self._connector = tls.connector()
            self.transport.startTLS(self._connector)  # type: ignore[union-attr]
            return
        if data[:1] == b"S":
            self._tls_failed("received unencrypted data after SSL response")
        elif data == b"N" and not tls.required:
            log.info("{id}: server refused TLS, continuing in plaintext (prefer)", id=self.id)
            self._send_startup()
        elif data[:1] == b"N":
            self._tls_failed(f"server does not support SSL, but tls.mode {tls.mode} requires it"
                             if len(data) == 1 else "received unencrypted data after SSL response")
        else:
            self._tls_failed(f"received invalid response to SSL negotiation: {chr(data[0])!r}")

    def handshakeCompleted(self) -> None:
        """TLS is up: check who answered (verify-full) before saying who we are."""
        if self.state is not ServerState.TLS:
            return
        assert self.tls is not None
        problem = self.tls.check(peer_certificate(self.transport))
        if problem is not None:
            self._tls_failed(problem)
            return
        self.encrypted = True
        self._send_startup()

    def _tls_failed(self, why: str) -> None:
        self._fail_login(PoolerError(
            errors.CONNECTION_FAILURE,
            f'could not connect to server "{self.login.storage.name}": {why}'))
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self.state is ServerState.TLS:
            self._tls_answer(data)
            return
        if self._recent:
            self._recent = []
        if self.state is ServerState.ACTIVE:
            self.handler.serverData(data)  # type: ignore[union-attr]
            return
        events = self.events(data)
        if events is None:
            return
        for kind, body, _end in events:
            if self.state is ServerState.LOGIN:
                self._login_message(kind, body or b"")
            elif self.state is ServerState.QUERY:
                self._statement_message(kind, body or b"")
            elif kind == S:
                self.note_parameter(body or b"")
            elif kind == E:
                log.info("{id}: server says {msg}", id=self.id,
                         msg=m.parse_error_fields(body or b"\0").get("M"))
            else:  # a reply nobody asked for: the server is not in the state we think
                log.error("{id}: unexpected {kind!r} from an idle server, closing it",
                          id=self.id, kind=chr(kind))
                self.abort()
                return

    def events(self, data: bytes) -> list[Event] | None:
        """The scanner's events for a chunk; None when the server broke the protocol
        (it is aborted then)."""
        try:
            return self.scanner.feed(data)
        except ProtocolViolation as exc:
            log.error("{id}: invalid data from server: {exc}", id=self.id, exc=exc)
            self.abort()
            return None

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        before = self.state
        self.state = ServerState.CLOSED
        if before is ServerState.TLS and not self.ready.called:
            why = "server closed the connection during TLS negotiation"
            if self._connector is not None:
                why = "TLS handshake failed: " + (
                    self._connector.error
                    or (describe_failure(reason.value) if reason is not None else "closed"))
            self._tls_failed(why)
        elif before in (ServerState.CONNECTING, ServerState.LOGIN):
            self._fail_login(PoolerError(
                errors.CONNECTION_FAILURE, "server closed the connection during login"))
        elif before is ServerState.ACTIVE and self.handler is not None:
            handler, self.handler = self.handler, None
            handler.serverLost()
        elif before is ServerState.QUERY and self._statements is not None:
            statements, self._statements = self._statements, None
            statements.done.errback(PoolerError(
                errors.CONNECTION_FAILURE, "server connection lost"))
        if self.owner is not None:
            self.owner.serverLost(self)
        self.closed.callback(None)

    def never_connected(self) -> None:
        """The connection attempt failed: no connectionLost will ever come."""
        if self.state is ServerState.CONNECTING:
            self.state = ServerState.CLOSED
            self.closed.callback(None)

    def close(self) -> None:
        """Say goodbye properly (Terminate) and close once PostgreSQL has closed: its
        backend has left pg_stat_activity by then (it does so before its socket closes),
        so whoever counts on ``closed`` (a worker returning its lease on a server to the
        master) never lets a new connection overlap the old backend. Over TLS, which
        cannot half-close, or when PostgreSQL has not closed within the storage's
        connect timeout, our side closes at once."""
        transport = self.transport
        if transport is None or self.state is ServerState.CLOSED or self._closing is not None:
            return
        if self.state is not ServerState.CONNECTING and self.state is not ServerState.TLS:
            transport.write(m.terminate())
            half_close = getattr(transport, "loseWriteConnection", None)
            if half_close is not None and not getattr(transport, "TLS", False):
                half_close()
                self._closing = self.reactor.callLater(self.login.storage.connect_timeout, self.abort)
                return
        transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None and self.state is not ServerState.CLOSED:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- login ---------------------------------------------------------------------------

    def _login_message(self, kind: int, body: bytes) -> None:
        if kind == R:
            code, payload = m.parse_authentication(body)
            answering = maybeDeferred(self._auth.answer, code, payload)
            answering.addCallbacks(self._send_auth, self._auth_failed)
        elif kind == S:
            self.login_params.append(m.parse_parameter_status(body))
            self.note_parameter(body)
        elif kind == K:
            self.key = m.parse_backend_key_data(body)
        elif kind == E:
            fields = m.parse_error_fields(body)
            # A database that does not exist is the client's own answer: PostgreSQL's words.
            prefix = "" if fields.get("C") == errors.INVALID_CATALOG_NAME else "server login failed: "
            self._fail_login(server_error(fields, prefix))
            self.abort()
        elif kind == Z:
            self.status = body
            self.state = ServerState.IDLE
            self.ready.callback(self)

    def _send_auth(self, reply: bytes) -> None:
        if reply and self.transport is not None and self.state is ServerState.LOGIN:
            self.transport.write(reply)

    def _auth_failed(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, PoolerError):
            error = PoolerError(errors.CONNECTION_FAILURE, f"server login failed: {error}")
        self._fail_login(error)
        self.abort()

    def _fail_login(self, error: PoolerError) -> None:
        if not self.ready.called:
            self.ready.errback(error)

    # -- parameters --------------------------------------------------------------------

    def note_parameter(self, body: bytes) -> list[tuple[str, str]]:
        """Record a ParameterStatus; returns the values it sets (name as spelled, value).

        Its value is in the connection's client_encoding, which PostgreSQL applies to
        every report it sends with a ReadyForQuery: when client_encoding itself is among
        them, the reports that came before it in the same read are decoded again."""
        name, raw = body.split(b"\0", 2)[:2]
        spelled = name.decode("ascii", "replace")
        key = spelled.lower()
        self._recent.append((key, spelled, raw))
        self.params_print = None
        if key == "client_encoding":
            codec = codec_for(raw.decode("ascii", "replace"))
            if codec != self.codec:
                self.codec = codec
                for k, n, r in self._recent:
                    self.params[k] = (n, r.decode(codec, "replace"))
                return [self.params[k] for k, _n, _r in self._recent]
        self.params[key] = (spelled, raw.decode(self.codec, "replace"))
        return [self.params[key]]

    # -- the pooler's own statements ---------------------------------------------------

    def run(self, statements: list[str]) -> "Deferred[list[dict[str, str]]]":
        """Send simple queries (pipelined), swallow their replies, return their errors."""
        return self.exchange(m.queries(statements), len(statements))

    def exchange(self, payload: bytes, replies: int) -> "Deferred[list[dict[str, str]]]":
        """Send the pooler's own messages and wait for ``replies`` ReadyForQuery."""
        assert self.state is ServerState.IDLE, self.state
        self._statements = _Statements(replies)
        self.statements.unnamed = None  # a simple query drops it
        self.state = ServerState.QUERY
        self.transport.write(payload)  # type: ignore[union-attr]
        return self._statements.done

    def fetch(self, payload: bytes) -> "Deferred[tuple[list[dict[str, str]], list[bytes]]]":
        """Send one request of the pooler's own that ends in one Sync (or is one Query);
        its errors and its DataRow bodies. Only on a connection made with ``collect_rows``."""
        running = self.exchange(payload, 1)
        statements = self._statements
        assert statements is not None and D in self.scanner.collect
        return running.addCallback(lambda errors: (errors, statements.rows))

    def _statement_message(self, kind: int, body: bytes) -> None:
        statements = self._statements
        assert statements is not None
        if kind == D:
            statements.rows.append(body)
        elif kind == E:
            statements.errors.append(m.parse_error_fields(body))
        elif kind == S:
            self.note_parameter(body)
        elif kind == C and body in DROPS_ALL:
            self.statements.forget()  # a reset query (DISCARD ALL) dropped them
        elif kind == Z:
            self.status = body
            statements.expected -= 1
            if statements.expected == 0:
                self._statements = None
                self.state = ServerState.IDLE
                statements.done.callback(statements.errors)

    # -- attachment ----------------------------------------------------------------------

    def attach(self, handler: Handler) -> None:
        self.state = ServerState.ACTIVE
        self.handler = handler

    def detach(self) -> None:
        self.state = ServerState.IDLE
        self.handler = None
        self.touched = True  # (the janitor turns this into used_at: no clock read here)

    def cancel(self) -> "Deferred[bool]":
        """Ask PostgreSQL to cancel what this connection is running (new connection)."""
        assert self.key is not None
        sent = send_cancel(self.reactor, self.login.storage, *self.key)
        return self.tracker.cancelling(sent) if self.tracker is not None else sent


def _configured_secret(route: Route) -> Secret | None:
    """The password the config gives for a route's server logins, if any."""
    secret = route.server.password
    if secret is None and route.auth.password is not None and route.auth.password.kind == "plain":
        secret = route.auth.password
    return secret


def borrows_credentials(route: Route, user: str) -> bool:
    """Whether ``user``'s server logins on ``route`` use what its clients' logins prove
    (no configured password, the same user on both sides): only then is a recovered
    ClientKey worth keeping in memory at all."""
    return _configured_secret(route) is None and (route.server.user or user) == user


def connect(
    reactor: IReactorTime,
    route: Route,
    database: str,
    user: str,
    *,
    tracker: Tracker,
    threads: InThread,
    credentials: Credentials | None = None,
    tls: Optional[Mapping[str, ServerSide]] = None,
) -> "Deferred[ServerConnection]":
    """Open and log in one server connection for a route, within its connect timeout.

    Without a server password of its own, a route logs in with what its clients' logins
    left in ``credentials`` for this pool: a looked-up md5 secret, or the SCRAM keys
    recovered from a client's proof (pass-through). That needs the same user on both
    sides, so a route with another ``server.user`` never uses them."""
    secret = _configured_secret(route)
    server_user = route.server.user or user
    keys = None
    if secret is None and server_user == user and credentials is not None:
        left = credentials.get(database, user)
        if isinstance(left, PassThrough):
            keys = left
        elif left is not None:
            secret = left
    login = LoginInfo(route.storage, route.server.database or database, server_user, secret, keys)
    server = ServerConnection(login, reactor, threads, tracker,
                              tls=(tls or {}).get(route.storage.name))
    tracker.add(server)
    return open_connection(reactor, server, route.storage)


def open_connection(reactor: IReactorTime, server: ServerConnection, storage: Storage) -> "Deferred[ServerConnection]":
    """Connect ``server`` to ``storage`` and wait for its login, within the connect timeout."""
    connecting = connect_storage(reactor, storage, server)

    def connected(_proto: object) -> "Deferred[ServerConnection]":
        return server.ready

    def failed(failure: Failure) -> Failure:
        server.abort()
        server.never_connected()
        if isinstance(failure.value, PoolerError):
            return failure
        reason = failure.getErrorMessage()
        if failure.check(defer.TimeoutError):
            reason = f"timed out after {storage.connect_timeout:g}s"
        raise PoolerError(
            errors.CONNECTION_FAILURE,
            f'could not connect to server "{storage.name}": {reason}',
        )

    connecting.addCallback(connected)
    connecting.addTimeout(storage.connect_timeout, reactor)
    connecting.addErrback(failed)
    return connecting
