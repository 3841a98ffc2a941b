"""TLS on both sides, against a real PostgreSQL with ssl=on and real clients (psycopg,
whose bundled libpq is 18: direct TLS works), plus raw sockets and fake servers for the
attacks (bytes injected after an SSLRequest or its answer)."""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import pwd
import shutil
import socket
import ssl
import tempfile
import threading
import time
from typing import Any

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg.conninfo import make_conninfo
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from odissey import config, tls
from odissey.config import ConfigError
from odissey.postgres import LocalPostgres
from odissey.server import LoginInfo, ServerConnection
from odissey.service import OdisseyService
from odissey.wire import messages as m
from tests.harness import APP_PASSWORD, free_port, login_outcome, read_message, send_cancel_request


# -- certificates ---------------------------------------------------------------------------


class Certs:
    """A throwaway PKI in a temporary directory: CA, server certificates (right name,
    wrong name, expired), client certificates (CN app, CN mallory), and a stranger CA."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="odissey-tls-")
        os.chmod(self.dir, 0o755)  # PostgreSQL (another OS user when we are root) reads here
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_key, self.ca = self._ca("Odissey test CA", now)
        self.ca_file = self._write("ca.crt", self.ca)
        stranger_key, stranger = self._ca("Stranger CA", now)
        self.stranger_ca_file = self._write("stranger.crt", stranger)
        self.server = self._leaf("server", "localhost", ["localhost"], ["127.0.0.1"], now)
        self.wrong = self._leaf("wrong", "wrong.example", ["wrong.example"], [], now)
        self.expired = self._leaf("expired", "localhost", ["localhost"], ["127.0.0.1"], now,
                                  days=-1)
        self.client = self._leaf("client", "app", [], [], now, client=True)
        self.mallory = self._leaf("mallory", "mallory", [], [], now, client=True)
        self.pg_cert, self.pg_key = self.server  # PostgreSQL's own copies, owned by it
        if os.geteuid() == 0:
            info = pwd.getpwnam("postgres")
            self.pg_key = os.path.join(self.dir, "pg.key")
            shutil.copy(self.server[1], self.pg_key)
            os.chown(self.pg_key, info.pw_uid, info.pw_gid)
        atexit.register(shutil.rmtree, self.dir, True)

    @staticmethod
    def _name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def _ca(self, cn: str, now: datetime.datetime) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(self._name(cn)).issuer_name(self._name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def _leaf(self, stem: str, cn: str, dns: list[str], ips: list[str], now: datetime.datetime,
              days: int = 30, client: bool = False) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(self._name(cn)).issuer_name(self.ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(now + datetime.timedelta(days=days))
        )
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file = self._write(f"{stem}.crt", cert)
        key_file = os.path.join(self.dir, f"{stem}.key")
        with open(key_file, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        os.chmod(key_file, 0o600)
        return cert_file, key_file

    def _write(self, name: str, cert: x509.Certificate) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(path, 0o644)
        return path


_certs: Certs | None = None
_postgres: LocalPostgres | None = None


def certs() -> Certs:
    global _certs
    if _certs is None:
        _certs = Certs()
    return _certs


def ssl_postgres() -> LocalPostgres:
    """A PostgreSQL of this module's own with ssl=on (the shared one speaks no TLS)."""
    global _postgres
    if _postgres is None:
        c = certs()
        pg = LocalPostgres(
            port=free_port(), users={"app": APP_PASSWORD, "tls_lookup": "lookup-pw"},
            databases={"app": "app"},
            # The lookup user may only come over TLS: proof that auth_query uses it.
            hba=("hostnossl all tls_lookup 127.0.0.1/32 reject",),
            settings={"listen_addresses": "127.0.0.1", "ssl": "on",
                      "ssl_cert_file": f"'{c.pg_cert}'", "ssl_key_file": f"'{c.pg_key}'"},
        )
        try:
            pg.start()
        except Exception:
            pg.stop()
            raise
        atexit.register(pg.stop)
        pg.psql(
            "CREATE FUNCTION public.odissey_lookup(p_user text)"
            " RETURNS TABLE (usename name, passwd text, valuntil timestamptz)"
            " LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS"
            " $$ SELECT usename, passwd, valuntil FROM pg_catalog.pg_shadow WHERE usename = p_user $$;"
            "REVOKE ALL ON FUNCTION public.odissey_lookup(text) FROM PUBLIC;"
            "GRANT EXECUTE ON FUNCTION public.odissey_lookup(text) TO tls_lookup;", database="app")
        _postgres = pg
    return _postgres


