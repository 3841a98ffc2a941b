"""One Pool per (database, user): idle servers, waiting clients, the size limit.

Taking an idle server is synchronous (the hot path of transaction pooling), and so is
handing a released server to a waiting client: with more clients than servers, most
transactions wait, so waiting must cost no Deferred and no timer of its own. A waiter is
told through :class:`Waiter`; one timer per pool, armed for the oldest waiter's deadline,
enforces ``wait_timeout``. Waiters are served strictly first-come first-served: a
released server goes to the head of the queue, and newcomers cannot take an idle server
while anyone is queued. Among idle servers, the one the same client used last is
preferred (its parameters already match), then the most recently used.

The console's PAUSE takes a pool ``RUNNING -> PAUSING -> PAUSED``: from PAUSING on no
server is handed out or opened (clients queue, as for a full pool), idle servers close
at once and busy ones when released; PAUSED is reached when none is left open, and
RESUME goes back to RUNNING. None of it costs the hot path a check: a pausing pool has
no idle server to take, and its busy servers are marked ``retiring``, which release
already reads.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Callable, Iterable, NamedTuple, Optional, Protocol as TypingProtocol, Tuple

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from odissey.config import Route
from odissey.logs import Logger
from odissey.params import Fingerprints, Params, login_parameters, params_from
from odissey.server import ServerConnection, ServerState
from odissey.stats import PoolStats, interval_clock
from odissey.statements import Registry
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError

log = Logger()

Connector = Callable[[], "Deferred[ServerConnection]"]

#: How long a server must have been idle before another worker may take it while this
#: one still has its share (see :meth:`Pool.shed`).
SPARE_AFTER = 0.5
ServerConnector = Callable[[IReactorTime, Route, str, str], "Deferred[ServerConnection]"]


class Withdrawn(Exception):
    """A connector gave a connection attempt up because nobody needed it any more (see
    :meth:`Pool.surplus`): not a failure of the storage."""


class PoolKey(NamedTuple):
    database: str
    user: str
    #: The route's index when that route has address rules (``clients``): one pair may
    #: then be served by several routes, with other server logins and settings, and each
    #: gets pools of its own. None otherwise, where a pair has exactly one route.
    route: Optional[int] = None

    def __str__(self) -> str:
        if self.route is None:
            return f"{self.database}/{self.user}"
        return f"{self.database}/{self.user} (routes[{self.route}])"


class Login(NamedTuple):
    """What a login starts from (see :meth:`Pool.login`)."""

    wanted: Params
    told: dict[str, str]
    #: ``wanted``'s fingerprint (params.Fingerprints): its relay's, until it changes.
    fingerprint: frozenset
    #: The ParameterStatus messages the client is greeted with.
    greeting: bytes
    #: The pool's ``Fingerprints.generation`` the fingerprint was taken in.
    generation: int


class Waiter(TypingProtocol):
    """Who queues for a server (a relay): told once, synchronously, of the outcome."""

    def granted(self, server: ServerConnection) -> None:
        """The server is the waiter's now (it is in the pool's ``active`` set)."""

    def refused(self, error: PoolerError) -> None:
        """No server: the wait timed out, connecting failed, or the pool closed."""


#: A client in the queue: (waiter, deadline, since), a plain tuple (an object would
#: cost CPython a call of its ``__init__`` per wait).
_Queued = Tuple[Waiter, float, float]


class _DeferredWaiter:
    """:meth:`Pool.wait`'s adapter: fires a Deferred (login-time callers)."""

    __slots__ = ("deferred",)

    def __init__(self, deferred: "Deferred[ServerConnection]") -> None:
        self.deferred = deferred

    def granted(self, server: ServerConnection) -> None:
        self.deferred.callback(server)

    def refused(self, error: PoolerError) -> None:
        self.deferred.errback(error)


class PauseState(Enum):
    RUNNING = "running"
    #: No server is handed out or opened; the ones in use close when released.
    PAUSING = "pausing"
    #: And none is open any more.
    PAUSED = "paused"


