"""The client protocol on a StringTransport and a fake clock: bytes in, bytes out."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from odissey import client as client_module, config
from odissey.cancel import CancelKeys, KeyLayout, Peering
from odissey.client import ClientConnection, ClientFactory, ClientState
from odissey.config import Route
from odissey.janitor import Janitor
from odissey.pool import Pools
from odissey.router import Router
from odissey.service import OdisseyService
from odissey.testing import FakeBackends, answer_cancel, in_this_thread
from odissey.wire import messages as m
from odissey.wire.scanner import Scanner


def messages(data: bytes) -> list[tuple[str, bytes]]:
    return [(chr(k), b or b"") for k, b, _ in Scanner(collect_all=True).feed(data)]


def client_factory(**pool: object) -> tuple[ClientFactory, MemoryReactorClock, FakeBackends]:
    """A client factory for one trust route whose pool opens fake backends."""
    cfg = config.parse({
        "listen": ["tcp:0"],
        "limits": {"max_clients": 2, "max_login_clients": 3, "login_timeout": "3s"},
        "storages": {"pg": {"host": "127.0.0.1"}},
        "routes": [{"database": "db", "user": "u", "storage": "pg", "auth": {"method": "trust"},
                    "pool": pool}],
    })
    clock = MemoryReactorClock()
    backends = FakeBackends(clock)
    pools = Pools(clock, lambda *_args: backends())
    return ClientFactory(clock, Router(cfg.routes), pools, cfg.limits, in_this_thread), clock, backends


def connect(factory: ClientFactory) -> tuple[ClientConnection, StringTransport]:
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


class ClientProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory, self.clock, self.backends = client_factory()

    def connect(self) -> tuple[ClientConnection, StringTransport]:
        return connect(self.factory)

    def test_ssl_and_gssenc_answered_no(self) -> None:
        """SSLRequest and GSSENCRequest get 'N'; the startup may follow."""
        proto, transport = self.connect()
        proto.dataReceived(m.ssl_request())
        proto.dataReceived(struct.pack("!ii", 8, 80877104))
        self.assertEqual(transport.value(), b"NN")
        self.assertEqual(proto.state, ClientState.STARTUP)

    def test_login_answered_in_one_write(self) -> None:
        """Once its pool knows the server's parameters, a transaction-mode login's
        AuthenticationOk, ParameterStatus set, BackendKeyData and ReadyForQuery leave in
        one write, as PostgreSQL sends them (a login that must wait first gets its
        AuthenticationOk before the wait: test_session_login_waits_for_a_server_then_53300)."""
        factory, clock, backends = client_factory(mode="transaction")
        first, _ = connect(factory)
        first.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        backends.flush()
        clock.advance(0)
        self.assertEqual(first.state, ClientState.READY)
        proto, transport = connect(factory)
        writes: list[bytes] = []
        write = transport.write
        transport.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
        proto.dataReceived(m.startup_message({"user": "u", "database": "db", "application_name": "t"}))
        self.assertEqual(len(writes), 1)
        kinds = [kind for kind, _ in messages(writes[0])]
        self.assertEqual((kinds[0], kinds[-2:]), ("R", ["K", "Z"]))
        self.assertEqual(proto.state, ClientState.READY)

    def test_logins_with_one_startup_packet_share_nothing_they_change(self) -> None:
        """Logins with the same startup packet start from what the pool worked out once,
        each with parameters of its own: what one client's session changes (a SET, a
        ParameterStatus) reaches neither the next login's greeting nor its relay."""
        factory, clock, backends = client_factory(mode="transaction")
        startup = m.startup_message({"user": "u", "database": "db", "application_name": "t"})
        first, _ = connect(factory)
        first.dataReceived(startup)
        backends.flush()
        clock.advance(0)
        assert first.relay is not None
        first.relay.wanted["timezone"] = ("TimeZone", "Asia/Tokyo")
        first.relay.told["timezone"] = "Asia/Tokyo"
        second, transport = connect(factory)
        second.dataReceived(startup)
        assert second.relay is not None
        self.assertEqual(second.relay.wanted["timezone"], ("TimeZone", "UTC"))
        self.assertEqual(second.relay.told["timezone"], "UTC")
        greeting = [body for kind, body in messages(transport.value()) if kind == "S"]
        self.assertIn(m.parameter_status("TimeZone", "UTC")[5:], greeting)

    def test_trust_login_greeting(self) -> None:
        """A trust login gets AuthenticationOk, cached parameters, our own key, ReadyForQuery."""
        proto, transport = self.connect()
        proto.dataReceived(m.startup_message({"user": "u", "database": "db", "application_name": "t"}))
        self.backends.flush()  # (session mode: application_name is set on its server)
        got = messages(transport.value())
        kinds = [k for k, _ in got]
        self.assertEqual(kinds[0], "R")
        self.assertEqual(kinds[-2:], ["K", "Z"])
        params = dict(m.parse_parameter_status(b) for k, b in got if k == "S")
        self.assertEqual(params["application_name"], "t")
        self.assertEqual(params["TimeZone"], "UTC")
        self.assertEqual(proto.state, ClientState.READY)
        self.assertEqual(len(self.backends.opened), 1)  # for the parameter cache, then the session

    def test_bad_startup_gets_protocol_violation(self) -> None:
        """An invalid startup length gets 08P01 and a closed connection."""
        proto, transport = self.connect()
        proto.dataReceived(struct.pack("!i", 3) + b"\0" * 8)
        (kind, body), = messages(transport.value())
        self.assertEqual(m.parse_error_fields(body)["C"], "08P01")
        self.assertTrue(transport.disconnecting)

    def test_too_many_clients(self) -> None:
        """Past max_clients logged-in clients, a login gets 53300; connections still
        logging in do not count."""
        for _ in range(3):
            self.connect()  # never send a startup packet
        for _ in range(2):
            proto, _transport = self.connect()
            proto.dataReceived(m.startup_message({"user": "u", "database": "db"}))
            self.clock.advance(0)  # a waiter for a server is served on a later turn
            self.assertEqual(proto.state, ClientState.READY)
        proto, transport = self.connect()
        proto.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        (kind, body), = messages(transport.value())
        self.assertEqual(m.parse_error_fields(body)["C"], "53300")

    def test_stalled_login_makes_room(self) -> None:
        """Past max_login_clients, the oldest login that kept us waiting half a second is
        dropped with 53300; a burst of fresh connections drops nobody."""
        stalled = [self.connect() for _ in range(3)]  # max_login_clients is 3 here
        burst = self.connect()
        self.assertFalse(any(t.disconnecting for _, t in stalled + [burst]))
        self.clock.advance(0.6)
        self.connect()
        (kind, body), = messages(stalled[0][1].value())
        self.assertEqual(m.parse_error_fields(body)["C"], "53300")
        self.assertFalse(stalled[1][1].disconnecting)

    def test_second_ssl_request_refused(self) -> None:
        """PostgreSQL answers SSLRequest once; a second one is an unsupported protocol (0A000)."""
        proto, transport = self.connect()
        proto.dataReceived(m.ssl_request())
        proto.dataReceived(m.ssl_request())
        self.assertEqual(transport.value()[:1], b"N")
        (kind, body), = messages(transport.value()[1:])
        fields = m.parse_error_fields(body)
        self.assertEqual(fields["C"], "0A000")
        self.assertIn("1234.5679", fields["M"])

    def test_bytes_after_gssenc_request(self) -> None:
        """Bytes pipelined behind a GSSENCRequest are refused, and the error says so."""
        proto, transport = self.connect()
        proto.dataReceived(struct.pack("!ii", 8, 80877104) + b"junk")
        (kind, body), = messages(transport.value())
        self.assertIn("GSSAPI encryption request", m.parse_error_fields(body)["M"])

    def test_one_fatal_only(self) -> None:
        """A second error on a closing connection is not sent."""
        from odissey.wire.errors import PoolerError
        proto, transport = self.connect()
        proto.fail(PoolerError("08P01", "first"))
        proto.fail(PoolerError("57014", "second"))
        self.assertEqual(len(messages(transport.value())), 1)

    def test_login_timeout(self) -> None:
        """A client that never finishes its startup is dropped by the janitor's first
        pass after login_timeout, not before."""
        janitor = Janitor(self.clock, self.factory.pools, self.factory)
        proto, transport = self.connect()
        proto.dataReceived(b"\0\0")
        self.clock.advance(2.9)
        janitor.tick()
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        janitor.tick()
        (kind, body), = messages(transport.value())
        self.assertEqual(m.parse_error_fields(body)["C"], "57014")
        self.assertTrue(transport.disconnecting)

    def test_login_timeout_survives_a_failing_janitor_step(self) -> None:
        """A step of the janitor that raises is logged, and the others still run, on
        this pass and the next (a LoopingCall would stop at the first exception)."""
        janitor = Janitor(self.clock, self.factory.pools, self.factory)

        def broken(now: float) -> None:
            raise RuntimeError("a pool's upkeep went wrong")

        janitor._maintain_pools = broken  # type: ignore[method-assign]
        proto, transport = self.connect()
        proto.dataReceived(b"\0\0")
        self.clock.advance(3.0)
        janitor.tick()
        (kind, body), = messages(transport.value())
        self.assertEqual(m.parse_error_fields(body)["C"], "57014")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cancel_request_closes(self) -> None:
        """A CancelRequest connection is closed with no answer."""
        proto, transport = self.connect()
        proto.dataReceived(m.cancel_request(1, 2))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_cancel_for_a_peer_closes_after_the_peer(self) -> None:
        """With peers, a CancelRequest whose key another instance issued is sent on to
        it, and the client's cancel connection closes only once the peer has closed
        the forwarded one (libpq's ordering, across instances); a key naming an
        unknown instance is dropped and closed at once."""
        peer = config.Peer(id=1, host="10.0.0.1", port=6432)
        self.factory.keys = CancelKeys(KeyLayout.of(2, True, 0, 1))
        self.factory.peering = Peering(self.clock, {1: peer})
        _pid, secret = CancelKeys(KeyLayout.of(1, True, 0, 1)).issue("theirs")
        proto, transport = self.connect()
        proto.dataReceived(m.cancel_request(4242, secret))
        line = answer_cancel(self.clock)
        self.assertEqual(line.value(), m.cancel_request(4242, secret - 1))
        self.assertFalse(transport.disconnecting)
        line.loseConnection()
        self.assertTrue(transport.disconnecting)
        _pid, secret = CancelKeys(KeyLayout.of(9, True, 0, 1)).issue("nobody's")
        proto, transport = self.connect()
        proto.dataReceived(m.cancel_request(4242, secret))
        self.assertEqual(self.clock.tcpClients, [])
        self.assertTrue(transport.disconnecting)

    def test_newer_protocol_negotiated(self) -> None:
        """A 3.2 startup with a _pq_ option gets NegotiateProtocolVersion first."""
        proto, transport = self.connect()
        packet = m.startup_message({"user": "u", "database": "db", "_pq_.x": "1"}, protocol=(3 << 16) | 2)
        proto.dataReceived(packet)
        kind, body = messages(transport.value())[0]
        self.assertEqual(kind, "v")
        self.assertEqual(body, struct.pack("!ii", 0, 1) + b"_pq_.x\0")


