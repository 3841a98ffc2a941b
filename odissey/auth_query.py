"""auth_query: a route's user secrets looked up in PostgreSQL, as PgBouncer's auth_user does.

A route with ``auth.query_user`` holds no client password: at each login (or from a short
cache) it runs ``auth.query`` with the user name as the Bind parameter ``$1`` (never
spliced into the SQL), on a connection of its own logged in as the query user. The query
returns one row (name, secret[, valid until]).

What the client may not touch (CVE-2025-12819): the lookup connection is Odissey's
alone, opened with Odissey's startup packet and never the client's, and that packet pins
``search_path`` to ``pg_catalog``, so a client's ``options=-csearch_path=evil`` or a
function shadowing a catalog name in another schema never takes part in the lookup.
(The query user's own settings cannot change it either: a startup-packet value wins
over ALTER ROLE ... SET.) ``DateStyle``/``TimeZone`` are pinned too, so that the
expiry column reads the same everywhere.

What a lookup must not tell (an oracle): an unknown user, a NULL secret, several rows
and an expired password (CVE-2025-2291: refused like PostgreSQL refuses one) all end in
the same 28P01 after the same exchange as a wrong password (``ClientVerifiers.for_lookup``).
Results, known or not, are cached ``query_cache_ttl`` seconds, so a repeated try costs
the same whoever it names. A lookup that fails outright (the storage is down, the query
is wrong) fails the login with 08006 whatever the user, and its cause goes to the log.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from odissey.auth.secrets import InThread
from odissey.config import AuthQuery, Route, Secret
from odissey.logs import Logger
from odissey.server import LoginInfo, ServerConnection, ServerState, Tracker, open_connection
from odissey.tls import ServerSide
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError

log = Logger()

#: The lookup connection's own startup parameters: nothing of the client's is ever added.
LOOKUP_OPTIONS: Tuple[Tuple[str, str], ...] = (
    ("search_path", "pg_catalog"),
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("client_encoding", "UTF8"),
    ("application_name", "odissey auth_query"),
)
#: A lookup connection unused this long is closed (the next lookup opens another).
IDLE_CLOSE = 60.0
#: Cached lookups per source; past it the cache starts afresh (users invented by
#: clients cannot make it grow without bound).
MAX_CACHED = 10000
#: (route, database) pairs with lookup state; past it those without a connection go.
MAX_SOURCES = 1000


@dataclass(frozen=True)
class Found:
    """What a lookup found: the secret (None: no such user, or none usable) and when the
    password stops being valid (seconds since the epoch; None: never)."""

    secret: Optional[Secret]
    valid_until: Optional[float] = None

    def expired(self, now: float) -> bool:
        return self.valid_until is not None and self.valid_until <= now

    def __repr__(self) -> str:
        return f"Found({'***' if self.secret else None}, valid_until={self.valid_until})"


NOT_FOUND = Found(None)

_TIMESTAMP = re.compile(
    r"^(\d{4,})-(\d\d)-(\d\d)(?:[ T](\d\d):(\d\d):(\d\d)(?:\.(\d+))?)?"
    r"(?:([+-])(\d\d)(?::?(\d\d))?(?::?(\d\d))?)?( BC)?$"
)


def parse_valid_until(text: str) -> Optional[float]:
    """A timestamptz as PostgreSQL writes it with DateStyle ISO (or a date) -> seconds
    since the epoch; ``infinity`` -> None (never expires). ValueError for anything else:
    the caller then treats the password as expired (fail closed)."""
    text = text.strip()
    if text == "infinity":
        return None
    if text == "-infinity":
        return float("-inf")
    match = _TIMESTAMP.match(text)
    if match is None:
        raise ValueError(f"unreadable expiry {text!r}")
    year, month, day, hour, minute, second, fraction, sign, oh, om, os_, bc = match.groups()
    if bc:
        return float("-inf")  # long gone
    seconds = float(calendar.timegm((int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                                     int(second or 0), 0, 0, 0)))
    if fraction:
        seconds += float("0." + fraction)
    if sign:
        offset = int(oh) * 3600 + int(om or 0) * 60 + int(os_ or 0)
        seconds -= offset if sign == "+" else -offset
    return seconds


def found_in(rows: List[bytes], user: str) -> Found:
    """The lookup's answer from its DataRows: exactly one row with a non-NULL secret, or
    nothing (several rows would be a query that does not say which one is meant)."""
    if len(rows) != 1:
        if rows:
            log.warn("auth_query returned {n} rows for user {user!r}: refusing", n=len(rows), user=user)
        return NOT_FOUND
    values = m.parse_data_row(rows[0])
    if len(values) < 2 or values[1] is None:
        return NOT_FOUND
    secret = Secret.parse(values[1].decode("utf-8", "replace"))
    valid_until = None
    if len(values) > 2 and values[2] is not None:
        try:
            valid_until = parse_valid_until(values[2].decode("utf-8", "replace"))
        except ValueError as exc:
            log.warn("auth_query for user {user!r}: {exc}; treating the password as expired",
                     user=user, exc=exc)
            valid_until = float("-inf")
    return Found(secret, valid_until)


class _Source:
    """One (route, database)'s lookups: its connection, its cache, one query at a time."""

    def __init__(
        self, owner: "AuthQueries", route: Route, query: AuthQuery, database: str
    ) -> None:
        self.owner = owner
        self.route = route
        self.query = query
        self.login = LoginInfo(route.storage, query.database or database, query.user,
                               query.password, options=LOOKUP_OPTIONS)
        self.server: Optional[ServerConnection] = None
        self.lock = DeferredLock()
        self.cache: Dict[str, Tuple[float, Found]] = {}
        self.running: Dict[str, List["Deferred[Found]"]] = {}
        self.idle_timer: Optional[IDelayedCall] = None

    def lookup(self, user: str) -> "Deferred[Found]":
        now = self.owner.reactor.seconds()
        cached = self.cache.get(user)
        if cached is not None and cached[0] > now:
            d: Deferred[Found] = Deferred()
            d.callback(cached[1])
            return d
        waiting: Deferred[Found] = Deferred()
        if user in self.running:  # the same user asked for twice at once: one query
            self.running[user].append(waiting)
            return waiting
        self.running[user] = [waiting]
        self.lock.run(self._run, user).addBoth(self._done, user)
        return waiting

    def _done(self, result: "Found | Failure", user: str) -> None:
        if isinstance(result, Found) and self.query.cache_ttl > 0:
            if len(self.cache) >= MAX_CACHED:
                self.cache.clear()
            self.cache[user] = (self.owner.reactor.seconds() + self.query.cache_ttl, result)
        for d in self.running.pop(user, []):
            if isinstance(result, Failure):
                d.errback(PoolerError(
                    errors.CONNECTION_FAILURE,
                    f'could not look up the password of user "{user}": the pooler\'s log says why',
                ) if not isinstance(result.value, PoolerError) else result.value.copy())
            else:
                d.callback(result)

    @inlineCallbacks
    def _run(self, user: str):
        server = yield self._connection()
        storage = self.route.storage
        fetching = server.fetch(m.parameterised_query(self.query.query, [user]))
        fetching.addTimeout(storage.connect_timeout, self.owner.reactor,
                            onTimeoutCancel=lambda _r, _t: self._stuck(server))
        try:
            failed, rows = yield fetching
        except PoolerError:
            raise
        except Exception as exc:
            log.error("auth_query on storage {storage}: {exc}", storage=storage.name, exc=exc)
            raise PoolerError(errors.CONNECTION_FAILURE,
                              f'could not look up the password of user "{user}": lookup failed') from None
        self._arm_idle(server)
        if failed:
            fields = failed[0]
            log.error("auth_query on storage {storage} failed: {code} {msg}", storage=storage.name,
                      code=fields.get("C"), msg=fields.get("M"))
            raise PoolerError(
                errors.CONNECTION_FAILURE,
                f'could not look up the password of user "{user}": the pooler\'s log says why')
        return found_in(rows, user)

    def _stuck(self, server: ServerConnection) -> Failure:
        server.abort()
        return Failure(PoolerError(errors.CONNECTION_FAILURE, "auth_query timed out"))

    @inlineCallbacks
    def _connection(self):
        server = self.server
        if server is not None and server.state is ServerState.IDLE:
            return server
        self.server = None
        owner = self.owner
        server = ServerConnection(self.login, owner.reactor, owner.threads, owner.tracker,
                                  collect_rows=True, tls=owner.tls.get(self.route.storage.name))
        if owner.tracker is not None:
            owner.tracker.add(server)
        try:
            yield open_connection(owner.reactor, server, self.route.storage)
        except PoolerError as exc:
            log.error("auth_query: could not log in as {user!r}: {exc}", user=self.login.user,
                      exc=exc.message)
            raise PoolerError(exc.sqlstate if exc.sqlstate == errors.INVALID_CATALOG_NAME
                              else errors.CONNECTION_FAILURE,
                              exc.message if exc.sqlstate == errors.INVALID_CATALOG_NAME
                              else "could not look up the password: the pooler's log says why") from None
        if owner.closed:
            server.close()
            raise PoolerError(errors.ADMIN_SHUTDOWN, "the pooler is shutting down")
        self.server = server
        return server

    def _arm_idle(self, server: ServerConnection) -> None:
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.reset(IDLE_CLOSE)
        else:
            self.idle_timer = self.owner.reactor.callLater(IDLE_CLOSE, self.close)

    def close(self) -> None:
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None
        server, self.server = self.server, None
        if server is not None:
            server.close()


