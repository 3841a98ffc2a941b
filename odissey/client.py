"""The client side: SSL negotiation, startup, authentication, then the relay.

A client connection goes ``STARTUP -> AUTH -> PARAMS -> READY``, then ``CLOSING`` once
an error has been sent (nothing more is read or said) and ``GONE``. A transaction-mode
login never needs a server once its pool has cached the server's ParameterStatus set,
and its BackendKeyData is Odissey's own. A session-mode login takes its server before
ReadyForQuery, so that its BackendKeyData carries that server's real pid (the secret is
still ours).

Connections still logging in have a budget of their own (``limits.max_login_clients``):
past it the oldest of them that has kept us waiting for STALL_GRACE is dropped, so a
flood of connections that never finish logging in cannot keep real clients out, while a
burst of real logins (which always answer at once) is never cut. ``limits.max_clients``
counts logged-in clients; all connections together stay under the sum of both.

TLS (``tls.py`` makes the context): an SSLRequest is answered ``S`` and the same
transport switches to TLS (``startTLS``), or ``N``; a first byte 0x16 is PostgreSQL 17's
direct TLS, whose ClientHello is handed to the TLS layer once started. Bytes sent behind
an SSLRequest before the handshake are an injection attempt (CVE-2021-23214) and close
the connection. A CancelRequest is served in plaintext whatever the mode.
"""

from __future__ import annotations

import itertools
import platform
from collections import Counter
from enum import Enum
from functools import partial
from typing import Any, Callable, Generator, Iterator, Protocol as TypingProtocol

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from odissey.auth.passthrough import Credentials
from odissey.auth.secrets import InThread
from odissey.auth.verifiers import CertVerifier, ClientVerifiers, Step, Verifier
from odissey.auth_query import AuthQueries
from odissey.cancel import CancelKeys, Drop, Forward, Peering, route_cancel
from odissey.config import Limits, Route
from odissey.console import Console, ConsoleSession, console_parameters
from odissey.logs import CONNECTION_EVENT, Logger
from odissey.flow import PENDING_LIMIT, Valve, send, set_nodelay
from odissey.params import login_parameters, params_from, startup_wants
from odissey.pool import Pools
from odissey.relay import Relay
from odissey.router import ClientAddress, Router, client_address
from odissey.server import ServerConnection, borrows_credentials
from odissey.startup_check import StartupChecks
from odissey.stats import LoginFailures
from odissey.tls import (
    ALPN,
    HANDSHAKE_RECORD,
    ClientSide,
    common_name,
    describe_failure,
    negotiated_protocol,
    peer_certificate,
)
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation, UnsupportedProtocol
from odissey.wire.scanner import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
)

log = Logger()
_ids = itertools.count(1)
_P, _X = b"pX"
_READY = m.ready_for_query(b"I")
_PYPY = platform.python_implementation() == "PyPy"
#: The longest password-type message accepted (a SCRAM exchange's are far shorter).
MAX_PASSWORD_MESSAGE = 65536
#: How long a connection still logging in must have kept us waiting for its next bytes
#: before it may be dropped to make room (a real client answers within a round trip).
STALL_GRACE = 0.5


class ClientState(Enum):
    STARTUP = "startup"
    AUTH = "auth"
    PARAMS = "params"
    READY = "ready"
    #: Logged in to the admin console: bytes go to a ConsoleSession, never a relay.
    CONSOLE = "console"
    CLOSING = "closing"
    GONE = "gone"


#: A client failed in these states is a refused login (logged, and counted by reason).
_LOGIN_STATES = (ClientState.STARTUP, ClientState.AUTH, ClientState.PARAMS)


