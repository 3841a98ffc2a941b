"""The admin console: a virtual database (``odissey``, alias ``pgbouncer``) that Odissey
serves itself, on its own listeners, to the users named in ``admin_users`` and
``stats_users``; spoken to with psql, like PgBouncer's.

Where PgBouncer 1.25 has the same command, the columns are its columns, in its order and
with its meaning, so that tools written for PgBouncer read Odissey unchanged; a column
Odissey has nothing real to put in is left out rather than filled with a constant (the
omissions are listed in docs/operations.md).

A console client is logged in by ``client.py`` like any other (its password is the one
its routes ask for: see :meth:`Console.auth_route`), then its bytes go to a
:class:`ConsoleSession` instead of a relay: the relay's hot path knows nothing of it.
Only the simple query protocol is spoken (as PgBouncer's console); an extended-protocol
request gets 0A000 and is skipped up to its Sync, so the session goes on.
"""

from __future__ import annotations

import datetime
import platform
from typing import Any, Callable, Iterable, Optional, Protocol as TypingProtocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.python.failure import Failure

import odissey
from odissey.config import ANY, CONSOLE_DATABASES, Config, Route
from odissey.control import Control, serves
from odissey.logs import Logger
from odissey.pool import Pool, Pools
from odissey.router import ClientAddress, Router
from odissey.server import ServerConnection, ServerState
from odissey.stats import Period, Totals, total
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError

log = Logger()

