"""The cost of observability: pgbench through Odissey with the metrics endpoint and the
admin console on and in use, against the same code with both off, interleaved in one run.

``on`` serves metrics and the console and is asked during each run, every
``--scrape-every`` seconds, for the metrics (an HTTP scrape) and SHOW STATS (psql): a
scrape every second is fifteen times what a usual Prometheus does. ``off`` has neither in
its configuration and nobody asks. The per-pool counters themselves are always kept (they
are plain integer adds with no switch); ``--old COMMIT`` adds that commit, checked out in a
temporary worktree, to show what the counters cost against code without them. Which target
goes first rotates from round to round. Reports median TPS, Odissey's CPU per transaction
(user + system, from /proc, the scrapes' work included), and the ratios to ``off``.

    python bench/observability.py --clients 32 --seconds 15 --rounds 5 --old d2f4c67
    python bench/observability.py --python /path/to/pypy/venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ab import worktree
from common import (ROOT, PgbenchFailed, cpu_seconds, free_port, pg_env, pgbench, remove_worktrees, start_odissey,
                    start_postgres, stop)
from compare import DB, PASSWORD, USER


class Asker(threading.Thread):
    """Scrapes the metrics and runs SHOW STATS every ``every`` seconds until stopped."""

    def __init__(self, port: int, metrics_port: int, every: float) -> None:
        super().__init__(daemon=True)
        self.port, self.metrics_port, self.every = port, metrics_port, every
        self.done = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.done.wait(self.every):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as reply:
                reply.read()
            subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", "odissey",
                            "-Atc", "SHOW STATS"], env=pg_env(PASSWORD), check=True, capture_output=True)
            self.scrapes += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--protocol", default="simple", help="pgbench -M")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scrape-every", type=float, default=1.0)
    parser.add_argument("--old", help="also run this commit (before the counters), without metrics")
    parser.add_argument("--python", default=sys.executable, help="the interpreter Odissey runs on")
    args = parser.parse_args()

    trees = Path(tempfile.mkdtemp(prefix="odissey-obs-"))
    made: List[Path] = []
    pg = None
    procs: Dict[str, Tuple[subprocess.Popen, int]] = {}
    metrics_port = free_port()
    try:
        pg = start_postgres(USER, PASSWORD, DB, scale=10, settings={"max_connections": "300"})
        targets = [
            ("on", ROOT, f"admin_users: [{USER}]\nmetrics: {{listen: 'tcp:{metrics_port}:interface=127.0.0.1'}}\n"),
            ("off", ROOT, ""),
        ]
        if args.old:
            short, tree = worktree(args.old, trees)
            made.append(tree)
            targets.append((short, tree, ""))
        for name, root, extra in targets:
            workdir = tempfile.mkdtemp(prefix=f"odissey-obs-{name}-", dir=trees)
            proc, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode="transaction",
                                                 pool_size=args.pool_size, workdir=workdir, root=root,
                                                 python=args.python, extra=extra)
            procs[name] = (proc, port)

        results: Dict[str, List[Tuple[float, float]]] = {}
        failures: Dict[str, List[str]] = {}
        names = list(procs)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                proc, port = procs[name]
                asker = Asker(port, metrics_port, args.scrape_every) if name == "on" else None
                before = cpu_seconds(proc.pid)
                if asker is not None:
                    asker.start()
                try:
                    tps = pgbench(port, USER, PASSWORD, DB, clients=args.clients, jobs=args.jobs,
                                  protocol=args.protocol, seconds=args.seconds)
                except PgbenchFailed as exc:
                    failures.setdefault(name, []).append(exc.reason)
                    print(f"round {round_ + 1}: {name:8} FAILED: {exc.reason}", flush=True)
                    continue
                finally:
                    if asker is not None:
                        asker.done.set()
                        asker.join()
                per_tx = (cpu_seconds(proc.pid) - before) / (tps * args.seconds) * 1e6
                results.setdefault(name, []).append((tps, per_tx))
                asked = f" ({asker.scrapes} scrapes + SHOW STATS)" if asker is not None else ""
                print(f"round {round_ + 1}: {name:8} {tps:8.0f} tps {per_tx:6.1f} us CPU/tx{asked}", flush=True)

        def medians(name: str) -> Optional[Tuple[float, float]]:
            rows = results.get(name)
            if not rows or name in failures:
                return None
            return statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)

        implementation = subprocess.run([args.python, "-c", "import sys; print(sys.implementation.name)"],
                                        capture_output=True, text=True).stdout.strip()
        print(f"\npgbench -S -M {args.protocol} -c {args.clients} -j {args.jobs}, transaction pooling, "
              f"pool size {args.pool_size}, {args.seconds}s x {args.rounds} rounds, Odissey on "
              f"{implementation}, medians; `on` scraped and asked SHOW STATS every {args.scrape_every:g}s\n")
        print("| Odissey | TPS | CPU µs / tx | TPS vs off | CPU vs off |")
        print("|---|---|---|---|---|")
        off = medians("off")
        for name in procs:
            found = medians(name)
            if found is None:
                print(f"| {name} | failed: {failures.get(name, ['no run'])[0]} | | | |")
                continue
            tps, cpu = found
            versus = (f"x{tps / off[0]:.3f} | {(cpu / off[1] - 1) * 100:+.1f} %" if off else " | ")
            print(f"| {name} | {tps:.0f} | {cpu:.1f} | {versus} |")
    finally:
        for proc, _port in procs.values():
            stop(proc)
        if pg is not None:
            pg.stop()
        remove_worktrees(made, trees)


if __name__ == "__main__":
    main()
