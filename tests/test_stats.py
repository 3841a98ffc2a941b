"""The per-pool counters (stats.py) as the relay and the pool keep them: transactions,
queries, bytes, times and waits, driven through a relay with fake backends on a clock;
then SHOW STATS and friends after real activity through psycopg and psql."""

from __future__ import annotations

from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from odissey import stats as stats_module
from odissey.relay import Relay
from odissey.stats import Histogram, LoginFailures, Period, PoolStats, Ticker, Totals, cumulative, total
from odissey.testing import FakeClient
from odissey.wire import messages as m
from tests.harness import IntegrationTest, have, route, until
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
        self.assertEqual(stats.query_hist.counts[(1_500_000_000).bit_length()], 1)

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
        stats = PoolStats(clock=lambda: 1_000_000)
        period = Period(100.0, 60.0)
        for _ in range(5):
            stats.ended(0, 0, b"I")
        period.turn(160.0, [stats])
        for _ in range(60):
            stats.ended(0, 0, b"I")
        period.turn(220.0, [stats])
        self.assertEqual((stats.older.xact_count, stats.newer.xact_count), (5, 65))
        self.assertEqual(period.seconds(250.0), 90.0)
        self.assertEqual(stats.totals().averages(stats.older, period.seconds(220.0)).xact_count, 1)

    def test_total(self) -> None:
        self.assertEqual(total([Totals(1, 2), Totals(3, 4)]), Totals(4, 6))


class TickerTests(SynchronousTestCase):
    def test_one_line_per_active_pool(self) -> None:
        """Each turn logs PgBouncer's figures for every pool active in the period just
        ended, named; a quiet pool logs nothing, and log_stats off logs nothing."""
        events: list[dict] = []
        self.patch(stats_module, "log", Logger(observer=events.append))
        clock = Clock()
        busy, quiet = PoolStats(clock=lambda: 2_000_000), PoolStats()
        pools = [("app/app", busy), ("other/u", quiet)]
        ticker = Ticker(clock, Period(clock.seconds(), 10.0), lambda: pools, True)
        ticker.turn()
        for _ in range(50):
            self.assertIsNone(busy.ended(1_000_000, 0, b"I"))  # (a query of 1 ms in a transaction of 2 ms)
        busy.received = 4000
        clock.advance(10)
        ticker.turn()
        lines = [formatEvent(e) for e in events]
        self.assertEqual(lines, [
            "stats: app/app: 5 xacts/s, 5 queries/s, 0 client parses/s, 0 server parses/s, "
            "0 binds/s, in 400 B/s, out 0 B/s, xact 2000 us, query 1000 us, wait 0 us"])
        self.assertEqual(events[0]["pool"], "app/app")
        clock.advance(10)
        ticker.turn()  # nothing happened since
        self.assertEqual(len(events), 1)
        ticker.log_stats = False
        self.assertEqual(busy.ended(1_000_000, 0, b"T"), 0)  # (the transaction goes on)
        clock.advance(10)
        ticker.turn()
        self.assertEqual(len(events), 1)