def greeting(transport: StringTransport) -> tuple[dict[str, str], tuple[int, int] | None, list[str]]:
    """What a login was told: its ParameterStatus set, its BackendKeyData, the message types."""
    got = messages(transport.value())
    params = dict(m.parse_parameter_status(body) for kind, body in got if kind == "S")
    keys = [m.parse_backend_key_data(body) for kind, body in got if kind == "K"]
    return params, keys[0] if keys else None, [kind for kind, _ in got]


class SessionIdentityTests(SynchronousTestCase):
    """Session mode: a login takes its server, so its key carries that backend's pid."""

    def test_session_key_is_the_backend_pid_with_our_secret(self) -> None:
        """A session login's BackendKeyData has its server's real pid but a secret of
        Odissey's; a cancel with that key reaches the server with the server's own key."""
        factory, clock, backends = client_factory(mode="session")
        proto, transport = connect(factory)
        proto.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        _params, key, kinds = greeting(transport)
        backend = backends[0]
        self.assertEqual(kinds[-2:], ["K", "Z"])
        self.assertEqual(key[0], backend.key[0])  # type: ignore[index]
        self.assertNotEqual(key[1], backend.key[1])  # type: ignore[index]
        self.assertIs(backend.server.handler, proto.relay)  # attached before ReadyForQuery
        proto.dataReceived(m.query("select pg_sleep(10)"))
        backends.flush()
        landed = factory.cancel(*key)  # type: ignore[misc]
        self.assertEqual(backend.accept_cancel(), m.cancel_request(*backend.key))
        self.successResultOf(landed)
        self.assertIn(b"C57014\0", transport.value())

    def test_transaction_key_is_odisseys_own(self) -> None:
        """A transaction-mode login holds no server, and its pid is not a backend's."""
        factory, clock, backends = client_factory(mode="transaction")
        proto, transport = connect(factory)
        proto.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        _params, key, kinds = greeting(transport)
        self.assertEqual(kinds[-1], "Z")
        self.assertNotEqual(key[0], backends[0].key[0])  # type: ignore[index]
        self.assertIsNone(backends[0].server.handler)

    def test_two_sessions_on_one_pid_keep_their_own_keys(self) -> None:
        """Two sessions whose servers (on different storages) share a pid get distinct
        keys, and each cancel finds its own client."""
        factory, clock, backends = client_factory(mode="session")
        first, first_transport = connect(factory)
        first.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        second, second_transport = connect(factory)
        second.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        clock.advance(0)
        a, b = greeting(first_transport)[1], greeting(second_transport)[1]
        self.assertEqual(a[0], b[0])  # type: ignore[index]  # (every fake backend's pid is 4242)
        self.assertNotEqual(a, b)
        self.assertIs(factory.keys.find(*a), first)  # type: ignore[misc]
        self.assertIs(factory.keys.find(*b), second)  # type: ignore[misc]
        first.connectionLost(None)
        self.assertIsNone(factory.keys.find(*a))  # type: ignore[misc]
        self.assertIs(factory.keys.find(*b), second)  # type: ignore[misc]

    def test_session_login_waits_for_a_server_then_53300(self) -> None:
        """With the pool's only server held, a session login waits after authentication
        (past login_timeout, which covers only what the client does) and gets 53300 at
        wait_timeout, with no BackendKeyData or ReadyForQuery before it."""
        factory, clock, backends = client_factory(mode="session", size=1, wait_timeout="5s")
        holder, _ = connect(factory)
        holder.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        proto, transport = connect(factory)
        proto.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        clock.advance(4.9)
        factory.expire_logins(clock.seconds())  # (what the janitor does twice a second)
        self.assertEqual(proto.state, ClientState.PARAMS)
        clock.advance(0.1)
        got = messages(transport.value())
        self.assertEqual([kind for kind, _ in got], ["R", "E"])
        self.assertEqual(m.parse_error_fields(got[-1][1])["C"], "53300")

    def test_session_login_served_when_the_server_comes_back(self) -> None:
        """A waiting session login gets the server its holder left, with that backend's pid."""
        factory, clock, backends = client_factory(mode="session", size=1, reset_query="")
        holder, _ = connect(factory)
        holder.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        proto, transport = connect(factory)
        proto.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        holder.connectionLost(None)
        backends.flush()
        clock.advance(0)
        self.assertEqual(proto.state, ClientState.READY)
        self.assertEqual(greeting(transport)[1][0], backends[0].key[0])  # type: ignore[index]

    def test_left_while_waiting_leaves_no_trace(self) -> None:
        """A session login that goes while it waits for a server leaves the pool's queue."""
        factory, clock, backends = client_factory(mode="session", size=1)
        holder, _ = connect(factory)
        holder.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        proto, transport = connect(factory)
        proto.dataReceived(m.startup_message({"user": "u", "database": "db"}))
        pool = next(iter(factory.pools.pools.values()))
        self.assertEqual(len(pool.waiters), 1)
        proto.connectionLost(None)
        self.assertEqual(len(pool.waiters), 0)
        self.assertEqual(proto.state, ClientState.GONE)


