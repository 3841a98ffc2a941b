"""Odissey against an earlier commit of itself: the same pgbench runs, interleaved, in one run.

For changes on the hot path: PgBouncer and PostgreSQL direct are left out, so that the
rounds alternate only between the two Odissey processes (this working tree and
``--old``, checked out in a temporary git worktree), one transaction-mode route each in
front of one throwaway PostgreSQL. Reports median TPS and Odissey's CPU per transaction
(user + system, from /proc), which is what decides throughput on a 2-core machine.

    python bench/ab.py --old ee2fcc1 --seconds 12 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from common import ROOT, cpu_seconds, start_odissey, start_postgres, stop
from compare import DB, PASSWORD, USER, pgbench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the commit to compare with")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--protocol", default="simple,extended")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=20)
    args = parser.parse_args()

    old_tree = Path(tempfile.mkdtemp(prefix="odissey-ab-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old_tree), args.old], check=True)
    pg = None
    procs: Dict[str, Tuple[subprocess.Popen, int]] = {}
    try:
        pg = start_postgres(USER, PASSWORD, DB, scale=10, settings={"max_connections": "300"})
        for name, root in (("this tree", ROOT), (args.old, old_tree)):
            workdir = tempfile.mkdtemp(prefix="odissey-ab-run-")
            proc, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode="transaction",
                                                 pool_size=args.pool_size, workdir=workdir, root=root)
            procs[name] = (proc, port)
        results: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
        for round_ in range(args.rounds):
            for protocol in args.protocol.split(","):
                for name, (proc, port) in procs.items():
                    before = cpu_seconds(proc.pid)
                    tps = pgbench(port, args.clients, protocol, args.seconds)
                    per_tx = (cpu_seconds(proc.pid) - before) / (tps * args.seconds) * 1e6
                    results.setdefault((name, protocol), []).append((tps, per_tx))
                    print(f"round {round_ + 1}: {name:12} -M {protocol:8} {tps:8.0f} tps {per_tx:6.1f} us CPU/tx",
                          flush=True)
        print(f"\npgbench -S -c {args.clients}, transaction pooling, pool size {args.pool_size}, "
              f"{args.seconds}s x {args.rounds} rounds, medians\n")
        print("| protocol | Odissey | TPS | CPU µs / tx |")
        print("|---|---|---|---|")
        for protocol in args.protocol.split(","):
            for name in procs:
                runs = results[(name, protocol)]
                print(f"| {protocol} | {name} | {statistics.median(t for t, _ in runs):.0f} | "
                      f"{statistics.median(c for _, c in runs):.1f} |")
    finally:
        for proc, _port in procs.values():
            stop(proc)
        if pg is not None:
            pg.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)
        shutil.rmtree(old_tree.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