# -- Odissey in front of it -----------------------------------------------------------------


def document(client_tls: dict | None = None, storage_tls: dict | None = None,
             auth: dict | None = None, storage_port: int | None = None,
             pool_mode: str = "session") -> dict:
    storage: dict[str, Any] = {"host": "127.0.0.1", "port": storage_port or ssl_postgres().port,
                               "connect_timeout": "5s", "retry_backoff": "250ms"}
    if storage_tls is not None:
        storage["tls"] = storage_tls
    doc: dict[str, Any] = {
        "listen": ["tcp:0:interface=127.0.0.1"],
        "storages": {"pg": storage},
        "routes": [{
            "database": "app", "user": "*", "storage": "pg",
            "auth": auth or {"method": "scram-sha-256", "password": APP_PASSWORD},
            "server": {"user": "app", "password": APP_PASSWORD},
            "pool": {"mode": pool_mode, "size": 4, "wait_timeout": "5s"},
        }],
    }
    if client_tls is not None:
        doc["tls"] = client_tls
    return doc


def serving(mode: str, **more: str) -> dict:
    c = certs()
    return {"mode": mode, "cert_file": c.server[0], "key_file": c.server[1], "ca_file": c.ca_file,
            **more}


def outcome(port: int, sslmode: str, client_cert: tuple[str, str] | None = None, **extra: str) -> str:
    """Connect with psycopg and run a query: "tls" or "plain", or "refused: <why>"."""
    parts = {"host": "127.0.0.1", "port": str(port), "user": "app", "dbname": "app",
             "password": APP_PASSWORD, "sslmode": sslmode, **extra}
    if sslmode.startswith("verify"):
        parts["sslrootcert"] = certs().ca_file
    if client_cert is not None:
        parts["sslcert"], parts["sslkey"] = client_cert
    big = parts.pop("big", None)
    try:
        with psycopg.connect(make_conninfo(**parts), autocommit=True, connect_timeout=10) as conn:
            conn.execute("select 1").fetchone()
            if big:  # a reply larger than the socket takes at once: writes queue behind TLS
                rows = conn.execute("select repeat('x', 3000000) from generate_series(1, 3)").fetchall()
                assert [len(r[0]) for r in rows] == [3000000] * 3, "reply damaged"
            return "tls" if conn.pgconn.ssl_in_use else "plain"
    except psycopg.OperationalError as exc:
        return f"refused: {exc}"


class _Base(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=8, name="tls-clients")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.services: list[OdisseyService] = []

    @inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        for service in self.services:
            yield service.stopService()

    def thread(self, f: Any, *args: Any, **kwargs: Any) -> Deferred:
        return deferToThreadPool(reactor, self.pool, f, *args, **kwargs)

    @inlineCallbacks
    def odissey(self, doc: dict):  # type: ignore[no-untyped-def]
        """Start an Odissey for ``doc``; its port."""
        service = OdisseyService(config.parse(doc), reactor)
        self.services.append(service)
        service.startService()
        ports = yield service.ready
        return ports[0].getHost().port


# -- client-facing --------------------------------------------------------------------------


