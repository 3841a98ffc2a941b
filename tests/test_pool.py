"""The pool on a fake clock with fake servers: size, FIFO waiters, affinity, timeouts."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from odissey import config
from odissey.pool import SPARE_AFTER, PauseState, Pool, PoolKey, Pools, Withdrawn
from odissey.server import ServerState
from odissey.testing import FakeServer, FakeServers
from odissey.wire.errors import PoolerError


def make_pool(size: int = 2, wait: str = "5s", **pool: object) -> tuple[Pool, FakeServers, Clock]:
    cfg = config.parse({
        "listen": ["tcp:0"],
        "storages": {"pg": {"host": "127.0.0.1", "retry_backoff": "4s"}},
        "routes": [{"database": "db", "user": "u", "storage": "pg",
                    "pool": {"size": size, "wait_timeout": wait, **pool}}],
    })
    clock = Clock()
    servers = FakeServers(clock)
    return Pool(PoolKey("db", "u"), cfg.routes[0], clock, servers), servers, clock  # type: ignore[arg-type]


class PoolTests(SynchronousTestCase):
    def test_waiters_open_up_to_size(self) -> None:
        """Three waiters on a pool of two open exactly two connections."""
        pool, servers, _ = make_pool(size=2)
        for name in ("a", "b", "c"):
            pool.wait(name)
        self.assertEqual(len(servers.attempts), 2)
        self.assertEqual(pool.total, 2)

    def test_fifo_at_once(self) -> None:
        """A released server goes to the first waiter, at once (no timer, no turn)."""
        pool, servers, clock = make_pool(size=1)
        first = pool.wait("a")
        got: list[object] = []
        first.addCallback(got.append)
        server = servers.succeed_next()
        self.assertEqual(got, [server])
        second, third = pool.wait("b"), pool.wait("c")
        order: list[str] = []
        second.addCallback(lambda _: order.append("b"))
        third.addCallback(lambda _: order.append("c"))
        pool.release(server)  # type: ignore[arg-type]
        self.assertEqual(order, ["b"])
        self.assertEqual(clock.getDelayedCalls()[0].getTime(), 5.0)  # the pool's one timer

    def test_each_waiter_expires_at_its_own_deadline(self) -> None:
        """One timer per pool still gives every waiter exactly its wait_timeout, also
        when waiters ahead of it were served, and a shortened timeout takes effect."""
        pool, servers, clock = make_pool(size=1, wait="2s")
        pool.wait("holder")
        servers.succeed_next()
        first = pool.wait("a")
        clock.advance(1.5)
        second = pool.wait("b")
        clock.advance(0.5)
        self.failureResultOf(first, PoolerError)
        self.assertNoResult(second)
        clock.advance(1.4)
        self.assertNoResult(second)
        clock.advance(0.1)
        self.assertEqual(self.failureResultOf(second, PoolerError).value.sqlstate, "53300")
        self.assertEqual(clock.getDelayedCalls(), [])
        third = pool.wait("c")
        object.__setattr__(pool.route.pool, "wait_timeout", 0.5)  # (what a reload will do)
        fourth = pool.wait("d")
        clock.advance(0.5)
        self.assertNoResult(third)
        self.failureResultOf(fourth, PoolerError)
        clock.advance(1.5)
        self.failureResultOf(third, PoolerError)

    def test_a_cancelled_wait_leaves_the_queue(self) -> None:
        pool, servers, clock = make_pool(size=1)
        holder = pool.wait("a")
        server = servers.succeed_next()
        gone = pool.wait("b")
        gone.addErrback(lambda _: None)
        gone.cancel()
        self.assertEqual(len(pool.waiters), 0)
        pool.release(self.successResultOf(holder))
        self.assertEqual(pool.idle, [server])

    def test_newcomer_cannot_jump_queue(self) -> None:
        """While anyone waits, take() gives nothing even if a server is idle."""
        pool, servers, clock = make_pool(size=1)
        pool.wait("a")
        server = servers.succeed_next()
        clock.advance(0)
        pool.wait("b")
        pool.release(server)  # type: ignore[arg-type]
        self.assertIsNone(pool.take("newcomer"))

    def test_affinity(self) -> None:
        """take() prefers the server the same client used last."""
        pool, servers, clock = make_pool(size=2)
        pool.wait("a"), pool.wait("b")
        s1, s2 = servers.succeed_next(), servers.succeed_next()
        clock.advance(0)
        s1.last_client, s2.last_client = "a", "b"
        pool.release(s1)  # type: ignore[arg-type]
        pool.release(s2)  # type: ignore[arg-type]
        self.assertIs(pool.take("a"), s1)

    def test_affinity_after_the_server_served_another(self) -> None:
        """A client whose last server another client took gets the most recently
        released idle server, and the server's new user finds it next time."""
        pool, servers, clock = make_pool(size=3)
        pool.wait("a"), pool.wait("b"), pool.wait("c")
        s1, s2, s3 = servers.succeed_next(), servers.succeed_next(), servers.succeed_next()
        clock.advance(0)
        s1.last_client, s2.last_client, s3.last_client = "a", "b", "c"
        for server in (s1, s2, s3):
            pool.release(server)  # type: ignore[arg-type]
        self.assertIs(pool.take("z"), s3)  # (nobody's: the newest)
        self.assertIs(pool.take("c"), s2)  # (c's went to z)
        s2.last_client = "c"
        pool.release(s2)  # type: ignore[arg-type]
        self.assertIs(pool.take("c"), s2)
        self.assertIs(pool.take("a"), s1)
        self.assertEqual((pool.idle, pool._idle_of), ([], {}))

    def test_waited_counts_from_queueing(self) -> None:
        """A waiter's time so far (SHOW POOLS' maxwait) runs from when it queued, also
        after a reload changed wait_timeout."""
        pool, servers, clock = make_pool(size=1, wait="5s")
        pool.wait("holder")
        servers.succeed_next()
        clock.advance(1)
        pool.wait("a")
        clock.advance(1.5)
        object.__setattr__(pool.route.pool, "wait_timeout", 2.0)
        self.assertEqual(list(pool.waited(clock.seconds()).values()), [1.5])

    def test_wait_timeout(self) -> None:
        """A waiter gives up with 53300 after the wait timeout."""
        pool, servers, clock = make_pool(size=1, wait="2s")
        holder = pool.wait("a")
        servers.succeed_next()
        waiting = pool.wait("b")
        clock.advance(2)
        error = self.failureResultOf(waiting, PoolerError).value
        self.assertEqual(error.sqlstate, "53300")
        self.assertIn('pool "db/u"', error.message)
        self.assertEqual(error.detail, "pool size is 1: 1 in use, 0 connecting, 0 other clients waiting")
        self.assertTrue(holder.called)

    def test_connect_failure_backs_off(self) -> None:
        """A failed attempt fails the waiters at once with the error; during the back-off
        new waiters fail fast; afterwards attempts resume, and delays double up to the cap."""
        pool, servers, clock = make_pool(size=1)
        first, second = pool.wait("a"), pool.wait("b")
        servers.fail_next(PoolerError("08006", 'could not connect to server "pg": refused'))
        for waiting in (first, second):
            error = self.failureResultOf(waiting, PoolerError).value
            self.assertIn("could not connect", error.message)
        fast = self.failureResultOf(pool.wait("c"), PoolerError).value
        self.assertIn("next attempt in 0.2s", fast.message)
        self.assertEqual(servers.attempts, [])
        clock.advance(0.25)
        later = pool.wait("d")
        self.assertEqual(len(servers.attempts), 1)
        servers.fail_next(PoolerError("08006", "refused"))
        self.failureResultOf(later, PoolerError)
        self.assertEqual(pool.backoff, 0.5)
        for _ in range(6):
            clock.advance(pool.backoff)
            later = pool.wait("e")
            servers.fail_next(PoolerError("08006", "refused"))
            self.failureResultOf(later, PoolerError)
        self.assertEqual(pool.backoff, 4.0)
        clock.advance(4)
        pool.wait("f")
        servers.succeed_next()
        self.assertEqual((pool.backoff, pool.retry_at), (0.0, 0.0))

    def test_missing_database_keeps_postgresqls_words_during_back_off(self) -> None:
        """A 3D000 from PostgreSQL is what every waiter gets during the back-off, word
        for word; a connection failure is framed with the pool and the next attempt."""
        pool, servers, clock = make_pool(size=1)
        first = pool.wait("a")
        servers.fail_next(PoolerError("3D000", 'database "db" does not exist'))
        later = [pool.wait("b"), pool.parameters()]
        self.assertEqual(servers.attempts, [])  # backing off
        for waiting in [first] + later:
            error = self.failureResultOf(waiting, PoolerError).value
            self.assertEqual((error.sqlstate, error.message), ("3D000", 'database "db" does not exist'))
        clock.advance(pool.backoff)
        again = pool.wait("c")
        servers.fail_next(PoolerError("08006", 'could not connect to server "pg": refused'))
        self.failureResultOf(again, PoolerError)
        framed = self.failureResultOf(pool.wait("d"), PoolerError).value
        self.assertEqual(framed.sqlstate, "08006")
        self.assertIn('(pool "db/u", next attempt in', framed.message)

    def test_idle_timeout_lifetime_and_min_size(self) -> None:
        """Idle servers past their idle timeout or lifetime are closed; min_size stays open."""
        pool, servers, clock = make_pool(size=3, min_size=1, server_idle_timeout="10s",
                                         server_lifetime="100s")
        pool.maintain()
        first = servers.succeed_next()  # opened for min_size
        self.assertEqual(pool.idle, [first])
        self.assertIs(pool.take("a"), first)
        waiting = pool.wait("b")
        second = servers.succeed_next()
        clock.advance(0)
        self.assertIs(self.successResultOf(waiting), second)
        for server in list(pool.active):
            pool.release(server)  # type: ignore[arg-type]
        clock.advance(11)
        pool.maintain()
        self.assertEqual(pool.total, 1)  # one closed for idleness, min_size kept
        clock.advance(90)
        pool.maintain()
        self.assertEqual(len(servers.attempts), 1)  # the old one went; a fresh one is opening
        self.assertEqual(first.state, ServerState.CLOSED)
        self.assertEqual(second.state, ServerState.CLOSED)

    def test_parameters_cached(self) -> None:
        """The first login's ParameterStatus set is cached; later logins need no server."""
        pool, servers, clock = make_pool()
        asked = pool.parameters()
        server = servers.succeed_next()
        self.assertEqual(self.successResultOf(asked), server.login_params)
        self.assertEqual(pool.idle, [server])
        self.assertEqual(self.successResultOf(pool.parameters()), server.login_params)
        self.assertEqual(servers.attempts, [])

    def test_login_worked_out_once_per_startup_wishes(self) -> None:
        """A login's parameters start from the cache with the startup packet's wishes
        applied (a reported one spelled as the server does, valued as PostgreSQL
        reports it), and are worked out once per distinct set of wishes, until the
        cache changes."""
        pool, servers, _clock = make_pool()
        pool.parameters_cache = [("application_name", ""), ("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]
        asked: list[tuple[str, str]] = []

        def canonical(key: str, value: str) -> str:
            asked.append((key, value))
            return value.upper() if key == "datestyle" else value

        wishes = (("datestyle", "iso, dmy"), ("search_path", "app"))
        login = pool.login(wishes, canonical)
        self.assertEqual(login.wanted["datestyle"], ("DateStyle", "ISO, DMY"))
        self.assertEqual(login.wanted["search_path"], ("search_path", "app"))
        self.assertEqual(login.told, {"application_name": "", "datestyle": "ISO, DMY", "timezone": "UTC"})
        self.assertIs(login.fingerprint, pool.fingerprints.of(dict(login.wanted)))
        self.assertIn(b"DateStyle\0ISO, DMY\0", login.greeting)
        self.assertIs(pool.login(wishes, canonical), login)
        self.assertEqual(asked, [("datestyle", "iso, dmy")])  # (once: the second login was known)
        self.assertIsNot(pool.login((("search_path", "other"),), canonical), login)
        pool.parameters_cache = [("application_name", ""), ("DateStyle", "German"), ("TimeZone", "UTC")]
        again = pool.login(wishes, canonical)
        self.assertIsNot(again, login)
        self.assertEqual(len(asked), 2)

    def test_login_fingerprint_taken_again_after_fingerprints_start_afresh(self) -> None:
        """Once the pool's fingerprints have started afresh (past their limit), a
        remembered login's fingerprint is taken again: the old one would match no
        server's, and every attach would compare parameters the slow way."""
        pool, _servers, _clock = make_pool()
        pool.parameters_cache = [("application_name", ""), ("TimeZone", "UTC")]
        pool.fingerprints.LIMIT = 2
        wishes = (("search_path", "app"),)
        login = pool.login(wishes, lambda _key, value: value)
        pool.fingerprints.of({"a": ("a", "1")})
        pool.fingerprints.of({"b": ("b", "1")})  # (the limit: the memory starts afresh)
        again = pool.login(wishes, lambda _key, _value: self.fail("asked again"))
        self.assertIsNot(again.fingerprint, login.fingerprint)
        self.assertIs(again.fingerprint, pool.fingerprints.of(dict(login.wanted)))
        self.assertEqual((again.wanted, again.told, again.greeting), (login.wanted, login.told, login.greeting))

    def test_released_broken_server_closed(self) -> None:
        """A server released in a non-idle state is closed, not pooled."""
        pool, servers, clock = make_pool()
        pool.wait("a")
        server = servers.succeed_next()
        clock.advance(0)
        server.state = ServerState.QUERY
        pool.release(server)  # type: ignore[arg-type]
        self.assertEqual(pool.idle, [])
        self.assertEqual(server.state, ServerState.CLOSED)

    def test_cancelled_waiter_leaves_queue(self) -> None:
        """A waiter whose client left is removed from the queue."""
        pool, servers, clock = make_pool(size=1)
        waiting = pool.wait("a")
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(len(pool.waiters), 0)


class ShedTests(SynchronousTestCase):
    """Pool.shed: a server given up for another worker's waiting client."""

    def test_idle_server_closes_at_once(self) -> None:
        """The least recently used idle server is closed and leaves the pool."""
        pool, servers, _ = make_pool(size=2)
        pool.wait("a")
        pool.wait("b")
        first, second = servers.succeed_next(), servers.succeed_next()
        pool.release(first)  # type: ignore[arg-type]
        pool.release(second)  # type: ignore[arg-type]
        self.assertTrue(pool.shed())
        self.assertEqual(first.state, ServerState.CLOSED)
        self.assertEqual(pool.idle, [second])

    def test_busy_server_closes_when_released_not_handed_on(self) -> None:
        """With none idle, the next busy server to come back closes even though a
        client of this pool waits (the other worker's client is older)."""
        pool, servers, _ = make_pool(size=1)
        pool.wait("a")
        server = servers.succeed_next()
        waiting = pool.wait("b")
        self.assertTrue(pool.shed())
        pool.release(server)  # type: ignore[arg-type]
        self.assertEqual(server.state, ServerState.CLOSED)
        self.assertNoResult(waiting)

    def test_whichever_busy_server_comes_back_first_closes(self) -> None:
        """Asked for one of two busy servers, the first released closes; the other then
        serves this pool's waiters again."""
        pool, servers, _ = make_pool(size=2)
        pool.wait("a")
        pool.wait("b")
        first, second = servers.succeed_next(), servers.succeed_next()
        self.assertTrue(pool.shed())
        pool.release(second)  # type: ignore[arg-type]
        self.assertEqual(second.state, ServerState.CLOSED)
        self.assertFalse(first.retiring)
        waiting = pool.wait("c")
        pool.release(first)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(waiting), first)

    def test_idle_only_takes_only_a_spare_server(self) -> None:
        """idle_only takes an idle server only once the janitor has seen it idle for
        SPARE_AFTER: not one released a moment ago between two transactions."""
        pool, servers, clock = make_pool(size=1)
        pool.wait("a")
        server = servers.succeed_next()
        server.touched = True
        pool.release(server)  # type: ignore[arg-type]
        self.assertFalse(pool.shed(idle_only=True))
        pool.maintain()  # (the janitor notes when it was used)
        self.assertFalse(pool.shed(idle_only=True))
        clock.advance(SPARE_AFTER)
        self.assertTrue(pool.shed(idle_only=True))
        self.assertEqual(server.state, ServerState.CLOSED)

    def test_idle_only_and_nothing_to_give(self) -> None:
        """idle_only leaves busy servers alone; a pool with nothing left says False."""
        pool, servers, _ = make_pool(size=1)
        pool.wait("a")
        servers.succeed_next()
        self.assertFalse(pool.shed(idle_only=True))
        self.assertTrue(pool.shed())
        self.assertFalse(pool.shed())  # (the one busy server is already owed)


class SurplusTests(SynchronousTestCase):
    """Pool.surplus and Withdrawn: a worker's lease requests that nobody needs any more."""

    def test_surplus_after_waiters_were_served(self) -> None:
        """Two waiters start two attempts; a server that comes back serves the second
        waiter, so one attempt is surplus; withdrawing it is no storage failure."""
        pool, servers, _ = make_pool(size=3)
        pool.wait("a")
        first = servers.succeed_next()
        pool.wait("b")
        pool.wait("c")
        self.assertEqual((pool.opening, pool.surplus()), (2, 0))
        pool.release(first)  # type: ignore[arg-type]
        self.assertEqual(pool.surplus(), 1)
        servers.fail_next(Withdrawn())
        self.assertEqual((pool.opening, pool.surplus(), pool.backoff, len(pool.waiters)), (1, 0, 0.0, 1))

    def test_min_size_attempts_are_not_surplus(self) -> None:
        """Attempts the janitor started for min_size are needed though nobody waits."""
        pool, _servers, _ = make_pool(size=3, min_size=2)
        pool.maintain()
        self.assertEqual((pool.opening, pool.surplus()), (2, 0))


class PauseTests(SynchronousTestCase):
    """The console's controls on one pool: PAUSE/RESUME, RECONNECT, KILL."""

    def busy_and_idle(self) -> tuple[Pool, FakeServers, Clock, FakeServer, FakeServer]:
        """A pool of two: ``busy`` held by client a, ``idle`` released by b."""
        pool, servers, clock = make_pool(size=2)
        held, released = pool.wait("a"), pool.wait("b")
        busy, idle = servers.succeed_next(), servers.succeed_next()
        self.assertIs(self.successResultOf(held), busy)
        self.assertIs(self.successResultOf(released), idle)
        pool.release(idle)  # type: ignore[arg-type]
        return pool, servers, clock, busy, idle

    def test_pause_waits_for_busy_servers_and_queues_clients(self) -> None:
        """PAUSE closes the idle server at once and the busy one when released, and is
        done only then; a query arriving meanwhile waits (no server opened) and gets a
        fresh server after RESUME."""
        pool, servers, _, busy, idle = self.busy_and_idle()
        pool.pause()
        paused = pool.when_paused()
        self.assertEqual((idle.state, pool.pause_state), (ServerState.CLOSED, PauseState.PAUSING))
        self.assertNoResult(paused)
        self.assertIsNone(pool.take("c"))
        waiting = pool.wait("c")
        self.assertEqual(servers.attempts, [])
        pool.release(busy)  # type: ignore[arg-type]
        self.assertEqual(busy.state, ServerState.CLOSED)
        self.successResultOf(paused)
        self.assertEqual((pool.pause_state, pool.total), (PauseState.PAUSED, 0))
        self.assertNoResult(waiting)
        pool.maintain()  # (no min_size opening while paused either)
        self.assertEqual(servers.attempts, [])
        pool.resume()
        fresh = servers.succeed_next()
        self.assertIs(self.successResultOf(waiting), fresh)

    def test_pause_closes_a_connection_that_opens_meanwhile(self) -> None:
        """A connection being opened when PAUSE comes is closed once open, not handed
        to the client waiting for it; a failed one does not refuse that client."""
        pool, servers, _ = make_pool(size=2)
        first, second = pool.wait("a"), pool.wait("b")
        pool.pause()
        paused = pool.when_paused()
        opened = servers.succeed_next()
        self.assertEqual(opened.state, ServerState.CLOSED)
        self.assertNoResult(first)
        self.assertNoResult(paused)
        servers.fail_next(PoolerError("08006", "refused"))
        self.successResultOf(paused)
        self.assertNoResult(first)
        self.assertNoResult(second)

    def test_paused_waiter_still_times_out(self) -> None:
        """wait_timeout still bounds a paused client's wait (as PgBouncer's
        query_wait_timeout does), and the error says the pool is paused."""
        pool, _, clock = make_pool(size=1, wait="3s")
        pool.pause()
        waiting = pool.wait("a")
        clock.advance(3)
        error = self.failureResultOf(waiting, PoolerError).value
        self.assertEqual(error.sqlstate, "53300")
        self.assertIn("paused", error.detail or "")

    def test_resume_before_paused_fails_the_pause(self) -> None:
        """RESUME before the busy servers came back ends PAUSE's wait with 57014; the
        server in use is still closed when released, and the pool serves again."""
        pool, servers, _, busy, _idle = self.busy_and_idle()
        pool.pause()
        paused = pool.when_paused()
        pool.resume()
        self.assertEqual(self.failureResultOf(paused, PoolerError).value.sqlstate, "57014")
        pool.release(busy)  # type: ignore[arg-type]
        self.assertEqual(busy.state, ServerState.CLOSED)
        waiting = pool.wait("c")
        fresh = servers.succeed_next()
        self.assertIs(self.successResultOf(waiting), fresh)

    def test_reconnect(self) -> None:
        """RECONNECT closes idle servers now and busy ones when released, and lists
        those still to close; new clients get new servers meanwhile."""
        pool, servers, _, busy, idle = self.busy_and_idle()
        pool.reconnect()
        self.assertEqual(idle.state, ServerState.CLOSED)
        self.assertEqual(pool.to_close(), [busy])
        waiting = pool.wait("c")
        fresh = servers.succeed_next()
        self.assertIs(self.successResultOf(waiting), fresh)
        pool.release(busy)  # type: ignore[arg-type]
        self.assertEqual(busy.state, ServerState.CLOSED)
        pool.release(fresh)  # type: ignore[arg-type]
        self.assertEqual(pool.idle, [fresh])
        self.assertEqual(pool.to_close(), [])

    def test_reconnect_closes_a_connection_begun_before_it(self) -> None:
        """A connection being opened when RECONNECT comes is closed once open, and the
        client waiting for it gets one opened after."""
        pool, servers, _ = make_pool(size=2)
        waiting = pool.wait("a")
        pool.reconnect()
        stale = servers.succeed_next()
        self.assertEqual(stale.state, ServerState.CLOSED)
        self.assertNoResult(waiting)
        fresh = servers.succeed_next()
        self.assertIs(self.successResultOf(waiting), fresh)

    def test_kill(self) -> None:
        """KILL cuts busy and idle servers at once and leaves the pool paused."""
        pool, servers, _, busy, idle = self.busy_and_idle()
        pool.kill()
        self.assertEqual((busy.state, idle.state), (ServerState.CLOSED, ServerState.CLOSED))
        self.assertEqual((pool.pause_state, pool.total), (PauseState.PAUSED, 0))
        self.assertNoResult(pool.wait("c"))
        self.assertEqual(servers.attempts, [])


class PoolsControlTests(SynchronousTestCase):
    """The console's controls per database, over every pool of it."""

    def pools(self) -> tuple[Pools, dict[str, FakeServers], config.Route]:
        """Pools over a catch-all route, with each user's connection attempts apart."""
        cfg = config.parse({
            "listen": ["tcp:0"], "storages": {"pg": {"host": "127.0.0.1"}},
            "routes": [{"database": "*", "user": "*", "storage": "pg"}]})
        servers: dict[str, FakeServers] = {}

        def connect(reactor: object, route: object, database: str, user: str) -> object:
            return servers.setdefault(user, FakeServers())()

        return Pools(Clock(), connect), servers, cfg.routes[0]  # type: ignore[arg-type]

    def test_pause_one_database_now_and_later(self) -> None:
        """PAUSE db pauses that database's pools, and one made for it later; other
        databases go on; RESUME db while everything is paused leaves it paused."""
        pools, _, route = self.pools()
        a = pools.get(route, "a", "u")
        b = pools.get(route, "b", "u")
        self.successResultOf(pools.pause("a"))
        later = pools.get(route, "a", "v")
        self.assertEqual((a.pause_state, later.pause_state, b.pause_state),
                         (PauseState.PAUSED, PauseState.PAUSED, PauseState.RUNNING))
        self.successResultOf(pools.pause(None))
        pools.resume("a")
        self.assertTrue(pools.is_paused("a"))
        self.assertEqual(a.pause_state, PauseState.PAUSED)
        pools.resume(None)
        self.assertEqual({p.pause_state for p in (a, b, later)}, {PauseState.RUNNING})
        self.assertFalse(pools.is_paused("a"))

    def test_pause_fires_when_every_pool_is_done(self) -> None:
        """The database's PAUSE is done only when the last of its pools is."""
        pools, servers, route = self.pools()
        first, second = pools.get(route, "a", "u"), pools.get(route, "a", "v")
        one, two = first.wait("c1"), second.wait("c2")
        s1, s2 = servers["u"].succeed_next(), servers["v"].succeed_next()
        self.assertIs(self.successResultOf(one), s1)
        self.assertIs(self.successResultOf(two), s2)
        paused = pools.pause("a")
        first.release(s1)  # type: ignore[arg-type]
        self.assertNoResult(paused)
        second.release(s2)  # type: ignore[arg-type]
        self.successResultOf(paused)

    def test_closing_waits_for_reconnected_servers(self) -> None:
        """WAIT_CLOSE's Deferred fires once the servers RECONNECT marked have closed."""
        pools, servers, route = self.pools()
        pool = pools.get(route, "a", "u")
        held = pool.wait("c")
        server = servers["u"].succeed_next()
        self.successResultOf(held)
        self.successResultOf(pools.closing("a"))  # nothing to close yet
        pools.reconnect("a")
        closing = pools.closing("a")
        self.assertNoResult(closing)
        pool.release(server)  # type: ignore[arg-type]
        self.successResultOf(closing)
