"""(database, user, client address) -> Route, most specific rule first; and where a
storage is reached."""

from __future__ import annotations

import ipaddress
from typing import Any, Iterator, Sequence, Union

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from odissey.config import ANY, UNIX, Address, ClientAuth, ClientNetwork, Route

IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class ClientAddress:
    """Where a client connected from, as routes' ``clients`` lists judge it. The address
    is parsed only when a route asks: most configurations have no address rules, and
    parsing costs more than the rest of routing a login (a plain class with slots for
    the same reason: 0.6 µs to make under CPython, against 3.5 µs for a frozen
    dataclass and 11 µs with the address parsed)."""

    __slots__ = ("host", "unix", "_ip", "_parsed")

    def __init__(self, host: str | None, unix: bool = False) -> None:
        #: The numeric address as the transport reported it; None for a unix-socket
        #: client or an address of a kind Odissey does not know.
        self.host = host
        self.unix = unix
        self._ip: IP | None = None
        self._parsed = False

    def __repr__(self) -> str:
        return f"<ClientAddress {self.shown}>"

    @property
    def ip(self) -> IP | None:
        """The IP address, an IPv4-mapped IPv6 address as the IPv4 address it carries (a
        dual-stack listener's IPv4 client); IPv6 scope ids (``%eth0``) are dropped, since
        a route's networks carry none."""
        if not self._parsed:
            self._parsed = True
            self._ip = _parse_ip(self.host)
        return self._ip

    @property
    def shown(self) -> str:
        """As PostgreSQL's messages show a client: its numeric address, or "[local]"."""
        if self.unix:
            return "[local]"
        return self.host if self.host is not None else "unknown"

    def within(self, networks: tuple[ClientNetwork, ...] | None) -> bool:
        """Is this client served by a route with these ``clients`` (None: everyone)?"""
        if networks is None:
            return True
        ip = self.ip
        for network in networks:
            if network == UNIX:
                if self.unix:
                    return True
            elif ip is not None and ip.version == network.version and ip in network:  # type: ignore[union-attr]
                return True
        return False


def _parse_ip(host: str | None) -> IP | None:
    if host is None:
        return None
    try:
        ip: IP = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


#: A client whose address Odissey cannot judge: only routes without ``clients`` serve it.
UNKNOWN_ADDRESS = ClientAddress(None)


def client_address(peer: object) -> ClientAddress:
    """A Twisted peer address -> :class:`ClientAddress`."""
    if isinstance(peer, UNIXAddress):
        return ClientAddress(None, unix=True)
    if isinstance(peer, (IPv4Address, IPv6Address)):
        return ClientAddress(peer.host)
    return UNKNOWN_ADDRESS


class Router:
    """Picks a route: exact database and user, then database with any user, then any
    database with that user, then the catch-all; at each step the first route in the
    configuration whose ``clients`` take in the client's address (like pg_hba.conf, a
    route that does not serve an address does not exist for it). Lookups are dictionary
    hits and, for a pair with address rules, a short scan."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._all = tuple(routes)
        self._routes: dict[tuple[str, str], tuple[Route, ...]] = {}
        for r in routes:
            key = (r.database, r.user)
            self._routes[key] = self._routes.get(key, ()) + (r,)
        self._databases = {r.database for r in routes}
        #: Some route has address rules (else matching is one dictionary hit per step).
        self._by_address = any(r.clients is not None for r in routes)

    def _candidates(self, database: str, user: str, client: ClientAddress) -> Iterator[Route]:
        """Every route that serves this client, best first."""
        for key in ((database, user), (database, ANY), (ANY, user), (ANY, ANY)):
            for route in self._routes.get(key, ()):
                if client.within(route.clients):
                    yield route

    def match(self, database: str, user: str, client: ClientAddress = UNKNOWN_ADDRESS) -> Route | None:
        if not self._by_address:  # one route per pair, serving everyone
            routes = self._routes
            for key in ((database, user), (database, ANY), (ANY, user), (ANY, ANY)):
                found = routes.get(key)
                if found is not None:
                    return found[0]
            return None
        for route in self._candidates(database, user, client):
            return route
        return None

    def auth_of(self, route: Route, database: str, user: str, client: ClientAddress) -> ClientAuth | None:
        """How the client of ``route`` is challenged: by the route's own ``auth``; for a
        blocked route without one, by the route it shadows (the next that would serve
        the client), so that a blocked user sees the exchange they always saw and only
        learns of the block after proving the password. None: nothing is shadowed, the
        client gets an unknown user's mock exchange."""
        owner = self.auth_route_of(route, database, user, client)
        return owner.auth if owner is not None else None

    def auth_route_of(self, route: Route, database: str, user: str, client: ClientAddress) -> Route | None:
        """The route whose ``auth`` challenges the client of ``route`` (see auth_of):
        an auth_query runs on that route's storage."""
        if route.own_auth:
            return route
        after = False
        for other in self._candidates(database, user, client):
            if other is route:
                after = True
            elif after and other.own_auth:
                return other
        return None

    def knows_database(self, database: str) -> bool:
        return database in self._databases or ANY in self._databases

    def serves(self, database: str, client: ClientAddress) -> bool:
        """Does any route of ``database`` (for any user) take in this client's address?
        When none does, the client is refused before any password, like PostgreSQL's
        "no pg_hba.conf entry"; the answer does not depend on the user name, so it
        tells nothing about which users exist."""
        return any(r.database in (database, ANY) and client.within(r.clients) for r in self._all)

    def mock_auth(self, database: str, client: ClientAddress = UNKNOWN_ADDRESS) -> ClientAuth:
        """How an unknown user of ``database`` is challenged.

        Like known users of that database at this address (the first password route in
        the configuration: its method, and its secret, whose SCRAM iteration count the
        mock copies), so that the challenge does not reveal whether the user exists;
        trust only when every such route is trust (then nothing is secret). Blocked
        routes without an ``auth`` of their own ask what another route asks, so they
        are not counted.
        """
        auths = [r.auth for r in self._all
                 if r.database in (database, ANY) and r.own_auth and client.within(r.clients)]
        for auth in auths:
            if auth.method != "trust":
                return auth
        return ClientAuth("trust" if auths else "scram-sha-256", None)


def storage_endpoint(reactor: object, storage: Address) -> IStreamClientEndpoint:
    """The client endpoint for a storage (or a peer): a unix socket directory or a TCP host."""
    if storage.is_unix:
        return UNIXClientEndpoint(reactor, storage.socket_path, timeout=storage.connect_timeout)
    if ":" in storage.host:
        return TCP6ClientEndpoint(
            reactor, storage.host, storage.port, timeout=storage.connect_timeout
        )
    return TCP4ClientEndpoint(reactor, storage.host, storage.port, timeout=storage.connect_timeout)


class _OneConnection(Factory):
    """What ``connectProtocol`` makes, minus its "Starting factory" log lines (Twisted
    factories are noisy by default: two lines per server connection)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


def connect_storage(reactor: object, storage: Address, protocol: Protocol) -> "Deferred[Any]":
    """Connect ``protocol`` to a storage (the server's, or a cancel request's)."""
    return storage_endpoint(reactor, storage).connect(_OneConnection(protocol))