class ClientSideTests(_Base):
    @inlineCallbacks
    def test_sslmode_against_each_mode(self):  # type: ignore[no-untyped-def]
        """Each tls.mode serves or refuses each libpq sslmode as documented: disable
        answers N, allow serves both, require and verify-full refuse plaintext (28000),
        verify-full wants a client certificate naming the user."""
        cert = certs().client
        expected = {
            "disable": {"disable": "plain", "require": "refused", "verify-full": "refused"},
            "allow": {"disable": "plain", "require": "tls", "verify-ca": "tls", "verify-full": "tls"},
            "require": {"disable": "refused", "require": "tls", "verify-full": "tls"},
            "verify-full": {"disable": "refused", "require": "tls", "verify-ca": "tls"},
        }
        seen = {}
        for mode, cases in expected.items():
            port = yield self.odissey(document(serving(mode) if mode != "disable" else None))
            for sslmode in cases:
                got = yield self.thread(outcome, port, sslmode, cert)
                seen[mode, sslmode] = got.split(":")[0]
                if mode == "require" and sslmode == "disable":
                    self.assertIn("no encryption: TLS is required", got)
                    self.assertIn('user "app", database "app" (tls.mode is require)', got)
                if mode == "disable" and sslmode == "require":
                    self.assertIn("server does not support SSL", got)
            if mode == "verify-full":
                got = yield self.thread(outcome, port, "require")  # no client certificate
                seen[mode, "require, no certificate"] = got.split(":")[0]
                got = yield self.thread(outcome, port, "require", certs().mallory)
                self.assertIn("certificate validation (tls.mode verify-full) failed", got)
                seen[mode, "require, CN mallory"] = got.split(":")[0]
        want = {(mode, s): o for mode, cases in expected.items() for s, o in cases.items()}
        want["verify-full", "require, no certificate"] = "refused"
        want["verify-full", "require, CN mallory"] = "refused"
        self.assertEqual(seen, want)

    @inlineCallbacks
    def test_direct_tls(self):  # type: ignore[no-untyped-def]
        """PostgreSQL 17's direct TLS (a ClientHello first, no SSLRequest) is served on the
        same port, large replies included; with TLS off the connection is closed."""
        port = yield self.odissey(document(serving("require")))
        got = yield self.thread(outcome, port, "verify-full", sslnegotiation="direct")
        self.assertEqual(got, "tls")
        # Both sides encrypted, transaction mode: a 9 MB reply crosses two TLS layers.
        port_tx = yield self.odissey(document(serving("require"), storage_tls={"mode": "require"},
                                              pool_mode="transaction"))
        got = yield self.thread(outcome, port_tx, "require", sslnegotiation="direct", big="1")
        self.assertEqual(got, "tls")
        port = yield self.odissey(document())
        got = yield self.thread(outcome, port, "require", sslnegotiation="direct")
        self.assertTrue(got.startswith("refused"), got)

    @inlineCallbacks
    def test_asyncpg(self):  # type: ignore[no-untyped-def]
        """asyncpg (its own protocol code, Python's ssl module): 'require' and a verifying
        context are served in transaction mode, prepared statements included; without TLS
        it is refused with 28000; a context trusting another CA fails its handshake."""
        import asyncio

        import asyncpg

        port = yield self.odissey(document(serving("require"), pool_mode="transaction"))

        async def run(ssl_arg: Any) -> Any:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password=APP_PASSWORD,
                                         database="app", ssl=ssl_arg, timeout=10)
            try:
                statement = await conn.prepare("select $1::int * 2")
                return [await statement.fetchval(i) for i in range(3)] + [await conn.fetchval("select 7")]
            finally:
                await conn.close()

        def attempt(ssl_arg: Any) -> Any:
            try:
                return asyncio.run(run(ssl_arg))
            except Exception as exc:  # what each refusal looks like to asyncpg
                return f"{type(exc).__name__}: {exc}"

        verifying = ssl.create_default_context(cafile=certs().ca_file)
        stranger = ssl.create_default_context(cafile=certs().stranger_ca_file)
        self.assertEqual((yield self.thread(attempt, "require")), [0, 2, 4, 7])
        self.assertEqual((yield self.thread(attempt, verifying)), [0, 2, 4, 7])
        plain = yield self.thread(attempt, False)
        self.assertIn("no encryption: TLS is required", plain)
        self.assertIn("InvalidAuthorizationSpecification", plain)  # 28000
        refused = yield self.thread(attempt, stranger)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", refused)

    @inlineCallbacks
    def test_transaction_mode_over_tls(self):  # type: ignore[no-untyped-def]
        """Transaction mode over TLS on both sides: each transaction attaches and detaches
        a server, and the producers coupled behind Twisted's TLS layer are uncoupled
        each time (they were not: the second transaction failed)."""
        port = yield self.odissey(document(serving("require"), storage_tls={"mode": "require"},
                                           pool_mode="transaction"))

        def run() -> list[int]:
            dsn = make_conninfo(host="127.0.0.1", port=str(port), user="app", dbname="app",
                                password=APP_PASSWORD, sslmode="require")
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                return [conn.execute("select %s::int", (i,)).fetchone()[0] for i in range(20)]

        self.assertEqual((yield self.thread(run)), list(range(20)))

    @inlineCallbacks
    def test_slow_tls_reader_pauses_server(self):  # type: ignore[no-untyped-def]
        """A TLS client that stops reading a 300 MB result makes Odissey stop reading
        the server: back-pressure works through Twisted's TLS layer on both sides."""
        port = yield self.odissey(document(serving("require"), storage_tls={"mode": "require"},
                                           auth={"method": "trust"}))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(raw.close)

        def start() -> ssl.SSLSocket:
            raw.sendall(m.ssl_request())
            assert raw.recv(1) == b"S"
            sock = ssl.create_default_context(cafile=certs().ca_file).wrap_socket(
                raw, server_hostname="localhost")
            sock.sendall(m.startup_message({"user": "app", "database": "app"}))
            data = b""
            while not data.endswith(m.ready_for_query(b"I")):
                data += sock.recv(65536)
            sock.sendall(m.query("select repeat('x', 1000) from generate_series(1, 300000)"))
            return sock

        sock = yield self.thread(start)
        self.addCleanup(sock.close)
        client = next(iter(self.services[-1].factory.clients))  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while not client.transport.producerPaused:
            self.assertLess(time.monotonic(), deadline, "the client's writes never backed up")
            yield deferLater(reactor, 0.02, lambda: None)
        yield deferLater(reactor, 0.5, lambda: None)  # let anything in flight land
        buffered = len(client.transport.dataBuffer) + client.transport._tempDataLen
        self.assertLess(buffered, 4 * 1024 * 1024)

    @inlineCallbacks
    def test_direct_tls_needs_alpn_postgresql(self):  # type: ignore[no-untyped-def]
        """Direct TLS offering another ALPN protocol fails the handshake; offering none,
        the connection is closed once the handshake is done (as PostgreSQL 17 does)."""
        port = yield self.odissey(document(serving("allow")))

        def handshake(alpn: list[str] | None) -> str:
            ctx = ssl.create_default_context(cafile=certs().ca_file)
            if alpn is not None:
                ctx.set_alpn_protocols(alpn)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                try:
                    tls_sock = ctx.wrap_socket(raw, server_hostname="localhost")
                except (ssl.SSLError, ConnectionError) as exc:
                    return f"handshake failed: {type(exc).__name__}"
                with tls_sock:
                    try:
                        tls_sock.sendall(m.startup_message({"user": "app", "database": "app"}))
                        data = tls_sock.recv(1024)
                    except (ssl.SSLError, ConnectionError):
                        return "closed"
                    return f"answered {data[:1]!r}" if data else "closed"

        self.assertTrue((yield self.thread(handshake, ["http/1.1"])).startswith("handshake failed"))
        self.assertEqual((yield self.thread(handshake, None)), "closed")
        self.assertEqual((yield self.thread(handshake, ["postgresql"])), "answered b'R'")

    @inlineCallbacks
    def test_bytes_after_sslrequest_refused(self):  # type: ignore[no-untyped-def]
        """A StartupMessage sent behind an SSLRequest, before the handshake, is never read
        as protocol nor handed to TLS: 08P01 in the clear and the connection closes."""
        port = yield self.odissey(document(serving("allow")))

        def inject() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(m.ssl_request() + m.startup_message({"user": "app", "database": "app"}))
                data = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                kind, body, _rest = read_message(sock, data)
                return kind, body

        kind, body = yield self.thread(inject)
        self.assertEqual(kind, b"E")
        fields = m.parse_error_fields(body)
        self.assertEqual((fields["C"], fields["M"]), ("08P01", "received unencrypted data after SSL request"))

    @inlineCallbacks
    def test_stalled_handshake_closed_at_login_timeout(self):  # type: ignore[no-untyped-def]
        """A client that asks for TLS and then never finishes the handshake is cut at
        limits.login_timeout (nothing can be said to it before the handshake)."""
        doc = document(serving("require"))
        doc["limits"] = {"login_timeout": "500ms"}
        port = yield self.odissey(doc)

        def stall() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(m.ssl_request())
                answer = sock.recv(1)
                started = time.monotonic()
                rest = sock.recv(1024)  # b"" (or a reset) when Odissey cuts it
                return answer + rest, time.monotonic() - started

        try:
            data, waited = yield self.thread(stall)
        except ConnectionResetError:
            data, waited = b"S", 0.0
        self.assertEqual(data, b"S")
        self.assertLess(waited, 5)

    @inlineCallbacks
    def test_cert_auth(self):  # type: ignore[no-untyped-def]
        """auth.method cert lets in a client whose verified certificate's CN is its user
        name, and refuses (28000) another CN or no certificate at all."""
        port = yield self.odissey(document(serving("require"), auth={"method": "cert"}))
        self.assertEqual((yield self.thread(outcome, port, "require", certs().client)), "tls")
        got = yield self.thread(outcome, port, "require", certs().mallory)
        self.assertIn('certificate authentication failed for user "app"', got)
        got = yield self.thread(outcome, port, "require")
        self.assertIn("connection requires a valid client certificate", got)

    @inlineCallbacks
    def test_route_requires_tls(self):  # type: ignore[no-untyped-def]
        """A route with auth.require_tls refuses a plaintext login before any password
        is asked, even where tls.mode allows plaintext."""
        auth = {"method": "scram-sha-256", "password": APP_PASSWORD, "require_tls": True}
        port = yield self.odissey(document(serving("allow"), auth=auth))
        self.assertEqual((yield self.thread(outcome, port, "require")), "tls")
        state, message = yield self.thread(login_outcome, port, user="app")
        self.assertEqual(state, "28000")
        self.assertIn("route app/* requires TLS", message)

    @inlineCallbacks
    def test_channel_binding_cannot_pass(self):  # type: ignore[no-untyped-def]
        """A client with channel_binding=require is refused by its own libpq: a pooler
        that terminates TLS cannot offer SCRAM-SHA-256-PLUS (the client's TLS channel
        is not the one PostgreSQL sees)."""
        port = yield self.odissey(document(serving("require")))
        got = yield self.thread(outcome, port, "require", channel_binding="require")
        self.assertIn("channel binding is required, but server did not offer an "
                      "authentication method that supports channel binding", got)
        self.assertEqual((yield self.thread(outcome, port, "require", channel_binding="prefer")), "tls")

    @inlineCallbacks
    def test_expired_certificate_refused_by_verifying_client(self):  # type: ignore[no-untyped-def]
        """An expired certificate still encrypts (sslmode=require) but fails verify-ca
        (libpq says only "certificate verify failed"; Odissey logs OpenSSL's alert)."""
        c = certs()
        tls_conf = {"mode": "allow", "cert_file": c.expired[0], "key_file": c.expired[1]}
        port = yield self.odissey(document(tls_conf))
        self.assertEqual((yield self.thread(outcome, port, "require")), "tls")
        got = yield self.thread(outcome, port, "verify-ca")
        self.assertIn("certificate verify failed", got)

    @inlineCallbacks
    def test_plaintext_cancel_of_tls_session(self):  # type: ignore[no-untyped-def]
        """A CancelRequest in plaintext (as libpq's PQcancel sends it) is served even
        though tls.mode is require, and the TLS session's long query, on a TLS server
        connection, is cancelled by Odissey's own plaintext CancelRequest. (Raw
        sockets: psycopg's PQcancel would hold the GIL, and so this in-process Odissey,
        while it waits for the close.)"""
        port = yield self.odissey(document(serving("require"), auth={"method": "trust"},
                                           storage_tls={"mode": "verify-full", "ca_file": certs().ca_file}))

        def session() -> list[str]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            raw.sendall(m.ssl_request())
            assert raw.recv(1) == b"S"
            ctx = ssl.create_default_context(cafile=certs().ca_file)
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(m.startup_message({"user": "app", "database": "app"}))
                key, data = None, b""
                while True:
                    kind, body, data = read_message(sock, data)  # type: ignore[arg-type]
                    if kind == b"K":
                        key = m.parse_backend_key_data(body)
                    if kind == b"Z":
                        break
                assert key is not None
                sock.sendall(m.query("select pg_sleep(20)"))
                time.sleep(0.3)
                send_cancel_request(port, key)  # plaintext, on a connection of its own
                states = []
                while True:
                    kind, body, data = read_message(sock, data)  # type: ignore[arg-type]
                    if kind == b"E":
                        states.append(m.parse_error_fields(body)["C"])
                    if kind == b"Z":
                        return states

        started = time.monotonic()
        self.assertEqual((yield self.thread(session)), ["57014"])
        self.assertLess(time.monotonic() - started, 10)


