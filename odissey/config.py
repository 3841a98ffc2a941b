"""YAML configuration -> frozen, validated objects.

Loading never stops at the first mistake: every problem is reported once, naming its key
path (``routes[2].pool.size: must be a positive integer, got "ten"``), and the caller
refuses to start if there are any. The keys each section accepts are declared in
:data:`SCHEMA`, which the configuration reference in ``docs/`` is tested against.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import yaml

ANY = "*"
POOL_MODES = ("session", "transaction")
AUTH_METHODS = ("trust", "cleartext", "md5", "scram-sha-256", "cert")
#: The admin console's database names: Odissey's own, and PgBouncer's (scripts and
#: exporters written for PgBouncer connect to "pgbouncer"). No route may use them.
CONSOLE_DATABASES = ("odissey", "pgbouncer")
#: Client-facing TLS modes (PgBouncer's client_tls_sslmode, without the redundant prefer).
CLIENT_TLS_MODES = ("disable", "allow", "require", "verify-ca", "verify-full")
#: Server-facing TLS modes: libpq's sslmode values Odissey implements.
SERVER_TLS_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
#: Spelled as PostgreSQL's ssl_min_protocol_version.
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: In ``routes[].clients``: connections that came through a unix-socket listener.
UNIX = "unix"
#: One entry of ``routes[].clients``: an IPv4 or IPv6 network, or :data:`UNIX`.
ClientNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network, str]
#: IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``): a dual-stack listener's IPv4 clients.
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

POOL_KEYS = (
    "mode", "size", "min_size", "max_clients", "wait_timeout",
    "reset_query", "reset_timeout", "reset_after_transaction",
    "server_idle_timeout", "server_lifetime",
    "client_idle_timeout", "idle_in_transaction_timeout", "query_timeout",
    "max_prepared_statements", "pin_listeners",
)

#: Every key the loader accepts, by section; ``docs/configuration.md`` documents exactly these.
SCHEMA: dict[str, tuple[str, ...]] = {
    "": ("listen", "workers", "limits", "tls", "storages", "pool_defaults", "routes", "admin_users",
         "stats_users", "stats_period", "log_stats", "metrics", "shutdown_timeout",
         "handover_socket", "log", "peer_id", "peers"),
    "log": ("format", "level", "connections"),
    "metrics": ("listen",),
    "limits": ("max_clients", "max_login_clients", "login_timeout", "max_message_size"),
    "tls": ("mode", "cert_file", "key_file", "ca_file", "min_version", "ciphers"),
    "storages.*": ("host", "port", "connect_timeout", "retry_backoff", "tls", "managed"),
    "storages.*.tls": ("mode", "ca_file", "cert_file", "key_file", "server_name"),
    "storages.*.managed": ("data_dir", "users", "databases", "hba", "settings"),
    "routes[]": ("database", "user", "clients", "block", "storage", "server", "auth", "pool"),
    "routes[].server": ("database", "user", "password"),
    "routes[].auth": (
        "method", "password", "query", "query_user", "query_password", "query_database",
        "query_cache_ttl", "require_tls",
    ),
    "pool_defaults": POOL_KEYS,
    "routes[].pool": POOL_KEYS,
    "peers[]": ("id", "host", "port", "connect_timeout"),
}
#: Peer ids fit the 8 bits every cancel key spends on them (odissey.cancel.PEER_BITS).
MAX_PEER_ID = 255


class ConfigError(Exception):
    """The configuration has problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- values --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    """A password as configured: plain text, an md5 hash, or a SCRAM-SHA-256 secret.

    Only what is needed is kept: a route whose clients use SCRAM can be configured with
    the SCRAM secret alone, so the plain password need not be on the pooler's disk.
    """

    kind: str  # "plain" | "md5" | "scram"
    value: str

    def __repr__(self) -> str:
        return f"Secret({self.kind}, ***)"

    @classmethod
    def parse(cls, text: str) -> "Secret":
        if re.fullmatch(r"md5[0-9a-f]{32}", text):
            return cls("md5", text)
        if text.startswith("SCRAM-SHA-256$"):
            return cls("scram", text)
        return cls("plain", text)


@dataclass(frozen=True)
class ManagedPostgres:
    """A throwaway PostgreSQL that Odissey starts and stops itself (demo and tests)."""

    data_dir: str | None
    users: Mapping[str, str]
    databases: Mapping[str, str]
    hba: tuple[str, ...]
    settings: Mapping[str, str]


