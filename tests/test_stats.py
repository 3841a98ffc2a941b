"""The per-pool counters (stats.py) as the relay and the pool keep them: transactions,
queries, bytes, times and waits, driven through a relay with fake backends on a clock."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from odissey.relay import Relay
from odissey.stats import BOUNDS_US, Histogram, LoginFailures, Period, PoolStats, Totals, total
from odissey.testing import FakeClient
from odissey.wire import messages as m
from tests.test_relay import attached, relay_setup


def counts(stats: PoolStats) -> tuple[int, int, int]:
    return stats.assignments, stats.xacts, stats.queries


class RelayCountsTests(SynchronousTestCase):
    def test_one_query_one_transaction_bytes_both_ways(self) -> None:
        """An autocommit query is one assignment, one query, one transaction; the bytes
        received are the client's, those sent are the server's reply."""
        for statements in (0, 200):
            relay, client, pool, backends, reactor = relay_setup(max_prepared_statements=statements)
            query = m.query("select 1")
            attached(relay, reactor, backends, query)
            reply = client.received()
            self.assertTrue(reply.endswith(m.ready_for_query(b"I")))
            stats = pool.stats
            self.assertEqual(counts(stats), (1, 1, 1))
            self.assertEqual((stats.received, stats.sent), (len(query), len(reply)))

    def test_times_follow_the_clock(self) -> None:
        """A query held 1.5 s by the server counts 1.5 s of query and transaction time."""
        relay, client, pool, backends, reactor = relay_setup()
        reactor.advance(10)
        attached(relay, reactor, backends, m.query("select pg_sleep(1)"))
        reactor.advance(1.5)
        backends[0].finish()
        stats = pool.stats
        self.assertEqual(counts(stats), (1, 1, 1))
        self.assertEqual((stats.query_us, stats.xact_us), (1_500_000, 1_500_000))
        self.assertEqual(stats.query_hist.counts[BOUNDS_US.index(2_500_000)], 1)

    def test_transaction_spans_its_queries(self) -> None:
        """BEGIN, a query, COMMIT with pauses between: three queries, one transaction
        whose time includes the idle time in between."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("BEGIN"))
        reactor.advance(2)
        relay.clientData(m.query("select 1"))
        backends.flush()
        reactor.advance(3)
        relay.clientData(m.query("COMMIT"))
        backends.flush()
        stats = pool.stats
        self.assertEqual(counts(stats), (1, 1, 3))
        self.assertEqual(stats.xact_us, 5_000_000)
        self.assertEqual(stats.query_us, 0)  # the fake answers on the same tick

    def test_pipelined_batch_is_one_query(self) -> None:
        """Two Querys and an extended batch sent at once are one busy stretch, as in
        PgBouncer: one query (time with work in flight), one transaction."""
        relay, client, pool, backends, reactor = relay_setup()
        batch = (m.query("select 1") + m.query("select 2") + m.parse(b"", b"select 3\0\0\0")
                 + m.bind(b"", b"", b"\0\0\0\0\0\0") + m.message(b"E", b"\0\0\0\0\0") + m.sync())
        attached(relay, reactor, backends, batch)
        self.assertEqual(counts(pool.stats), (1, 1, 1))

    def test_wait_time_when_queued(self) -> None:
        """With one server, a second client waits until the first commits: the wait is
        counted when it is granted the server, and both got an assignment."""
        relay, client, pool, backends, reactor = relay_setup(size=1)
        attached(relay, reactor, backends, m.query("BEGIN"))
        other = Relay(FakeClient(), pool, relay.wanted, dict(relay.told), 1 << 20)
        other.clientData(m.query("select 1"))
        self.assertEqual(len(pool.waiters), 1)
        reactor.advance(0.75)
        relay.clientData(m.query("COMMIT"))
        backends.flush()
        stats = pool.stats
        self.assertEqual(stats.assignments, 2)
        self.assertEqual(stats.wait_us, 750_000)
        # (the first client waited too, for the server being opened: on the same tick)
        self.assertEqual(sum(stats.wait_hist.counts), 2)
        self.assertEqual(stats.xacts, 2)
        # the waiter's query counted its wait too (as PgBouncer's query_start does)
        self.assertGreaterEqual(stats.query_us, 750_000)

    def test_session_mode_transactions(self) -> None:
        """In session mode the server stays, and each autocommit query is a transaction."""
        relay, client, pool, backends, reactor = relay_setup(mode="session")
        attached(relay, reactor, backends, m.query("select 1"))
        relay.clientData(m.query("select 2"))
        backends.flush()
        self.assertEqual(counts(pool.stats), (1, 2, 2))

    def test_error_in_transaction_keeps_it_open(self) -> None:
        """A failed statement inside a transaction ends a query, not the transaction
        (status E); ROLLBACK ends it."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("BEGIN"))
        relay.clientData(m.query("select 1/0"))
        backends.flush()
        self.assertEqual(pool.stats.xacts, 0)
        relay.clientData(m.query("ROLLBACK"))
        backends.flush()
        self.assertEqual(counts(pool.stats), (1, 1, 3))

    def test_cancel_and_reset_counted(self) -> None:
        """A forwarded cancel counts, and so does the cleanup of a server whose client
        left mid-query."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("select pg_sleep(1)"))
        relay.cancelRequest()
        self.assertEqual(pool.stats.cancels, 1)
        relay.clientGone()
        self.assertEqual(pool.stats.resets, 1)


