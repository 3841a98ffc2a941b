"""Peers: several Odissey instances behind one TCP load balancer, in front of the real
PostgreSQL. psycopg clients connect through the balancer; their own cancels (libpq's
cancel over a new connection to the address they used) are sent by the balancer to an
instance that did *not* issue the key, which must forward it to the one that did."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Any

import asyncpg
import psycopg
from psycopg.conninfo import make_conninfo
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from odissey.cancel import PEER_BITS, CancelKeys, KeyLayout
from odissey.wire import messages as m
from tests.harness import (
    APP_PASSWORD, Odissey, direct, free_port, route, run_seed, send_cancel_request, until,
)


class _Back(Protocol):
    """The balancer's connection to an instance: what the instance says goes to the client."""

    def __init__(self, front: "_Front") -> None:
        self.front = front

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        self.front.transport.loseConnection()  # type: ignore[union-attr]


class _Front(Protocol):
    """A client's connection to the balancer: its first packet picks the instance."""

    def __init__(self, balancer: "Balancer") -> None:
        self.balancer = balancer
        self.pending = b""
        self.back: _Back | None = None
        self.opening = False
        self.gone = False

    def dataReceived(self, data: bytes) -> None:
        if self.back is not None:
            self.back.transport.write(data)  # type: ignore[union-attr]
            return
        self.pending += data
        if not self.opening and len(self.pending) >= 8:
            self._open()

    def _open(self) -> None:
        port = self.balancer.choose(self.pending)
        if port is None:
            return  # a CancelRequest not whole yet
        self.opening = True
        back = _Back(self)
        factory = Factory.forProtocol(lambda: back)
        factory.noisy = False
        connecting = TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)

        def connected(_proto: object) -> None:
            if self.gone:
                back.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.back = back
            back.transport.write(self.pending)  # type: ignore[union-attr]

        connecting.addCallbacks(connected, lambda _f: self.transport.loseConnection())  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        self.gone = True
        if self.back is not None:
            self.back.transport.loseConnection()  # type: ignore[union-attr]


class Balancer:
    """A TCP load balancer as a deployment would have, made adversarial: logins go to
    the instances in turn, and every CancelRequest goes to an instance other than the
    one whose key it carries (read from the peer id in the secret's top bits)."""

    def __init__(self, instances: dict[int, int], rng: random.Random) -> None:
        self.instances = instances  # peer id -> port
        self.rng = rng
        self.turn = 0
        #: (peer id that issued the key, peer id the request was sent to), per cancel.
        self.cancels: list[tuple[int, int]] = []
        self.port = 0
        self._listening: Any = None

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        factory = Factory.forProtocol(lambda: _Front(self))
        factory.noisy = False
        self._listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.port = self._listening.getHost().port

    def stop(self) -> Any:
        return self._listening.stopListening()

    def choose(self, first: bytes) -> int | None:
        _length, code = struct.unpack("!ii", first[:8])
        ids = sorted(self.instances)
        if code != m.CANCEL_REQUEST_CODE:
            self.turn += 1
            return self.instances[ids[self.turn % len(ids)]]
        if len(first) < 16:
            return None
        _pid, secret = struct.unpack("!ii", first[8:16])
        owner = (secret & 0xFFFFFFFF) >> (32 - PEER_BITS)
        target = self.rng.choice([i for i in ids if i != owner])
        self.cancels.append((owner, target))
        return self.instances[target]

    def dsn(self) -> str:
        return make_conninfo(host="127.0.0.1", port=str(self.port), user="app", dbname="app",
                             password=APP_PASSWORD, sslmode="disable")


#: Seconds a victim's query would run uncancelled: a lost cancel shows as "finished".
LONG = 15


