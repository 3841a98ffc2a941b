"""The client side: SSL negotiation, startup, authentication, then the relay.

A client connection goes ``STARTUP -> AUTH -> PARAMS -> READY -> GONE``. Login never
needs a server once its pool has cached the server's ParameterStatus set; the fake
BackendKeyData it gets is Odissey's own.
"""

from __future__ import annotations

import itertools
from collections import Counter
from enum import Enum

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from odissey.auth.verifiers import ClientVerifiers
from odissey.cancel import CancelKeys
from odissey.config import Limits
from odissey.flow import Valve, set_nodelay
from odissey.params import params_from, startup_wants
from odissey.pool import Pools
from odissey.relay import Relay
from odissey.router import Router
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation
from odissey.wire.scanner import (
    CancelRequest,
    GSSENCRequest,
    Scanner,
    SSLRequest,
    StartupMessage,
    StartupReader,
)

log = Logger()
_ids = itertools.count(1)
_P, _X = b"pX"


class ClientState(Enum):
    STARTUP = "startup"
    AUTH = "auth"
    PARAMS = "params"
    READY = "ready"
    GONE = "gone"


class ClientConnection(Protocol):
    def __init__(self, factory: "ClientFactory") -> None:
        self.id = f"c{next(_ids)}"
        self.factory = factory
        self.state = ClientState.STARTUP
        self.valve = Valve(self)
        self.relay: Relay | None = None
        self.key: tuple[int, int] | None = None
        self.user = ""
        self.database = ""
        self.route_index: int | None = None
        self._reader = StartupReader()
        self._auth_scanner = Scanner(collect_all=True, max_length=65536)
        self._password: Deferred[bytes] | None = None
        self._early: list[bytes] = []
        self._login_timer: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<client {self.id} {self.user}@{self.database} {self.state.value}>"

    # -- lifecycle -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.factory.clients.add(self)
        self._login_timer = self.factory.reactor.callLater(
            self.factory.limits.login_timeout, self._login_timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        if self.state is ClientState.READY:
            self.relay.clientData(data)  # type: ignore[union-attr]
            return
        try:
            if self.state is ClientState.STARTUP:
                self._startup(data)
            elif self.state is ClientState.AUTH:
                self._auth_data(data)
            elif self.state is ClientState.PARAMS:
                self._early.append(data)
        except PoolerError as exc:
            self.fail(exc)

    def connectionLost(self, reason: Failure | None = None) -> None:
        before, self.state = self.state, ClientState.GONE
        self.factory.forget(self)
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        if self.key is not None:
            self.factory.keys.release(self.key[0])
        if self.route_index is not None:
            self.factory.route_clients[self.route_index] -= 1
        if before is ClientState.READY and self.relay is not None:
            self.relay.clientGone()
        if self._password is not None and not self._password.called:
            self._password.errback(PoolerError(errors.CONNECTION_FAILURE, "client left"))

    def fail(self, error: PoolerError) -> None:
        """Send an error and close; FATAL, as PostgreSQL ends a session it refuses."""
        if self.state is ClientState.GONE or self.transport is None:
            return
        error.severity = "FATAL"
        log.info("{id}: {sqlstate} {message}", id=self.id, sqlstate=error.sqlstate,
                 message=error.message)
        self.transport.write(m.error_response(error))
        self.transport.loseConnection()

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.state is not ClientState.READY:
            self.fail(PoolerError(errors.QUERY_CANCELED, "canceling authentication due to timeout"))

    # -- startup -----------------------------------------------------------------------------

    def _startup(self, data: bytes) -> None:
        packet = self._reader.feed(data)
        if packet is None:
            return
        rest, self._reader.rest = self._reader.rest, b""
        if isinstance(packet, (SSLRequest, GSSENCRequest)):
            if rest:
                raise ProtocolViolation("received unencrypted data after SSL request")
            self.transport.write(b"N")  # type: ignore[union-attr]
            return
        if isinstance(packet, CancelRequest):
            self.factory.cancel(packet.pid, packet.secret)
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.state = ClientState.GONE
            return
        self.state = ClientState.AUTH
        self._login(packet).addErrback(self._login_failed)
        if rest:
            self.dataReceived(rest)

    def _auth_data(self, data: bytes) -> None:
        for kind, body, _end in self._auth_scanner.feed(data):
            if kind == _X:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            if kind != _P or self._password is None or self._password.called:
                raise ProtocolViolation(
                    f"expected password response, got message type {chr(kind)!r}"
                )
            waiting, self._password = self._password, None
            waiting.callback(body or b"")

    def _next_password(self) -> "Deferred[bytes]":
        self._password = Deferred()
        return self._password

    @inlineCallbacks
    def _login(self, startup: StartupMessage):
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
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise PoolerError(
                errors.FEATURE_NOT_SUPPORTED, "replication connections are not supported"
            )
        if len(f.clients) > f.limits.max_clients:
            raise PoolerError(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        route = f.router.match(database, user)
        if route is None:
            if not f.router.knows_database(database):
                raise PoolerError(errors.INVALID_CATALOG_NAME, f'database "{database}" does not exist')
            verifier = f.verifiers.mock(f.router.mock_method(database), user)
        else:
            verifier = yield f.verifiers.for_route(route.auth, user)
        step = verifier.start()
        while not step.done:
            self.send(step.reply)
            body = yield self._next_password()
            step = yield maybeDeferred(verifier.receive, body)
        assert route is not None
        limit = route.pool.max_clients
        if limit and f.route_clients[route.index] >= limit:
            raise PoolerError(
                errors.TOO_MANY_CONNECTIONS,
                f'too many clients for database "{database}" user "{user}" (max_clients {limit})',
            )
        f.route_clients[route.index] += 1
        self.route_index = route.index
        self.send(step.reply + m.authentication_ok())
        self.state = ClientState.PARAMS
        pool = f.pools.get(route, database, user)
        server_params = yield pool.parameters()
        if self.state is not ClientState.PARAMS:
            return
        wanted = params_from(server_params)
        told = {key: value for key, (_name, value) in wanted.items()}
        for name, value in startup_wants(params):
            key = name.lower()
            if key in wanted:
                name = wanted[key][0]
                told[key] = value
            wanted[key] = (name, value)
        self.key = f.keys.issue(self)
        greeting = [m.parameter_status(wanted[k][0], v) for k, v in told.items()]
        greeting += [m.backend_key_data(*self.key), m.ready_for_query(b"I")]
        self.send(b"".join(greeting))
        self.relay = Relay(self, pool, wanted, told, f.limits.max_message_size)
        self.state = ClientState.READY
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        if self._early:
            early, self._early = b"".join(self._early), []
            self.relay.clientData(early)

    def _login_failed(self, failure: Failure) -> None:
        if self.state is ClientState.GONE:
            return
        error = failure.value
        if not isinstance(error, PoolerError):
            log.failure("{id}: login failed", failure, id=self.id)
            error = PoolerError(errors.INTERNAL_ERROR, "internal error during login")
        self.fail(error)

    def send(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)


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
        keys: CancelKeys[ClientConnection] | None = None,
    ) -> None:
        self.reactor = reactor
        self.router = router
        self.pools = pools
        self.limits = limits
        self.keys: CancelKeys[ClientConnection] = keys or CancelKeys()
        self.verifiers = ClientVerifiers()
        self.clients: set[ClientConnection] = set()
        self.route_clients: Counter[int] = Counter()
        self._drained: list[Deferred[None]] = []

    def buildProtocol(self, addr: object) -> ClientConnection:
        return ClientConnection(self)

    def forget(self, client: ClientConnection) -> None:
        self.clients.discard(client)
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

    def cancel(self, pid: int, secret: int) -> None:
        client = self.keys.find(pid, secret)
        if client is not None and client.relay is not None:
            client.relay.cancelRequest()
