"""The hardening of issue 6 through real clients against the real PostgreSQL: cancels
that hit nothing when nothing runs, coalesced cancels that never hit the next client,
libpq's cancel ordering, a query pipelined behind the password, bounded login buffers,
a login flood, and a failed Parse or a lone CopyData that no longer hold a server."""

from __future__ import annotations

import gc
import selectors
import socket
import struct
import threading
import time
import weakref
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

import odissey.server
from odissey.flow import PENDING_LIMIT
from odissey.wire import messages as m
from tests.harness import (
    APP_PASSWORD, IntegrationTest, Replies, direct, route, send_cancel_request, trust_login_keyed, until,
)

#: What Twisted's TCP transport reads from a socket at once.
ONE_READ = 65536
AUTH_OK = m.authentication_ok()


def trust_route(**pool: Any) -> dict[str, Any]:
    return route("app", "u_trust", auth={"method": "trust"}, pool=pool)


def parse(sql: str) -> bytes:
    """Parse of an unnamed statement with no parameter types."""
    return m.message(b"P", m.cstring("") + m.cstring(sql) + b"\0\0")


def copy_data(data: bytes) -> bytes:
    return m.message(b"d", data)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read from a raw socket until ``marker`` has come."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by Odissey after {data!r}")
        data += chunk
    return data


def message_types(data: bytes) -> list[str]:
    """The type of each whole backend message in ``data``, in order."""
    types = []
    while len(data) >= 5:
        types.append(chr(data[0]))
        data = data[1 + int.from_bytes(data[1:5], "big"):]
    return types


def wait_active(sql: str, timeout: float = 5.0) -> None:
    """Block until PostgreSQL runs ``sql`` in some backend (seen in pg_stat_activity)."""
    deadline = time.monotonic() + timeout
    with direct() as su:
        while True:
            row = su.execute(
                "select count(*) from pg_stat_activity where state = 'active' and query = %s", (sql,)
            ).fetchone()
            if row and row[0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{sql!r} did not start within {timeout}s")
            time.sleep(0.005)


class IdleCancelTests(IntegrationTest):
    """A cancel that arrives while its client has nothing running hits nothing, not even
    the client's next query (psycopg inside a transaction, the server held meanwhile)."""

    def routes(self) -> list[dict[str, Any]]:
        return [
            route(pool={"mode": "session", "size": 1}),
            trust_route(mode="transaction", size=1),
        ]

    def rounds(self, user: str, password: str | None) -> list[str]:
        """Five rounds of select 1, cancel, select pg_sleep(0.3); what went wrong in each."""
        failures = []
        with self.odissey.connect(user=user, password=password, autocommit=False) as conn:
            for i in range(5):
                try:
                    conn.execute("select 1")
                    conn.cancel_safe(timeout=5)
                    conn.execute("select pg_sleep(0.3)")
                except psycopg.Error as exc:
                    failures.append(f"round {i}: {exc.sqlstate} {exc}")
                conn.rollback()
        return failures

    @inlineCallbacks
    def test_idle_cancel_hits_nothing_in_session_mode(self):
        """Session mode: a cancel between queries of a transaction never cancels the next one."""
        self.assertEqual((yield self.thread(self.rounds, "app", APP_PASSWORD)), [])

    @inlineCallbacks
    def test_idle_cancel_hits_nothing_in_transaction_mode(self):
        """Transaction mode, pool of one: a cancel between queries never cancels the next one."""
        self.assertEqual((yield self.thread(self.rounds, "u_trust", None)), [])


class CoalescedCancelTests(IntegrationTest):
    """A client's concurrent cancels open few PostgreSQL cancel connections and all land
    before its server serves another client."""

    def routes(self) -> list[dict[str, Any]]:
        return [trust_route(mode="transaction", size=1, wait_timeout="10s")]

    @inlineCallbacks
    def test_concurrent_cancels_coalesced_and_never_hit_the_next_client(self):
        """Ten cancels at once for A's pg_sleep(0.2): B's next query is never cancelled,
        and Odissey never has more than one cancel connection of A's open at a time."""
        opened: list[int] = []
        in_flight = [0, 0]  # now, most ever
        real = odissey.server.send_cancel

        def counting(*args: Any, **kwargs: Any) -> Any:
            opened.append(1)
            in_flight[0] += 1
            in_flight[1] = max(in_flight)

            def landed(result: Any) -> Any:
                in_flight[0] -= 1
                return result

            return real(*args, **kwargs).addBoth(landed)

        self.patch(odissey.server, "send_cancel", counting)
        port = self.odissey.port
        a, key = yield self.thread(trust_login_keyed, port)
        b, _ = yield self.thread(trust_login_keyed, port)
        ra, rb = Replies(a), Replies(b)

        def one_round(n: int) -> tuple[list[str], list[str]]:
            """A's query, ten cancels, B's query as soon as A has its answer."""
            a_errors, b_errors = len(ra.errors), len(rb.errors)
            a.sendall(m.query("select pg_sleep(0.2)"))
            cancels = [threading.Thread(target=send_cancel_request, args=(port, key)) for _ in range(10)]
            for t in cancels:
                t.start()
            ra.until(n)
            b.sendall(m.query("select pg_sleep(0.05)"))
            rb.until(n)
            for t in cancels:
                t.join(10)
            return ra.errors[a_errors:], rb.errors[b_errors:]

        per_round = []
        cancelled = 0
        try:
            for n in range(1, 13):
                before = len(opened)
                a_errors, b_errors = yield self.thread(one_round, n)
                per_round.append(len(opened) - before)
                self.assertEqual(b_errors, [], f"round {n}: B got {b_errors}")
                self.assertIn(a_errors, ([], ["57014"]), f"round {n}")
                cancelled += len(a_errors)
        finally:
            a.close()
            b.close()
        self.assertGreater(cancelled, 0)  # the cancels did reach A's queries
        # Coalesced: never two at once (a new one only after the last landed, while A's
        # query is still running); 1 to 5 a round were seen, 4 to 10 at once before.
        self.assertEqual(in_flight[1], 1, per_round)
        self.assertLess(max(per_round), 10, per_round)


class CancelOrderTests(IntegrationTest):
    """libpq's ordering end to end: once a cancel call returns, the client's next query
    is never hit by it."""

    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "session", "size": 1})]

    @inlineCallbacks
    def test_query_after_cancel_not_cancelled(self):
        """Session mode: pg_sleep(5) is cancelled (57014) and the very next select 1 succeeds, 5 times."""
        conn = yield self.thread(self.odissey.connect)
        try:
            for i in range(5):
                running = self.thread(sleep_then_select_1, conn)
                yield self.thread(wait_active, "select pg_sleep(5)")
                yield self.thread(conn.cancel_safe, timeout=5)
                self.assertEqual((yield running), ("57014", ""), f"round {i}")
        finally:
            yield self.thread(conn.close)


