"""Routing: most specific (database, user) first, client address rules, blocked routes;
then the same through the client protocol (bytes in, bytes out) and through psycopg
against the real PostgreSQL."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import tempfile
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from odissey import config
from odissey.client import ClientConnection, ClientFactory, ClientState
from odissey.config import ClientAuth, Secret
from odissey.pool import Pools
from odissey.router import UNKNOWN_ADDRESS, ClientAddress, Router, client_address
from odissey.testing import FakeBackends, in_this_thread
from odissey.wire import messages as m
from odissey.wire.scanner import Scanner
from tests.harness import APP_PASSWORD, IntegrationTest, route, server_pids


def routes(*bodies: dict[str, Any]) -> tuple[config.Route, ...]:
    """Parsed routes (each body defaults to trust on storage pg)."""
    return config.parse({
        "listen": ["tcp:0"],
        "storages": {"pg": {"host": "127.0.0.1"}},
        "routes": [{"storage": "pg", **body} for body in bodies],
    }).routes


def tcp(host: str) -> ClientAddress:
    cls = IPv6Address if ":" in host else IPv4Address
    return client_address(cls("TCP", host, 50000))


UNIX = client_address(UNIXAddress(None))


def picked(router: Router, database: str, user: str, client: ClientAddress = UNKNOWN_ADDRESS) -> int | None:
    """The index of the route chosen for this client, or None."""
    route = router.match(database, user, client)
    return None if route is None else route.index
CLEAR = {"method": "cleartext", "password": "pw"}


class ClientAddressTests(SynchronousTestCase):
    def test_ipv4_ipv6_and_unix(self) -> None:
        """TCP peers become IP addresses shown numerically; unix peers are "[local]"."""
        self.assertEqual((tcp("10.1.2.3").ip, tcp("10.1.2.3").shown), (ipaddress.ip_address("10.1.2.3"), "10.1.2.3"))
        self.assertEqual(tcp("2001:db8::7").ip, ipaddress.ip_address("2001:db8::7"))
        self.assertEqual((UNIX.ip, UNIX.unix, UNIX.shown), (None, True, "[local]"))

    def test_ipv4_mapped_is_ipv4(self) -> None:
        """A dual-stack listener's IPv4 client is judged as IPv4 and shown as it came."""
        mapped = tcp("::ffff:10.1.2.3")
        self.assertEqual(mapped.ip, ipaddress.ip_address("10.1.2.3"))
        self.assertEqual(mapped.shown, "::ffff:10.1.2.3")

    def test_scope_id_dropped(self) -> None:
        """A link-local peer's scope id does not stop it matching a network."""
        self.assertTrue(tcp("fe80::1%eth0").within((ipaddress.ip_network("fe80::/10"),)))

    def test_unknown_peer_kind(self) -> None:
        """An address of another kind matches only routes without address rules."""
        self.assertIs(client_address(object()), UNKNOWN_ADDRESS)
        self.assertEqual(UNKNOWN_ADDRESS.shown, "unknown")
        self.assertIsNone(ClientAddress("not-an-address").ip)
        self.assertTrue(UNKNOWN_ADDRESS.within(None))
        self.assertFalse(UNKNOWN_ADDRESS.within(("unix", ipaddress.ip_network("0.0.0.0/0"))))