TEXT, INT4, INT8 = m.TEXT_OID, m.INT4_OID, m.INT8_OID
ADMIN, STATS = "admin", "stats"
#: The longest console message accepted (a command is a line of text).
MAX_MESSAGE = 1 << 20
VERSION = f"Odissey {odissey.__version__}"
#: What the console tells a login in ParameterStatus (psql reads server_version and the
#: encodings; PgBouncer's console sends the same set, with its own version).
GREETING = (
    ("server_version", f"{odissey.__version__}/odissey"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
    ("is_superuser", "on"),
)

#: PgBouncer's commands that change things: not in this version of the console yet.
COMING = ("SUSPEND", "SET")
#: Commands for admin_users only, answered by the service that owns the process.
ADMIN_COMMANDS = ("SHUTDOWN", "RELOAD")
#: PgBouncer's SHOW commands that Odissey does not answer.
SHOW_NEVER = ("PEERS", "PEER_POOLS", "FDS", "SOCKETS", "ACTIVE_SOCKETS", "MEM",
              "DNS_HOSTS", "DNS_ZONES")

HELP = """SHOW HELP|VERSION|POOLS|CLIENTS|SERVERS|DATABASES|USERS|CONFIG|LISTS|ROUTES
SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|STATE
PAUSE [<db>], RESUME [<db>], DISABLE <db>, ENABLE <db>, RECONNECT [<db>], KILL [<db>],
KILL_CLIENT <id>, WAIT_CLOSE [<db>]
RELOAD, SHUTDOWN [WAIT_FOR_CLIENTS]
Coming (answered 0A000 for now):
\tSUSPEND, SET key = arg"""


class Lifecycle(TypingProtocol):
    """What the console may ask of the service that owns the process."""

    def shutdown(self, wait_for_clients: bool) -> None:
        """SHUTDOWN: stop now; WAIT_FOR_CLIENTS: stop accepting, exit once clients left.
        The whole process: with workers, the master stops every worker."""

    def reload(self) -> "Deferred[list[str]]":
        """RELOAD: read the configuration again; the problems that kept it from applying."""


class ConsoleClient(TypingProtocol):
    """What the console reads of a client connection (``ClientConnection`` is one)."""

    id: str
    user: str
    database: str
    connected_at: float
    relay: Any
    console: Optional["ConsoleSession"]

    @property
    def transport(self) -> Any: ...

    def fail(self, error: PoolerError) -> None:
        """Send one FATAL error and close (KILL, KILL_CLIENT: see control.py)."""


def _when(seconds: float) -> str:
    """A wall-clock time as PgBouncer's console shows it."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def _address(address: object) -> tuple[Optional[str], Optional[int]]:
    """(addr, port) of a Twisted address: ``unix`` and no port for a unix socket."""
    host = getattr(address, "host", None)
    if host is None:
        return "unix", None
    return host, getattr(address, "port", None)


def _tls(transport: object) -> str:
    """The TLS protocol and cipher of a connection ("" in plaintext), as PgBouncer's tls column."""
    if transport is None or not ISSLTransport.providedBy(transport):
        return ""
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
        return f"{handle.get_protocol_version_name()}/{handle.get_cipher_name()}"
    except Exception:  # a transport mid-handshake or closing: nothing to say
        return ""


def _id_number(connection_id: str) -> int:
    """PgBouncer's numeric ``id`` column: the number of an id like ``c17``."""
    return int(connection_id[1:])


class Console:
    """What every console session shares: the configuration, the router (for logins),
    the pools and the client connections (for SHOW)."""

    def __init__(
        self,
        config: Config,
        router: Router,
        pools: Pools,
        clients: Callable[[], Iterable[ConsoleClient]],
        reactor: IReactorTime,
        lifecycle: Optional[Lifecycle] = None,
        period: Optional[Period] = None,
    ) -> None:
        #: SHUTDOWN's addressee (None: the command is refused, as in tests of SHOW).
        self.lifecycle = lifecycle
        self.pools = pools
        self.clients = clients
        self.reactor = reactor
        #: The stats period the averages are taken over (turned by the service).
        self.period = period if period is not None else Period(reactor.seconds(), config.stats_period)
        self.control = Control(lambda: self.config.routes, pools, clients)
        #: Who carries out a control command when other processes serve the same pools
        #: (a worker's master, which asks every worker); None: this process's Control.
        self.spread: Optional[Callable[[str, Optional[str]], Deferred[None]]] = None
        #: The other processes' rows of SHOW CLIENTS or SERVERS (a worker's master asks
        #: the other workers); None: this process's rows are all there are.
        self.gather: Optional[Callable[[str], Deferred[list[list[Any]]]]] = None
        self.configure(config, router)

    def configure(self, config: Config, router: Router) -> None:
        """Take a (re)loaded configuration: its users and routes serve the next logins."""
        self.config = config
        self.router = router
        self.admin_users = frozenset(config.admin_users)
        self.stats_users = frozenset(config.stats_users)
        #: SHOW POOLS rows of the other processes serving the same listeners (the other
        #: workers, as their master last relayed them); empty in one process.
        self.elsewhere: Callable[[], list[list[Any]]] = list

    # -- login -------------------------------------------------------------------------

    serves = staticmethod(serves)

    def role(self, user: str) -> Optional[str]:
        """``admin``, ``stats`` or None (not allowed in)."""
        if user in self.admin_users:
            return ADMIN
        if user in self.stats_users:
            return STATS
        return None

    def auth_route(self, user: str, client: ClientAddress) -> Optional[Route]:
        """The route whose ``auth`` a console login of ``user`` goes through.

        PgBouncer's admin users log in with their auth_file password, the one they use
        for every database. Odissey keeps passwords on routes, so: the first route in the
        file that names this user (any database) and serves the client's address, else
        the route a database-``*`` rule would pick (a catch-all). None: no password is
        known, and the login gets an unknown user's mock exchange (then 28P01)."""
        for route in self.config.routes:
            if route.user == user and route.own_auth and client.within(route.clients):
                return route
        matched = self.router.match(CONSOLE_DATABASES[0], user, client)
        if matched is not None and not matched.own_auth:
            return self.router.auth_route_of(matched, CONSOLE_DATABASES[0], user, client)
        return matched

    @staticmethod
    def lookup_database(route: Route) -> str:
        """Where an auth_query for a console login runs: its query_database, else the
        route's database (or its server database), else ``postgres``."""
        query = route.auth.query
        if query is not None and query.database:
            return query.database
        if route.database != ANY:
            return route.server.database or route.database
        return route.server.database or "postgres"

    # -- the commands ------------------------------------------------------------------

    def _consoles(self) -> list[ConsoleClient]:
        return [c for c in self.clients() if c.console is not None]

    def _pool_clients(self) -> dict[Pool, list[ConsoleClient]]:
        by_pool: dict[Pool, list[ConsoleClient]] = {}
        for client in self.clients():
            relay = client.relay
            if relay is not None:
                by_pool.setdefault(relay.pool, []).append(client)
        return by_pool

    def show_pools(self) -> tuple[list, list]:
        columns = [("database", TEXT), ("user", TEXT), ("cl_active", INT4), ("cl_waiting", INT4),
                   ("sv_active", INT4), ("sv_idle", INT4), ("sv_tested", INT4), ("sv_login", INT4),
                   ("maxwait", INT4), ("maxwait_us", INT4), ("pool_mode", TEXT)]
        rows = self.pool_rows()
        others = self.elsewhere()
        return columns, merge_pools(rows + others) if others else rows

    def pool_rows(self) -> list[list[Any]]:
        """SHOW POOLS rows of this process alone."""
        now = self.reactor.seconds()
        by_pool = self._pool_clients()
        rows = []
        for pool in list(self.pools.pools.values()):
            clients = by_pool.get(pool, [])
            waiting = sum(1 for c in clients if c.relay.state.value == "waiting")
            waited = max(pool.waited(now).values(), default=0.0)
            active_servers = [s for s in pool.active if s.state is ServerState.ACTIVE]
            rows.append([
                pool.key.database, pool.key.user, len(clients) - waiting, waiting,
                len(active_servers), len(pool.idle), len(pool.active) - len(active_servers),
                pool.opening, int(waited), int(waited * 1_000_000) % 1_000_000,
                pool.route.pool.mode,
            ])
        return rows

    _SOCKET_COLUMNS = [("type", TEXT), ("user", TEXT), ("database", TEXT), ("state", TEXT),
                       ("addr", TEXT), ("port", INT4), ("local_addr", TEXT), ("local_port", INT4),
                       ("connect_time", TEXT)]

    def show_clients(self) -> tuple[list, list]:
        columns = self._SOCKET_COLUMNS + [
            ("request_time", TEXT), ("wait", INT4), ("wait_us", INT4), ("ptr", TEXT), ("link", TEXT),
            ("tls", TEXT), ("application_name", TEXT), ("id", INT8)]
        now = self.reactor.seconds()
        rows = []
        waited: dict[Pool, dict[object, float]] = {}
        for client in sorted(self.clients(), key=lambda c: _id_number(c.id)):
            relay = client.relay
            if relay is None and client.console is None:
                continue  # still logging in (PgBouncer lists those only in SHOW SOCKETS)
            transport = client.transport
            if transport is None:
                continue
            addr, port = _address(transport.getPeer())
            local_addr, local_port = _address(transport.getHost())
            session = client.console
            if session is not None:  # active only while running a command (this one)
                state = "active" if session.busy else "idle"
                request, wait, link, app = session.request_at, 0.0, None, session.application_name
            else:
                state = {"waiting": "waiting", "idle": "idle"}.get(relay.state.value, "active")
                request = relay.heard_at
                wait = 0.0
                if state == "waiting":
                    if relay.pool not in waited:
                        waited[relay.pool] = relay.pool.waited(now)
                    wait = waited[relay.pool].get(relay, 0.0)
                link = relay.server.id if relay.server is not None else None
                app_param = relay.wanted.get("application_name")
                app = app_param[1] if app_param else ""
            rows.append([
                "C", client.user, client.database, state, addr, port, local_addr, local_port,
                _when(client.connected_at), _when(request), int(wait),
                int(wait * 1_000_000) % 1_000_000, client.id, link or "", _tls(transport), app,
                _id_number(client.id),
            ])
        return columns, rows

    def show_servers(self) -> tuple[list, list]:
        columns = self._SOCKET_COLUMNS + [
            ("close_needed", INT4), ("ptr", TEXT), ("link", TEXT), ("remote_pid", INT4), ("tls", TEXT),
            ("application_name", TEXT), ("prepared_statements", INT4), ("id", INT8)]
        rows = []
        for pool in list(self.pools.pools.values()):
            servers: list[tuple[ServerConnection, str]] = []
            for server in pool.active:
                servers.append((server, "active" if server.state is ServerState.ACTIVE else "tested"))
            servers.extend((server, "idle") for server in pool.idle)
            for server, state in sorted(servers, key=lambda pair: _id_number(pair[0].id)):
                transport = server.transport
                if transport is None:
                    continue
                addr, port = _address(transport.getPeer())
                local_addr, local_port = _address(transport.getHost())
                handler = server.handler if state == "active" else None
                client = getattr(handler, "client", None)
                relay = getattr(client, "relay", None)
                app_param = relay.wanted.get("application_name") if relay is not None else None
                rows.append([
                    "S", pool.key.user, pool.key.database, state, addr, port, local_addr, local_port,
                    _when(server.created_at), int(server.retiring), server.id, getattr(client, "id", ""),
                    server.key[0] if server.key is not None else None, _tls(transport),
                    app_param[1] if app_param else "", len(server.statements.prepared),
                    _id_number(server.id),
                ])
        return columns, rows

    def show_databases(self) -> tuple[list, list]:
        """One row per route (PgBouncer's database entry: where a name leads, with which
        pool settings); counts are over the route's pools and clients."""
        columns = [("name", TEXT), ("host", TEXT), ("port", INT4), ("database", TEXT),
                   ("force_user", TEXT), ("pool_size", INT4), ("min_pool_size", INT4),
                   ("server_lifetime", INT4), ("pool_mode", TEXT), ("current_connections", INT4),
                   ("max_client_connections", INT4), ("current_client_connections", INT4),
                   ("paused", INT4), ("disabled", INT4)]
        # (By route identity, which a reload keeps where it may move a route's index.)
        servers: dict[str, int] = {}
        for pool in self.pools.pools.values():
            servers[pool.route.identity] = servers.get(pool.route.identity, 0) + pool.total
        clients: dict[str, int] = {}
        for client in self.clients():
            identity = getattr(client, "route_identity", None)
            if identity is not None:
                clients[identity] = clients.get(identity, 0) + 1
        rows = []
        for route in self.config.routes:
            storage = route.storage
            rows.append([
                route.database, storage.host, storage.port, route.server.database or route.database,
                route.server.user, route.pool.size, route.pool.min_size, int(route.pool.server_lifetime),
                route.pool.mode, servers.get(route.identity, 0), route.pool.max_clients,
                clients.get(route.identity, 0), int(self.pools.is_paused(route.database)),
                int(route.database in self.pools.disabled),
            ])
        return columns, rows

    def show_users(self) -> tuple[list, list]:
        """Users that have pools or clients now (PgBouncer's user list is those it has
        seen); connection counts over all their pools."""
        columns = [("name", TEXT), ("current_connections", INT4), ("current_client_connections", INT4)]
        servers: dict[str, int] = {}
        for pool in self.pools.pools.values():
            servers[pool.key.user] = servers.get(pool.key.user, 0) + pool.total
        clients: dict[str, int] = {}
        for client in self.clients():
            if client.relay is not None or client.console is not None:
                clients[client.user] = clients.get(client.user, 0) + 1
        names = sorted(set(servers) | set(clients))
        return columns, [[name, servers.get(name, 0), clients.get(name, 0)] for name in names]

    def show_lists(self) -> tuple[list, list]:
        pools = list(self.pools.pools.values())
        all_clients = list(self.clients())
        logged_in = [c for c in all_clients if c.relay is not None or c.console is not None]
        rows = [
            ["databases", len({r.database for r in self.config.routes})],
            ["users", len({p.key.user for p in pools} | {c.user for c in logged_in})],
            ["pools", len(pools)],
            ["used_clients", len(all_clients)],
            ["login_clients", len(all_clients) - len(logged_in)],
            ["used_servers", sum(p.total for p in pools)],
        ]
        return [("list", TEXT), ("items", INT4)], rows

    def show_config(self) -> tuple[list, list]:
        """Odissey's global settings (key, value); per-route settings are in SHOW ROUTES."""
        c = self.config
        limits = c.limits
        values = [
            ("listen", ", ".join(c.listen)),
            ("admin_users", ", ".join(c.admin_users)),
            ("stats_users", ", ".join(c.stats_users)),
            ("limits.max_clients", limits.max_clients),
            ("limits.max_login_clients", limits.max_login_clients),
            ("limits.login_timeout", f"{limits.login_timeout:g}s"),
            ("limits.max_message_size", limits.max_message_size),
            ("tls.mode", c.tls.mode),
            ("tls.min_version", c.tls.min_version),
            ("stats_period", f"{c.stats_period:g}s"),
            ("log_stats", "on" if c.log_stats else "off"),
            ("metrics.listen", c.metrics_listen or ""),
        ]
        return [("key", TEXT), ("value", TEXT)], [[k, v] for k, v in values]

    def show_routes(self) -> tuple[list, list]:
        """Odissey's own: every route as configured, with its pools' server counts."""
        columns = [("index", INT4), ("database", TEXT), ("user", TEXT), ("clients", TEXT),
                   ("block", TEXT), ("storage", TEXT), ("server_database", TEXT),
                   ("server_user", TEXT), ("auth", TEXT), ("pool_mode", TEXT), ("pool_size", INT4),
                   ("min_pool_size", INT4), ("max_clients", INT4), ("pools", INT4),
                   ("servers", INT4)]
        pools: dict[int, list[Pool]] = {}
        for pool in self.pools.pools.values():
            pools.setdefault(pool.route.index, []).append(pool)
        rows = []
        for r in self.config.routes:
            auth = r.auth.method if r.own_auth else "(shadowed route's)"
            if r.own_auth and r.auth.query is not None:
                auth += " (auth_query)"
            if r.own_auth and r.auth.require_tls:
                auth += " (require_tls)"
            mine = pools.get(r.index, [])
            rows.append([
                r.index, r.database, r.user,
                "*" if r.clients is None else ", ".join(str(n) for n in r.clients),
                "yes" if r.block else "no", r.storage.name, r.server.database or r.database,
                r.server.user or r.user, auth, r.pool.mode, r.pool.size, r.pool.min_size,
                r.pool.max_clients, len(mine), sum(p.total for p in mine),
            ])
        return columns, rows

    # -- statistics (PgBouncer's stats.c: per database, over all its pools) --------------

    def _stats_by_database(self) -> list[tuple[str, Totals, Totals]]:
        """(database, totals now, averages over the period), sorted by database."""
        now_totals: dict[str, list[Totals]] = {}
        older: dict[str, list[Totals]] = {}
        for pool in list(self.pools.pools.values()):
            now_totals.setdefault(pool.key.database, []).append(pool.stats.totals())
            older.setdefault(pool.key.database, []).append(pool.stats.older)
        seconds = self.period.seconds(self.reactor.seconds())
        rows = []
        for database in sorted(now_totals):
            current = total(now_totals[database])
            rows.append((database, current, current.averages(total(older[database]), seconds)))
        return rows

    _TOTALS_COLUMNS = [(name, INT8) for name in (
        "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
        "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count",
        "bind_count")]
    #: SHOW STATS's names: totals then averages, as PgBouncer 1.25 spells them.
    _STATS_NAMES = (
        "server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time",
        "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count")
    _AVG_NAMES = (
        "server_assignment_count", "xact_count", "query_count", "recv", "sent", "xact_time",
        "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count")

    def show_stats(self) -> tuple[list, list]:
        columns = ([("database", TEXT)] + [(f"total_{n}", INT8) for n in self._STATS_NAMES]
                   + [(f"avg_{n}", INT8) for n in self._AVG_NAMES])
        return columns, [[db, *now, *avg] for db, now, avg in self._stats_by_database()]

    def show_stats_totals(self) -> tuple[list, list]:
        return ([("database", TEXT)] + self._TOTALS_COLUMNS,
                [[db, *now] for db, now, _avg in self._stats_by_database()])

    def show_stats_averages(self) -> tuple[list, list]:
        # (PgBouncer 1.25 names the last three avg_*, the others as in STATS_TOTALS)
        columns = [("database", TEXT)] + self._TOTALS_COLUMNS[:8] + [
            (f"avg_{name}", INT8) for name, _ in self._TOTALS_COLUMNS[8:]]
        return columns, [[db, *avg] for db, _now, avg in self._stats_by_database()]

    #: SHOW TOTALS's row names (PgBouncer's field names, prefixed total_/avg_).
    _TOTALS_ROWS = ("server_assignment_count", "xact_count", "query_count", "client_bytes",
                    "server_bytes", "xact_time", "query_time", "wait_time", "ps_client_parse_count",
                    "ps_server_parse_count", "ps_bind_count")

    def show_totals(self) -> tuple[list, list]:
        """SHOW STATS over every database, one (name, value) row per figure."""
        pools = list(self.pools.pools.values())
        current = total(p.stats.totals() for p in pools)
        averages = current.averages(total(p.stats.older for p in pools),
                                    self.period.seconds(self.reactor.seconds()))
        rows = ([[f"total_{name}", value] for name, value in zip(self._TOTALS_ROWS, current)]
                + [[f"avg_{name}", value] for name, value in zip(self._TOTALS_ROWS, averages)])
        return [("name", TEXT), ("value", INT8)], rows

    def show_state(self) -> tuple[list, list]:
        """PgBouncer's pause states (a bare PAUSE; PAUSE db shows in SHOW DATABASES);
        Odissey has no SUSPEND, so that row is left out."""
        paused = self.pools.paused_all
        return [("key", TEXT), ("value", TEXT)], [["active", "no" if paused else "yes"],
                                                   ["paused", "yes" if paused else "no"]]

    def show_version(self) -> tuple[list, list]:
        return [("version", TEXT)], [[f"{VERSION} ({platform.python_implementation()} "
                                      f"{platform.python_version()})"]]

    SHOW = {
        "POOLS": show_pools, "CLIENTS": show_clients, "SERVERS": show_servers,
        "DATABASES": show_databases, "USERS": show_users, "LISTS": show_lists,
        "CONFIG": show_config, "ROUTES": show_routes, "VERSION": show_version,
        "STATS": show_stats, "STATS_TOTALS": show_stats_totals,
        "STATS_AVERAGES": show_stats_averages, "TOTALS": show_totals, "STATE": show_state,
    }


def merge_pools(rows: list[list[Any]]) -> list[list[Any]]:
    """SHOW POOLS rows of several workers as one process's: counts added up per
    (database, user, pool_mode), the longest wait kept."""
    merged: dict[tuple[Any, Any, Any], list[Any]] = {}
    for row in rows:
        key = (row[0], row[1], row[10])
        seen = merged.get(key)
        if seen is None:
            merged[key] = list(row)
            continue
        for i in range(2, 8):
            seen[i] += row[i]
        seen[8:10] = max(seen[8:10], row[8:10])
    return list(merged.values())


#: SHOW commands whose rows the other workers add to (by id, the last column).
SPANNED = frozenset({"CLIENTS", "SERVERS"})


def _rows_reply(columns: list, rows: list) -> bytes:
    return m.row_description(columns) + b"".join(m.data_row(r) for r in rows) + m.command_complete(b"SHOW")


def _error(sqlstate: str, message: str, **kwargs: Any) -> PoolerError:
    return PoolerError(sqlstate, message, severity="ERROR", **kwargs)


def _unknown(text: str) -> PoolerError:
    return _error(errors.SYNTAX_ERROR, f"invalid command '{text}', use SHOW HELP;",
                  hint="Commands: SHOW HELP|VERSION|POOLS|CLIENTS|SERVERS|DATABASES|USERS|"
                       "CONFIG|LISTS|ROUTES|STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|STATE; "
                       + ", ".join(Control.COMMANDS))


class ConsoleSession:
    """One logged-in console client: reads its messages, answers each command.

    A command may answer later (PAUSE, WAIT_CLOSE wait for servers): until it does,
    the session reads on but runs nothing more, so replies keep the order of requests."""

    def __init__(self, console: Console, role: str, write: Callable[[bytes], object],
                 close: Callable[[PoolerError], None], drop: Callable[[], None],
                 client_id: str, application_name: str = "") -> None:
        self.console = console
        self.role = role
        self._write = write
        self._close = close
        self._drop = drop
        self.client_id = client_id
        self.application_name = application_name
        self._buffer = b""
        #: Running a command now (SHOW CLIENTS calls such a session active, others idle).
        self.busy = False
        #: When the client last sent a message (SHOW CLIENTS's request_time).
        self.request_at = console.reactor.seconds()
        self._skipping = False  # an extended-protocol error was sent: skip to Sync
        self._commands: list[str] = []  # the rest of the query being run
        self._waiting: Optional[Deferred[bytes]] = None  # a command that answers later
        self._out: list[bytes] = []
        self._draining = False
        self._over = False

    def data(self, data: bytes) -> None:
        """Bytes from the client: every whole message is handled, in order."""
        self._buffer += data
        self.request_at = self.console.reactor.seconds()
        self._drain()

    def _drain(self) -> None:
        """Run what can run now: the rest of the current query, then the next messages."""
        self._draining = True
        try:
            while self._waiting is None and not self._over:
                if self._commands:
                    self._command()
                elif not self._next_message():
                    break
        finally:
            self._draining = False
            self._flush()

    def _flush(self) -> None:
        if self._out:
            out, self._out = b"".join(self._out), []
            self._write(out)

    def _next_message(self) -> bool:
        """Handle the next whole message; False when there is none (or the session is over)."""
        buffer = self._buffer
        if len(buffer) < 5:
            return False
        kind = buffer[0]
        length = int.from_bytes(buffer[1:5], "big")
        if length < 4 or length > MAX_MESSAGE:
            self._end(PoolerError(errors.PROTOCOL_VIOLATION,
                                  f"invalid message length {length} for the admin console"))
            return False
        if len(buffer) < 1 + length:
            return False
        body, self._buffer = buffer[5:1 + length], buffer[1 + length:]
        self._message(kind, body)
        return not self._over

    def _end(self, error: Optional[PoolerError]) -> None:
        """The session is over: what was answered goes first, then the error (or none)."""
        self._over = True
        self._flush()
        if error is None:
            self._drop()
        else:
            self._close(error)

    def _message(self, kind: int, body: bytes) -> None:
        out = self._out
        if kind == ord("Q"):
            text = body.rstrip(b"\0").decode("utf-8", "replace")
            # (one or more commands separated by ;, none of which quotes one)
            self._commands = [part.strip() for part in text.split(";") if part.strip()]
            if not self._commands:
                out.append(m.EMPTY_QUERY_RESPONSE + m.ready_for_query(b"I"))
        elif kind == ord("X"):
            self._end(None)
        elif kind in b"PBDEC":
            if not self._skipping:
                self._skipping = True
                out.append(m.error_response(_error(
                    errors.FEATURE_NOT_SUPPORTED,
                    "extended query protocol not supported by the admin console",
                    hint="Use the simple query protocol (psql does; in psycopg, "
                         "cursor.execute(..., prepare=False) still uses the extended protocol: "
                         "use conn.pgconn.exec_() or psql).")))
        elif kind == ord("S"):
            self._skipping = False
            out.append(m.ready_for_query(b"I"))
        elif kind == ord("H"):
            pass  # Flush: everything is written at once anyway
        else:
            self._end(PoolerError(errors.PROTOCOL_VIOLATION,
                                  f"unsupported message type {chr(kind)!r} for the admin console"))

    def _command(self) -> None:
        """Run the query's next command; an error ends the query."""
        command = self._commands.pop(0)
        self.busy = True
        try:
            reply = self._run(command)
        except PoolerError as exc:
            self._failed(exc)
            return
        if isinstance(reply, Deferred):
            self._waiting = reply
            reply.addCallbacks(self._answered, self._failed_later)
            return
        self._answered(reply)

    def _answered(self, reply: bytes) -> None:
        self._waiting = None
        self._out.append(reply)
        if not self._commands:
            self._out.append(m.ready_for_query(b"I"))
            self.busy = False
        if not self._draining:  # it answered later: go on with what has come meanwhile
            self._drain()

    def _failed(self, exc: PoolerError) -> None:
        log.info("{id}: console: {sqlstate} {message}", id=self.client_id,
                 sqlstate=exc.sqlstate, message=exc.message)
        self._waiting = None
        self._commands = []
        self.busy = False
        self._out.append(m.error_response(exc) + m.ready_for_query(b"I"))
        if not self._draining:
            self._drain()

    def _failed_later(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, PoolerError):
            log.failure("{id}: console command failed", failure, id=self.client_id)
            error = _error(errors.INTERNAL_ERROR, "internal error in the admin console")
        self._failed(error)

    def _run(self, command: str) -> "bytes | Deferred[bytes]":
        words = command.split()
        verb = words[0].upper()
        if verb == "SHOW":
            if len(words) != 2:
                raise _unknown(command)
            what = words[1].upper()
            if what == "HELP":
                return m.notice_response("00000", "Console usage", HELP) + m.command_complete(b"SHOW")
            show = Console.SHOW.get(what)
            if show is not None:
                columns, rows = show(self.console)
                gather = self.console.gather
                if gather is not None and what in SPANNED:
                    return gather(what).addCallback(
                        lambda others: _rows_reply(columns, sorted(rows + others, key=lambda row: row[-1])))
                return _rows_reply(columns, rows)
            if what in SHOW_NEVER:
                raise _error(errors.FEATURE_NOT_SUPPORTED,
                             f"SHOW {what} is PgBouncer's; Odissey has nothing to show for it")
            raise _unknown(command)
        control = Control.COMMANDS.get(verb)
        if control is not None or verb in ADMIN_COMMANDS or verb in COMING:
            if self.role != ADMIN:
                raise _error(errors.INSUFFICIENT_PRIVILEGE, "admin access needed",
                             detail=f"{verb} is for admin_users; stats_users may only SHOW.")
            if verb == "SHUTDOWN":
                return self._shutdown(command, words)
            if verb == "RELOAD" and len(words) == 1:
                return self._reload()
            if control is None:
                raise _error(errors.FEATURE_NOT_SUPPORTED, f"{verb} is not supported yet",
                             hint="See SHOW HELP for what the console answers today.")
            if len(words) > 2:
                raise _unknown(command)
            arg = words[1].strip('"') if len(words) == 2 else None
            log.info("{id}: console: {command}", id=self.client_id, command=command)
            spread = self.console.spread
            done = spread(verb, arg) if spread is not None else control(self.console.control, arg)
            tag = verb.encode()
            if isinstance(done, Deferred):
                return done.addCallback(lambda _: m.command_complete(tag))
            return m.command_complete(tag)
        raise _unknown(command)


    def _reload(self) -> "Deferred[bytes]":
        """RELOAD: applied (in every worker, with workers), or refused as a whole with
        every problem in the detail."""
        lifecycle = self.console.lifecycle
        if lifecycle is None:
            raise _error(errors.FEATURE_NOT_SUPPORTED, "RELOAD: this console reloads nothing")
        log.info("{id}: console: RELOAD", id=self.client_id)

        def reloaded(problems: list[str]) -> bytes:
            if problems:
                raise _error(errors.CONFIG_FILE_ERROR,
                             f"configuration not reloaded: {len(problems)} problem"
                             f"{'' if len(problems) == 1 else 's'}, nothing changed",
                             detail="\n".join(problems))
            return m.command_complete(b"RELOAD")

        return lifecycle.reload().addCallback(reloaded)

    def _shutdown(self, command: str, words: list[str]) -> bytes:
        """SHUTDOWN [WAIT_FOR_CLIENTS]: answered first, carried out on the next reactor
        turn, so that the answer reaches the client before the stop ends it."""
        wait = len(words) == 2 and words[1].upper() == "WAIT_FOR_CLIENTS"
        if len(words) > 2 or (len(words) == 2 and not wait):
            raise _unknown(command)
        lifecycle = self.console.lifecycle
        if lifecycle is None:
            raise _error(errors.FEATURE_NOT_SUPPORTED, "SHUTDOWN: this console stops nothing")
        log.info("{id}: console: SHUTDOWN{how}", id=self.client_id,
                 how=" WAIT_FOR_CLIENTS" if wait else "")
        self.console.reactor.callLater(0, lifecycle.shutdown, wait)
        return m.command_complete(b"SHUTDOWN")


def console_parameters(application_name: str) -> Sequence[tuple[str, str]]:
    """The ParameterStatus set a console login is told."""
    return GREETING + (("application_name", application_name),)