@dataclass(frozen=True)
class ClientTLS:
    """TLS offered to clients (``tls:``); file paths are absolute once loaded."""

    mode: str = "disable"
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    min_version: str = "TLSv1.2"
    ciphers: str | None = None


@dataclass(frozen=True)
class ServerTLS:
    """TLS to one storage (``storages.*.tls``), with libpq's sslmode meanings."""

    mode: str = "disable"
    ca_file: str | None = None  # or "system": the machine's trust store
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # checked by verify-full, sent as SNI; default: host


class Address:
    """Where Odissey connects to: a host name/address and port, or a unix socket
    directory (starts with "/") and the port that names the socket in it, as libpq
    reads ``host``; and how long a connection attempt may take."""

    host: str
    port: int
    connect_timeout: float

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.host, f".s.PGSQL.{self.port}")


@dataclass(frozen=True)
class Storage(Address):
    name: str
    host: str
    port: int
    connect_timeout: float
    retry_backoff: float = 1.0
    managed: ManagedPostgres | None = None
    tls: ServerTLS = ServerTLS()


@dataclass(frozen=True)
class Peer(Address):
    """Another Odissey instance behind the same load balancer: cancel requests whose key
    it issued are forwarded to it."""

    id: int
    host: str
    port: int = 6432
    connect_timeout: float = 5.0


@dataclass(frozen=True)
class ServerLogin:
    """How Odissey logs in to PostgreSQL for a route; None means "same as the client"."""

    database: str | None
    user: str | None
    password: Secret | None


#: auth_query's default: schema-qualified (a client's search_path cannot redirect it, and
#: the lookup connection's own is pg_catalog anyway), the user name a Bind parameter, and
#: the expiry, so that an expired password is refused (CVE-2025-2291).
DEFAULT_AUTH_QUERY = (
    "SELECT usename, passwd, valuntil FROM pg_catalog.pg_shadow WHERE usename = $1"
)


@dataclass(frozen=True)
class AuthQuery:
    """Where a route looks up its users' secrets: a query run as a dedicated user."""

    query: str
    user: str
    password: Secret | None
    database: str | None  # None: the client's database
    cache_ttl: float = 5.0


@dataclass(frozen=True)
class ClientAuth:
    method: str
    password: Secret | None
    #: Set when the route looks secrets up in PostgreSQL instead of holding one.
    query: AuthQuery | None = None
    #: Refuse this route's clients unless their connection is encrypted.
    require_tls: bool = False


@dataclass(frozen=True)
class PoolSettings:
    """A route's pooling; durations are seconds, 0 means "no limit" where allowed."""

    mode: str = "session"
    size: int = 20
    min_size: int = 0
    max_clients: int = 0
    wait_timeout: float = 30.0
    reset_query: str = "DISCARD ALL"
    reset_timeout: float = 10.0
    reset_after_transaction: bool = False
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    client_idle_timeout: float = 0.0
    idle_in_transaction_timeout: float = 0.0
    query_timeout: float = 0.0
    #: Transaction mode: drivers' named statements carried across servers, at most this
    #: many prepared on each server (0: off, statements are the client's problem).
    max_prepared_statements: int = 200
    #: Transaction mode: a client that LISTENs keeps its server for the rest of its session.
    pin_listeners: bool = False


@dataclass(frozen=True)
class Route:
    database: str
    user: str
    storage: Storage
    server: ServerLogin
    auth: ClientAuth
    pool: PoolSettings
    index: int = 0
    #: The client networks served (``UNIX`` for unix-socket clients); None: every address.
    clients: tuple[ClientNetwork, ...] | None = None
    #: Refuse this route's clients (28000) once they have passed its authentication.
    block: bool = False
    #: False for a blocked route without an ``auth`` section: its clients are asked what
    #: the route it shadows would ask, so a block shows nothing before the password.
    own_auth: bool = True

    @property
    def name(self) -> str:
        return f"{self.database}/{self.user}"

    @cached_property
    def identity(self) -> str:
        """What the route matches (database, user, client networks), as one string: no
        two routes of a configuration share it, and a reload that keeps a route (moved,
        its settings changed) keeps it, where its index may change. A reload matches
        routes by it; the client limits count a route's clients under it."""
        networks = None if self.clients is None else [str(network) for network in self.clients]
        return json.dumps([self.database, self.user, networks])


@dataclass(frozen=True)
class Limits:
    max_clients: int = 1000
    max_login_clients: int = 100
    login_timeout: float = 15.0
    max_message_size: int = 256 * 1024 * 1024


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error")