class RouterTests(SynchronousTestCase):
    def test_specific_before_wildcard(self) -> None:
        """Exact pair, then database with any user, then any database with the user, then "*"."""
        router = Router(routes({"database": "*", "user": "*"}, {"database": "*", "user": "u"},
                               {"database": "d", "user": "*"}, {"database": "d", "user": "u"}))
        self.assertEqual(picked(router, "d", "u"), 3)
        self.assertEqual(picked(router, "d", "v"), 2)
        self.assertEqual(picked(router, "e", "u"), 1)
        self.assertEqual(picked(router, "e", "v"), 0)

    def test_address_rules_pick_among_routes_of_one_pair(self) -> None:
        """The same pair is served by the first route whose clients take the address in."""
        router = Router(routes(
            {"database": "d", "user": "u", "clients": ["unix"]},
            {"database": "d", "user": "u", "clients": ["10.0.0.0/8", "2001:db8::/32"], "auth": CLEAR},
        ))
        self.assertEqual(picked(router, "d", "u", UNIX), 0)
        self.assertEqual(picked(router, "d", "u", tcp("10.9.9.9")), 1)
        self.assertEqual(picked(router, "d", "u", tcp("::ffff:10.9.9.9")), 1)
        self.assertEqual(picked(router, "d", "u", tcp("2001:db8::1")), 1)
        self.assertIsNone(router.match("d", "u", tcp("192.0.2.1")))
        self.assertIsNone(router.match("d", "u", tcp("2001:db9::1")))

    def test_address_miss_falls_through_to_wildcard(self) -> None:
        """Like a pg_hba.conf line, a route not serving the address is skipped, not final."""
        router = Router(routes({"database": "d", "user": "u", "clients": ["10.0.0.0/8"]},
                               {"database": "d", "user": "*"}))
        self.assertEqual(picked(router, "d", "u", tcp("10.0.0.1")), 0)
        self.assertEqual(picked(router, "d", "u", tcp("192.0.2.1")), 1)

    def test_serves_ignores_the_user(self) -> None:
        """Whether a database serves an address does not depend on who asks."""
        router = Router(routes({"database": "d", "user": "u", "clients": ["unix"]},
                               {"database": "e", "user": "*"}))
        self.assertTrue(router.serves("d", UNIX))
        self.assertFalse(router.serves("d", tcp("127.0.0.1")))
        self.assertTrue(router.serves("e", tcp("127.0.0.1")))

    def test_blocked_route_asks_what_it_shadows(self) -> None:
        """A blocked route without auth is challenged like the route it hides; with auth, its own."""
        router = Router(routes({"database": "d", "user": "mallory", "block": True},
                               {"database": "d", "user": "eve", "block": True, "auth": {"method": "md5", "password": "x"}},
                               {"database": "d", "user": "*", "auth": CLEAR}))
        mallory = router.match("d", "mallory", UNIX)
        assert mallory is not None
        self.assertTrue(mallory.block)
        self.assertEqual(router.auth_of(mallory, "d", "mallory", UNIX), ClientAuth("cleartext", Secret("plain", "pw")))
        eve = router.match("d", "eve", UNIX)
        assert eve is not None
        self.assertEqual(router.auth_of(eve, "d", "eve", UNIX), ClientAuth("md5", Secret("plain", "x")))

    def test_blocked_route_names_the_route_whose_auth_it_borrows(self) -> None:
        """auth_route_of gives the shadowed route itself, so that an auth_query lookup for
        a blocked user runs on that route's storage and query, as the login does."""
        router = Router(routes({"database": "d", "user": "mallory", "block": True},
                               {"database": "d", "user": "*",
                                "auth": {"method": "scram-sha-256", "query_user": "lookup"}}))
        mallory = router.match("d", "mallory", UNIX)
        assert mallory is not None
        owner = router.auth_route_of(mallory, "d", "mallory", UNIX)
        assert owner is not None
        self.assertIsNot(owner, mallory)
        self.assertEqual(owner.user, "*")
        self.assertIsNotNone(owner.auth.query)
        self.assertIs(router.auth_route_of(owner, "d", "someone", UNIX), owner)

    def test_blocked_route_with_nothing_below_is_mocked(self) -> None:
        """A blocked route without auth and nothing under it gets an unknown user's exchange."""
        router = Router(routes({"database": "d", "user": "mallory", "block": True},
                               {"database": "d", "user": "u", "auth": CLEAR}))
        mallory = router.match("d", "mallory")
        assert mallory is not None
        self.assertIsNone(router.auth_of(mallory, "d", "mallory", UNKNOWN_ADDRESS))
        self.assertEqual(router.mock_auth("d").method, "cleartext")  # not the block's "trust"

    def test_mock_copies_routes_serving_the_address(self) -> None:
        """An unknown user is challenged like the known users at the same address."""
        router = Router(routes({"database": "d", "user": "a", "clients": ["unix"]},
                               {"database": "d", "user": "b", "clients": ["127.0.0.0/8"], "auth": CLEAR}))
        self.assertEqual(router.mock_auth("d", UNIX).method, "trust")
        self.assertEqual(router.mock_auth("d", tcp("127.0.0.1")).method, "cleartext")