class AuthQueries:
    """Every route's lookups, by (route, database); owned by the service, which closes it."""

    def __init__(self, reactor: IReactorTime, threads: InThread, tracker: Optional[Tracker] = None,
                 tls: "Optional[Mapping[str, ServerSide]]" = None) -> None:
        self.reactor = reactor
        self.threads = threads
        self.tracker = tracker
        #: TLS to each storage (storages.*.tls): lookups use it like the pools' logins.
        self.tls: Mapping[str, ServerSide] = tls or {}
        self.closed = False
        self._sources: Dict[Tuple[int, str], _Source] = {}

    def lookup(self, route: Route, database: str, user: str) -> "Deferred[Found]":
        """The secret of ``user`` for a login to ``database`` through ``route``."""
        query = route.auth.query
        assert query is not None
        if self.closed:
            d: Deferred[Found] = Deferred()
            d.errback(PoolerError(errors.ADMIN_SHUTDOWN, "the pooler is shutting down"))
            return d
        where = query.database or database
        source = self._sources.get((route.index, where))
        if source is not None and source.route != route:  # a reload changed the route
            source.close()
            source = None
        if source is None:
            if len(self._sources) >= MAX_SOURCES:  # database names a client invented
                self._forget_idle()
            source = self._sources[(route.index, where)] = _Source(self, route, query, where)
        return source.lookup(user)

    def _forget_idle(self) -> None:
        for key, source in list(self._sources.items()):
            if source.server is None and not source.running:
                source.close()
                del self._sources[key]

    def close(self) -> None:
        self.closed = True
        for source in self._sources.values():
            source.close()