class Admissions:
    """A worker's link to its master as a client sees it (``Admission``): admits all,
    records what it was asked and given back."""

    def __init__(self) -> None:
        self.admitted: list[str] = []
        self.gone: list[str] = []

    def admit(self, route: Route) -> "Deferred[str]":
        self.admitted.append(route.identity)
        return succeed("")

    def left(self, identity: str) -> None:
        self.gone.append(identity)


def two_routes(first: str, second: str) -> config.Config:
    """Routes to databases ``first`` and ``second`` (max_clients 1 each), in that order,
    behind a cleartext password (so a login can be caught halfway)."""
    route = {"user": "u", "storage": "pg", "auth": {"method": "cleartext", "password": "pw"},
             "pool": {"max_clients": 1}}
    return config.parse({"listen": ["tcp:0"], "storages": {"pg": {"host": "127.0.0.1"}},
                         "routes": [{"database": first, **route}, {"database": second, **route}]})


class ClientLimitsTests(SynchronousTestCase):
    """A route's max_clients counts a client under the route it was admitted for, and
    gives back exactly that."""

    def setUp(self) -> None:
        clock = MemoryReactorClock()
        clock.getThreadPool = lambda: None  # type: ignore[attr-defined]  # (never used: threads below)
        self.service = OdisseyService(two_routes("a", "b"), clock)
        self.service.threads = in_this_thread
        self.service.startService()  # (on a fake reactor: nothing to stop)
        self.factory = self.service.factory
        assert self.factory is not None

    def login(self, database: str, password: bool = True) -> tuple[ClientConnection, StringTransport]:
        proto, transport = connect(self.factory)  # type: ignore[arg-type]
        proto.dataReceived(m.startup_message({"user": "u", "database": database}))
        if password:
            proto.dataReceived(m.password_message(m.cstring("pw")))
        return proto, transport

    def refused(self, transport: StringTransport) -> bool:
        return any(kind == "E" and m.parse_error_fields(body)["C"] == "53300"
                   for kind, body in messages(transport.value()))

    def test_login_across_a_reload_counts_under_its_route(self) -> None:
        """A login past route matching when a reload swaps its route with another is
        counted under its own route: that route is full, the other is not; once it
        leaves, its route takes a client again."""
        admissions = self.factory.admission = Admissions()  # type: ignore[union-attr]
        early, _ = self.login("a", password=False)
        self.assertEqual(self.service.take(two_routes("b", "a")), [])
        early.dataReceived(m.password_message(m.cstring("pw")))
        self.assertEqual(early.state, ClientState.PARAMS)  # (admitted; waits for the server's parameters)
        a, b = self.service.config.routes[1], self.service.config.routes[0]
        self.assertEqual(self.factory.route_clients, {a.identity: 1})  # type: ignore[union-attr]
        self.assertTrue(self.refused(self.login("a")[1]))
        self.assertFalse(self.refused(self.login("b")[1]))
        early.connectionLost(None)
        self.assertEqual(admissions.gone, [a.identity])
        self.assertFalse(self.refused(self.login("a")[1]))
        self.assertEqual(admissions.admitted, [a.identity, b.identity, a.identity])

    def test_slot_given_back_when_login_fails_after_admission(self) -> None:
        """Whatever fails between admission and the greeting, the client's slot is given
        back when it goes (here: the SCRAM pass-through check raises)."""
        admissions = self.factory.admission = Admissions()  # type: ignore[union-attr]

        def broken(route: Route, user: str) -> bool:
            raise RuntimeError("broken")

        self.patch(client_module, "borrows_credentials", broken)
        proto, transport = self.login("a")
        self.assertEqual(m.parse_error_fields(messages(transport.value())[-1][1])["C"], "XX000")
        self.flushLoggedErrors(RuntimeError)
        proto.connectionLost(None)
        identity = self.service.config.routes[0].identity
        self.assertEqual((admissions.admitted, admissions.gone), ([identity], [identity]))
        self.assertEqual(+self.factory.route_clients, {})  # type: ignore[union-attr]


