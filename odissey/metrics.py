"""The Prometheus endpoint: ``metrics: {listen: ...}`` serves the text format from a
twisted.web resource, written by ``prometheus_client`` (no hand-made exposition).

A custom collector reads the live pools, clients and counters (stats.py) when scraped:
the hot path keeps its plain integer adds and never touches a metric object, so the
cost of metrics is paid by the scrape, not by every transaction. The families are read
on the reactor thread (the pools are not safe to read from another); only the text is
rendered in a thread, so a scrape of many pools does not stall every client for the
time formatting takes.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Protocol as TypingProtocol, Union

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import generate_latest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from odissey.auth.secrets import InThread
from odissey.pool import Pool, Pools
from odissey.server import ServerState
from odissey.stats import LoginFailures, cumulative

LABELS = ["database", "user", "route"]
#: Per-pool counters: (metric name without _total, help, PoolStats attribute).
COUNTERS = (
    ("odissey_pool_transactions", "Transactions ended (ReadyForQuery idle).", "xacts"),
    ("odissey_pool_queries", "Queries ended (nothing outstanding after a ReadyForQuery).", "queries"),
    ("odissey_pool_received_bytes", "Bytes received from clients.", "received"),
    ("odissey_pool_sent_bytes", "Bytes sent to clients (from servers).", "sent"),
    ("odissey_pool_server_assignments", "Times a server was handed to a client.", "assignments"),
    ("odissey_pool_logins", "Clients logged in to the pool.", "logins"),
    ("odissey_pool_server_connects", "Server connections opened (logged in).", "server_connects"),
    ("odissey_pool_server_connect_failures", "Server connection attempts that failed.",
     "connect_failures"),
    ("odissey_pool_cancels", "Cancel requests forwarded to PostgreSQL.", "cancels"),
    ("odissey_pool_resets", "Servers cleaned before reuse (reset query, rollback, cancel wait).",
     "resets"),
)
GAUGES = (
    ("odissey_pool_client_active_connections", "Logged-in clients not waiting for a server."),
    ("odissey_pool_client_waiting_connections", "Clients queued for a server."),
    ("odissey_pool_server_active_connections", "Servers attached to a client."),
    ("odissey_pool_server_idle_connections", "Idle servers in the pool."),
    ("odissey_pool_server_tested_connections",
     "Servers running Odissey's own statements (parameter sync, reset, cleanup)."),
    ("odissey_pool_server_login_connections", "Server connections being opened."),
)
PARSES = (
    ("odissey_pool_client_parses", "Named statements prepared by clients (transaction mode)."),
    ("odissey_pool_server_parses", "Parse messages Odissey sent servers for them."),
    ("odissey_pool_binds", "Binds of named statements."),
)
HISTOGRAMS = (
    ("odissey_pool_transaction_duration_seconds", "Transaction time, first query to idle.",
     "xact_hist"),
    ("odissey_pool_query_duration_seconds", "Query time, start to nothing outstanding.",
     "query_hist"),
    ("odissey_pool_wait_duration_seconds", "Time clients queued for a server (clients that queued).",
     "wait_hist"),
)


class MetricsClient(TypingProtocol):
    """What the collector reads of a client connection (``ClientConnection`` is one)."""

    relay: Any


def _labels(pool: Pool) -> list[str]:
    route = pool.key.route
    return [pool.key.database, pool.key.user, "" if route is None else str(route)]


class _Figures(NamedTuple):
    """One pool's numbers at scrape time: copied on the reactor thread, plain data."""

    labels: list[str]
    gauges: tuple[int, ...]
    counters: tuple[int, ...]
    closes: dict[str, int]
    parses: Optional[tuple[int, int, int]]
    histograms: tuple[tuple[list[int], int], ...]  # (counts by bit length, sum in ns)


class PoolCollector:
    """Reads the pools as they are at scrape time: :meth:`snapshot` copies the numbers
    (cheap, on the reactor thread), the snapshot builds the families wherever it runs."""

    def __init__(self, pools: Pools, clients: Callable[[], Iterable[MetricsClient]],
                 login_failures: Callable[[], LoginFailures]) -> None:
        self.pools = pools
        self.clients = clients
        self.login_failures = login_failures

    def snapshot(self) -> "Snapshot":
        active: dict[Pool, int] = {}
        waiting: dict[Pool, int] = {}
        for client in list(self.clients()):
            relay = client.relay
            if relay is not None:
                counts = waiting if relay.state.value == "waiting" else active
                counts[relay.pool] = counts.get(relay.pool, 0) + 1
        figures = []
        for pool in list(self.pools.pools.values()):
            stats = pool.stats
            busy = sum(1 for server in pool.active if server.state is ServerState.ACTIVE)
            registry = pool.statements
            figures.append(_Figures(
                _labels(pool),
                (active.get(pool, 0), waiting.get(pool, 0), busy, len(pool.idle),
                 len(pool.active) - busy, pool.opening),
                tuple(getattr(stats, attribute) for _name, _text, attribute in COUNTERS),
                dict(stats.closes),
                (registry.client_parses, registry.server_parses, registry.binds)
                if registry is not None else None,
                tuple((list(h.counts), h.sum) for h in (stats.xact_hist, stats.query_hist, stats.wait_hist)),
            ))
        return Snapshot(figures, dict(self.login_failures().counts))


