"""The client protocol on a StringTransport and a fake clock: bytes in, bytes out."""

from __future__ import annotations

import struct

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from odissey import config
from odissey.client import ClientConnection, ClientFactory, ClientState
from odissey.pool import Pools
from odissey.router import Router
from odissey.testing import FakeServer, in_this_thread
from odissey.wire import messages as m
from odissey.wire.scanner import Scanner


def messages(data: bytes) -> list[tuple[str, bytes]]:
    return [(chr(k), b or b"") for k, b, _ in Scanner(collect_all=True).feed(data)]


class ClientProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        cfg = config.parse({
            "listen": ["tcp:0"],
            "limits": {"max_clients": 2, "max_login_clients": 3, "login_timeout": "3s"},
            "storages": {"pg": {"host": "127.0.0.1"}},
            "routes": [{"database": "db", "user": "u", "storage": "pg", "auth": {"method": "trust"}}],
        })
        self.clock = Clock()
        self.opened: list[FakeServer] = []

        def connect(*_args: object) -> object:
            server = FakeServer()
            self.opened.append(server)
            return succeed(server)

        self.factory = ClientFactory(self.clock, Router(cfg.routes), Pools(self.clock, connect), cfg.limits, in_this_thread)  # type: ignore[arg-type]

    def connect(self) -> tuple[ClientConnection, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_ssl_and_gssenc_answered_no(self) -> None:
        """SSLRequest and GSSENCRequest get 'N'; the startup may follow."""
        proto, transport = self.connect()
        proto.dataReceived(m.ssl_request())
        proto.dataReceived(struct.pack("!ii", 8, 80877104))
        self.assertEqual(transport.value(), b"NN")
        self.assertEqual(proto.state, ClientState.STARTUP)

    def test_trust_login_greeting(self) -> None:
        """A trust login gets AuthenticationOk, cached parameters, our own key, ReadyForQuery."""
        proto, transport = self.connect()
        proto.dataReceived(m.startup_message({"user": "u", "database": "db", "application_name": "t"}))
        got = messages(transport.value())
        kinds = [k for k, _ in got]
        self.assertEqual(kinds[0], "R")
        self.assertEqual(kinds[-2:], ["K", "Z"])
        params = dict(m.parse_parameter_status(b) for k, b in got if k == "S")
        self.assertEqual(params["application_name"], "t")
        self.assertEqual(params["TimeZone"], "UTC")
        self.assertEqual(proto.state, ClientState.READY)
        self.assertEqual(len(self.opened), 1)  # one server, for the parameter cache

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
        """A client that never finishes its startup is dropped after login_timeout."""
        proto, transport = self.connect()
        proto.dataReceived(b"\0\0")
        self.clock.advance(3)
        (kind, body), = messages(transport.value())
        self.assertEqual(m.parse_error_fields(body)["C"], "57014")
        self.assertTrue(transport.disconnecting)

    def test_cancel_request_closes(self) -> None:
        """A CancelRequest connection is closed with no answer."""
        proto, transport = self.connect()
        proto.dataReceived(m.cancel_request(1, 2))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_newer_protocol_negotiated(self) -> None:
        """A 3.2 startup with a _pq_ option gets NegotiateProtocolVersion first."""
        proto, transport = self.connect()
        packet = m.startup_message({"user": "u", "database": "db", "_pq_.x": "1"}, protocol=(3 << 16) | 2)
        proto.dataReceived(packet)
        kind, body = messages(transport.value())[0]
        self.assertEqual(kind, "v")
        self.assertEqual(body, struct.pack("!ii", 0, 1) + b"_pq_.x\0")