def sleep_then_select_1(conn: psycopg.Connection) -> tuple[str, str]:
    """Run pg_sleep(5), then at once select 1: the SQLSTATE of each ("" for success)."""
    outcomes = []
    for sql in ("select pg_sleep(5)", "select 1"):
        try:
            conn.execute(sql)
            outcomes.append("")
        except psycopg.Error as exc:
            outcomes.append(exc.sqlstate or str(exc))
    return outcomes[0], outcomes[1]


class PipelinedPasswordTests(IntegrationTest):
    """A query sent in the same packet as the last password message is answered after login."""

    def routes(self) -> list[dict[str, Any]]:
        return [route("app", "u_clear", auth={"method": "cleartext", "password": "clear-pw"})]

    def login_and_query(self) -> tuple[bytes, Replies]:
        with socket.create_connection(("127.0.0.1", self.odissey.port), timeout=10) as sock:
            sock.sendall(m.startup_message({"user": "u_clear", "database": "app"}))
            asked = read_until(sock, m.authentication_cleartext())
            assert asked == m.authentication_cleartext(), asked
            sock.sendall(m.password_message(b"clear-pw\0") + m.query("select 42"))
            replies = Replies(sock)
            data = replies.until(2)
            sock.sendall(m.terminate())
        return data, replies

    @inlineCallbacks
    def test_query_behind_password_answered(self):
        """PasswordMessage + Query('select 42') in one write: AuthenticationOk ... ReadyForQuery, then 42."""
        data, replies = yield self.thread(self.login_and_query)
        self.assertTrue(data.startswith(AUTH_OK), data[:40])
        self.assertEqual(replies.errors, [])
        self.assertEqual(replies.rows, ["42"])
        types = message_types(data)
        self.assertEqual(types[types.index("Z"):], ["Z", "T", "D", "C", "Z"], types)