class Pool:
    """Implements :class:`~odissey.server.ServerOwner` for the servers it opened."""

    def __init__(self, key: PoolKey, route: Route, reactor: IReactorTime, connect: Connector) -> None:
        self.key = key
        self.route = route
        self.reactor = reactor
        self._connect = connect
        self.idle: list[ServerConnection] = []
        #: Client id -> the idle server that client released last (affinity in O(1):
        #: a scan of the idle list per transaction grew with the pool).
        self._idle_of: dict[str, ServerConnection] = {}
        self.active: set[ServerConnection] = set()
        self.opening = 0
        self.waiters: deque[_Queued] = deque()
        #: Fires at the oldest waiter's deadline (or earlier: it then re-arms itself),
        #: which is kept (reactor seconds) to be compared without a call.
        self._timer: Optional[IDelayedCall] = None
        self._timer_at = 0.0
        self._parameters_cache: list[tuple[str, str]] | None = None
        #: Lower-case names of the parameters the servers report (from the cache).
        self.reported: frozenset[str] = frozenset()
        #: What a login starts from, as params.Params and as told to the client (each
        #: login copies them, then applies its own wishes): built with the cache.
        self.login_wanted: Params = {}
        self.login_told: dict[str, str] = {}
        #: A login's ParameterStatus messages, by the values it is told (see greeting).
        self._greetings: dict[tuple[tuple[str, str], ...], bytes] = {}
        #: What logins start from, by their startup packets' wishes (see login).
        self._logins: dict[tuple[tuple[str, str], ...], Login] = {}
        self._parameter_waiters: list[Deferred[list[tuple[str, str]]]] = []
        #: Servers marked by :meth:`shed` to close when they come back, and how many of
        #: them are owed to other workers.
        self._shedding: set[ServerConnection] = set()
        self._owed = 0
        self.closed = False
        self.pause_state = PauseState.RUNNING
        self._pause_waiters: list[Deferred[None]] = []
        #: Bumped by RECONNECT, and when a reload changes the storage or login: a
        #: connection opened before that is closed as it arrives, never handed out.
        self.generation = 0
        self.backoff = 0.0  # delay before the next attempt after failures; 0 when healthy
        self.retry_at = 0.0
        self.failed_at = float("-inf")  # when the last failure was seen
        self.last_error: PoolerError | None = None
        self.fingerprints = Fingerprints()
        #: Transaction mode's prepared statements, shared by the pool's clients.
        settings = route.pool
        self.statements = (
            Registry(settings.max_prepared_statements)
            if settings.mode == "transaction" and settings.max_prepared_statements else None
        )
        #: Integer nanoseconds, for the relays' query and transaction times.
        self.clock_ns = interval_clock(reactor)
        self.stats = PoolStats(self.statements, self.clock_ns)

    @property
    def parameters_cache(self) -> list[tuple[str, str]] | None:
        """The server's ParameterStatus set, as the pool's first login received it."""
        return self._parameters_cache

    @parameters_cache.setter
    def parameters_cache(self, value: list[tuple[str, str]] | None) -> None:
        self._parameters_cache = value
        self.reported = frozenset(name.lower() for name, _ in value or ())
        self.login_wanted = params_from(value or ())
        self.login_told = {key: value for key, (_name, value) in self.login_wanted.items()}
        self._logins.clear()
        self._greetings.clear()

    @property
    def size(self) -> int:
        return self.route.pool.size

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.opening

    # -- clients ---------------------------------------------------------------------------

    def take(self, client_id: str) -> ServerConnection | None:
        """An idle server right now, or None (then call :meth:`wait`).

        Once per transaction, so the idle bookkeeping is written out here rather than
        called (:meth:`_leave_idle` does the same for the other paths)."""
        idle = self.idle
        if self.waiters or not idle:
            return None
        idle_of = self._idle_of
        chosen = idle_of.pop(client_id, None)  # (its last_client is client_id)
        if chosen is None:
            chosen = idle.pop()
            last = chosen.last_client
            if last is not None and idle_of.get(last) is chosen:
                del idle_of[last]
        else:
            idle.remove(chosen)
        self.active.add(chosen)
        self.stats.assignments += 1
        return chosen

    def _enter_idle(self, server: ServerConnection) -> None:
        self.idle.append(server)
        if server.last_client is not None:
            self._idle_of[server.last_client] = server

    def _leave_idle(self, server: ServerConnection) -> None:
        self.idle.remove(server)
        last = server.last_client
        if last is not None and self._idle_of.get(last) is server:
            del self._idle_of[last]

    def queue(self, client_id: str, waiter: Waiter) -> None:
        """Queue for a server: ``waiter`` is told once, maybe before this returns (the
        storage is backing off after failures); 53300 after the route's wait timeout."""
        now = self.reactor.seconds()
        timeout = self.route.pool.wait_timeout
        deadline = now + timeout
        self.waiters.append((waiter, deadline, now))
        timer = self._timer
        if timer is None:
            self._timer_at = deadline
            self._timer = self.reactor.callLater(timeout, self._expire)
        elif self._timer_at > deadline:  # the wait timeout was shortened
            self._timer_at = deadline
            timer.reset(timeout)
        if self.retry_at or len(self.idle) + len(self.active) + self.opening < self.route.pool.size:
            self._grow()  # (a full pool, the usual case when clients queue, needs no call)

    def waited(self, now: float) -> dict[Waiter, float]:
        """Each waiter's time in the queue so far (SHOW POOLS' maxwait, SHOW CLIENTS)."""
        return {waiter: max(0.0, now - since) for waiter, _deadline, since in self.waiters}

    def leave(self, waiter: Waiter) -> None:
        """``waiter`` stops waiting (its client went); it is told nothing more."""
        for queued in self.waiters:
            if queued[0] is waiter:
                self.waiters.remove(queued)
                return

    def wait(self, client_id: str) -> "Deferred[ServerConnection]":
        """:meth:`queue`, as a Deferred; cancelling it leaves the queue."""
        adapter = _DeferredWaiter(Deferred(lambda d: self.leave(adapter)))
        self.queue(client_id, adapter)
        return adapter.deferred

    def _expire(self) -> None:
        """Refuse the waiters whose deadline has passed; re-arm for the next one."""
        self._timer = None
        now = self.reactor.seconds()
        waiters = self.waiters
        expired = [queued for queued in waiters if queued[1] <= now]
        for queued in expired:
            waiters.remove(queued)
        if waiters:
            self._timer_at = min(deadline for _waiter, deadline, _since in waiters)
            self._timer = self.reactor.callLater(max(0.0, self._timer_at - now), self._expire)
        for waiter, _deadline, _since in expired:
            waiter.refused(PoolerError(
                errors.TOO_MANY_CONNECTIONS,
                f'no server connection available in pool "{self.key}" '
                f"within {self.route.pool.wait_timeout:g}s",
                detail=f"pool size is {self.size}: {len(self.active)} in use, {self.opening} connecting, "
                       f"{len(waiters)} other clients waiting"
                       + ("; the pool is paused (PAUSE on the admin console)"
                          if self.pause_state is not PauseState.RUNNING else ""),
            ))

    def release(self, server: ServerConnection) -> None:
        """A clean, idle server comes back: to the first waiter, or to the idle list.

        A server past its lifetime (marked by :meth:`maintain`) is closed here, when
        nobody is using it.
        """
        if self.closed or server.state is not ServerState.IDLE or server.retiring:
            self.active.discard(server)
            server.owner = None
            self._given(server)
            self.stats.closed("shutdown" if self.closed else "lifetime" if server.retiring else "unusable")
            server.close()
            self._grow()
        elif self.waiters:  # (_hand_out, inlined: this runs once per transaction)
            self._grant(server)
        else:  # (and _enter_idle)
            self.active.discard(server)
            self.idle.append(server)
            last = server.last_client
            if last is not None:
                self._idle_of[last] = server

    def discard(self, server: ServerConnection) -> None:
        """A server in doubt: close it, never reuse it."""
        self._given(server)
        self.active.discard(server)
        if server in self.idle:
            self._leave_idle(server)
        self.stats.closed("dirty")
        server.owner = None
        server.abort()
        self._grow()

    def serverLost(self, server: ServerConnection) -> None:
        """A server connection closed under us."""
        self._given(server)
        self.stats.closed("lost")
        self.active.discard(server)
        if server in self.idle:
            self._leave_idle(server)
        self._grow()

    def _hand_out(self, server: ServerConnection) -> None:
        """To the first waiter, at once (its timer is left to notice it has gone), or
        to the idle list."""
        if self.waiters:
            self.active.add(server)
            self._grant(server)
        else:
            self._enter_idle(server)

    def _grant(self, server: ServerConnection) -> None:
        """The first waiter gets ``server``: counted as an assignment after a wait."""
        waiter, _deadline, since = self.waiters.popleft()
        stats = self.stats
        stats.assignments += 1
        stats.waited(self.reactor.seconds() - since)
        waiter.granted(server)

    # -- servers ---------------------------------------------------------------------------

    def _grow(self) -> None:
        """Open servers for waiters not already covered by an opening, within the size.

        While the storage is in back-off after failed attempts, waiters fail at once with
        the last error instead of hanging.
        """
        if self.closed:
            return
        if self.pause_state is not PauseState.RUNNING:  # (a server left: maybe the last)
            self._check_paused()
            return
        if self.retry_at and self.reactor.seconds() < self.retry_at:  # (0 when healthy: no clock read)
            self._fail_uncovered(self._unreachable())
            return
        size = self.route.pool.size
        # (a full pool, the usual case for a client that queues, is seen with no call)
        while len(self.idle) + len(self.active) + self.opening < size and self._wanted() > self.opening:
            self._open()

    def _wanted(self) -> int:
        """Connections somebody is waiting for (a waiter, or a login needing parameters)."""
        return len(self.waiters) + (1 if self._parameter_waiters and self.parameters_cache is None else 0)

    def _open(self) -> None:
        self.opening += 1
        started = self.reactor.seconds()
        self._connect().addCallbacks(self._opened, self._open_failed,
                                     callbackArgs=(self.generation,), errbackArgs=(started,))

    def _opened(self, server: ServerConnection, generation: int) -> None:
        self.opening -= 1
        self.stats.server_connects += 1
        self.backoff, self.retry_at, self.last_error = 0.0, 0.0, None
        if self.closed or self.pause_state is not PauseState.RUNNING or generation != self.generation:
            server.close()  # (not wanted any more, or begun before a RECONNECT or reload)
            self._grow()
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
        if failure.check(Withdrawn):
            return
        self.stats.connect_failures += 1
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
        if self.pause_state is PauseState.RUNNING:
            self._fail_uncovered(error)
        else:  # paused clients wait for RESUME, not for the storage
            self._check_paused()

    def _fail_uncovered(self, error: PoolerError) -> None:
        """Fail the waiters (and logins) that no connection attempt in progress will serve."""
        if self.parameters_cache is None and self.opening == 0:
            waiting, self._parameter_waiters = self._parameter_waiters, []
            for d in waiting:
                d.errback(error.copy())
        while len(self.waiters) > self.opening:
            self.waiters.pop()[0].refused(error.copy())

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

    def maintain(self) -> None:
        """Close idle servers past their idle timeout or lifetime, and mark busy ones past
        their lifetime to be closed when released; keep min_size open.

        The release path reads no clock: a server's idle time counts from the first pass
        that finds it released (``touched``), so it closes up to one period late."""
        now = self.reactor.seconds()
        settings = self.route.pool
        lifetime = settings.server_lifetime
        if lifetime:
            for server in self.active:
                if now - server.created_at > lifetime:
                    server.retiring = True
        for server in list(self.idle):
            if server.touched:
                server.touched = False
                server.used_at = now
            idle_too_long = (
                settings.server_idle_timeout
                and now - server.used_at > settings.server_idle_timeout
                and self.total > settings.min_size
            )
            if idle_too_long or (lifetime and now - server.created_at > lifetime):
                self._leave_idle(server)
                self.stats.closed("idle_timeout" if idle_too_long else "lifetime")
                server.owner = None
                server.close()
        if (not self.closed and not self.waiters and now >= self.retry_at
                and self.pause_state is PauseState.RUNNING):
            while self.total < settings.min_size:
                self._open()

    def surplus(self) -> int:
        """Connection attempts in progress that no waiter (nor min_size) needs now: their
        waiters were served by servers that came back meanwhile."""
        needed = max(self._wanted(), self.route.pool.min_size - len(self.idle) - len(self.active))
        return max(0, self.opening - needed)

    def shed(self, idle_only: bool = False) -> bool:
        """Give one server up for a client of another worker (whose master holds the
        pool's global size): the least recently used idle server closes now; with none
        idle and unless ``idle_only``, the next busy one to come back, whichever it is,
        closes instead of serving this pool's next waiter. Every busy server is marked
        ``retiring`` (release's existing check, so the hot path pays nothing) until as
        many have closed as were asked for. ``idle_only`` takes only a *spare* server,
        idle for SPARE_AFTER at least as the janitor saw it: under transaction pooling a
        busy worker's servers are idle for moments between transactions, and taking
        those would move servers between workers all the time, a connect each. False
        when there is nothing to give."""
        if self.idle:
            server = self.idle[0]  # (the least recently released)
            if idle_only and (server.touched or self.reactor.seconds() - server.used_at < SPARE_AFTER):
                return False
            self._leave_idle(server)
            server.owner = None
            server.close()
            return True
        if idle_only:
            return False
        for server in self.active:
            if not server.retiring:
                server.retiring = True
                self._shedding.add(server)
        if len(self._shedding) <= self._owed:
            return False
        self._owed += 1
        return True

    def _forget_shedding(self) -> None:
        """A control command or a reload marks servers to close: from now on the marks
        are theirs, and :meth:`_given` must not take any back (the debts to other
        workers are paid by those closes all the same)."""
        self._shedding.clear()
        self._owed = 0

    def _given(self, server: ServerConnection) -> None:
        """A server leaves: if it was marked by :meth:`shed`, one debt is paid; once
        all are, the servers still marked go back to serving this pool."""
        if server not in self._shedding:
            return
        self._shedding.discard(server)
        self._owed -= 1
        if not self._owed:
            for other in self._shedding:
                other.retiring = False
            self._shedding.clear()

    # -- the console's controls --------------------------------------------------------

    def _retire_all(self) -> None:
        """Idle servers close now, busy ones when released."""
        self._forget_shedding()
        for server in self.active:
            server.retiring = True
        for server in list(self.idle):
            self._leave_idle(server)
            server.owner = None
            server.close()

    def pause(self) -> None:
        """PAUSE: hand out and open no server; close every one as soon as it is free."""
        if self.pause_state is PauseState.RUNNING:
            self.pause_state = PauseState.PAUSING
            self._retire_all()
        self._check_paused()

    def when_paused(self) -> "Deferred[None]":
        """Fires once a paused pool has no server left open; fails with 57014 if
        RESUME comes first."""
        if self.pause_state is PauseState.PAUSED:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._pause_waiters.append(d)
        return d

    def _check_paused(self) -> None:
        if self.pause_state is PauseState.PAUSING and not self.active and not self.opening:
            self.pause_state = PauseState.PAUSED
            waiting, self._pause_waiters = self._pause_waiters, []
            for d in waiting:
                d.callback(None)

    def resume(self) -> None:
        """RESUME: serve again; the clients that queued meanwhile get servers."""
        if self.pause_state is PauseState.RUNNING:
            return
        self.pause_state = PauseState.RUNNING
        waiting, self._pause_waiters = self._pause_waiters, []
        for d in waiting:
            d.errback(PoolerError(errors.QUERY_CANCELED, f'PAUSE of "{self.key}" canceled by RESUME',
                                  severity="ERROR"))
        self._grow()

    def reconnect(self) -> None:
        """RECONNECT: every server open now is closed as soon as it is free (idle ones
        at once, those still connecting once connected); new ones open as clients need
        them."""
        self.generation += 1
        self._retire_all()
        self._grow()

    def kill(self) -> None:
        """KILL: pause, and cut every server at once (the console drops the clients)."""
        self.pause()
        for server in list(self.active):
            self.discard(server)

    def to_close(self) -> list[ServerConnection]:
        """The servers that will close when released (RECONNECT, server_lifetime)."""
        return [server for server in self.active if server.retiring]

    def reconfigure(self, route: Route, reconnect: bool) -> None:
        """A reload changed this pool's route (same match rule, same pool mode). Sizes
        and timeouts apply now: past a smaller size idle servers close, and busy ones
        close when released. With ``reconnect`` (storage, server login or auth changed)
        no server of the old settings serves anyone again: idle ones close now, busy ones
        when their client releases them (its transaction is not cut)."""
        self._forget_shedding()
        self.route = route
        if reconnect:
            self.generation += 1
            self.backoff, self.retry_at, self.last_error = 0.0, 0.0, None
            self.parameters_cache = None  # the new storage's servers may report others
            self._greetings.clear()
            for server in self.active:
                server.retiring = True
            keep = 0
        else:
            keep = max(0, route.pool.size - len(self.active) - self.opening)
        while len(self.idle) > keep:
            server = self.idle[0]
            self._leave_idle(server)
            server.owner = None
            server.close()
        excess = self.total - route.pool.size
        for server in self.active:
            if excess <= 0:
                break
            if not server.retiring:
                server.retiring = True
                excess -= 1
        self._grow()

    def greeting(self, told: tuple[tuple[str, str], ...], wanted: Params) -> bytes:
        """The ParameterStatus messages for a login told these (key, value) pairs, each
        named as ``wanted`` spells it (as the pool's servers do, whatever the client
        wrote): built once per distinct set, since most clients of a pool are told the
        same."""
        greeting = self._greetings.get(told)
        if greeting is None:
            if len(self._greetings) >= 256:
                self._greetings.clear()
            greeting = self._greetings[told] = b"".join(
                m.parameter_status(wanted[key][0], value) for key, value in told)
        return greeting

    def login(self, wants: tuple[tuple[str, str], ...], canonical: Callable[[str, str], str]) -> "Login":
        """What a login with these startup wishes starts from, once the parameter cache
        is known (``params.login_parameters`` from it, their fingerprint, the greeting):
        worked out once per distinct set of wishes, since most of a pool's clients send
        the same startup packet. The relay copies ``wanted`` and ``told``, which it
        changes. (``canonical`` is asked only then: how PostgreSQL spells a value it
        reports is the same at every check.) A fingerprint from before the pool's
        fingerprints started afresh is taken again, or it would match no server's."""
        login = self._logins.get(wants)
        fingerprints = self.fingerprints
        if login is None:
            wanted, told = login_parameters(self.login_wanted, self.login_told, wants, canonical)
            if len(self._logins) >= 256:  # (clients inventing values cannot make it grow)
                self._logins.clear()
            login = self._logins[wants] = Login(
                wanted, told, fingerprints.of(wanted), self.greeting(tuple(told.items()), wanted),
                fingerprints.generation)
        elif login.generation != fingerprints.generation:
            login = self._logins[wants] = login._replace(
                fingerprint=fingerprints.of(login.wanted), generation=fingerprints.generation)
        return login

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
            self.stats.closed("shutdown")
            server.close()
        self.idle.clear()
        self._idle_of.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiters:
            self.waiters.popleft()[0].refused(PoolerError(errors.ADMIN_SHUTDOWN, "the pooler is shutting down"))