# -- the client protocol ----------------------------------------------------------------------


def messages(data: bytes) -> list[tuple[str, bytes]]:
    return [(chr(k), b or b"") for k, b, _ in Scanner(collect_all=True).feed(data)]


def error_of(data: bytes) -> tuple[str, str]:
    """The (SQLSTATE, message) of the last message, which must be an ErrorResponse."""
    kind, body = messages(data)[-1]
    assert kind == "E", messages(data)
    fields = m.parse_error_fields(body)
    return fields["C"], fields["M"]


class ProtocolTests(SynchronousTestCase):
    """Blocks and address refusals as a client sees them, byte by byte."""

    def setUp(self) -> None:
        cfg = config.parse({
            "listen": ["tcp:0"],
            "storages": {"pg": {"host": "127.0.0.1"}},
            "routes": [
                {"database": "db", "user": "mallory", "storage": "pg", "block": True},
                {"database": "db", "user": "trusty", "storage": "pg", "block": True, "auth": {"method": "trust"}},
                {"database": "db", "user": "*", "storage": "pg", "auth": CLEAR, "clients": ["10.0.0.0/8", "unix"]},
                {"database": "far", "user": "*", "storage": "pg", "clients": ["2001:db8::/32"]},
            ],
        })
        clock = MemoryReactorClock()
        self.backends = FakeBackends(clock)
        pools = Pools(clock, lambda *_args: self.backends())
        self.factory = ClientFactory(clock, Router(cfg.routes), pools, cfg.limits, in_this_thread)

    def login(self, user: str, database: str = "db", peer: object = None,
              password: bytes | None = None) -> tuple[ClientConnection, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=peer or IPv4Address("TCP", "10.1.2.3", 50000))
        proto.makeConnection(transport)
        proto.dataReceived(m.startup_message({"user": user, "database": database}))
        if password is not None:
            self.assertEqual(messages(transport.value()), [("R", m.authentication_cleartext()[5:])])
            proto.dataReceived(m.password_message(password + b"\0"))
        self.backends.flush()
        return proto, transport

    def test_blocked_after_the_right_password(self) -> None:
        """A blocked user is asked for the password like its neighbours, then gets 28000."""
        proto, transport = self.login("mallory", password=b"pw")
        self.assertEqual(error_of(transport.value()),
                         ("28000", 'pg_hba.conf rejects connection for host "10.1.2.3", user "mallory", '
                                   'database "db", no encryption'))
        self.assertNotIn(m.authentication_ok(), transport.value())
        self.assertEqual(proto.state, ClientState.CLOSING)
        self.assertEqual(self.backends.opened, [])  # a blocked login needs no server

    def test_blocked_wrong_password_is_a_password_error(self) -> None:
        """A blocked user with a wrong password gets 28P01, like anyone with a wrong password."""
        _proto, transport = self.login("mallory", password=b"nope")
        self.assertEqual(error_of(transport.value()), ("28P01", 'password authentication failed for user "mallory"'))

    def test_neighbour_logs_in(self) -> None:
        """Another user of the same wildcard route is served."""
        proto, _transport = self.login("alice", password=b"pw")
        self.assertEqual(proto.state, ClientState.READY)

    def test_blocked_trust_route(self) -> None:
        """A blocked route with trust auth refuses at once: trust has nothing to hide."""
        _proto, transport = self.login("trusty")
        self.assertEqual(error_of(transport.value())[0], "28000")
        self.assertEqual(len(messages(transport.value())), 1)

    def test_no_route_for_the_address(self) -> None:
        """No route of the database serves the address: 28000 before any password request."""
        _proto, transport = self.login("alice", database="far", peer=IPv4Address("TCP", "192.0.2.7", 50000))
        self.assertEqual(len(messages(transport.value())), 1)
        self.assertEqual(error_of(transport.value()),
                         ("28000", 'no pg_hba.conf entry for host "192.0.2.7", user "alice", '
                                   'database "far", no encryption'))

    def test_blocked_route_keeps_its_database_served(self) -> None:
        """A blocked route serves the addresses it lists, so that a refusal before the
        password never singles out a blocked name: elsewhere everyone is mocked alike."""
        seen = []
        for user in ("mallory", "alice"):
            _proto, transport = self.login(user, peer=IPv4Address("TCP", "192.0.2.7", 50000))
            state, message = error_of(transport.value())
            seen.append((len(messages(transport.value())), state, message.replace(user, "X")))
        # (there only the blocked trust route serves: an unknown user's trust refusal, for both)
        self.assertEqual(seen, [(1, "28000", 'role "X" does not exist')] * 2)

    def test_no_route_for_a_unix_client(self) -> None:
        """A unix-socket client is named "[local]", as PostgreSQL names it."""
        _proto, transport = self.login("alice", database="far", peer=UNIXAddress(None))
        self.assertEqual(error_of(transport.value())[1],
                         'no pg_hba.conf entry for host "[local]", user "alice", database "far", no encryption')

    def test_unix_and_ipv6_served(self) -> None:
        """A unix client of a route listing "unix", an IPv6 client of an IPv6 network."""
        proto, _ = self.login("alice", peer=UNIXAddress(None), password=b"pw")
        self.assertEqual(proto.state, ClientState.READY)
        proto, _ = self.login("alice", database="far", peer=IPv6Address("TCP", "2001:db8::5", 50000))
        self.assertEqual(proto.state, ClientState.READY)


