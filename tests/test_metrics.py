"""The Prometheus endpoint, scraped over HTTP and read with prometheus_client's own
parser after real psycopg activity: values match the console's, refused logins are
counted by reason, gauges follow a client inside a transaction."""

from __future__ import annotations

import urllib.request
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks

from twisted.trial.unittest import SynchronousTestCase

from odissey.metrics import Snapshot, _Figures
from tests.harness import IntegrationTest, route

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
APP = (("database", "app"), ("route", ""), ("user", "app"))


class MetricsTests(IntegrationTest):
    top = {"admin_users": ["app"], "metrics": {"listen": "tcp:0:interface=127.0.0.1"}}

    def routes(self) -> list[dict[str, Any]]:
        return [route("app", "app", pool={"mode": "transaction", "size": 2})]

    def scrape(self) -> tuple[str, str]:
        port = self.odissey.service.metrics_port.getHost().port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return reply.headers["content-type"], reply.read().decode()

    def samples(self) -> Samples:
        _type, text = self.scrape()
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def totals(self) -> dict[str, Any]:
        with psycopg.connect(self.odissey.dsn(dbname="odissey"), autocommit=True,
                             cursor_factory=psycopg.ClientCursor, connect_timeout=10) as conn:
            cur = conn.execute("SHOW STATS_TOTALS")
            names = [d.name for d in cur.description]
            return next(dict(zip(names, row)) for row in cur.fetchall() if row[0] == "app")

    def work(self, n: int) -> None:
        with self.odissey.connect() as conn:
            for i in range(n):
                conn.execute("select %s::int", (i,), prepare=False)

    @inlineCallbacks
    def test_values_match_the_console(self):
        """After real transactions the counters scraped equal SHOW STATS_TOTALS', and the
        transaction histogram counted each one."""
        yield self.thread(self.work, 25)
        content_type, _text = yield self.thread(self.scrape)
        self.assertTrue(content_type.startswith("text/plain"), content_type)
        samples = yield self.thread(self.samples)
        console = yield self.thread(self.totals)
        for metric, column in (("odissey_pool_transactions_total", "xact_count"),
                               ("odissey_pool_queries_total", "query_count"),
                               ("odissey_pool_received_bytes_total", "bytes_received"),
                               ("odissey_pool_sent_bytes_total", "bytes_sent"),
                               ("odissey_pool_server_assignments_total", "server_assignment_count")):
            self.assertEqual(samples[(metric, APP)], console[column], metric)
        self.assertEqual(samples[("odissey_pool_transactions_total", APP)], 25)
        self.assertEqual(samples[("odissey_pool_transaction_duration_seconds_count", APP)], 25)
        self.assertAlmostEqual(samples[("odissey_pool_transaction_duration_seconds_sum", APP)],
                               console["xact_time"] / 1e6, places=5)
        self.assertEqual(samples[("odissey_pool_logins_total", APP)], 1)
        self.assertEqual(samples[("odissey_pool_server_connects_total", APP)], 1)

    @inlineCallbacks
    def test_gauges_follow_a_transaction(self):
        """A client inside a transaction: one client and one server active; after
        COMMIT the server is idle."""
        conn = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(conn.execute, "begin")
            samples = yield self.thread(self.samples)
            self.assertEqual(samples[("odissey_pool_client_active_connections", APP)], 1)
            self.assertEqual(samples[("odissey_pool_server_active_connections", APP)], 1)
            self.assertEqual(samples[("odissey_pool_server_idle_connections", APP)], 0)
            yield self.thread(conn.execute, "commit")
            samples = yield self.thread(self.samples)
            self.assertEqual(samples[("odissey_pool_server_active_connections", APP)], 0)
            self.assertEqual(samples[("odissey_pool_server_idle_connections", APP)], 1)
        finally:
            yield self.thread(conn.close)

    @inlineCallbacks
    def test_login_failures_by_reason(self):
        """A wrong password and an unknown database are counted under their reasons."""
        def refused(**kwargs: str) -> None:
            try:
                psycopg.connect(self.odissey.dsn(**kwargs), connect_timeout=10).close()
            except psycopg.OperationalError:
                return
            raise AssertionError(f"login {kwargs} was not refused")

        yield self.thread(refused, password="wrong")
        yield self.thread(refused, password="wrong")
        yield self.thread(refused, dbname="nope")
        samples = yield self.thread(self.samples)
        self.assertEqual(samples[("odissey_login_failures_total", (("reason", "password"),))], 2)
        self.assertEqual(samples[("odissey_login_failures_total", (("reason", "unknown_database"),))], 1)


class AddedTests(SynchronousTestCase):
    """Workers' snapshots as the master adds them up (after their JSON trip)."""

    def test_added_per_pool_and_reason(self) -> None:
        one = Snapshot([_Figures(["app", "u", ""], (1, 0, 1, 2, 0, 0), (5, 6), {"idle": 1}, None,
                                 (([1, 2], 10),))], {"auth": 1})
        two = Snapshot([_Figures(["app", "u", ""], (2, 1, 0, 1, 0, 1), (3, 4), {"idle": 2, "error": 1},
                                 (1, 1, 2), (([0, 3], 5),)),
                        _Figures(["db", "u", ""], (0,) * 6, (1, 1), {}, None, (([], 0),))], {"other": 2})
        added = Snapshot.added(Snapshot.from_json(s.to_json()) for s in (one, two))
        app = next(f for f in added.pools if f.labels == ["app", "u", ""])
        self.assertEqual(app.gauges, (3, 1, 1, 3, 0, 1))
        self.assertEqual(app.counters, (8, 10))
        self.assertEqual(app.closes, {"idle": 3, "error": 1})
        self.assertEqual(app.parses, (1, 1, 2))
        self.assertEqual(app.histograms, (([1, 5], 15),))
        self.assertEqual(len(added.pools), 2)
        self.assertEqual(added.login_failures, {"auth": 1, "other": 2})