class _Silent(Protocol):
    """A storage that accepts the connection and never says a word."""


class LoginBufferTests(IntegrationTest):
    """What a client sends while its login waits for the server's parameters is bounded,
    and a departed client is released."""

    def routes(self) -> list[dict[str, Any]]:
        return [trust_route()]

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        silent = Factory.forProtocol(_Silent)
        self.silent = reactor.listenTCP(0, silent, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(self.silent.stopListening)
        self.storage_port = self.silent.getHost().port  # type: ignore[attr-defined]
        return super().setUp()

    @inlineCallbacks
    def logged_in_waiting(self):
        """A raw u_trust client that got AuthenticationOk and waits for the server's
        parameters, which never come; and its ClientConnection."""
        factory = self.odissey.service.factory
        sock = yield self.thread(socket.create_connection, ("127.0.0.1", self.odissey.port), 10)
        sock.sendall(m.startup_message({"user": "u_trust", "database": "app"}))
        got = yield self.thread(read_until, sock, AUTH_OK)
        self.assertEqual(got, AUTH_OK)
        yield until(lambda: len(factory.clients) == 1, 2, "Odissey knows the client")
        client = next(iter(factory.clients))
        self.assertEqual(client.state.value, "params")
        return sock, client

    @inlineCallbacks
    def test_login_buffer_bounded(self):
        """4 MB of queries while the login waits for parameters: Odissey pauses reading
        once it holds 256 kB, and never holds more than that plus one read."""
        sock, client = yield self.logged_in_waiting()
        try:
            payload = m.query("select '" + "x" * 1000 + "'") * 4096  # about 4 MB
            stop = threading.Event()

            def send() -> int:
                """Send until all is sent, or stop is set and the socket takes no more."""
                sock.setblocking(False)
                sent = 0
                view = memoryview(payload)
                while sent < len(payload):
                    try:
                        sent += sock.send(view[sent:sent + 65536])
                    except BlockingIOError:
                        if stop.is_set():
                            break
                        time.sleep(0.005)
                return sent

            sending = self.thread(send)
            largest = 0

            def paused() -> bool:
                nonlocal largest
                largest = max(largest, len(client._buffer))
                return bool(client._paused)

            yield until(paused, 5, "Odissey paused the client")
            watched_until = reactor.seconds() + 0.5
            yield until(lambda: paused() and reactor.seconds() > watched_until, 2, "still paused")
            stop.set()
            sent = yield sending
            paused()
            self.assertGreater(sent, PENDING_LIMIT)
            self.assertLessEqual(largest, PENDING_LIMIT + ONE_READ)
            self.assertEqual(client.state.value, "params")
        finally:
            sock.close()

    @inlineCallbacks
    def test_departed_login_released(self):
        """A client that leaves while its login waits for parameters is garbage at once, not
        at login_timeout (15 s); the wait allows a loaded machine 5 s to notice the close."""
        factory = self.odissey.service.factory
        sock, client = yield self.logged_in_waiting()
        ref = weakref.ref(client)
        del client
        sock.sendall(m.query("select 1"))  # kept for after login, which never comes
        sock.close()

        def dead() -> bool:
            gc.collect()
            return ref() is None

        yield until(dead, 5, "the departed client connection is collected", interval=0.05)
        self.assertEqual(factory.clients, set())

    @inlineCallbacks
    def test_paused_login_released_when_client_leaves(self):
        """A client paused past 256 kB during login, then gone, is noticed and collected
        within seconds (the janitor polls twice a second), not at login_timeout, 15 s
        (reading is paused: only the janitor's poll sees the close)."""
        factory = self.odissey.service.factory
        sock, client = yield self.logged_in_waiting()
        sock.setblocking(False)
        payload = m.query("select '" + "x" * 1000 + "'") * 1024  # 1 MB: past the bound
        try:
            sock.send(payload)
        except BlockingIOError:
            pass
        yield until(lambda c=client: c._paused, 5, "Odissey paused the client")
        ref = weakref.ref(client)
        del client
        # The client vanishes with a reset. A graceful close would queue its FIN behind
        # the bytes still in its send buffer, which the paused Odissey does not read:
        # then nothing shows the departure until login_timeout, whether the FIN got
        # through depending only on how the kernel sized the buffers (this test failed
        # about one run in two that way).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

        def dead() -> bool:
            gc.collect()
            return ref() is None

        # (6 s, well under login_timeout: two helpers' loaded machines missed 2 s)
        yield until(dead, 6, "the departed, paused client connection is collected", interval=0.05)
        self.assertEqual(factory.clients, set())


class LoginFloodTests(IntegrationTest):
    """Connections that connect and stall cannot keep real clients from logging in."""

    limits = {"max_login_clients": 20}
    FLOOD = 150

    def flood(self, started: threading.Event, stop: threading.Event, deadline: float) -> int:
        """Hold FLOOD silent connections, reopening each one Odissey closes, until stop or
        the deadline; how many Odissey closed."""
        port = self.odissey.port
        selector = selectors.DefaultSelector()

        def open_one() -> None:
            """Connect without waiting: a SYN past the listen backlog waits for its retry."""
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_READ)

        closed = 0
        try:
            for _ in range(self.FLOOD):
                open_one()
            started.set()
            while not stop.is_set() and time.monotonic() < deadline:
                for selected, _ in selector.select(0.05):
                    sock = selected.fileobj
                    try:
                        data = sock.recv(65536)  # type: ignore[union-attr]
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(sock)
                        sock.close()  # type: ignore[union-attr]
                        closed += 1
                        open_one()
        finally:
            started.set()
            for selected in list(selector.get_map().values()):
                selected.fileobj.close()  # type: ignore[union-attr]
            selector.close()
        return closed

    def login(self) -> str:
        try:
            with self.odissey.connect() as conn:
                row = conn.execute("select 1").fetchone()
                return str(row[0]) if row else "no row"
        except psycopg.Error as exc:
            return f"{exc.sqlstate} {exc}"

    @inlineCallbacks
    def test_logins_succeed_during_flood(self):
        """150 stalled connections (reopened when dropped) and max_login_clients 20: 20
        psycopg SCRAM logins all succeed, and the flood only pushes out its own."""
        factory = self.odissey.service.factory
        started, stop = threading.Event(), threading.Event()
        flooding = self.thread(self.flood, started, stop, time.monotonic() + 10)
        try:
            self.assertTrue((yield self.thread(started.wait, 10)), "the flood could not connect")
            limit = self.limits["max_login_clients"]
            yield until(lambda: len(factory.logging_in) > limit, 5, "the flood fills the login budget")
            yield deferLater(reactor, 0.6, lambda: None)  # the flood has stalled past the grace
            t0 = time.monotonic()
            results = yield gatherResults([self.thread(self.login) for _ in range(20)])
            took = time.monotonic() - t0
            yield deferLater(reactor, max(0.0, 2.4 - took), lambda: None)  # ~3 s of flood in all
        finally:
            stop.set()
            closed = yield flooding
        self.assertEqual(results, ["1"] * 20)
        self.assertLess(took, 10)
        self.assertGreater(closed, 0)  # Odissey did drop stalled connections to make room
        yield until(lambda: not factory.clients, 5, "every connection gone")
        self.assertEqual(factory.logged_in, 0)