# -- through psycopg, against the real PostgreSQL ------------------------------------------------


def refusal(dsn: str) -> str:
    """Log in with libpq; the error text of the refusal (or "served")."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute("select 1")
    except psycopg.OperationalError as exc:
        return str(exc)
    return "served"


class BlockIntegrationTests(IntegrationTest):
    """``u_clear`` is blocked inside the wildcard route of database app (SCRAM, APP_PASSWORD)."""

    def routes(self) -> list[dict]:
        blocked = {**route("app", "u_clear"), "block": True}
        del blocked["auth"]  # challenged like the wildcard route it shadows
        return [blocked, route("app", "*", server={"password": APP_PASSWORD})]

    @inlineCallbacks
    def test_blocked_user_refused_after_its_password(self):
        """The right password gets PostgreSQL's 28000 refusal; the pooler opens no server for it."""
        got = yield self.thread(refusal, self.odissey.dsn(user="u_clear"))
        self.assertIn('FATAL:  pg_hba.conf rejects connection for host "127.0.0.1", user "u_clear", '
                      'database "app", no encryption', got)
        self.assertEqual(server_pids("u_clear"), set())

    @inlineCallbacks
    def test_blocked_user_wrong_password(self):
        """A wrong password gets the password error first, as for any user."""
        got = yield self.thread(refusal, self.odissey.dsn(user="u_clear", password="wrong"))
        self.assertIn('password authentication failed for user "u_clear"', got)

    @inlineCallbacks
    def test_blocked_sqlstate(self):
        """The refusal carries SQLSTATE 28000 (read from the raw ErrorResponse)."""
        got = yield self.thread(scram_login_error, self.odissey.port, "u_clear", APP_PASSWORD)
        self.assertEqual(got[0], "28000")

    @inlineCallbacks
    def test_neighbour_still_served(self):
        """Another user of the wildcard route logs in and queries."""
        got = yield self.thread(refusal, self.odissey.dsn(user="app"))
        self.assertEqual(got, "served")


def scram_login_error(port: int, user: str, password: str) -> tuple[str, str]:
    """Log in with SCRAM over a raw socket: ("", "") if logged in, else the FATAL's
    (SQLSTATE, message), which libpq does not hand its callers at login."""
    import scramp

    from tests.harness import read_message

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": user, "database": "app"}))
        client = scramp.ScramClient(["SCRAM-SHA-256"], "placeholder", password)
        data = b""
        while True:
            kind, body, data = read_message(sock, data)
            if kind == b"E":
                fields = m.parse_error_fields(body)
                return fields["C"], fields["M"]
            if kind == b"Z":
                return "", ""
            if kind != b"R":
                continue
            code, payload = m.parse_authentication(body)
            if code == m.AUTH_SASL:
                first = client.get_client_first().replace("n=placeholder,", "n=,")
                client.client_first_bare = first[3:]
                sock.sendall(m.sasl_initial_response("SCRAM-SHA-256", first.encode()))
            elif code == m.AUTH_SASL_CONTINUE:
                client.set_server_first(payload.decode())
                sock.sendall(m.password_message(client.get_client_final().encode()))


