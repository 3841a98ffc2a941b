"""Per-pool counters, as PgBouncer keeps them, and their averages over ``stats_period``.

One :class:`PoolStats` per pool holds plain integers that the relay and the pool add to
at points that already exist on their paths: bytes once per chunk, a query and a
transaction where a ReadyForQuery ends them, a wait when a waiting client is granted a
server. Nothing here runs per message. The console (SHOW STATS...), the metrics
endpoint and the periodic log line all read the same counters, at the time they are
asked, so observability costs the hot path the same whether anybody looks or not.

Times are shown in microseconds, as PgBouncer's (kept in nanoseconds). A query is timed
from the client chunk that starts it (the monotonic clock is read there only when no
query is being timed) to the ReadyForQuery that leaves nothing outstanding (one more
clock read): two clock reads per query, none per chunk. A transaction is timed from its first query's start to the
ReadyForQuery that reports it idle, with no clock read of its own. Like PgBouncer's,
pipelined queries are timed as one busy stretch: the time a client had work in flight.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, NamedTuple, Optional, Protocol as TypingProtocol

from twisted.internet.interfaces import IReactorTime

from odissey.logs import Logger

log = Logger()

#: Exported histogram bounds, as powers of two of nanoseconds: 2**18 ns (262 µs) to
#: 2**36 ns (69 s), a factor of four apart. Ten bounds: each is a line per pool and
#: histogram in every scrape (with 1000 pools, a bound more is 3000 lines more).
BOUND_BITS = tuple(range(18, 37, 2))


def interval_clock(reactor: IReactorTime) -> Callable[[], int]:
    """Integer nanoseconds to time intervals with: the monotonic clock when the reactor
    keeps real time (its ``seconds`` is the wall clock), the reactor's own time when it is
    a fake one (tests move a ``Clock``)."""
    if reactor.seconds is time.time:
        return time.monotonic_ns
    seconds = reactor.seconds
    return lambda: int(seconds() * 1_000_000_000)


def cumulative(counts: list[int]) -> list[tuple[str, int]]:
    """(le in seconds, observations at or below it) for a histogram's counts by
    bit length, as Prometheus wants them, the last one +Inf. An observation of bit
    length ``b`` is below 2**b ns, so it is counted under every bound from 2**b up."""
    out, running, taken = [], 0, 0
    for bits in BOUND_BITS:
        running += sum(counts[taken:bits + 1])
        taken = bits + 1
        out.append((repr((1 << bits) / 1e9), running))
    out.append(("+Inf", running + sum(counts[taken:])))
    return out


class Histogram:
    """Counts by bit length of the nanoseconds observed (power-of-two buckets: the
    bucket is ``ns.bit_length()``, no search) and their sum. The count and the sum are
    also the pool's count and total time of what it observes (nothing counted twice)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * 65
        self.sum = 0  # ns

    def observe(self, ns: int) -> None:
        self.counts[ns.bit_length()] += 1
        self.sum += ns

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def us(self) -> int:
        return self.sum // 1000


class Totals(NamedTuple):
    """PgBouncer's per-pool counters (its ``PgStats``), in SHOW STATS_TOTALS' order."""

    server_assignment_count: int = 0
    xact_count: int = 0
    query_count: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    xact_time: int = 0
    query_time: int = 0
    wait_time: int = 0
    client_parse_count: int = 0
    server_parse_count: int = 0
    bind_count: int = 0

    def plus(self, other: "Totals") -> "Totals":
        return Totals(*(a + b for a, b in zip(self, other)))

    def averages(self, older: "Totals", seconds: float) -> "Totals":
        """PgBouncer's averages from ``older`` (taken ``seconds`` ago) to these: counts and
        bytes per second, times per query, per transaction and per assignment."""
        if seconds <= 0:
            return Totals()
        d = Totals(*(a - b for a, b in zip(self, older)))
        return Totals(
            server_assignment_count=int(d.server_assignment_count / seconds),
            xact_count=int(d.xact_count / seconds),
            query_count=int(d.query_count / seconds),
            bytes_received=int(d.bytes_received / seconds),
            bytes_sent=int(d.bytes_sent / seconds),
            xact_time=d.xact_time // d.xact_count if d.xact_count > 0 else 0,
            query_time=d.query_time // d.query_count if d.query_count > 0 else 0,
            wait_time=d.wait_time // d.server_assignment_count if d.server_assignment_count > 0 else 0,
            client_parse_count=int(d.client_parse_count / seconds),
            server_parse_count=int(d.server_parse_count / seconds),
            bind_count=int(d.bind_count / seconds),
        )