class HeldServerTests(IntegrationTest):
    """Messages that leave no work behind free the only server for the next client."""

    def routes(self) -> list[dict[str, Any]]:
        return [trust_route(mode="transaction", size=1, wait_timeout="5s")]

    def served_in(self) -> float:
        """How long a new psycopg client takes to log in and run a query."""
        t0 = time.monotonic()
        with self.odissey.connect(user="u_trust", password=None) as conn:
            conn.execute("select 2").fetchone()
        return time.monotonic() - t0

    @inlineCallbacks
    def check_other_served(self, ra: Replies) -> Any:
        self.assertLess((yield self.thread(self.served_in)), 2)
        ra.sock.sendall(m.query("select 7"))  # A is still connected and served
        ready = ra.ready
        yield self.thread(ra.until, ready + 1)
        self.assertEqual(ra.rows[-1], "7")

    @inlineCallbacks
    def test_request_inside_copy_data_refused(self):
        """A bad CopyData row and a BEGIN in one write: whether PostgreSQL runs the BEGIN
        depends on the row, so Odissey refuses it (08P01) and closes that server; the
        next client gets a server outside any transaction."""
        a, _ = yield self.thread(trust_login_keyed, self.odissey.port)
        ra = Replies(a)
        try:
            a.sendall(m.query("copy items (id, note) from stdin"))
            yield self.thread(read_until, a, m.message(b"G", b"\0\0\2\0\0\0\0"))
            a.sendall(m.message(b"d", b"not-a-number\tx\n") + m.query("begin"))
            with self.assertRaises(ConnectionError):
                yield self.thread(ra.until, 1)
            self.assertEqual(ra.errors, ["08P01"])
        finally:
            a.close()

        def status() -> str:
            with self.odissey.connect(user="u_trust", password=None) as conn:
                return str(conn.info.transaction_status.name)

        self.assertEqual((yield self.thread(status)), "IDLE")

    @inlineCallbacks
    def test_failed_parse_then_query_before_sync(self):
        """Parse fails, the Query before Sync is discarded: A's server serves B within 2 s."""
        a, _ = yield self.thread(trust_login_keyed, self.odissey.port)
        ra = Replies(a)
        try:
            a.sendall(parse("select * from nosuchtable") + m.query("select 1") + m.sync())
            yield self.thread(ra.until, 1)
            self.assertEqual(ra.errors, ["42P01"])
            self.assertEqual(ra.rows, [])
            yield self.check_other_served(ra)
        finally:
            a.close()

    @inlineCallbacks
    def test_lone_copy_data_while_idle(self):
        """A CopyData outside any COPY holds no server: B is served within 2 s."""
        a, _ = yield self.thread(trust_login_keyed, self.odissey.port)
        ra = Replies(a)
        try:
            a.sendall(copy_data(b"stray\n"))
            yield self.check_other_served(ra)
            self.assertEqual(ra.errors, [])
        finally:
            a.close()