def _wait_active(tag: str, timeout: float = 20.0) -> None:
    """Until PostgreSQL runs the query carrying ``tag`` (a cancel before that finds
    nothing to cancel, in PostgreSQL as in Odissey)."""
    deadline = time.monotonic() + timeout
    with direct() as su:
        while time.monotonic() < deadline:
            row = su.execute("select 1 from pg_stat_activity where state = 'active' and query like %s",
                             (f"%{tag}%",)).fetchone()
            if row:
                return
            time.sleep(0.01)
    raise AssertionError(f"query {tag} never ran")


def victim(dsn: str, tag: str) -> tuple[str, float, int]:
    """Run a long pg_sleep and cancel it with psycopg's own cancel (libpq's, over a
    new connection to the balancer): the query's outcome, how long the cancel took to
    land, and that the connection still answers afterwards."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        outcome: dict[str, str] = {}

        def run() -> None:
            try:
                conn.execute(f"select pg_sleep({LONG}) /* {tag} */")
                outcome["state"] = "finished"
            except psycopg.Error as exc:
                outcome["state"] = exc.sqlstate or repr(exc)

        sleeper = threading.Thread(target=run)
        sleeper.start()
        _wait_active(tag)
        started = time.monotonic()
        conn.cancel_safe(timeout=10)
        sleeper.join(LONG + 10)
        landed = time.monotonic() - started
        after = conn.execute("select 1").fetchone()[0]
        return outcome.get("state", "still running"), landed, after


def bystander(dsn: str, stop: threading.Event) -> tuple[int, list[str]]:
    """Short sleeps until told to stop: how many ran, and every error (a cancel that
    reached the wrong client would show here as 57014)."""
    ran, errors = 0, []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        while not stop.is_set():
            try:
                conn.execute("select pg_sleep(0.2) /* bystander */")
                ran += 1
            except psycopg.Error as exc:
                errors.append(exc.sqlstate or repr(exc))
    return ran, errors


class PeerCancelTests(unittest.TestCase):
    """Cancels sent through a load balancer to the wrong instance reach their query:
    none lost, none reaching another client, in transaction and session mode, with two
    and with three instances."""

    timeout = 180
    cancels = 50
    batch = 10
    bystanders = 4

    def start_peers(self, count: int, mode: str, unix: bool = False):  # type: ignore[no-untyped-def]
        """``count`` instances, each listening on its own TCP port (the balancer's way
        in), and with ``unix`` on a socket in a directory of its own too, which the
        peers then use to reach it (instances sharing one machine)."""
        ports = {i: free_port() for i in range(1, count + 1)}
        dirs = {i: tempfile.mkdtemp(prefix="odissey-peer-") for i in ports}  # short: sun_path
        for d in dirs.values():
            self.addCleanup(shutil.rmtree, d, True)
        peers = [{"id": i, "host": dirs[i] if unix else "127.0.0.1", "port": port,
                  "connect_timeout": "5s"} for i, port in ports.items()]  # one list for all
        self.instances = [
            Odissey([route(pool={"mode": mode, "size": 20})],
                    listen=[f"tcp:{port}:interface=127.0.0.1"]
                    + ([f"unix:{dirs[i]}/.s.PGSQL.{port}"] if unix else []),
                    top={"peer_id": i, "peers": peers})
            for i, port in ports.items()]
        for instance in self.instances:
            self.addCleanup(instance.stop)
        return DeferredList([instance.start() for instance in self.instances], fireOnOneErrback=True)

    def thread(self, f: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, self.clients, f, *args)

    def setUp(self) -> None:
        self.clients = ThreadPool(minthreads=0, maxthreads=50, name="peer-clients")
        self.clients.start()
        self.addCleanup(self.clients.stop)

    @inlineCallbacks
    def cancel_across(self, count: int, mode: str, unix: bool = False):  # type: ignore[no-untyped-def]
        rng = random.Random(run_seed(self))
        yield self.start_peers(count, mode, unix)
        balancer = Balancer({i + 1: o.port for i, o in enumerate(self.instances)}, rng)
        yield balancer.start()
        self.addCleanup(balancer.stop)
        dsn = balancer.dsn()
        stop = threading.Event()
        watching = [self.thread(bystander, dsn, stop) for _ in range(self.bystanders)]
        outcomes = []
        try:
            for first in range(0, self.cancels, self.batch):
                batch = yield DeferredList(
                    [self.thread(victim, dsn, f"victim-{n}") for n in range(first, first + self.batch)],
                    fireOnOneErrback=True, consumeErrors=True)
                outcomes += [result for _ok, result in batch]
                if any(state != "57014" for state, _landed, _after in outcomes):
                    break  # lost already: no need to wait for more
        finally:
            stop.set()
            watched = yield DeferredList(watching, fireOnOneErrback=True, consumeErrors=True)
        states = [state for state, _landed, _after in outcomes]
        self.assertEqual(states, ["57014"] * self.cancels, balancer.cancels)  # none lost
        self.assertEqual([after for _s, _l, after in outcomes], [1] * self.cancels)
        self.assertLess(max(landed for _s, landed, _a in outcomes), 10)
        ran = [r for _ok, (r, _e) in watched]
        self.assertEqual([e for _ok, (_r, e) in watched], [[]] * self.bystanders)  # none crossed
        self.assertTrue(all(ran), ran)
        self.assertEqual(len(balancer.cancels), self.cancels)
        self.assertTrue(all(owner != target for owner, target in balancer.cancels))
        self.assertEqual({owner for owner, _t in balancer.cancels}, set(range(1, count + 1)))

    def test_two_instances_transaction_mode(self):  # type: ignore[no-untyped-def]
        return self.cancel_across(2, "transaction")

    def test_two_instances_session_mode(self):  # type: ignore[no-untyped-def]
        return self.cancel_across(2, "session")

    def test_three_instances_transaction_mode(self):  # type: ignore[no-untyped-def]
        return self.cancel_across(3, "transaction")

    def test_three_instances_session_mode(self):  # type: ignore[no-untyped-def]
        return self.cancel_across(3, "session")

    def test_peers_on_unix_sockets(self):  # type: ignore[no-untyped-def]
        """Peers reached through unix socket directories, as storages can be."""
        return self.cancel_across(2, "transaction", unix=True)

    def test_asyncpg_transaction_mode(self):  # type: ignore[no-untyped-def]
        return self.asyncpg_timeouts("transaction")

    def test_asyncpg_session_mode(self):  # type: ignore[no-untyped-def]
        return self.asyncpg_timeouts("session")

    @inlineCallbacks
    def asyncpg_timeouts(self, mode: str):  # type: ignore[no-untyped-def]
        """asyncpg's own cancel (sent when a query times out, to the address it
        connected to) reaches the right instance through the balancer too: twenty
        concurrent timeouts stop their queries, each connection goes on at once (a
        lost cancel would leave it waiting for the whole pg_sleep)."""
        rng = random.Random(run_seed(self))
        yield self.start_peers(2, mode)
        balancer = Balancer({i + 1: o.port for i, o in enumerate(self.instances)}, rng)
        yield balancer.start()
        self.addCleanup(balancer.stop)

        async def one(i: int) -> tuple[str, int, bool]:
            conn = await asyncpg.connect(host="127.0.0.1", port=balancer.port, user="app",
                                         password=APP_PASSWORD, database="app", ssl=False,
                                         statement_cache_size=0)
            try:
                started = time.monotonic()
                try:
                    await conn.fetchval(f"select pg_sleep({LONG}) /* asyncpg-{i} */", timeout=0.5)
                    outcome = "finished"
                except asyncio.TimeoutError:
                    outcome = "timed out"
                after = await conn.fetchval("select 7")  # waits for the cancelled query's end
                return outcome, after, time.monotonic() - started < LONG - 5
            finally:
                await conn.close()

        async def main() -> list[tuple[str, int, bool]]:
            return list(await asyncio.gather(*(one(i) for i in range(20))))

        def sleeping() -> int:
            with direct() as su:
                return int(su.execute("select count(*) from pg_stat_activity where state = 'active'"
                                      " and query like %s", ("%asyncpg-%",)).fetchone()[0])

        outcomes = yield self.thread(lambda: asyncio.run(main()))
        self.assertEqual(outcomes, [("timed out", 7, True)] * 20)  # not waited out: cancelled
        self.assertEqual((yield self.thread(sleeping)), 0)
        self.assertEqual(len(balancer.cancels), 20)
        self.assertTrue(all(owner != target for owner, target in balancer.cancels))


class _Silent(Protocol):
    """A peer that takes a forwarded cancel and never answers."""

    def __init__(self, seen: list[bytes], closed: list[float]) -> None:
        self.seen = seen
        self.closed = closed

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.append(reactor.seconds())


def send_and_leave(port: int, packet: bytes) -> None:
    """A client that sends its CancelRequest and goes without waiting for the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet)


