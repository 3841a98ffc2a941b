"""One Pool per (database, user): idle servers, waiting clients, the size limit.

Taking an idle server is synchronous (the hot path of transaction pooling); only a client
that must wait gets a Deferred. Waiters are served strictly first-come first-served: a
released server goes to the head of the queue, and newcomers cannot take an idle server
while anyone is queued. Among idle servers, the one the same client used last is
preferred (its parameters already match), then the most recently used.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from odissey.config import Route
from odissey.server import ServerConnection, ServerState
from odissey.statements import Registry
from odissey.wire import errors
from odissey.wire.errors import PoolerError

log = Logger()

Connector = Callable[[], "Deferred[ServerConnection]"]
ServerConnector = Callable[[IReactorTime, Route, str, str], "Deferred[ServerConnection]"]


class PoolKey(NamedTuple):
    database: str
    user: str

    def __str__(self) -> str:
        return f"{self.database}/{self.user}"


class _Waiter:
    __slots__ = ("client_id", "deferred", "timer")

    def __init__(self, client_id: str, deferred: "Deferred[ServerConnection]") -> None:
        self.client_id = client_id
        self.deferred = deferred
        self.timer: IDelayedCall | None = None


class Pool:
    """Implements :class:`~odissey.server.ServerOwner` for the servers it opened."""

    def __init__(self, key: PoolKey, route: Route, reactor: IReactorTime, connect: Connector) -> None:
        self.key = key
        self.route = route
        self.reactor = reactor
        self._connect = connect
        self.idle: list[ServerConnection] = []
        self.active: set[ServerConnection] = set()
        self.opening = 0
        self.waiters: deque[_Waiter] = deque()
        self.parameters_cache: list[tuple[str, str]] | None = None
        self._parameter_waiters: list[Deferred[list[tuple[str, str]]]] = []
        self.closed = False
        self.backoff = 0.0  # delay before the next attempt after failures; 0 when healthy
        self.retry_at = 0.0
        self.failed_at = float("-inf")  # when the last failure was seen
        self.last_error: PoolerError | None = None
        #: Transaction mode's prepared statements, shared by the pool's clients.
        settings = route.pool
        self.statements = (
            Registry(settings.max_prepared_statements)
            if settings.mode == "transaction" and settings.max_prepared_statements else None
        )

    @property
    def size(self) -> int:
        return self.route.pool.size

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.opening

    # -- clients ---------------------------------------------------------------------------

    def take(self, client_id: str) -> ServerConnection | None:
        """An idle server right now, or None (then call :meth:`wait`)."""
        if self.waiters or not self.idle:
            return None
        idle = self.idle
        chosen = idle[-1]
        if chosen.last_client != client_id:
            for server in reversed(idle):
                if server.last_client == client_id:
                    chosen = server
                    break
        idle.remove(chosen)
        self.active.add(chosen)
        return chosen

    def wait(self, client_id: str) -> "Deferred[ServerConnection]":
        """Queue for a server; fails with 53300 after the route's wait timeout."""
        waiter = _Waiter(client_id, Deferred(lambda d: self._cancel(waiter)))
        waiter.timer = self.reactor.callLater(self.route.pool.wait_timeout, self._expire, waiter)
        self.waiters.append(waiter)
        self._grow()
        return waiter.deferred

    def _cancel(self, waiter: _Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def _expire(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if waiter in self.waiters:
            self.waiters.remove(waiter)
            waiter.deferred.errback(PoolerError(
                errors.TOO_MANY_CONNECTIONS,
                f'no server connection available in pool "{self.key}" '
                f"within {self.route.pool.wait_timeout:g}s",
                detail=f"pool size is {self.size}: {len(self.active)} in use, {self.opening} connecting, "
                       f"{len(self.waiters)} other clients waiting",
            ))

    def release(self, server: ServerConnection) -> None:
        """A clean, idle server comes back: to the first waiter, or to the idle list.

        A server past its lifetime is closed here, when nobody is using it.
        """
        self.active.discard(server)
        if self.closed or server.state is not ServerState.IDLE or self._expired(server):
            server.owner = None
            server.close()
            self._grow()
            return
        self._hand_out(server)

    def discard(self, server: ServerConnection) -> None:
        """A server in doubt: close it, never reuse it."""
        self.active.discard(server)
        if server in self.idle:
            self.idle.remove(server)
        server.owner = None
        server.abort()
        self._grow()

    def serverLost(self, server: ServerConnection) -> None:
        """A server connection closed under us."""
        self.active.discard(server)
        if server in self.idle:
            self.idle.remove(server)
        self._grow()

    def _hand_out(self, server: ServerConnection) -> None:
        if self.waiters:
            waiter = self.waiters.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            self.active.add(server)
            self.reactor.callLater(0, self._deliver, waiter, server)
        else:
            self.idle.append(server)

    def _deliver(self, waiter: _Waiter, server: ServerConnection) -> None:
        """Fire a waiter on a later turn; if it gave up meanwhile, take the server back."""
        if waiter.deferred.called:
            self.release(server)
        elif server.state is not ServerState.IDLE:
            self.active.discard(server)
            self.waiters.appendleft(waiter)
            self._grow()
        else:
            waiter.deferred.callback(server)

    # -- servers ---------------------------------------------------------------------------

    def _grow(self) -> None:
        """Open servers for waiters not already covered by an opening, within the size.

        While the storage is in back-off after failed attempts, waiters fail at once with
        the last error instead of hanging.
        """
        if self.closed:
            return
        if self.reactor.seconds() < self.retry_at:
            self._fail_uncovered(self._unreachable())
            return
        while self._wanted() > self.opening and self.total < self.size:
            self._open()

    def _wanted(self) -> int:
        """Connections somebody is waiting for (a waiter, or a login needing parameters)."""
        return len(self.waiters) + (1 if self._parameter_waiters and self.parameters_cache is None else 0)

    def _open(self) -> None:
        self.opening += 1
        started = self.reactor.seconds()
        self._connect().addCallbacks(self._opened, self._open_failed, errbackArgs=(started,))

    def _opened(self, server: ServerConnection) -> None:
        self.opening -= 1
        self.backoff, self.retry_at, self.last_error = 0.0, 0.0, None
        if self.closed:
            server.close()
            return
        server.owner = self
        self._hand_out(server)  # first: a login woken below may take it at once
        if self.parameters_cache is None:
            self.parameters_cache = list(server.login_params)
            waiting, self._parameter_waiters = self._parameter_waiters, []
            for d in waiting:
                d.callback(self.parameters_cache)

    def _open_failed(self, failure: Failure, started: float) -> None:
        """One round of failures (attempts started before the last failure was seen, which
        fail together in an outage) doubles the back-off once, not once each."""
        self.opening -= 1
        error = failure.value
        if not isinstance(error, PoolerError):
            error = PoolerError(errors.CONNECTION_FAILURE, f"could not connect to server: {error}")
        error = error.copy()  # kept and handed to many: no traceback, no login's frames
        self.last_error = error
        now = self.reactor.seconds()
        if started >= self.failed_at:
            self.backoff = min(max(self.backoff * 2, 0.25), self.route.storage.retry_backoff)
        self.failed_at = now
        self.retry_at = now + self.backoff
        log.warn("pool {pool}: {error}; next attempt in {delay:.2f}s", pool=str(self.key),
                 error=error.message, delay=self.backoff)
        self._fail_uncovered(error)

    def _fail_uncovered(self, error: PoolerError) -> None:
        """Fail the waiters (and logins) that no connection attempt in progress will serve."""
        if self.parameters_cache is None and self.opening == 0:
            waiting, self._parameter_waiters = self._parameter_waiters, []
            for d in waiting:
                d.errback(error.copy())
        while len(self.waiters) > self.opening:
            waiter = self.waiters.pop()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.errback(error.copy())

    def _unreachable(self) -> PoolerError:
        """The last failure, as seen by a client arriving during the back-off: the same
        SQLSTATE (57P03 while PostgreSQL starts, 08006 while it refuses), whenever it comes.

        A database that does not exist gets PostgreSQL's own 3D000 word for word, as on
        the attempt that failed: it is the answer to what the client asked, not news
        about the pooler's connection (the back-off only spares PostgreSQL a login per
        client until the next attempt)."""
        last = self.last_error
        if last is not None and last.sqlstate == errors.INVALID_CATALOG_NAME:
            return last.copy()
        reason = last.message if last else "unreachable"
        wait = max(0.0, self.retry_at - self.reactor.seconds())
        return PoolerError(
            last.sqlstate if last else errors.CONNECTION_FAILURE,
            f"{reason} (pool \"{self.key}\", next attempt in {wait:.1f}s)",
            detail=last.detail if last else None,
        )

    # -- upkeep (the janitor calls this about twice a second) ------------------------------

    def _expired(self, server: ServerConnection) -> bool:
        lifetime = self.route.pool.server_lifetime
        return bool(lifetime) and self.reactor.seconds() - server.created_at > lifetime

    def maintain(self) -> None:
        """Close idle servers past their idle timeout or lifetime; keep min_size open."""
        now = self.reactor.seconds()
        settings = self.route.pool
        for server in list(self.idle):
            idle_too_long = (
                settings.server_idle_timeout
                and now - server.used_at > settings.server_idle_timeout
                and self.total > settings.min_size
            )
            if idle_too_long or self._expired(server):
                self.idle.remove(server)
                server.owner = None
                server.close()
        if not self.closed and not self.waiters and now >= self.retry_at:
            while self.total < settings.min_size:
                self._open()

    def parameters(self) -> "Deferred[list[tuple[str, str]]]":
        """The server's ParameterStatus set, cached after the first login of this pool."""
        if self.parameters_cache is not None:
            return succeed(self.parameters_cache)
        d: Deferred[list[tuple[str, str]]] = Deferred(self._parameter_waiters.remove)
        self._parameter_waiters.append(d)
        self._grow()
        return d

    def close(self) -> None:
        self.closed = True
        for server in list(self.idle):
            server.close()
        self.idle.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.errback(PoolerError(errors.ADMIN_SHUTDOWN, "the pooler is shutting down"))


class Pools:
    """All pools, created on first use."""

    def __init__(self, reactor: IReactorTime, connect: ServerConnector) -> None:
        self.reactor = reactor
        self._connect = connect
        self.pools: dict[PoolKey, Pool] = {}

    def get(self, route: Route, database: str, user: str) -> Pool:
        key = PoolKey(database, user)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(key, route, self.reactor,
                        lambda: self._connect(self.reactor, route, database, user))
            self.pools[key] = pool
        return pool

    def close(self) -> None:
        """Close every pool: idle servers go, waiters fail, nothing new opens (the
        service's ``Live`` waits for the connections still open)."""
        for pool in self.pools.values():
            pool.close()
