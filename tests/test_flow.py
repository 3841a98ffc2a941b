"""Bounded buffers and no leaks: slow readers pause the server; vanishing clients free everything."""

from __future__ import annotations

import random
import socket
import time

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet import tcp
from twisted.trial.unittest import SynchronousTestCase

from odissey.flow import send

from odissey.pool import PoolKey
from odissey.wire import messages as m
from tests.harness import IntegrationTest, route, run_seed, server_pids, trust_login, until, vanish


class BackPressureTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [route(), route("app", "u_trust", auth={"method": "trust"}, pool={"size": 2})]

    @inlineCallbacks
    def test_slow_reader_pauses_server(self):
        """A client that stops reading a 300 MB result makes Odissey stop reading the server."""
        sock = yield self.thread(trust_login, self.odissey.port)
        try:
            sock.sendall(m.query("select repeat('x', 1000) from generate_series(1, 300000)"))
            client = next(c for c in self.odissey.service.factory.clients if c.user == "u_trust")
            yield until(lambda: client.transport.producerPaused, 10, "the client's writes back up")
            pool = self.odissey.service.pools.pools[PoolKey("app", "u_trust")]
            self.assertEqual(len(pool.active), 1)
            buffered = len(client.transport.dataBuffer) + client.transport._tempDataLen
            self.assertLess(buffered, 4 * 1024 * 1024)
        finally:
            sock.close()
        yield until(lambda: len(pool.idle) == 1, 10, "the server is cancelled, drained and pooled")
        self.assertEqual(len(pool.active), 0)

    @inlineCallbacks
    def test_terminate_split_across_chunks(self):
        """A Terminate whose header arrives in two pieces: the half-sent header means the
        server's stream is in doubt, so that server is closed rather than reused."""
        def split_goodbye() -> None:
            sock = trust_login(self.odissey.port)
            sock.sendall(m.query("begin"))
            data = b""
            while not data.endswith(m.ready_for_query(b"T")):
                data += sock.recv(65536)
            sock.sendall(b"X\0\0")
            time.sleep(0.2)
            sock.sendall(b"\0\4")
            sock.close()

        yield self.thread(split_goodbye)
        pool = self.odissey.service.pools.pools[PoolKey("app", "u_trust")]
        yield until(lambda: (len(pool.active), len(pool.idle)) == (0, 0), 5, "the server is closed")

    @inlineCallbacks
    def test_nodelay_both_sides(self):
        """TCP_NODELAY is set on client and server sockets."""
        conn = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(lambda: conn.execute("select 1").close())
            client = next(iter(self.odissey.service.factory.clients))
            server = client.relay.server
            for transport in (client.transport, server.transport):
                flag = transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                self.assertTrue(flag)
        finally:
            yield self.thread(conn.close)


class NoLeakTests(IntegrationTest):
    """Clients leaving at random moments never leak a server connection or a pool slot."""

    def routes(self) -> list[dict]:
        return [route(pool={"size": 3, "wait_timeout": "20s"})]

    def chaotic_client(self, run: int, seed: int) -> str:
        rnd = random.Random(f"{run}-{seed}")
        try:
            conn = self.odissey.connect()
        except psycopg.OperationalError as exc:
            return f"refused {exc.sqlstate}"
        step = rnd.choice(["idle", "begin", "insert", "sleep", "copy", "polite"])
        if step in ("begin", "insert"):
            conn.execute("begin")
        if step == "insert":
            conn.execute("insert into items values (%s, 'chaos')", (100000 + seed,))
        if step == "sleep":
            conn.pgconn.send_query(b"select pg_sleep(20)")
        if step == "copy":
            copying = conn.cursor().copy("copy items from stdin")
            copying.__enter__().write_row((200000 + seed, "chaos"))
        time.sleep(rnd.random() * 0.3)
        if step == "polite":
            conn.close()
        else:
            vanish(conn)
        return step

    @inlineCallbacks
    def test_random_vanishing_clients(self):
        """Forty clients vanish mid-whatever; afterwards every server is idle and reusable."""
        run = run_seed(self)
        yield gatherResults([self.thread(self.chaotic_client, run, seed) for seed in range(40)])
        pool = self.odissey.service.pools.pools[PoolKey("app", "app")]
        yield until(lambda: not pool.active and not pool.waiters, 10, "every server is back")
        self.assertLessEqual(pool.total, 3)
        backends = yield self.thread(server_pids)
        self.assertEqual(backends, {s.key[0] for s in pool.idle})

        def count_chaos() -> int:
            with self.odissey.connect() as conn:
                return conn.execute("select count(*) from items where note = 'chaos'").fetchone()[0]

        self.assertEqual((yield self.thread(count_chaos)), 0)


class SendFastPathTests(SynchronousTestCase):
    """flow.send reads private attributes of Twisted's TCP transport; if Twisted renames
    or drops one, these tests fail instead of the fast path silently going wrong."""

    def connection(self) -> tuple[tcp.Connection, socket.socket]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        conn = tcp.Connection(ours, Protocol(), reactor)
        conn.connected = 1  # what tcp.Server and tcp.Client set once established
        self.addCleanup(conn.stopWriting)
        self.addCleanup(conn.stopReading)
        return conn, theirs

    def test_private_attributes_exist(self) -> None:
        """The attributes flow.send reads are on a plain connection, with the values it expects."""
        conn, _theirs = self.connection()
        self.assertEqual(conn._tempDataLen, 0)
        self.assertEqual(conn.dataBuffer, b"")
        self.assertFalse(conn.TLS)
        self.assertFalse(conn.disconnecting)
        self.assertTrue(conn.connected)
        self.assertEqual(conn.socket.send(b""), 0)  # flow.send calls the socket's own send

    def test_whole_write_goes_straight_to_the_socket(self) -> None:
        """With nothing queued, the bytes reach the peer at once and nothing is buffered."""
        conn, theirs = self.connection()
        self.assertTrue(send(conn, b"hello"))
        self.assertEqual(theirs.recv(16), b"hello")
        self.assertEqual(conn._tempDataLen, 0)

    def test_queued_bytes_keep_their_order(self) -> None:
        """Once something is queued in Twisted, later bytes are queued behind it."""
        conn, _theirs = self.connection()
        conn.write(b"first")  # queued by Twisted until the next reactor turn
        self.assertFalse(send(conn, b"second"))
        self.assertEqual(b"".join(conn._tempDataBuffer), b"firstsecond")