class AddressIntegrationTests(IntegrationTest):
    """Database app: u_trust only over the unix socket, everyone over 127.0.0.0/8 (which
    also takes in the IPv4-mapped ::ffff:127.0.0.1); database nowhere: only 10.0.0.0/8."""

    def listeners(self) -> list[str]:
        self.socket_dir = tempfile.mkdtemp(prefix="odissey-")  # short: a socket path has 107 bytes
        return ["tcp:0:interface=127.0.0.1",
                r"tcp6:0:interface=\:\:ffff\:127.0.0.1",
                f"unix:{self.socket_dir}/.s.PGSQL.6432"]

    @inlineCallbacks
    def tearDown(self):
        yield super().tearDown()  # (cleanups run before tearDown: the socket must be gone first)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def routes(self) -> list[dict]:
        return [
            {**route("app", "u_trust", auth={"method": "trust"}), "clients": ["unix"]},
            {**route("app", "*", server={"password": APP_PASSWORD}), "clients": ["127.0.0.0/8"]},
            {**route("nowhere", "*"), "clients": ["10.0.0.0/8"]},
        ]

    def unix_dsn(self, user: str, dbname: str = "app", password: str = APP_PASSWORD) -> str:
        return make_conninfo(host=self.socket_dir, port="6432", user=user, dbname=dbname, password=password)

    @inlineCallbacks
    def test_unix_client_served_by_unix_route(self):
        """u_trust over the unix socket gets its trust route (no password needed)."""
        got = yield self.thread(refusal, self.unix_dsn("u_trust", password="ignored"))
        self.assertEqual(got, "served")

    @inlineCallbacks
    def test_tcp_client_served_by_network_route(self):
        """Over 127.0.0.1 the same user falls to the 127.0.0.0/8 route and its SCRAM password."""
        self.assertEqual((yield self.thread(refusal, self.odissey.dsn(user="u_trust"))), "served")
        got = yield self.thread(refusal, self.odissey.dsn(user="u_trust", password="wrong"))
        self.assertIn('password authentication failed for user "u_trust"', got)

    @inlineCallbacks
    def test_each_route_of_a_pair_has_its_own_pool(self):
        """u_trust over the socket and over TCP is served by two routes: two pools, each
        with its route's settings (a pool is never shared across routes)."""
        self.assertEqual((yield self.thread(refusal, self.unix_dsn("u_trust"))), "served")
        self.assertEqual((yield self.thread(refusal, self.odissey.dsn(user="u_trust"))), "served")
        pools = self.odissey.service.pools.pools  # type: ignore[union-attr]
        self.assertEqual(sorted((str(k), p.route.index) for k, p in pools.items()),
                         [("app/u_trust (routes[0])", 0), ("app/u_trust (routes[1])", 1)])

    @inlineCallbacks
    def test_ipv4_mapped_client_matches_ipv4_network(self):
        """A client seen as ::ffff:127.0.0.1 is served by the 127.0.0.0/8 route."""
        port = self.odissey.service.ports[1].getHost().port
        dsn = make_conninfo(host="::ffff:127.0.0.1", port=str(port), user="app", dbname="app",
                            password=APP_PASSWORD, sslmode="disable")
        self.assertEqual((yield self.thread(refusal, dsn)), "served")

    @inlineCallbacks
    def test_no_route_for_the_address(self):
        """No route of the database serves the address: PostgreSQL's 28000, before the password."""
        got = yield self.thread(refusal, self.odissey.dsn(user="app", dbname="nowhere", password="not-asked"))
        self.assertIn('FATAL:  no pg_hba.conf entry for host "127.0.0.1", user "app", database "nowhere", '
                      "no encryption", got)
        got = yield self.thread(refusal, self.unix_dsn("app", dbname="nowhere"))
        self.assertIn('no pg_hba.conf entry for host "[local]", user "app", database "nowhere"', got)

    @inlineCallbacks
    def test_refused_before_any_password(self):
        """libpq is never asked for a password: the refusal comes first."""
        got = yield self.thread(refusal, self.odissey.dsn(user="app", dbname="nowhere", password=None))
        self.assertIn("no pg_hba.conf entry", got)
        self.assertNotIn("no password supplied", got)