class PoolCountsTests(SynchronousTestCase):
    def test_connects_and_closes_by_reason(self) -> None:
        """Each server opened is a connect; one discarded in doubt is a 'dirty' close."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("select 1"))
        self.assertEqual(pool.stats.server_connects, 1)
        pool.discard(backends[0].server)
        self.assertEqual(pool.stats.closes, {"dirty": 1})

    def test_lost_server(self) -> None:
        """A server whose connection closes under the pool is a 'lost' close."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("select 1"))
        backends[0].close()
        self.assertEqual(pool.stats.closes, {"lost": 1})


class TotalsTests(SynchronousTestCase):
    def test_averages_are_pgbouncers(self) -> None:
        """Counts and bytes per second over the period; times per query, per
        transaction and per assignment, as PgBouncer's calc_average."""
        older = Totals(10, 10, 20, 1000, 2000, 100, 50, 0)
        newer = Totals(30, 30, 60, 3000, 6000, 500, 250, 400)
        self.assertEqual(newer.averages(older, 10.0), Totals(2, 2, 4, 200, 400, 20, 5, 20))
        self.assertEqual(newer.averages(newer, 10.0), Totals())
        self.assertEqual(newer.averages(older, 0.0), Totals())

    def test_period_turns(self) -> None:
        """A turn of the period moves each pool's snapshots; averages then cover the time
        since the previous turn."""
        stats = PoolStats()
        period = Period(100.0, 60.0)
        stats.xacts = 5
        period.turn(160.0, [stats])
        stats.xacts = 65
        period.turn(220.0, [stats])
        self.assertEqual((stats.older.xact_count, stats.newer.xact_count), (5, 65))
        self.assertEqual(period.seconds(250.0), 90.0)
        self.assertEqual(stats.totals().averages(stats.older, period.seconds(220.0)).xact_count, 1)

    def test_total(self) -> None:
        self.assertEqual(total([Totals(1, 2), Totals(3, 4)]), Totals(4, 6))


class HistogramTests(SynchronousTestCase):
    def test_cumulative_buckets(self) -> None:
        """Observations land in the first bucket whose bound is at or above them;
        cumulative counts end with +Inf holding everything."""
        h = Histogram()
        for us in (50, 100, 101, 10**9):
            h.observe(us)
        buckets = dict(h.cumulative())
        self.assertEqual((buckets["0.0001"], buckets["0.00025"], buckets["60.0"], buckets["+Inf"]),
                         (2, 3, 3, 4))
        self.assertEqual(h.sum, 50 + 100 + 101 + 10**9)


class LoginFailureTests(SynchronousTestCase):
    def test_reasons(self) -> None:
        failures = LoginFailures()
        for sqlstate in ("28P01", "28P01", "3D000", "XX000"):
            failures.count(sqlstate)
        self.assertEqual(failures.counts, {"password": 2, "unknown_database": 1, "other": 1})