# -- server-facing --------------------------------------------------------------------------


class _FakeServer(Protocol):
    """Answers an SSLRequest with the bytes given, then records what comes next."""

    def __init__(self, answer: bytes, received: list[bytes]) -> None:
        self.answer = answer
        self.received = received

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if data == m.ssl_request():
            self.transport.write(self.answer)  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]


class ServerSideTests(_Base):
    @inlineCallbacks
    def fake_server(self, answer: bytes):  # type: ignore[no-untyped-def]
        received: list[bytes] = []
        factory = Factory.forProtocol(lambda: _FakeServer(answer, received))
        factory.noisy = False
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port, received

    def trust(self) -> dict:
        return {"method": "trust"}

    @inlineCallbacks
    def test_verify_full_and_pg_stat_ssl(self):  # type: ignore[no-untyped-def]
        """verify-full to PostgreSQL succeeds for its real name, and PostgreSQL sees the
        server connection encrypted (pg_stat_ssl)."""
        storage_tls = {"mode": "verify-full", "ca_file": certs().ca_file}
        port = yield self.odissey(document(storage_tls=storage_tls))

        def encrypted() -> tuple[Any, ...]:
            dsn = make_conninfo(host="127.0.0.1", port=str(port), user="app", dbname="app",
                                password=APP_PASSWORD, sslmode="disable")
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                return tuple(conn.execute(
                    "select ssl, version is not null from pg_stat_ssl where pid = pg_backend_pid()"
                ).fetchone())

        self.assertEqual((yield self.thread(encrypted)), (True, True))

    @inlineCallbacks
    def test_verify_full_wrong_name(self):  # type: ignore[no-untyped-def]
        """verify-full refuses a certificate that does not name server_name: the client
        gets 08006 saying so; verify-ca (the chain only) accepts the same server."""
        storage_tls = {"mode": "verify-full", "ca_file": certs().ca_file, "server_name": "wrong.example"}
        port = yield self.odissey(document(storage_tls=storage_tls, auth=self.trust()))
        state, message = yield self.thread(login_outcome, port, user="app")
        self.assertEqual(state, "08006")
        self.assertIn('server certificate does not match host name "wrong.example"', message)
        self.assertIn("localhost, 127.0.0.1", message)
        storage_tls["mode"] = "verify-ca"
        port = yield self.odissey(document(storage_tls=storage_tls, auth=self.trust()))
        self.assertEqual((yield self.thread(login_outcome, port, user="app")), ("ready", ""))

    @inlineCallbacks
    def test_auth_query_over_tls(self):  # type: ignore[no-untyped-def]
        """auth_query's lookup connections use the storage's TLS like the pools' logins
        (PostgreSQL refuses the lookup user without TLS here), and the SCRAM pass-through
        login that follows is encrypted too."""
        def doc(mode: str) -> dict:
            d = document(storage_tls={"mode": mode}, auth={
                "method": "scram-sha-256", "query_user": "tls_lookup", "query_password": "lookup-pw",
                "query": "SELECT usename, passwd, valuntil FROM public.odissey_lookup($1)"})
            del d["routes"][0]["server"]  # no password of Odissey's: SCRAM pass-through
            return d

        def encrypted(port: int) -> Any:
            dsn = make_conninfo(host="127.0.0.1", port=str(port), user="app", dbname="app",
                                password=APP_PASSWORD, sslmode="disable")
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                    return conn.execute(
                        "select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0]
            except psycopg.OperationalError as exc:
                return str(exc)

        port = yield self.odissey(doc("require"))
        self.assertIs((yield self.thread(encrypted, port)), True)
        port = yield self.odissey(doc("disable"))
        self.assertIn("could not look up the password", (yield self.thread(encrypted, port)))

    @inlineCallbacks
    def test_verify_ca_unknown_issuer(self):  # type: ignore[no-untyped-def]
        """verify-ca against a CA that did not sign the server's certificate: 08006 with
        OpenSSL's reason."""
        storage_tls = {"mode": "verify-ca", "ca_file": certs().stranger_ca_file}
        port = yield self.odissey(document(storage_tls=storage_tls, auth=self.trust()))
        state, message = yield self.thread(login_outcome, port, user="app")
        self.assertEqual(state, "08006")
        self.assertIn("TLS handshake failed: unable to get local issuer certificate", message)

    @inlineCallbacks
    def test_bytes_after_s_refused(self):  # type: ignore[no-untyped-def]
        """A server answering S with more bytes behind it is dropped before any TLS or
        startup (CVE-2021-23222): 08006, and the fake saw only the SSLRequest."""
        fake, received = yield self.fake_server(b"S" + m.authentication_ok())
        doc = document(storage_tls={"mode": "require"}, auth=self.trust(), storage_port=fake)
        port = yield self.odissey(doc)
        state, message = yield self.thread(login_outcome, port, user="app")
        self.assertEqual(state, "08006")
        self.assertIn("received unencrypted data after SSL response", message)
        self.assertEqual(received, [m.ssl_request()])

    @inlineCallbacks
    def test_n_answer(self):  # type: ignore[no-untyped-def]
        """N fails require with a clear reason; prefer goes on in plaintext."""
        fake, received = yield self.fake_server(b"N")
        port = yield self.odissey(document(storage_tls={"mode": "require"}, auth=self.trust(),
                                           storage_port=fake))
        state, message = yield self.thread(login_outcome, port, user="app")
        self.assertEqual(state, "08006")
        self.assertIn("server does not support SSL, but tls.mode require requires it", message)
        self.assertEqual(received, [m.ssl_request()])
        del received[:]
        port = yield self.odissey(document(storage_tls={"mode": "prefer"}, auth=self.trust(),
                                           storage_port=fake))
        state, _message = yield self.thread(login_outcome, port, user="app")
        self.assertEqual(state, "08006")  # the fake closes at the StartupMessage
        self.assertEqual(received[0], m.ssl_request())
        self.assertEqual(b"".join(received[1:]), m.startup_message({"user": "app", "database": "app"}))


class NegotiationTests(SynchronousTestCase):
    """The server connection's reading of the answer to its SSLRequest, byte by byte
    (no network: a StringTransport)."""

    def answer(self, mode: str, data: bytes) -> tuple[ServerConnection, list[Any]]:
        from odissey.config import ServerTLS
        from odissey.testing import STORAGE, in_this_thread

        side = tls.ServerSide(ServerTLS(mode=mode), STORAGE)
        server = ServerConnection(LoginInfo(STORAGE, "app", "app", None), Clock(), in_this_thread,
                                  tls=side)
        failures: list[Any] = []
        server.ready.addErrback(failures.append)
        transport = StringTransport()
        server.makeConnection(transport)
        self.assertEqual(transport.value(), m.ssl_request())  # nothing else before the answer
        transport.clear()
        server.dataReceived(data)
        self.sent = transport.value()
        return server, failures

    def test_refusals(self) -> None:
        """Anything but a lone S (or N for prefer) fails the login with 08006 and why,
        and nothing (no StartupMessage) is sent."""
        for mode, data, why in [
            ("require", b"S\0\0", "received unencrypted data after SSL response"),
            ("prefer", b"Nx", "received unencrypted data after SSL response"),
            ("require", b"N", "server does not support SSL, but tls.mode require requires it"),
            ("require", b"E\0\0\0\x08abc\0", "received invalid response to SSL negotiation: 'E'"),
        ]:
            _server, failures = self.answer(mode, data)
            self.assertEqual(len(failures), 1, (mode, data))
            error = failures[0].value
            self.assertEqual(error.sqlstate, "08006")
            self.assertEqual(error.message, f'could not connect to server "pg": {why}')
            self.assertEqual(self.sent, b"")

    def test_prefer_goes_on_in_plaintext(self) -> None:
        """prefer: N is followed by the StartupMessage in plaintext."""
        server, failures = self.answer("prefer", b"N")
        self.assertEqual(failures, [])
        self.assertEqual(self.sent, m.startup_message({"user": "app", "database": "app"}))
        self.assertFalse(server.encrypted)


# -- configuration --------------------------------------------------------------------------


class ConfigTests(SynchronousTestCase):
    def problems(self, doc: dict) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            tls.load(config.parse(doc))
        return caught.exception.problems

    def base(self) -> dict:
        return {"listen": ["tcp:6432"], "storages": {"pg": {"host": "127.0.0.1"}},
                "routes": [{"database": "db", "user": "u", "storage": "pg", "auth": {"method": "trust"}}]}

    def test_modes_need_their_files(self) -> None:
        """A TLS mode without the files it needs is refused, naming the keys."""
        doc = self.base()
        doc["tls"] = {"mode": "verify-ca"}
        doc["storages"]["pg"]["tls"] = {"mode": "verify-full"}
        self.assertEqual(self.problems(doc), [
            "tls.cert_file: is required for mode verify-ca",
            "tls.key_file: is required for mode verify-ca",
            "tls.ca_file: is required for mode verify-ca (client certificates are checked against it)",
            'storages.pg.tls.ca_file: is required for mode verify-full (a CA file, or "system")',
        ])

    def test_auth_needs_client_tls(self) -> None:
        """cert authentication and require_tls need client TLS; cert takes no password."""
        doc = self.base()
        doc["routes"][0]["auth"] = {"method": "cert", "password": "x", "require_tls": True}
        self.assertEqual(self.problems(doc), [
            "routes[0].auth.password: method cert takes no password (the client certificate is the proof)",
            "routes[0].auth.method: method cert needs client TLS with a CA: set tls.mode and tls.ca_file",
            "routes[0].auth.require_tls: needs client TLS: tls.mode is disable",
        ])

    def test_unreadable_and_mismatched_files(self) -> None:
        """A missing file is a config problem; a key that does not match its certificate
        is caught when the contexts are built (at start and by --check)."""
        c = certs()
        doc = self.base()
        doc["tls"] = {"mode": "require", "cert_file": "/nonexistent.crt", "key_file": c.server[1]}
        self.assertEqual(self.problems(doc),
                         ["tls.cert_file: cannot read '/nonexistent.crt': No such file or directory"])
        doc["tls"] = {"mode": "require", "cert_file": c.server[0], "key_file": c.client[1]}
        problems = self.problems(doc)
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("tls.key_file: "), problems)

    def test_unix_storage_cannot_require_tls(self) -> None:
        """TLS over a unix socket does not exist: require on one is refused."""
        doc = self.base()
        doc["storages"]["pg"] = {"host": "/run/postgresql", "tls": {"mode": "require"}}
        self.assertIn("storages.pg.tls: mode require needs TCP", self.problems(doc)[0])