def total(totals: Iterable[Totals]) -> Totals:
    out = Totals()
    for one in totals:
        out = out.plus(one)
    return out


class ParseCounts(TypingProtocol):
    """The prepared-statement layer's counters (``statements.Registry``), kept where
    the Parse and Bind messages are rewritten."""

    client_parses: int
    server_parses: int
    binds: int


class PoolStats:
    """One pool's counters. Attributes are added to directly by their owners (an
    attribute add is the cheapest thing Python does); the methods are for the paths
    that run once per query or less."""

    __slots__ = (
        "assignments", "received", "sent", "logins", "server_connects", "connect_failures", "cancels", "resets", "closes",
        "xact_hist", "query_hist", "wait_hist", "older", "newer", "parses", "clock",
    )

    def __init__(self, parses: Optional[ParseCounts] = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        #: Integer nanoseconds that queries and transactions are timed with (see
        #: :func:`interval_clock`): the relays read it at a query's start, :meth:`ended`
        #: at its end.
        self.clock = clock
        #: Transaction mode's prepared statements, when on (their counts are PgBouncer's
        #: client/server parse and bind counts; 0 without them, as in PgBouncer).
        self.parses = parses
        self.assignments = 0  # a server handed to a client (taken, or granted after a wait)
        self.received = 0  # bytes from clients
        self.sent = 0  # bytes from servers to clients
        self.logins = 0
        self.server_connects = 0
        self.connect_failures = 0
        self.cancels = 0  # cancel requests forwarded to PostgreSQL
        self.resets = 0  # servers cleaned (reset query, rollback, cancel wait) before reuse
        #: Server connections closed, by reason (see docs/operations.md).
        self.closes: dict[str, int] = {}
        #: Transactions, queries, and waits of clients that queued: counts and times.
        self.xact_hist = Histogram()
        self.query_hist = Histogram()
        self.wait_hist = Histogram()
        #: The totals at the last two period ticks (PgBouncer's newer/older_stats).
        self.older = Totals()
        self.newer = Totals()

    @property
    def xacts(self) -> int:
        return self.xact_hist.count

    @property
    def queries(self) -> int:
        return self.query_hist.count

    @property
    def xact_us(self) -> int:
        return self.xact_hist.us

    @property
    def query_us(self) -> int:
        return self.query_hist.us

    @property
    def wait_us(self) -> int:
        return self.wait_hist.us

    def ended(self, query_at: int, xact_at: int, status: bytes) -> Optional[int]:
        """A query that began at ``query_at`` (ns, :attr:`clock`) ends now, and with it,
        if ``status`` is ``I``, the transaction that began at ``xact_at``. Returns when
        the transaction began if it goes on, None if it ended (the relay keeps that).

        Once per query, so it is one call that reads the clock itself and writes the
        histograms out: integer adds, no search (callgrind: a ``bisect`` and a float
        conversion per histogram cost twice this; the relay's own method around it, as
        much as the counting)."""
        now = self.clock()
        ns = now - query_at
        histogram = self.query_hist
        histogram.counts[ns.bit_length()] += 1
        histogram.sum += ns
        if status != b"I":
            return xact_at
        ns = now - xact_at
        histogram = self.xact_hist
        histogram.counts[ns.bit_length()] += 1
        histogram.sum += ns
        return None

    def waited(self, seconds: float) -> None:
        """A client that queued for a server got one after ``seconds`` (written out:
        once per transaction when clients outnumber servers)."""
        ns = int(seconds * 1_000_000_000)
        histogram = self.wait_hist
        histogram.counts[ns.bit_length()] += 1
        histogram.sum += ns

    def closed(self, reason: str) -> None:
        self.closes[reason] = self.closes.get(reason, 0) + 1

    def totals(self) -> Totals:
        parses = self.parses
        return Totals(self.assignments, self.xacts, self.queries, self.received, self.sent,
                      self.xact_us, self.query_us, self.wait_us,
                      *((parses.client_parses, parses.server_parses, parses.binds)
                        if parses is not None else ()))

    def tick(self) -> None:
        """The stats period turned: the averages now run from the previous turn."""
        self.older = self.newer
        self.newer = self.totals()


class Period:
    """The stats period's clock, shared by all pools: PgBouncer's ``old_stamp``/
    ``new_stamp``. Averages run from the second-last turn to now, so they cover between
    one and two periods and never an empty one."""

    def __init__(self, now: float, period: float) -> None:
        self.period = period
        self.new_stamp = now
        self.old_stamp = now - 1.0  # (as PgBouncer: the first averages are over a second)

    def turn(self, now: float, pools: Iterable[PoolStats]) -> None:
        self.old_stamp, self.new_stamp = self.new_stamp, now
        for stats in pools:
            stats.tick()

    def seconds(self, now: float) -> float:
        """What averages read now are taken over."""
        return now - self.old_stamp


class Ticker:
    """Turns the stats period (the service calls :meth:`turn` every ``stats_period``)
    and, with ``log_stats``, logs one line per pool that did anything in the period
    just ended: PgBouncer's "stats: ... xacts/s" line, per pool."""

    def __init__(self, clock: IReactorTime, period: Period,
                 pools: Callable[[], Iterable[tuple[str, PoolStats]]], log_stats: bool) -> None:
        self.clock = clock
        self.period = period
        self.pools = pools
        self.log_stats = log_stats

    def turn(self) -> None:
        now = self.clock.seconds()
        seconds = now - self.period.new_stamp
        named = list(self.pools())
        self.period.turn(now, (stats for _name, stats in named))
        if not self.log_stats:
            return
        for name, stats in named:
            if stats.newer == stats.older:
                continue  # (a quiet pool: no line, so a thousand idle pools stay quiet)
            avg = stats.newer.averages(stats.older, seconds)
            log.info(
                "stats: {pool}: {xacts} xacts/s, {queries} queries/s, {client_parses} client parses/s, "
                "{server_parses} server parses/s, {binds} binds/s, in {received} B/s, out {sent} B/s, "
                "xact {xact_us} us, query {query_us} us, wait {wait_us} us",
                pool=name, xacts=avg.xact_count, queries=avg.query_count,
                client_parses=avg.client_parse_count, server_parses=avg.server_parse_count,
                binds=avg.bind_count, received=avg.bytes_received, sent=avg.bytes_sent,
                xact_us=avg.xact_time, query_us=avg.query_time, wait_us=avg.wait_time)


#: SQLSTATE of a refused login -> the reason metrics count it under.
LOGIN_FAILURE_REASONS = {
    "28P01": "password",
    "28000": "refused",
    "3D000": "unknown_database",
    "53300": "too_many_clients",
    "57014": "timeout",
    "08P01": "protocol",
    "0A000": "unsupported",
    "57P01": "shutdown",
    "08006": "server_unavailable",
    "57P03": "server_unavailable",
}


class LoginFailures:
    """Refused logins by reason: many happen before any pool is known, so they are
    counted for the whole pooler, not per pool."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, sqlstate: str) -> None:
        reason = LOGIN_FAILURE_REASONS.get(sqlstate, "other")
        self.counts[reason] = self.counts.get(reason, 0) + 1