class PausedWaiterTests(IntegrationTest):
    """A client whose reading is paused while it waits for a server is still seen leaving."""

    def routes(self) -> list[dict[str, Any]]:
        return [trust_route(mode="transaction", size=1, wait_timeout="30s")]

    @inlineCallbacks
    def test_paused_waiting_client_released_when_it_leaves(self):
        """A client paused while it waits for the busy server, then gone, is noticed
        within seconds, not at wait_timeout (30 s here)."""
        a, _ = yield self.thread(trust_login_keyed, self.odissey.port)
        ra = Replies(a)
        factory = self.odissey.service.factory
        try:
            a.sendall(m.query("begin"))  # A holds the only server
            yield self.thread(ra.until, 1)
            b, _ = yield self.thread(trust_login_keyed, self.odissey.port)
            b.setblocking(False)
            try:
                # Past the 256 kB a waiting client may buffer, yet all of it within the
                # kernel's buffers: a close stuck behind unsent data never reaches us.
                b.send(m.query("select '" + "x" * 1000 + "'") * 320)
            except BlockingIOError:
                pass
            yield until(lambda: any(c.paused for c in factory.clients), 5, "Odissey paused B")
            b.close()
            yield until(lambda: len(factory.clients) == 1, 5, "B's connection is gone")
        finally:
            a.close()


class ResetAfterTransactionTests(IntegrationTest):
    """reset_after_transaction also runs for a client that leaves while attached."""

    def routes(self) -> list[dict[str, Any]]:
        return [trust_route(mode="transaction", size=1, wait_timeout="10s",
                            reset_after_transaction=True)]

    @inlineCallbacks
    def test_reset_when_client_leaves_mid_query(self):
        """A client that SETs work_mem and leaves during its next query: the next client
        finds the default, because the server was reset, not just rolled back."""
        a, _ = yield self.thread(trust_login_keyed, self.odissey.port)
        a.sendall(m.query("set work_mem = '13MB'") + m.query("select pg_sleep(0.3)"))
        yield self.thread(read_until, a, m.ready_for_query(b"I"))  # the SET's answer
        a.close()

        def work_mem() -> str:
            with self.odissey.connect(user="u_trust", password=None) as conn:
                return str(conn.execute("show work_mem").fetchone()[0])  # type: ignore[index]

        self.assertEqual((yield self.thread(work_mem)), "4MB")