class Pools:
    """All pools, created on first use."""

    def __init__(self, reactor: IReactorTime, connect: ServerConnector) -> None:
        self.reactor = reactor
        self._connect = connect
        self.pools: dict[PoolKey, Pool] = {}
        #: The console's switches, per client-facing database name. They are kept here,
        #: with the pools, because a pool made later for a paused database starts paused.
        self.paused_all = False
        self.paused: set[str] = set()
        #: Databases whose new logins are refused (DISABLE).
        self.disabled: set[str] = set()
        #: Pools a reload took out of service (their route was removed, or its mode
        #: changed): they serve the clients they had until the last one leaves.
        self.retired: set[Pool] = set()

    @staticmethod
    def key_of(route: Route, database: str, user: str) -> PoolKey:
        return PoolKey(database, user, None if route.clients is None else route.index)

    def get(self, route: Route, database: str, user: str) -> Pool:
        key = self.key_of(route, database, user)
        pool = self.pools.get(key)
        if pool is None:
            def connect() -> "Deferred[ServerConnection]":  # (the route as a reload left it)
                return self._connect(self.reactor, made.route, database, user)

            made = pool = self.pools[key] = Pool(key, route, self.reactor, connect)
            if self.is_paused(database):
                pool.pause()
        return pool

    def is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused

    def of(self, database: Optional[str]) -> list[Pool]:
        """The pools of one database (None: all)."""
        return [pool for pool in (*self.pools.values(), *self.retired)
                if database is None or pool.key.database == database]

    def pause(self, database: Optional[str]) -> "Deferred[None]":
        """Pause one database's pools (None: all), now and future ones; fires once
        none of them has a server open."""
        if database is None:
            self.paused_all = True
        else:
            self.paused.add(database)
        pools = self.of(database)
        for pool in pools:
            pool.pause()
        return _all(pool.when_paused() for pool in pools)

    def resume(self, database: Optional[str]) -> None:
        """Resume one database (None: every paused one). A database stays paused while
        all of them are."""
        if database is None:
            self.paused_all = False
            self.paused.clear()
        else:
            self.paused.discard(database)
        for pool in self.of(database):
            if not self.is_paused(pool.key.database):
                pool.resume()

    def reconnect(self, database: Optional[str]) -> None:
        for pool in self.of(database):
            pool.reconnect()

    def kill(self, database: Optional[str]) -> None:
        """Pause the database (None: all) and cut all its servers at once."""
        if database is None:
            self.paused_all = True
        else:
            self.paused.add(database)
        for pool in self.of(database):
            pool.kill()

    def closing(self, database: Optional[str]) -> "Deferred[None]":
        """Fires once every server of the database (None: all) that is to close when
        released has closed (WAIT_CLOSE)."""
        return _all(server.closed for pool in self.of(database) for server in pool.to_close())

    def rekey(self, pools: dict[PoolKey, Pool]) -> None:
        """After a reload: the pools that go on, by their (maybe renumbered) keys; the
        others are retired."""
        for pool in self.pools.values():
            if pool not in pools.values():
                self.retired.add(pool)
        for key, pool in pools.items():
            pool.key = key
        self.pools = pools

    def sweep_retired(self, in_use: set[Pool]) -> None:
        """Close the retired pools that no client uses any more."""
        for pool in list(self.retired):
            if pool not in in_use:
                self.retired.discard(pool)
                pool.close()

    def close(self) -> None:
        """Close every pool: idle servers go, waiters fail, nothing new opens (the
        service's ``Live`` waits for the connections still open)."""
        for pool in [*self.pools.values(), *self.retired]:
            pool.close()


def _all(waits: "Iterable[Deferred[None]]") -> "Deferred[None]":
    """Fires once every Deferred has, or with the first failure."""
    def first_failure(failure: Failure) -> Failure:
        return failure.value.subFailure

    gathered = DeferredList(list(waits), fireOnOneErrback=True, consumeErrors=True)
    return gathered.addCallbacks(lambda _: None, first_failure)