@implementer(IHandshakeListener)
class ClientConnection(Protocol):
    def __init__(self, factory: "ClientFactory") -> None:
        self.id = f"c{next(factory.ids)}"
        self.factory = factory
        self.state = ClientState.STARTUP
        #: Logged in (READY or CONSOLE) at some point: its departure is a logout.
        self.served = False
        self.valve = Valve(self)
        self.relay: Relay | None = None
        self.key: tuple[int, int] | None = None
        self.user = ""
        self.database = ""
        #: The identity of the route this client was admitted under (``Route.identity``,
        #: which a reload keeps): its slot of the route's max_clients, given back when it goes.
        self.route_identity: str | None = None
        #: The admin console session, for a client logged in to the console database.
        self.console: ConsoleSession | None = None
        self.connected_at = factory.reactor.seconds()
        #: The client's address as log lines show it (known once its startup is read).
        self.peer = "?"
        self._reader = StartupReader()
        self._negotiated: set[type] = set()  # SSLRequest / GSSENCRequest already answered
        self._password: Deferred[bytes] | None = None
        self._buffer = b""  # what the client sent during login, beyond what was read
        self._paused = False
        self._parameters: Deferred[list[tuple[str, str]]] | None = None
        self._attaching: Deferred[ServerConnection] | None = None  # session mode: the server, at login
        self._asked_at = factory.reactor.seconds()  # when we last waited for the client
        self.tls_started = False  # startTLS called: every byte from now on is TLS
        self.encrypted = False  # the handshake completed
        self.direct_tls = False  # began with a ClientHello (sslnegotiation=direct)
        #: The CN of the client certificate (verified against tls.ca_file), if one was sent.
        self.peer_cn: str | None = None

    def __repr__(self) -> str:
        return f"<client {self.id} {self.user}@{self.database} {self.state.value}>"

    # -- lifecycle -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.factory.arrived(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state is ClientState.READY:
            self.relay.clientData(data)  # type: ignore[union-attr]
            return
        if self.state is ClientState.CONSOLE:
            self.console.data(data)  # type: ignore[union-attr]
            return
        self._asked_at = self.factory.reactor.seconds()
        try:
            if self.state is ClientState.STARTUP:
                self._startup(data)
            elif self.state is ClientState.AUTH or self.state is ClientState.PARAMS:
                self._keep(data)
                self._read_password()
        except PoolerError as exc:
            self.fail(exc)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.tls_started and not self.encrypted and reason is not None:
            log.info("{id}: TLS handshake failed: {why}", id=self.id,
                     why=describe_failure(reason.value))
        if self.served:  # (also once closing: a Terminate or a FATAL error has set CLOSING)
            log.info("{id}: logout {user}@{database} after {seconds:.1f}s", id=self.id,
                     user=self.user, database=self.database, connection=CONNECTION_EVENT,
                     seconds=self.factory.reactor.seconds() - self.connected_at)
        self.state = ClientState.GONE
        self.factory.forget(self)
        self._buffer = b""
        if self.key is not None:
            self.factory.keys.release(self.key)
        if self.route_identity is not None:
            self.factory.route_clients[self.route_identity] -= 1
            if self.factory.admission is not None:
                self.factory.admission.left(self.route_identity)
        if self.relay is not None:
            self.relay.clientGone()
        if self._password is not None and not self._password.called:
            self._password.errback(PoolerError(errors.CONNECTION_FAILURE, "client left"))
        if self._parameters is not None:  # stop waiting: the pool keeps no trace of us
            self._parameters.cancel()
        if self._attaching is not None:  # the relay has let the server go (or never had one)
            self._attaching.cancel()

    def fail(self, error: PoolerError) -> None:
        """Send an error and close; FATAL, as PostgreSQL ends a session it refuses.
        Only the first error is sent: the connection is closing after it."""
        if self.state is ClientState.GONE or self.state is ClientState.CLOSING or self.transport is None:
            return
        logging_in = self.state in _LOGIN_STATES
        if logging_in:
            self.factory.login_failures.count(error.sqlstate)
        self.state = ClientState.CLOSING
        if self.tls_started and not self.encrypted:
            # Mid-handshake nothing can be said, and Twisted would hold the connection
            # open until a stalled handshake finished to deliver it: cut it instead.
            log.info("{id}: {sqlstate} {message} (during the TLS handshake)", id=self.id,
                     sqlstate=error.sqlstate, message=error.message)
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        error.severity = "FATAL"
        if logging_in:  # one line per refused login, with its reason (never a password)
            log.info("{id}: login failed for {user}@{database} from {client}: {sqlstate} {message}",
                     id=self.id, user=self.user, database=self.database, client=self.peer,
                     sqlstate=error.sqlstate, message=error.message)
        else:
            log.info("{id}: {sqlstate} {message}", id=self.id, sqlstate=error.sqlstate,
                     message=error.message)
        self.transport.write(m.error_response(error))
        self.transport.loseConnection()

    @property
    def paused(self) -> bool:
        """Reading is paused (too much sent while no server could take it): a close by
        the client goes unseen until someone looks (the janitor, with flow.peer_closed)."""
        return self._paused or (self.relay is not None and self.relay.paused)

    def drop(self) -> None:
        """Close without a word: the client has already been told why (its server's own
        FATAL error, forwarded as it came), or said goodbye itself (Terminate)."""
        if self.state is not ClientState.GONE and self.state is not ClientState.CLOSING and self.transport:
            self.state = ClientState.CLOSING
            self.transport.loseConnection()

    def login_timed_out(self) -> None:
        """limits.login_timeout has passed since the connection came (the factory's
        expire_logins tells, only while the client has its part of the login to do)."""
        if self.state in _LOGIN_STATES:
            self.fail(PoolerError(errors.QUERY_CANCELED, "canceling authentication due to timeout"))

    # -- startup -----------------------------------------------------------------------------

    def handshakeCompleted(self) -> None:
        """TLS is up: note the client's certificate; a direct-TLS client must have
        agreed on ALPN ``postgresql`` (PostgreSQL 17 closes without a word otherwise)."""
        self.encrypted = True
        if self.direct_tls and negotiated_protocol(self.transport) != ALPN:
            log.info("{id}: direct TLS without ALPN postgresql, closing", id=self.id)
            self.state = ClientState.CLOSING
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        cert = peer_certificate(self.transport)
        self.peer_cn = common_name(cert) if cert is not None else None

    def _start_tls(self) -> None:
        tls = self.factory.tls
        assert tls is not None
        self.tls_started = True
        self._negotiated.add(SSLRequest)  # another one, inside TLS, is refused
        self.transport.startTLS(tls)  # type: ignore[union-attr]

    def _startup(self, data: bytes) -> None:
        if (data[0] == HANDSHAKE_RECORD and not self.tls_started and not self._negotiated
                and not self._reader.rest):
            # PostgreSQL 17's direct TLS: a ClientHello instead of an SSLRequest.
            if self.factory.tls is None:
                log.info("{id}: direct TLS attempted but TLS is off, closing", id=self.id)
                self.state = ClientState.CLOSING
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            self.direct_tls = True
            self._start_tls()
            self.transport.protocol.dataReceived(data)  # type: ignore[union-attr]
            return
        packet = self._reader.feed(data)
        if packet is None:
            return
        rest, self._reader.rest = self._reader.rest, b""
        if isinstance(packet, (SSLRequest, GSSENCRequest)):
            what = "SSL request" if isinstance(packet, SSLRequest) else "GSSAPI encryption request"
            if type(packet) in self._negotiated:  # PostgreSQL answers each only once
                code = m.SSL_REQUEST_CODE if isinstance(packet, SSLRequest) else m.GSSENC_REQUEST_CODE
                raise UnsupportedProtocol(
                    f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                    "server supports 3.0 to 3.0")
            if rest:  # never protocol, never handed to TLS (CVE-2021-23214)
                raise ProtocolViolation(f"received unencrypted data after {what}")
            self._negotiated.add(type(packet))
            if isinstance(packet, SSLRequest) and self.factory.tls is not None and not self.tls_started:
                self.transport.write(b"S")  # type: ignore[union-attr]
                self._start_tls()  # (what was written before goes out first, in the clear)
                return
            self.send(b"N")
            return
        if isinstance(packet, CancelRequest):
            # Close only once PostgreSQL has closed the cancel we forwarded: libpq waits
            # for that close before it lets the application send its next query.
            self.state = ClientState.GONE
            landed = self.factory.cancel(packet.pid, packet.secret)
            landed.addBoth(lambda _: self.transport.loseConnection())  # type: ignore[union-attr]
            return
        self.state = ClientState.AUTH
        self._keep(rest)
        self._login(packet).addErrback(self._login_failed)

    def _keep(self, data: bytes) -> None:
        """Hold what a client sends before it is logged in (a driver may pipeline its
        first query behind its last password message, as PostgreSQL allows), pausing
        reading past a bound."""
        self._buffer += data
        if len(self._buffer) > PENDING_LIMIT and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _read_password(self) -> None:
        """Hand the next whole message to a waiting verifier; it must be a password
        message (PostgreSQL reads the messages after the last one only once logged in)."""
        buffer = self._buffer
        if self._password is None or self._password.called or len(buffer) < 5:
            return
        kind, length = buffer[0], int.from_bytes(buffer[1:5], "big")
        if length < 4 or length > MAX_PASSWORD_MESSAGE:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}")
        if len(buffer) < 1 + length:
            return
        if kind == _X:
            self.state = ClientState.CLOSING
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if kind != _P:
            raise ProtocolViolation(f"expected password response, got message type {chr(kind)!r}")
        self._buffer = buffer[1 + length:]
        waiting, self._password = self._password, None
        waiting.callback(buffer[5:1 + length])

    def _next_password(self) -> "Deferred[bytes]":
        self._password = Deferred()
        self._asked_at = self.factory.reactor.seconds()
        self._read_password()
        return self._password

    def stalled(self, now: float) -> float:
        """How long this login has been waiting for the client (0 while we are working)."""
        waiting = self.state is ClientState.STARTUP or (
            self.state is ClientState.AUTH and self._password is not None and not self._password.called)
        return now - self._asked_at if waiting else 0.0

    @inlineCallbacks
    def _login(self, startup: StartupMessage) -> Generator[Any, Any, None]:
        """The login, from the startup packet to ReadyForQuery. Its steps are plain
        generators it delegates to (``yield from``): one inlineCallbacks per login, not
        one per step."""
        f = self.factory
        params = startup.params
        if startup.minor > 0 or startup.unsupported:
            self.send(m.negotiate_protocol_version(0, startup.unsupported))
        user = params.get("user", "")
        if not user:
            raise PoolerError(
                errors.INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            )
        database = params.get("database") or user
        self.user, self.database = user, database
        client = client_address(self.transport.getPeer())  # type: ignore[union-attr]
        self.peer = client.shown
        tls = f.tls
        if tls is not None and tls.require and not self.encrypted:
            raise self._no_encryption(client.shown, f"tls.mode is {tls.mode}")
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise PoolerError(
                errors.FEATURE_NOT_SUPPORTED, "replication connections are not supported"
            )
        if f.console is not None and f.console.serves(database):
            yield from self._console_login(user, database, client, params)
            return
        route = f.router.match(database, user, client)
        if route is None:
            if not f.router.knows_database(database):
                raise PoolerError(errors.INVALID_CATALOG_NAME, f'database "{database}" does not exist')
            if not f.router.serves(database, client):  # PostgreSQL's own check, before any password
                raise PoolerError(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                                  f'no pg_hba.conf entry for host "{client.shown}", user "{user}", '
                                  f'database "{database}", {self._encryption()}')
            owner = None
        else:
            owner = f.router.auth_route_of(route, database, user, client)
            # TLS checks, before any password is asked (as PostgreSQL's hostssl/clientcert).
            if owner is not None and owner.auth.require_tls and not self.encrypted:
                raise self._no_encryption(client.shown, f"route {owner.name} requires TLS")
            if tls is not None and tls.verify_user and self.encrypted and self.peer_cn != user:
                raise PoolerError(
                    errors.INVALID_AUTHORIZATION_SPECIFICATION,
                    f'certificate validation (tls.mode verify-full) failed for user "{user}": '
                    "CN mismatch")
        verifier, step = yield from self._authenticate(owner, database, user, client, database)
        assert route is not None
        if route.block:  # only now: before the password, a block must look like anything else
            log.info("{id}: {user}@{database} from {client} is blocked by routes[{index}]",
                     id=self.id, user=user, database=database, client=client.shown, index=route.index)
            raise PoolerError(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                              f'pg_hba.conf rejects connection for host "{client.shown}", '
                              f'user "{user}", database "{database}", {self._encryption()}')
        if database in f.pools.disabled:  # (DISABLE on the console; PgBouncer's words)
            raise PoolerError(errors.OBJECT_NOT_IN_PREREQUISITE_STATE, f'database "{database}" is disabled')
        limit = route.pool.max_clients
        identity = route.identity  # (what a reload landing meanwhile keeps; not its index)
        full = ("clients" if f.logged_in >= f.limits.max_clients
                else "route" if limit and f.route_clients[identity] >= limit else "")
        if not full and f.admission is not None:  # (other workers' clients count too)
            full = yield f.admission.admit(route)
            if not full and self.state is not ClientState.AUTH:  # gone while we asked
                f.admission.left(identity)
                return
        if full == "clients":
            raise PoolerError(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        if full:
            raise PoolerError(
                errors.TOO_MANY_CONNECTIONS,
                f'too many clients for database "{database}" user "{user}" (max_clients {limit})',
            )
        # Counted at once: whatever fails from here on, connectionLost gives back exactly this.
        f.route_clients[identity] += 1
        self.route_identity = identity
        if borrows_credentials(route, user):  # for this pool's server logins (SCRAM pass-through)
            credential = verifier.credential()
            if credential is not None:
                f.credentials.remember(database, user, credential)
        # AuthenticationOk leaves with the greeting, in one write (as PostgreSQL sends
        # them), unless the login must wait first: then at once, before the wait.
        ok = step.reply + m.authentication_ok()
        self.state = ClientState.PARAMS
        # The client has done its part: what is left is ours to wait for, bounded by the
        # storage's connect_timeout and the route's wait_timeout, not by login_timeout
        # (which expire_logins applies only to the connections still logging in).
        f.logged_in_now(self)
        pool = f.pools.get(route, database, user)
        server_params = pool.parameters_cache  # known after the pool's first login
        if server_params is None:
            self.send(ok)
            ok = b""
            self._parameters = pool.parameters()
            server_params = yield self._parameters
            self._parameters = None
            if self.state is not ClientState.PARAMS:
                return
        wants = startup_wants(params)
        unchecked = f.startup_checks.unchecked(pool, wants)
        if unchecked:
            self.send(ok)
            ok = b""
            yield f.startup_checks.check(pool, self.id, unchecked)
            if self.state is not ClientState.PARAMS:
                return
        canonical = partial(f.startup_checks.canonical, pool)
        if server_params is pool.parameters_cache:  # (the usual case)
            login = pool.login(tuple(wants), canonical)
            wanted, told = dict(login.wanted), dict(login.told)  # (the relay's to change)
            fingerprint, greeting = login.fingerprint, login.greeting
        else:  # (the cache was reset while this login waited for it)
            server_wanted = params_from(server_params)
            server_told = {key: value for key, (_name, value) in server_wanted.items()}
            wanted, told = login_parameters(server_wanted, server_told, wants, canonical)
            fingerprint, greeting = None, pool.greeting(tuple(told.items()), wanted)
        self.relay = Relay(self, pool, wanted, told, f.limits.max_message_size, fingerprint)
        pool.stats.logins += 1
        pid = None
        if not self.relay.transaction_mode:
            self.send(ok)
            ok = b""
            self._attaching = self.relay.attach_at_login()
            server = yield self._attaching
            self._attaching = None
            if self.state is not ClientState.PARAMS:
                return
            if server.key is not None:
                pid = server.key[0]
        self.key = f.keys.issue(self, pid)
        self.send(ok + greeting + m.backend_key_data(*self.key) + _READY)
        log.info("{id}: login {user}@{database} from {client} (pool {pool})", id=self.id,
                 user=user, database=database, client=self.peer, pool=str(pool.key),
                 connection=CONNECTION_EVENT)
        self._logged_in(ClientState.READY, self.relay.clientData)

    def _authenticate(self, owner: Route | None, database: str, user: str, client: ClientAddress,
                      lookup_database: str) -> Generator[Any, Any, tuple[Verifier, Step]]:
        """Run ``owner``'s authentication (an unknown user's mock exchange when None);
        returns (verifier, its last step), whose reply goes out with AuthenticationOk."""
        f = self.factory
        if owner is None:
            verifier = f.verifiers.mock(f.router.mock_auth(database, client), user)
        elif owner.auth.method == "cert":
            verifier = CertVerifier(user, self.peer_cn if self.encrypted else None)
        elif owner.auth.query is not None and f.auth_queries is not None:
            found = yield f.auth_queries.lookup(owner, lookup_database, user)
            verifier = f.verifiers.for_lookup(
                owner.auth, user, found.secret, found.expired(f.reactor.seconds()))
        else:
            verifier = f.verifiers.for_route(owner.auth, user)
            if isinstance(verifier, Deferred):  # (only a SCRAM secret still being derived)
                verifier = yield verifier
        step = verifier.start()
        while not step.done:
            self.send(step.reply)
            body = yield self._next_password()
            step = verifier.receive(body)  # a Deferred only for the slow methods
            if isinstance(step, Deferred):
                step = yield step
        return verifier, step

    def _console_login(self, user: str, database: str, client: ClientAddress,
                       params: dict[str, str]) -> Generator[Any, Any, None]:
        """A login to the admin console: the password its routes ask for (see
        ``Console.auth_route``), then ``admin_users``/``stats_users``, checked only after
        the password (as PgBouncer does), so a refusal tells nothing to a guesser."""
        f = self.factory
        console = f.console
        assert console is not None
        owner = console.auth_route(user, client)
        if owner is not None and owner.auth.require_tls and not self.encrypted:
            raise self._no_encryption(client.shown, f"route {owner.name} requires TLS")
        tls = f.tls
        if tls is not None and tls.verify_user and self.encrypted and self.peer_cn != user:
            raise PoolerError(
                errors.INVALID_AUTHORIZATION_SPECIFICATION,
                f'certificate validation (tls.mode verify-full) failed for user "{user}": '
                "CN mismatch")
        lookup = console.lookup_database(owner) if owner is not None else database
        _verifier, step = yield from self._authenticate(owner, database, user, client, lookup)
        if owner is not None and owner.block:
            log.info("{id}: {user} on the console from {client} is blocked by routes[{index}]",
                     id=self.id, user=user, client=client.shown, index=owner.index)
            raise PoolerError(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                              f'pg_hba.conf rejects connection for host "{client.shown}", '
                              f'user "{user}", database "{database}", {self._encryption()}')
        role = console.role(user)
        if role is None:
            raise PoolerError(
                errors.INVALID_AUTHORIZATION_SPECIFICATION,
                f'user "{user}" is not allowed to use the admin console',
                hint="The console is for the users named in admin_users and stats_users.")
        if f.logged_in >= f.limits.max_clients:
            raise PoolerError(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        application_name = params.get("application_name", "")
        self.console = ConsoleSession(console, role, self.send, self.fail, self.drop, self.id,
                                      application_name)
        f.logged_in_now(self)
        log.info("{id}: {user} logged in to the admin console ({role})", id=self.id, user=user,
                 role=role)
        greeting = b"".join(m.parameter_status(k, v) for k, v in console_parameters(application_name))
        self.send(step.reply + m.authentication_ok() + greeting + _READY)
        self._logged_in(ClientState.CONSOLE, self.console.data)

    def _logged_in(self, state: ClientState, deliver: Callable[[bytes], None]) -> None:
        """The login is over: read again, and hand what the client sent meanwhile (a
        driver may pipeline its first query behind its password) to its new reader."""
        self.state = state
        self.served = True
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        if self._buffer:
            early, self._buffer = self._buffer, b""
            deliver(early)

    def _no_encryption(self, host: str, why: str) -> PoolerError:
        """A plaintext login where TLS is required: 28000, like PostgreSQL's hostssl-only
        pg_hba.conf refusal (before any password is asked, so none crosses in clear)."""
        return PoolerError(
            errors.INVALID_AUTHORIZATION_SPECIFICATION,
            f'no encryption: TLS is required for host "{host}", user "{self.user}", '
            f'database "{self.database}" ({why})',
            hint="Connect with sslmode=require or stronger.")

    def _encryption(self) -> str:
        """How PostgreSQL's refusals end: whether the client's connection is encrypted."""
        return "SSL encryption" if ISSLTransport.providedBy(self.transport) else "no encryption"

    def _login_failed(self, failure: Failure) -> None:
        if self.state is ClientState.GONE or self.state is ClientState.CLOSING:
            return
        error = failure.value
        if not isinstance(error, PoolerError):
            log.failure("{id}: login failed", failure, id=self.id)
            error = PoolerError(errors.INTERNAL_ERROR, "internal error during login")
        self.fail(error)

    def send(self, data: bytes) -> None:
        if data and self.transport is not None:
            send(self.transport, data)

    def writer(self) -> Callable[[bytes], bool]:
        """The relay's way to write to this client: ``flow.send`` bound to the transport.
        On CPython a C-level partial, so the hot path adds no Python call of ours per
        chunk; on PyPy, whose ``partial`` is written in Python, a closure the JIT inlines."""
        if _PYPY:
            transport = self.transport

            def write(data: bytes) -> bool:
                return send(transport, data)

            return write
        return partial(send, self.transport)


class Admission(TypingProtocol):
    """Client limits counted across processes (a worker's master)."""

    def admit(self, route: Route) -> "Deferred[str]":
        """May one more client of this route log in? Fires with "" (yes, and it now
        counts, under ``route.identity``), "clients" (limits.max_clients is reached) or
        "route" (the route's max_clients is)."""

    def left(self, identity: str) -> None:
        """A client admitted under this route identity has gone."""


class ClientFactory(Factory):
    """What all client connections of one listener share."""

    protocol = ClientConnection
    noisy = False

    def __init__(
        self,
        reactor: IReactorTime,
        router: Router,
        pools: Pools,
        limits: Limits,
        threads: InThread,
        keys: CancelKeys[ClientConnection] | None = None,
        *,
        auth_queries: AuthQueries | None = None,
        credentials: Credentials | None = None,
        tls: ClientSide | None = None,
        console: Console | None = None,
        peering: Peering | None = None,
    ) -> None:
        self.reactor = reactor
        #: The admin console (None: the console databases are routed like any other).
        self.console = console
        #: The TLS offered to clients; None when tls.mode is disable (SSLRequest gets N).
        self.tls = tls
        self.router = router
        self.pools = pools
        self.limits = limits
        self.keys: CancelKeys[ClientConnection] = keys or CancelKeys()
        #: The other Odissey instances, which cancels with their keys are forwarded to.
        self.peering = peering if peering is not None else Peering(reactor, {})
        self.verifiers = ClientVerifiers(threads)
        self.auth_queries = auth_queries
        #: What clients' logins leave for their pools' server logins (pass-through).
        self.credentials = credentials if credentials is not None else Credentials()
        self.startup_checks = StartupChecks()
        self.clients: set[ClientConnection] = set()
        #: Connections still logging in, oldest first (a dict keeps insertion order).
        self.logging_in: dict[ClientConnection, None] = {}
        self.logged_in = 0
        #: Logged-in clients by route identity (a route's max_clients; a reload keeps it).
        self.route_clients: Counter[str] = Counter()
        #: Who cancels a key this factory did not issue (another worker's): a worker's
        #: link to its master; None in one process.
        self.elsewhere: Callable[[int, int], Deferred[None]] | None = None
        #: Who counts logged-in clients beyond this process (a worker's master), so that
        #: limits.max_clients and a route's max_clients hold over all workers; None: the
        #: counts here are all there is.
        self.admission: Admission | None = None
        self.login_failures = LoginFailures()
        self._drained: list[Deferred[None]] = []
        #: Client ids' numbers (c17): a worker takes every Nth, so that an id names one
        #: client over all workers (KILL_CLIENT goes to every worker).
        self.ids: Iterator[int] = _ids

    def buildProtocol(self, addr: object) -> ClientConnection:
        return ClientConnection(self)

    def arrived(self, client: ClientConnection) -> None:
        """A new connection. Past the login budget, the oldest login that has stalled
        goes; past both budgets together, the newcomer is refused."""
        self.clients.add(client)
        self.logging_in[client] = None
        limits = self.limits
        if len(self.logging_in) <= limits.max_login_clients:
            return
        now = self.reactor.seconds()
        for login in self.logging_in:
            if login.stalled(now) >= STALL_GRACE:
                login.fail(PoolerError(
                    errors.TOO_MANY_CONNECTIONS,
                    "too many connections still logging in: the one waiting longest is closed",
                    hint="Raise limits.max_login_clients if logins are slow rather than abusive."))
                return
        if len(self.clients) > limits.max_clients + limits.max_login_clients:
            client.fail(PoolerError(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already"))

    def expire_logins(self, now: float) -> None:
        """Fail the connections that have been logging in for longer than
        limits.login_timeout. The janitor calls this twice a second: a timer per
        connection cost every login a DelayedCall, its cancel and the reactor's upkeep
        of both (``pgbench -C``), for a timeout that needs no finer grain."""
        started_before = now - self.limits.login_timeout
        late = []
        for client in self.logging_in:  # oldest first
            if client.connected_at > started_before:
                break
            late.append(client)
        for client in late:
            client.login_timed_out()

    def logged_in_now(self, client: ClientConnection) -> None:
        del self.logging_in[client]
        self.logged_in += 1

    def forget(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if client in self.logging_in:
            del self.logging_in[client]
        elif client.route_identity is not None or client.console is not None:
            self.logged_in -= 1
        if not self.clients:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drained(self) -> "Deferred[None]":
        """Fires once no client connection is left."""
        if not self.clients:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def cancel(self, pid: int, secret: int) -> "Deferred[None]":
        """Cancel the work of the client with this key, here or at the peer that issued
        it; fires once that is done."""
        where = route_cancel(self.keys.layout, self.peering.peers, secret)
        if isinstance(where, Forward):
            return self.peering.forward(pid, where).addCallback(lambda _: None)
        if isinstance(where, Drop):
            log.debug("cancel request dropped: {why}", why=where.why)
            return succeed(None)
        client = self.keys.find(pid, where.secret)
        if client is not None and client.relay is not None:
            return client.relay.cancelRequest()
        if client is None and self.elsewhere is not None:
            return self.elsewhere(pid, where.secret)
        return succeed(None)