class HistogramTests(SynchronousTestCase):
    def test_cumulative_buckets(self) -> None:
        """An observation counts under every bound at or above it (bounds are powers of
        two of nanoseconds); +Inf holds everything; the sum is kept exactly."""
        h = Histogram()
        for ns in (1000, 2**18 - 1, 2**18, 10**12):
            h.observe(ns)
        buckets = dict(cumulative(h.counts))
        self.assertEqual(len(buckets), 11)
        self.assertEqual((buckets["0.000262144"], buckets["0.001048576"], buckets["68.719476736"],
                          buckets["+Inf"]), (2, 3, 3, 4))
        self.assertEqual((h.count, h.sum, h.us), (4, 1000 + 2**19 - 1 + 10**12, (1000 + 2**19 - 1 + 10**12) // 1000))


class LoginFailureTests(SynchronousTestCase):
    def test_reasons(self) -> None:
        failures = LoginFailures()
        for sqlstate in ("28P01", "28P01", "3D000", "XX000"):
            failures.count(sqlstate)
        self.assertEqual(failures.counts, {"password": 2, "unknown_database": 1, "other": 1})



#: PgBouncer 1.25's SHOW STATS columns, in order.
STATS_COLUMNS = [
    "database", "total_server_assignment_count", "total_xact_count", "total_query_count",
    "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
    "total_client_parse_count", "total_server_parse_count", "total_bind_count",
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
    "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
    "avg_server_parse_count", "avg_bind_count"]


class ConsoleStatsTests(IntegrationTest):
    """SHOW STATS and friends after real psycopg and psql activity."""

    top = {"admin_users": ["app"]}

    def routes(self) -> list[dict[str, Any]]:
        return [route("app", "app", pool={"mode": "transaction", "size": 1, "max_prepared_statements": 100})]

    def show(self, what: str) -> list[dict[str, Any]]:
        with psycopg.connect(self.odissey.dsn(dbname="pgbouncer"), autocommit=True,
                             cursor_factory=psycopg.ClientCursor, connect_timeout=10) as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [d.name for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def app_totals(self) -> dict[str, Any]:
        return next(r for r in self.show("STATS_TOTALS") if r["database"] == "app")

    def work(self, n: int, prepare: bool = False) -> None:
        with self.odissey.connect() as conn:
            for i in range(n):
                conn.execute("select %s::int", (i % 10,), prepare=prepare)
            with conn.transaction():
                conn.execute("select 1")

    @inlineCallbacks
    def test_counters_follow_transactions(self):
        """N autocommit queries and one BEGIN/select/COMMIT move the transactions by
        N + 1 and the queries by N + 3; two identical runs move the bytes alike."""
        yield self.thread(self.work, 1)  # the pool exists from here on
        before = yield self.thread(self.app_totals)
        yield self.thread(self.work, 20)
        middle = yield self.thread(self.app_totals)
        yield self.thread(self.work, 20)
        after = yield self.thread(self.app_totals)
        first = {k: middle[k] - before[k] for k in before if k != "database"}
        second = {k: after[k] - middle[k] for k in before if k != "database"}
        self.assertEqual((first["xact_count"], first["query_count"]), (21, 23))
        self.assertEqual(first["server_assignment_count"], 21)
        self.assertGreater(first["bytes_received"], 0)
        self.assertGreater(first["bytes_sent"], first["bytes_received"])  # results, not just requests
        for key in ("xact_count", "query_count", "bytes_received", "bytes_sent", "server_assignment_count"):
            self.assertEqual(first[key], second[key], key)
        self.assertGreater(first["xact_time"], 0)
        self.assertGreaterEqual(first["xact_time"], first["query_time"] - first["wait_time"])

    @inlineCallbacks
    def test_wait_time_when_clients_queue(self):
        """With one server held in a transaction, a second client's query waits until
        the commit: about that long shows in total_wait_time."""
        yield self.thread(self.work, 1)
        before = yield self.thread(self.app_totals)
        holder = yield self.thread(self.odissey.connect)
        yield self.thread(holder.execute, "begin")
        yield self.thread(holder.execute, "select 1")
        pool = next(iter(self.odissey.service.pools.pools.values()))
        queued = self.thread(self.work, 0)
        yield until(lambda: len(pool.waiters) == 1, 10, "a client queued")
        yield deferLater(reactor, 0.3, lambda: None)  # (the wait being measured)
        yield self.thread(holder.execute, "commit")
        yield queued
        yield self.thread(holder.close)
        after = yield self.thread(self.app_totals)
        waited = after["wait_time"] - before["wait_time"]
        self.assertGreaterEqual(waited, 300_000)
        self.assertLess(waited, 10_000_000)

    @inlineCallbacks
    def test_prepared_statement_counts(self):
        """psycopg's prepared statements count client parses, server parses and binds."""
        yield self.thread(self.work, 1)
        before = yield self.thread(self.app_totals)
        yield self.thread(self.work, 10, True)
        after = yield self.thread(self.app_totals)
        self.assertEqual(after["client_parse_count"] - before["client_parse_count"], 1)
        self.assertEqual(after["server_parse_count"] - before["server_parse_count"], 1)
        self.assertEqual(after["bind_count"] - before["bind_count"], 10)

    @inlineCallbacks
    def test_averages_and_totals(self):
        """Before the period turns, averages are over the time since start: the average
        transaction time is the total over the count; SHOW TOTALS sums every database."""
        yield self.thread(self.work, 5)
        stats = yield self.thread(self.show, "STATS")
        app = next(r for r in stats if r["database"] == "app")
        self.assertEqual(list(app), STATS_COLUMNS)
        self.assertEqual(app["avg_xact_time"], app["total_xact_time"] // app["total_xact_count"])
        self.assertEqual(app["avg_query_time"], app["total_query_time"] // app["total_query_count"])
        self.assertGreater(app["avg_xact_count"] + app["avg_query_count"], 0)
        averages = yield self.thread(self.show, "STATS_AVERAGES")
        self.assertEqual(next(r for r in averages if r["database"] == "app")["xact_time"],
                         app["avg_xact_time"])
        totals = {r["name"]: r["value"] for r in (yield self.thread(self.show, "TOTALS"))}
        self.assertEqual(totals["total_xact_count"], app["total_xact_count"])
        self.assertEqual(totals["total_client_bytes"], app["total_received"])
        self.assertEqual(totals["total_server_bytes"], app["total_sent"])
        self.assertEqual(totals["avg_xact_time"], app["avg_xact_time"])
        self.assertEqual(len(totals), 22)

    @inlineCallbacks
    def test_psql_show_stats_and_state(self):
        """psql reads SHOW STATS (a row for the database used) and SHOW STATE."""
        if not have("psql"):
            raise SkipTest("psql is not installed")
        done = yield self.thread(self.odissey.psql, "select 1")
        self.assertEqual(done.returncode, 0, done.stderr)
        shown = yield self.thread(self.odissey.psql, "SHOW STATS", dbname="odissey")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        rows = {line.split("|")[0]: line.split("|") for line in shown.stdout.splitlines()}
        self.assertEqual(len(rows["app"]), len(STATS_COLUMNS))
        self.assertGreaterEqual(int(rows["app"][STATS_COLUMNS.index("total_xact_count")]), 1)
        state = yield self.thread(self.odissey.psql, "SHOW STATE", dbname="odissey")
        self.assertEqual(state.stdout.split(), ["active|yes", "paused|no"])