@dataclass(frozen=True)
class LogSettings:
    """The ``log`` section: Odissey's own observer on standard output."""

    format: str = "text"
    level: str = "info"
    #: Routine lines about each connection (logins, logouts).
    connections: bool = True


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...]
    limits: Limits
    storages: Mapping[str, Storage]
    routes: tuple[Route, ...]
    source: str | None = field(default=None, compare=False)
    tls: ClientTLS = ClientTLS()
    #: Users allowed every admin console command.
    admin_users: tuple[str, ...] = ()
    #: Users allowed the admin console's SHOW commands only.
    stats_users: tuple[str, ...] = ()
    #: Worker processes; 1 runs everything in the twistd process itself.
    workers: int = 1
    #: This instance's id among its peers (1..255); 0: no peering, keys carry no id.
    peer_id: int = 0
    #: The other instances, by id (this instance's own id is never in it).
    peers: Mapping[int, Peer] = field(default_factory=dict)
    #: How long a graceful shutdown (SIGTERM) waits for clients before ending them all.
    shutdown_timeout: float = 30.0
    #: The unix socket path through which a new process takes the listening sockets.
    handover_socket: str | None = None
    #: None: twistd's own log observer (as given on its command line).
    log: LogSettings | None = None
    #: Seconds between turns of the statistics period (SHOW STATS averages, the log line).
    stats_period: float = 60.0
    #: Log one line per active pool every stats_period.
    log_stats: bool = True
    #: The endpoint serving Prometheus metrics, or None (off).
    metrics_listen: str | None = None


# -- parsing helpers -----------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|kB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_duration(value: Any) -> float:
    """``5s``, ``250ms``, ``1m``, ``2h`` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """``64MB``, ``512kB``, ``1GB`` or a bare number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        if value < 0:
            raise ValueError
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


class _Section:
    """One mapping of the YAML tree, read key by key; problems go to a shared list."""

    def __init__(self, problems: list[str], path: str, data: Any, schema_key: str) -> None:
        self.problems = problems
        self.path = path
        self.ok = isinstance(data, dict)
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        if data is not None and not self.ok:
            self.problem(f"must be a mapping, got {_show(data)}")
        allowed = SCHEMA[schema_key]
        for key in self.data:
            if key not in allowed:
                self.problems.append(
                    f"{self.at(str(key))}: unknown key (expected one of: {', '.join(allowed)})"
                )

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, text: str, key: str | None = None) -> None:
        where = self.at(key) if key is not None else (self.path or "(top level)")
        self.problems.append(f"{where}: {text}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def value(
        self,
        key: str,
        convert: Callable[[Any], Any],
        expected: str,
        default: Any = None,
        required: bool = False,
    ) -> Any:
        if not self.has(key):
            if required:
                self.problem("is required", key)
            return default
        raw = self.data[key]
        try:
            return convert(raw)
        except (ValueError, TypeError):
            self.problem(f"must be {expected}, got {_show(raw)}", key)
            return default


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError
    return value


def _any_string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


def _int_in(low: int, high: int | None = None) -> Callable[[Any], int]:
    """A converter accepting whole numbers (not booleans) from ``low`` to ``high``."""

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError
        if high is not None and value > high:
            raise ValueError
        return value

    return convert


_positive_int = _int_in(1)
#: The most workers a cancel key can name (cancel.KeyLayout gives each at most 6 bits).
MAX_WORKERS = 64
_worker_count = _int_in(1, MAX_WORKERS)


def _workers(value: Any) -> int:
    """A number of worker processes, or ``auto``: one per CPU, at most MAX_WORKERS."""
    if value == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    return _worker_count(value)


_nonneg_int = _int_in(0)
_port = _int_in(1, 65535)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError
    return seconds


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError
    return size


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError
        return str(value)

    return convert


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, (dict, list)) or v is None:
            raise ValueError
        out[k] = str(v)
    return out


def _string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError
    return tuple(value)


