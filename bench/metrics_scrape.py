"""What one Prometheus scrape costs with many pools: the collection (on the reactor
thread, where every client waits for it) and the text rendering (in a thread), timed
separately (the copy of the numbers, then building the families and the text), median
of several scrapes after warm-up.

    python bench/metrics_scrape.py --pools 1000 --clients 2000 --scrapes 20
    pypy3 bench/metrics_scrape.py --pools 1000   # (needs prometheus_client for PyPy)

The pools are real ``Pool`` objects with counters and histograms filled as if they had
run transactions; no server or socket is involved (a scrape reads memory only).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prometheus_client.core import CollectorRegistry  # noqa: E402
from prometheus_client.exposition import generate_latest  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from odissey import config  # noqa: E402
from odissey.metrics import PoolCollector  # noqa: E402
from odissey.pool import Pools  # noqa: E402
from odissey.relay import RelayState  # noqa: E402
from odissey.stats import LoginFailures  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=2000, help="logged-in clients, spread over the pools")
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    cfg = config.parse({"listen": ["tcp:0"], "storages": {"pg": {"host": "127.0.0.1"}},
                        "routes": [{"database": "*", "user": "*", "storage": "pg",
                                    "pool": {"mode": "transaction"}}]})
    pools = Pools(Clock(), None)  # type: ignore[arg-type]  # (nothing connects)
    rng = random.Random(1)
    for i in range(args.pools):
        stats = pools.get(cfg.routes[0], f"db{i}", f"user{i % 10}").stats
        stats.assignments = rng.randrange(10**6)
        stats.received, stats.sent = rng.randrange(10**9), rng.randrange(10**10)
        stats.closed("lifetime")
        for _ in range(50):
            stats.ended(rng.randrange(10**9), rng.randrange(10**9))
            stats.waited(rng.random() / 10)
    all_pools = list(pools.pools.values())
    clients = [SimpleNamespace(relay=SimpleNamespace(
        pool=all_pools[i % len(all_pools)],
        state=RelayState.WAITING if i % 7 == 0 else RelayState.IDLE)) for i in range(args.clients)]
    failures = LoginFailures()
    failures.count("28P01")
    collector = PoolCollector(pools, lambda: clients, lambda: failures)
    collect, render, size = [], [], 0
    for _ in range(args.scrapes + 3):  # (three warm-ups, dropped)
        started = time.perf_counter()
        snapshot = collector.snapshot()
        middle = time.perf_counter()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(snapshot)
        text = generate_latest(registry)
        done = time.perf_counter()
        collect.append(middle - started)
        render.append(done - middle)
        size = len(text)
    collect, render = collect[3:], render[3:]
    lines = text.count(b"\n")
    print(f"{sys.implementation.name} {sys.version.split()[0]}: {args.pools} pools, {args.clients} clients, "
          f"{lines} lines, {size / 1e6:.1f} MB per scrape")
    print(f"  snapshot (reactor thread): median {statistics.median(collect) * 1e3:.1f} ms")
    print(f"  families + text (thread):  median {statistics.median(render) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