class ToldValuesTests(SynchronousTestCase):
    """A login is told the values PostgreSQL would report for what it asked."""

    def told(self, mode: str, **startup: str) -> dict[str, str]:
        factory, clock, backends = client_factory(mode=mode)
        proto, transport = connect(factory)
        proto.dataReceived(m.startup_message({"user": "u", "database": "db", **startup}))
        backends.flush()
        self.assertEqual(proto.state, ClientState.READY)
        return greeting(transport)[0]

    def test_told_values_as_postgresql_spells_them(self) -> None:
        """client_encoding=utf-8 and DateStyle=iso are told UTF8 and ISO, MDY at login,
        in both modes, and the relay carries those values."""
        for mode in ("session", "transaction"):
            params = self.told(mode, client_encoding="utf-8", DateStyle="iso")
            self.assertEqual((params["client_encoding"], params["DateStyle"]), ("UTF8", "ISO, MDY"), mode)

    def test_relative_value_from_the_default_not_the_last_client(self) -> None:
        """DateStyle=iso is checked from the default (ISO, MDY), not from the order a
        previous transaction-mode client left on the server (DMY)."""
        factory, clock, backends = client_factory(mode="transaction", size=1)
        first, _ = connect(factory)
        first.dataReceived(m.startup_message({"user": "u", "database": "db", "DateStyle": "SQL, DMY"}))
        backends.flush()
        first.dataReceived(m.query("select 1"))
        backends.flush()
        self.assertIn(("DateStyle", "SQL, DMY"), backends[0].params)
        proto, transport = connect(factory)
        proto.dataReceived(m.startup_message({"user": "u", "database": "db", "DateStyle": "iso"}))
        backends.flush()
        self.assertEqual(greeting(transport)[0]["DateStyle"], "ISO, MDY")
        self.assertEqual(proto.relay.wanted["datestyle"], ("DateStyle", "ISO, MDY"))  # type: ignore[union-attr]