def _read_clients(section: _Section) -> tuple[ClientNetwork, ...] | None:
    """``routes[].clients``: networks in CIDR form (a bare address is a /32 or /128) and
    ``"unix"``. Absent means every address. Host bits must be zero, so that a typo like
    ``10.0.0.1/8`` is caught rather than silently widened; IPv4-mapped IPv6 networks are
    kept as the IPv4 networks they are, since a mapped client is matched as IPv4."""
    key = "clients"
    if not section.has(key):
        return None
    raw = section.data[key]
    expected = f'networks like 10.0.0.0/8 or "{UNIX}"'
    if not isinstance(raw, list) or not raw:
        section.problem(
            f"must be a non-empty list of {expected} (leave it out to serve every address), "
            f"got {_show(raw)}", key)
        return None
    out: list[ClientNetwork] = []
    for i, item in enumerate(raw):
        where = f"{section.at(key)}[{i}]"
        if item == UNIX:
            out.append(UNIX)
            continue
        if not isinstance(item, str):
            section.problems.append(f"{where}: must be a network like 10.0.0.0/8 or "
                                    f'"{UNIX}", got {_show(item)}')
            continue
        try:
            network = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            section.problems.append(f"{where}: must be a network like 10.0.0.0/8 or "
                                    f'"{UNIX}", got {_show(item)} ({exc})')
            continue
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(IPV4_MAPPED):
            network = ipaddress.IPv4Network(
                (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
        out.append(network)
    return tuple(out)


def _covers(earlier: tuple[ClientNetwork, ...] | None, entry: ClientNetwork) -> bool:
    """Does a ``clients`` list (None: every address) take in all of ``entry``?"""
    if earlier is None:
        return True
    for network in earlier:
        if network == entry:
            return True
        if isinstance(network, str) or isinstance(entry, str) or network.version != entry.version:
            continue
        if entry.subnet_of(network):  # type: ignore[arg-type]
            return True
    return False


def _read_secret(section: _Section, key: str, base: Path | None) -> Secret | None:
    """A password: a string, or ``{env: NAME}``, or ``{file: path}`` (relative to the config)."""
    if not section.has(key):
        return None
    raw = section.data[key]
    where = section.at(key)
    if isinstance(raw, str):
        return Secret.parse(raw)
    if isinstance(raw, dict) and len(raw) == 1 and "env" in raw:
        name = raw["env"]
        if not isinstance(name, str) or name not in os.environ:
            section.problems.append(f"{where}.env: environment variable {_show(name)} is not set")
            return None
        return Secret.parse(os.environ[name])
    if isinstance(raw, dict) and len(raw) == 1 and "file" in raw:
        path = Path(str(raw["file"]))
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            return Secret.parse(path.read_text().strip())
        except OSError as exc:
            section.problems.append(f"{where}.file: cannot read {str(path)!r}: {exc.strerror}")
            return None
    section.problem("must be a string, {env: NAME} or {file: path}, got " + _show(raw), key)
    return None


def _read_socket_path(section: _Section, key: str, base: Path | None) -> str | None:
    """A unix socket path Odissey will create (relative to the config file), returned
    absolute; its directory must exist."""
    raw = section.value(key, _string, "a unix socket path")
    if raw is None:
        return None
    path = Path(raw)
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.parent.is_dir():
        section.problem(f"directory {str(path.parent)!r} does not exist", key)
        return None
    if len(os.fsencode(path.absolute())) > 107:  # sun_path holds 108 bytes with the NUL
        section.problem(f"{str(path.absolute())!r} is too long for a unix socket path "
                        "(107 bytes at most)", key)
        return None
    return str(path.absolute())


def _read_path(section: _Section, key: str, base: Path | None, allow: tuple[str, ...] = ()) -> str | None:
    """A file path (relative to the config file) that must be readable now; returned
    absolute. Certificates and keys are read at start, so a wrong path is caught here."""
    raw = section.value(key, _string, "a file path")
    if raw is None or raw in allow:
        return raw
    path = Path(raw)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        section.problem(f"cannot read {str(path)!r}: {exc.strerror}", key)
        return None
    return str(path.resolve())


def _read_auth_query(au: _Section, method: str, base: Path | None) -> AuthQuery | None:
    """``routes[].auth.query*``: present when ``query_user`` is given."""
    others = [key for key in ("query", "query_password", "query_database", "query_cache_ttl") if au.has(key)]
    if not au.has("query_user"):
        for key in others:
            au.problem("needs query_user (the user that runs the lookup)", key)
        return None
    user = au.value("query_user", _string, "a user name")
    if method == "trust":
        au.problem("a trust route checks no password: there is nothing to look up", "query_user")
    if au.has("password"):
        au.problem("give either password or query_user (a looked-up secret), not both", "password")
    query = au.value("query", _string, "a SQL query with $1 for the user name", DEFAULT_AUTH_QUERY)
    if query is not None and "$1" not in query:
        au.problem("must take the user name as the parameter $1 (it is never spliced in)", "query")
    password = _read_secret(au, "query_password", base)
    if password is not None and password.kind == "scram":
        au.problem(
            "a SCRAM secret cannot answer a server's challenge; give the plain password",
            "query_password",
        )
    return AuthQuery(
        query=query or DEFAULT_AUTH_QUERY,
        user=user or "",
        password=password,
        database=au.value("query_database", _string, "a database name"),
        cache_ttl=au.value("query_cache_ttl", parse_duration, "a duration like 5s (0: no cache)", 5.0),
    )


# -- sections ------------------------------------------------------------------------------


def _read_client_tls(problems: list[str], data: Any, base: Path | None) -> ClientTLS:
    s = _Section(problems, "tls", data, "tls")
    d = ClientTLS()
    tls = ClientTLS(
        mode=s.value("mode", _choice(CLIENT_TLS_MODES), " or ".join(CLIENT_TLS_MODES), d.mode),
        cert_file=_read_path(s, "cert_file", base),
        key_file=_read_path(s, "key_file", base),
        ca_file=_read_path(s, "ca_file", base),
        min_version=s.value("min_version", _choice(TLS_VERSIONS), " or ".join(TLS_VERSIONS),
                            d.min_version),
        ciphers=s.value("ciphers", _string, "an OpenSSL cipher list"),
    )
    if tls.mode != "disable":
        for key in ("cert_file", "key_file"):
            if not s.has(key):
                s.problem(f"is required for mode {tls.mode}", key)
    if tls.mode in ("verify-ca", "verify-full") and not s.has("ca_file"):
        s.problem(f"is required for mode {tls.mode} (client certificates are checked against it)",
                  "ca_file")
    return tls


def _read_server_tls(problems: list[str], path: str, data: Any, base: Path | None) -> ServerTLS:
    s = _Section(problems, path, data, "storages.*.tls")
    tls = ServerTLS(
        mode=s.value("mode", _choice(SERVER_TLS_MODES), " or ".join(SERVER_TLS_MODES), "disable"),
        ca_file=_read_path(s, "ca_file", base, allow=("system",)),
        cert_file=_read_path(s, "cert_file", base),
        key_file=_read_path(s, "key_file", base),
        server_name=s.value("server_name", _string, "a host name or address"),
    )
    if tls.mode in ("verify-ca", "verify-full") and not s.has("ca_file"):
        s.problem(f'is required for mode {tls.mode} (a CA file, or "system")', "ca_file")
    if s.has("cert_file") != s.has("key_file"):
        s.problem("cert_file and key_file go together (a client certificate and its key)")
    return tls



def _read_log(problems: list[str], data: Any) -> LogSettings:
    s = _Section(problems, "log", data, "log")
    d = LogSettings()
    return LogSettings(
        format=s.value("format", _choice(LOG_FORMATS), " or ".join(LOG_FORMATS), d.format),
        level=s.value("level", _choice(LOG_LEVELS), " or ".join(LOG_LEVELS), d.level),
        # (YAML reads a bare on/off as true/false)
        connections=s.value("connections", _bool, "on or off", d.connections),
    )


def _read_limits(problems: list[str], data: Any) -> Limits:
    s = _Section(problems, "limits", data, "limits")
    d = Limits()
    return Limits(
        max_clients=s.value("max_clients", _positive_int, "a positive integer", d.max_clients),
        max_login_clients=s.value(
            "max_login_clients", _positive_int, "a positive integer", d.max_login_clients
        ),
        login_timeout=s.value(
            "login_timeout", _positive_duration, "a duration like 15s", d.login_timeout
        ),
        max_message_size=s.value(
            "max_message_size", _positive_size, "a size like 64MB", d.max_message_size
        ),
    )


def _read_managed(problems: list[str], path: str, data: Any) -> ManagedPostgres:
    s = _Section(problems, path, data, "storages.*.managed")
    return ManagedPostgres(
        data_dir=s.value("data_dir", _string, "a directory path"),
        users=s.value("users", _string_map, "a mapping of user: password", {}),
        databases=s.value("databases", _string_map, "a mapping of database: owner", {}),
        hba=s.value("hba", _string_list, "a list of pg_hba.conf lines", ()),
        settings=s.value("settings", _string_map, "a mapping of setting: value", {}),
    )


def _read_storage(problems: list[str], name: str, data: Any, base: Path | None = None) -> Storage:
    path = f"storages.{name}"
    s = _Section(problems, path, data, "storages.*")
    managed = None
    if s.has("managed"):
        managed = _read_managed(problems, s.at("managed"), s.data["managed"])
        if s.has("host"):
            s.problem("must not be set for a managed storage (Odissey picks the socket)", "host")
    host = s.value("host", _string, "a host name or a unix socket directory")
    if host is None and managed is None:
        s.problem("is required (or give `managed` to have Odissey start a PostgreSQL)", "host")
    tls = ServerTLS()
    if s.has("tls"):
        tls = _read_server_tls(problems, s.at("tls"), s.data["tls"], base)
        unix = managed is not None or (host or "").startswith("/")
        if unix and tls.mode not in ("disable", "prefer"):
            s.problem(f"mode {tls.mode} needs TCP: PostgreSQL speaks no TLS on a unix socket",
                      "tls")
    return Storage(
        name=name,
        host=host or "",
        port=s.value("port", _port, "a TCP port number", 5432),
        connect_timeout=s.value(
            "connect_timeout", _positive_duration, "a duration like 5s", 5.0
        ),
        retry_backoff=s.value("retry_backoff", _positive_duration, "a duration like 1s", 1.0),
        managed=managed,
        tls=tls,
    )


def _read_pool(
    problems: list[str], path: str, data: Any, schema_key: str, defaults: PoolSettings
) -> PoolSettings:
    po = _Section(problems, path, data, schema_key)
    d = defaults
    duration, off_duration = "a duration like 30s", "a duration like 30s (0 for none)"
    pool = PoolSettings(
        mode=po.value("mode", _choice(POOL_MODES), " or ".join(POOL_MODES), d.mode),
        size=po.value("size", _positive_int, "a positive integer", d.size),
        min_size=po.value("min_size", _nonneg_int, "an integer >= 0", d.min_size),
        max_clients=po.value("max_clients", _nonneg_int, "an integer >= 0", d.max_clients),
        wait_timeout=po.value("wait_timeout", _positive_duration, duration, d.wait_timeout),
        reset_query=po.value("reset_query", _any_string, "a string", d.reset_query),
        reset_timeout=po.value("reset_timeout", _positive_duration, duration, d.reset_timeout),
        reset_after_transaction=po.value(
            "reset_after_transaction", _bool, "true or false", d.reset_after_transaction
        ),
        server_idle_timeout=po.value(
            "server_idle_timeout", parse_duration, off_duration, d.server_idle_timeout
        ),
        server_lifetime=po.value("server_lifetime", parse_duration, off_duration, d.server_lifetime),
        client_idle_timeout=po.value(
            "client_idle_timeout", parse_duration, off_duration, d.client_idle_timeout
        ),
        idle_in_transaction_timeout=po.value(
            "idle_in_transaction_timeout", parse_duration, off_duration,
            d.idle_in_transaction_timeout,
        ),
        query_timeout=po.value("query_timeout", parse_duration, off_duration, d.query_timeout),
        max_prepared_statements=po.value(
            "max_prepared_statements", _nonneg_int, "an integer >= 0", d.max_prepared_statements
        ),
        pin_listeners=po.value("pin_listeners", _bool, "true or false", d.pin_listeners),
    )
    if pool.min_size > pool.size:
        po.problem(f"must not exceed size ({pool.size}), got {pool.min_size}", "min_size")
    if pool.reset_after_transaction and not pool.reset_query:
        po.problem("needs a reset_query to run", "reset_after_transaction")
    return pool


def _read_route(
    problems: list[str],
    index: int,
    data: Any,
    storages: Mapping[str, Storage],
    base: Path | None,
    pool_defaults: PoolSettings,
    tls: ClientTLS = ClientTLS(),
) -> Route | None:
    path = f"routes[{index}]"
    s = _Section(problems, path, data, "routes[]")
    if not s.ok:
        return None
    database = s.value("database", _string, f'a database name or "{ANY}"', ANY)
    user = s.value("user", _string, f'a user name or "{ANY}"', ANY)
    clients = _read_clients(s)
    block = s.value("block", _bool, "true or false", False)
    storage_name = s.value("storage", _string, "a storage name", required=True)
    storage = storages.get(storage_name) if storage_name else None
    if storage_name and storage is None:
        known = ", ".join(storages) or "none are defined"
        s.problem(f'names unknown storage "{storage_name}" (known: {known})', "storage")

    srv = _Section(problems, s.at("server"), s.data.get("server"), "routes[].server")
    server = ServerLogin(
        database=srv.value("database", _string, "a database name"),
        user=srv.value("user", _string, "a user name"),
        password=_read_secret(srv, "password", base),
    )
    if server.password is not None and server.password.kind == "scram":
        srv.problem(
            "a SCRAM secret cannot answer a server's challenge; give the plain password",
            "password",
        )

    au = _Section(problems, s.at("auth"), s.data.get("auth"), "routes[].auth")
    method = au.value("method", _choice(AUTH_METHODS), " or ".join(AUTH_METHODS), "trust")
    secret = _read_secret(au, "password", base)
    if (method not in ("trust", "cert") and secret is None and not au.has("password")
            and not au.has("query_user")):
        au.problem(f"is required for method {method}", "password")
    if method == "cert" and au.has("password"):
        au.problem("method cert takes no password (the client certificate is the proof)",
                   "password")
    if method == "cert" and au.has("query_user"):
        au.problem("method cert looks up no password", "query_user")
    require_tls = au.value("require_tls", _bool, "true or false", False)
    if method == "cert" and (tls.mode == "disable" or tls.ca_file is None):
        au.problem("method cert needs client TLS with a CA: set tls.mode and tls.ca_file",
                   "method")
    if require_tls and tls.mode == "disable":
        au.problem("needs client TLS: tls.mode is disable", "require_tls")
    if method == "md5" and secret is not None and secret.kind == "scram":
        au.problem("md5 needs a plain password or an md5 secret, not a SCRAM secret", "password")
    if secret is not None and secret.kind == "md5" and user == ANY:
        au.problem(
            'an md5 secret is bound to one user name; this route matches any user ("*")',
            "password",
        )
    if method == "scram-sha-256" and secret is not None and secret.kind == "md5":
        au.problem("scram-sha-256 needs a plain password or a SCRAM secret", "password")
    lookup = _read_auth_query(au, method, base)

    pool = _read_pool(problems, s.at("pool"), s.data.get("pool"), "routes[].pool", pool_defaults)
    if storage is None:
        return None
    return Route(
        database=database,
        user=user,
        storage=storage,
        server=server,
        auth=ClientAuth(method, secret, lookup, require_tls),
        pool=pool,
        index=index,
        clients=clients,
        block=block,
        own_auth=not (block and not s.has("auth")),
    )


def _unreachable(route: Route, earlier: list[Route]) -> str | None:
    """Why ``route`` can never be chosen, if routes before it for the same (database,
    user) already serve every address it lists (the first route that fits wins)."""
    where = f"routes[{route.index}]"
    pair = f"(database {route.database!r}, user {route.user!r})"
    if route.clients is None:
        for r in earlier:
            if r.clients is None:
                return f"{where}: duplicates routes[{r.index}] {pair}"
        return None
    covering = set()
    for entry in route.clients:
        found = [r.index for r in earlier if _covers(r.clients, entry)]
        if not found:
            return None
        covering.add(found[0])
    names = ", ".join(f"routes[{i}]" for i in sorted(covering))
    verb = "serves" if len(covering) == 1 else "serve"
    return f"{where}: never used: {names} before it already {verb} every address it lists {pair}"


def _read_console_users(top: _Section, key: str, routes: list[Route]) -> tuple[str, ...]:
    """``admin_users`` / ``stats_users``: user names. A console user proves its password
    with the ``auth`` of its routes (docs/operations.md), so a name that no route serves
    (neither by name nor with user "*") could never log in: that is a mistake to report."""
    users = top.value(key, _string_list, "a list of user names", ())
    for i, name in enumerate(users):
        if not name:
            top.problem("must not be empty", f"{key}[{i}]")
        elif routes and not any(r.user in (name, ANY) and r.own_auth for r in routes):
            top.problem(f'no route serves user "{name}", so it has no password to log in to '
                        "the console with", f"{key}[{i}]")
    return tuple(users)


def _read_peers(top: _Section) -> tuple[int, dict[int, Peer]]:
    """``peer_id`` and ``peers``. The list may name this instance too (then it is
    skipped, as PgBouncer does), so that every instance can share one list."""
    problems = top.problems
    peer_id = top.value("peer_id", _int_in(1, MAX_PEER_ID), f"an integer from 1 to {MAX_PEER_ID}", 0)
    raw = top.data.get("peers")
    if raw is None:
        return peer_id, {}
    if not isinstance(raw, list):
        top.problem(f"must be a list of peers ({{id, host, port}}), got {_show(raw)}", "peers")
        return peer_id, {}
    if not top.has("peer_id"):
        top.problem("needs peer_id (this instance's own id among its peers)", "peers")
    peers: dict[int, Peer] = {}
    seen: dict[int, int] = {}
    for i, body in enumerate(raw):
        s = _Section(problems, f"peers[{i}]", body, "peers[]")
        if not s.ok:
            continue
        ident = s.value("id", _int_in(1, MAX_PEER_ID), f"an integer from 1 to {MAX_PEER_ID}",
                        required=True)
        host = s.value("host", _string, "a host name or a unix socket directory", required=True)
        d = Peer(id=0, host="")
        port = s.value("port", _port, "a TCP port number", d.port)
        timeout = s.value("connect_timeout", _positive_duration, "a duration like 5s",
                          d.connect_timeout)
        if ident is None:
            continue
        if ident in seen:
            s.problem(f"duplicates peers[{seen[ident]}].id ({ident})", "id")
            continue
        seen[ident] = i
        if ident != peer_id and host is not None:
            peers[ident] = Peer(id=ident, host=host, port=port, connect_timeout=timeout)
    return peer_id, peers


def parse(data: Any, source: str | None = None) -> Config:
    """A YAML document (already loaded) -> Config, or ConfigError listing every problem."""
    problems: list[str] = []
    base = Path(source).parent if source else None
    top = _Section(problems, "", data, "")
    if data is None:
        problems.append("(top level): the configuration is empty")

    listen = top.value("listen", _string_list, "a list of endpoint strings", ())
    if top.ok and not listen:
        top.problem("needs at least one endpoint, e.g. tcp:6432:interface=127.0.0.1", "listen")

    workers = top.value("workers", _workers, f"auto or an integer from 1 to {MAX_WORKERS}", 1)
    limits = _read_limits(problems, top.data.get("limits"))
    tls = _read_client_tls(problems, top.data.get("tls"), base)

    storages: dict[str, Storage] = {}
    raw_storages = top.data.get("storages")
    if raw_storages is None and top.ok:
        top.problem("is required", "storages")
    elif raw_storages is not None and not isinstance(raw_storages, dict):
        top.problem(f"must be a mapping of name: storage, got {_show(raw_storages)}", "storages")
    else:
        for name, body in (raw_storages or {}).items():
            storages[str(name)] = _read_storage(problems, str(name), body, base)

    pool_defaults = _read_pool(
        problems, "pool_defaults", top.data.get("pool_defaults"), "pool_defaults", PoolSettings()
    )

    routes: list[Route] = []
    raw_routes = top.data.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        if top.ok:
            top.problem("must be a non-empty list of routes", "routes")
    else:
        seen: dict[tuple[str, str], list[Route]] = {}
        for i, body in enumerate(raw_routes):
            route = _read_route(problems, i, body, storages, base, pool_defaults, tls)
            if route is None:
                continue
            problem = _unreachable(route, seen.setdefault((route.database, route.user), []))
            if problem:
                problems.append(problem)
            seen[(route.database, route.user)].append(route)
            routes.append(route)

    peer_id, peers = _read_peers(top)
    shutdown_timeout = top.value("shutdown_timeout", parse_duration, "a duration like 30s",
                                 Config.shutdown_timeout)
    handover_socket = _read_socket_path(top, "handover_socket", base)
    log = _read_log(problems, top.data.get("log")) if top.has("log") else None
    stats_period = top.value("stats_period", _positive_duration, "a duration like 60s", 60.0)
    log_stats = top.value("log_stats", _bool, "true or false", True)
    metrics = _Section(problems, "metrics", top.data.get("metrics"), "metrics")
    metrics_listen = metrics.value("listen", _string, "an endpoint string like tcp:9127:interface=127.0.0.1",
                                   required=metrics.ok)
    admin_users = _read_console_users(top, "admin_users", routes)
    stats_users = _read_console_users(top, "stats_users", routes)
    for route in routes:
        if route.database in CONSOLE_DATABASES:
            problems.append(f'routes[{route.index}].database: "{route.database}" is the admin '
                            f"console's (reserved: {', '.join(CONSOLE_DATABASES)})")

    if problems:
        raise ConfigError(problems)
    return Config(
        admin_users=admin_users,
        stats_users=stats_users,
        stats_period=stats_period,
        log_stats=log_stats,
        metrics_listen=metrics_listen,
        listen=tuple(listen),
        limits=limits,
        storages=storages,
        routes=tuple(routes),
        source=source,
        tls=tls,
        workers=workers,
        peer_id=peer_id,
        peers=peers,
        shutdown_timeout=shutdown_timeout,
        handover_socket=handover_socket,
        log=log,
    )


def load(path: str) -> Config:
    """Read and validate a YAML file; every problem, including YAML syntax, is a ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    return parse(data, source=os.path.abspath(path))