class ForwardLifetimeTests(unittest.TestCase):
    """A forwarded cancel is a connection of Odissey's like a server cancel: bounded by
    the peer's connect_timeout, and waited for by shutdown."""

    @inlineCallbacks
    def test_shutdown_waits_for_forward(self):  # type: ignore[no-untyped-def]
        """A peer that never closes the forwarded cancel: the key reaches it with one hop
        spent; the client that asked leaves at once; stopping the service still waits
        until Odissey gives the forward up, after the peer's connect_timeout."""
        seen: list[bytes] = []
        closed: list[float] = []
        factory = Factory.forProtocol(lambda: _Silent(seen, closed))
        factory.noisy = False
        silent = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(silent.stopListening)
        odissey = Odissey([route()], top={"peer_id": 1, "peers": [
            {"id": 2, "host": "127.0.0.1", "port": silent.getHost().port, "connect_timeout": "1s"}]})
        yield odissey.start()
        secret = CancelKeys(KeyLayout.of(2, True, 0, 1)).issue("theirs")[1]
        yield deferToThread(send_and_leave, odissey.port, m.cancel_request(77, secret))
        yield until(lambda: seen, 10, "the forwarded cancel reached the peer")
        forwarded = reactor.seconds()
        self.assertEqual(b"".join(seen), m.cancel_request(77, secret - 1))
        factory = odissey.service.factory
        yield until(lambda: not factory.clients, 10, "the client's cancel connection gone")
        self.assertEqual(closed, [])  # the forward outlives the client that asked for it
        yield odissey.stop()
        self.assertGreaterEqual(reactor.seconds() - forwarded, 0.9)  # given up after 1s
        yield until(lambda: closed, 10, "the peer sees the forward closed")

    @inlineCallbacks
    def test_disagreeing_peer_lists_stop_after_three_hops(self):  # type: ignore[no-untyped-def]
        """Two instances whose lists both place peer 3 at the other: a cancel with a key
        of peer 3 bounces between them three times, as its hop budget allows, is then
        dropped, and the client's cancel connection is closed."""
        ports = {1: free_port(), 2: free_port()}
        instances = [
            Odissey([route()], listen=[f"tcp:{ports[me]}:interface=127.0.0.1"], top={
                "peer_id": me, "peers": [{"id": 3, "host": "127.0.0.1", "port": ports[other]}]})
            for me, other in ((1, 2), (2, 1))]
        for instance in instances:
            yield instance.start()
            self.addCleanup(instance.stop)
        hops: list[str] = []

        def observe(event: dict) -> None:  # type: ignore[type-arg]
            if event.get("log_namespace") == "odissey.cancel" and "forwarding" in event.get("log_format", ""):
                hops.append(str(event["port"]))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        secret = CancelKeys(KeyLayout.of(3, True, 0, 1)).issue("nobody's")[1]
        yield deferToThread(send_cancel_request, ports[1], (77, secret))
        self.assertEqual(hops, [str(ports[2]), str(ports[1]), str(ports[2])])