class Collector(TypingProtocol):
    """What the endpoint scrapes: this process's pools (:class:`PoolCollector`), or a
    master's workers' added up (``odissey.workers``), which takes an AMP round trip."""

    def snapshot(self) -> "Union[Snapshot, Deferred[Snapshot]]": ...


class Snapshot:
    """A prometheus_client collector over numbers copied at scrape time."""

    def __init__(self, pools: list[_Figures], login_failures: dict[str, int]) -> None:
        self.pools = pools
        self.login_failures = login_failures

    def to_json(self) -> str:
        """The numbers as JSON, for a worker's master."""
        return json.dumps([[list(f) for f in self.pools], self.login_failures])

    @classmethod
    def from_json(cls, text: str) -> "Snapshot":
        pools, failures = json.loads(text)
        return cls([_Figures(labels, tuple(gauges), tuple(counters), closes,
                             tuple(parses) if parses is not None else None,
                             tuple((counts, ns) for counts, ns in histograms))
                    for labels, gauges, counters, closes, parses, histograms in pools], failures)

    @classmethod
    def added(cls, snapshots: Iterable["Snapshot"]) -> "Snapshot":
        """Several processes' numbers (workers) as one's: per pool (its labels) and
        login failure reason, every gauge, counter and histogram bucket added up."""
        pools: dict[tuple[str, ...], _Figures] = {}
        failures: dict[str, int] = {}
        for snapshot in snapshots:
            for reason, count in snapshot.login_failures.items():
                failures[reason] = failures.get(reason, 0) + count
            for figures in snapshot.pools:
                key = tuple(figures.labels)
                before = pools.get(key)
                pools[key] = figures if before is None else _Figures(
                    figures.labels, _add(before.gauges, figures.gauges), _add(before.counters, figures.counters),
                    {reason: before.closes.get(reason, 0) + figures.closes.get(reason, 0)
                     for reason in set(before.closes) | set(figures.closes)},
                    _add(before.parses, figures.parses) if before.parses and figures.parses
                    else before.parses or figures.parses,
                    tuple((_add(a[0], b[0]), a[1] + b[1]) for a, b in zip(before.histograms, figures.histograms)))
        return cls(list(pools.values()), failures)

    def collect(self) -> Iterator[Metric]:
        gauges = [GaugeMetricFamily(name, text, labels=LABELS) for name, text in GAUGES]
        counters = [CounterMetricFamily(name, text, labels=LABELS) for name, text, _ in COUNTERS]
        closes = CounterMetricFamily("odissey_pool_server_closes", "Server connections closed, by reason.",
                                     labels=LABELS + ["reason"])
        parses = [CounterMetricFamily(name, text, labels=LABELS) for name, text in PARSES]
        histograms = [HistogramMetricFamily(name, text, labels=LABELS) for name, text, _ in HISTOGRAMS]
        for pool in self.pools:
            labels = pool.labels
            for gauge, value in zip(gauges, pool.gauges):
                gauge.add_metric(labels, value)
            for counter, value in zip(counters, pool.counters):
                counter.add_metric(labels, value)
            for reason, count in pool.closes.items():
                closes.add_metric(labels + [reason], count)
            if pool.parses is not None:  # (transaction mode with prepared statements only)
                for counter, value in zip(parses, pool.parses):
                    counter.add_metric(labels, value)
            for family, (counts, total_ns) in zip(histograms, pool.histograms):
                family.add_metric(labels, [(le, float(n)) for le, n in cumulative(counts)], total_ns / 1e9)
        yield from gauges
        yield from counters
        yield closes
        yield from parses
        yield from histograms
        failures = CounterMetricFamily("odissey_login_failures", "Refused logins, by reason.",
                                       labels=["reason"])
        for reason, count in sorted(self.login_failures.items()):
            failures.add_metric([reason], count)
        yield failures


def _add(a: Any, b: Any) -> Any:
    """Two equally long sequences of numbers, added element by element (a tuple for
    a tuple, a list for a list)."""
    return type(a)(x + y for x, y in zip(a, b))


class MetricsResource(Resource):
    """Every path answers with the metrics (``/metrics`` by convention)."""

    isLeaf = True

    def __init__(self, collector: Collector, threads: InThread) -> None:
        super().__init__()
        self.collector = collector
        self.threads = threads

    def _render(self, snapshot: Snapshot) -> "Deferred[bytes]":
        registry = CollectorRegistry(auto_describe=False)
        registry.register(snapshot)
        return self.threads(generate_latest, registry)

    def render_GET(self, request: Request) -> Any:
        taken: Deferred[Snapshot] = maybeDeferred(self.collector.snapshot)  # type: ignore[call-overload]
        rendering = taken.addCallback(self._render)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(text: bytes) -> None:
            if gone:
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.write(text)
            request.finish()

        def failed(failure: Any) -> None:
            if gone:
                return
            request.setResponseCode(500)
            request.write(f"could not render metrics: {failure.getErrorMessage()}\n".encode())
            request.finish()

        rendering.addCallbacks(send, failed)
        return NOT_DONE_YET


class MetricsSite(Site):
    """The endpoint's factory: no access log line per scrape, no factory noise."""

    noisy = False

    def log(self, request: HTTPRequest) -> None:
        pass
