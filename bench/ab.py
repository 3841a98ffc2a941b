"""Odissey against an earlier commit of itself: the same pgbench runs, interleaved, in one run.

For changes on the hot path: PgBouncer and PostgreSQL direct are left out, so that the
rounds alternate only between the two Odissey processes (``--new``, this working tree
unless a commit is given, and ``--old``, each commit checked out in a temporary git
worktree), one transaction-mode route each in front of one throwaway PostgreSQL. Which of
the two goes first alternates from round to round. Reports median TPS, Odissey's CPU per
transaction (user + system, from /proc), which is what decides throughput on a 2-core
machine, and PostgreSQL's.

    python bench/ab.py --old ee2fcc1 --seconds 12 --rounds 3
    python bench/ab.py --old d2f4c67 --python .ci/pypy/bin/python --warmup 15
    python bench/ab.py --old 762f76e --python .ci/pypy/bin/python --warmup 15 --connect --clients 8
    python bench/ab.py --old b74d9f9 --new HEAD --protocol simple,extended,prepared \
        --old-protocol simple,extended --seconds 15 --rounds 5
    python bench/ab.py --new HEAD --old HEAD --python ./pypy-16m --old-python ./pypy-default --clients 200

``--old-python`` runs the old commit under another interpreter; with ``--new X --old X``
it compares one commit under two interpreters, or under one interpreter in two
environments through wrapper scripts (``pypy-16m``: ``PYPY_GC_NURSERY=16M exec pypy "$@"``;
``pypy-default``: ``unset PYPY_GC_NURSERY; exec pypy "$@"``, since bench/common.py's
``runtime_env`` sets it otherwise). ``--old-protocol`` leaves out what the old commit
cannot run (``-M prepared`` before prepared statements existed in transaction mode); for
each commit that ran both, the report sets ``prepared`` against its own ``extended``. A failing pgbench run is reported
as failed, never as a number.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from common import (ROOT, PgbenchFailed, cpu_seconds, pgbench, postgres_cpu_seconds, remove_worktrees, start_odissey,
                    start_postgres, stop)
from compare import DB, PASSWORD, USER, clients_list, protocols


def worktree(commit: str, parent: Path) -> Tuple[str, Path]:
    """A detached worktree of ``commit`` under ``parent``; returns the commit's short hash and the tree."""
    short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit],
                           check=True, capture_output=True, text=True).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix=f"{short}-", dir=parent))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
    return short, tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the commit to compare with")
    parser.add_argument("--new", help="a commit to run instead of this working tree (HEAD, a hash)")
    parser.add_argument("--clients", type=clients_list, default=[32])
    parser.add_argument("--protocol", type=protocols, default=["simple", "extended"],
                        help="comma-separated pgbench -M values: simple, extended, prepared")
    parser.add_argument("--old-protocol", type=protocols,
                        help="what the old commit runs (default: --protocol)")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (at most the clients)")
    parser.add_argument("--mode", choices=("transaction", "session"), default="transaction")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter both run under (PyPy's, say: ../.ci/pypy/bin/python)")
    parser.add_argument("--old-python",
                        help="the interpreter the old commit runs under instead (default: --python); with "
                             "--old HEAD, compares two interpreters or two environments of one commit")
    parser.add_argument("--extra", default="",
                        help="YAML appended to each Odissey's configuration, e.g. 'log: {connections: false}'")
    parser.add_argument("--connect", action="store_true",
                        help="pgbench -C: a new connection per transaction (what a login costs)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="seconds of unmeasured pgbench per commit and protocol first (PyPy's JIT)")
    args = parser.parse_args()
    old_protocols = args.old_protocol or args.protocol

    trees = Path(tempfile.mkdtemp(prefix="odissey-ab-"))
    made: List[Path] = []
    pg = None
    procs: Dict[str, Tuple[subprocess.Popen, int]] = {}
    try:
        if args.new:
            new_name, new_root = worktree(args.new, trees)
            made.append(new_root)
        else:
            new_name, new_root = "this tree", ROOT
        old_name, old_root = worktree(args.old, trees)
        made.append(old_root)
        if old_name == new_name:  # one commit under two interpreters (--old-python)
            old_name += " (old)"
        runs = {new_name: args.protocol, old_name: old_protocols}
        pg = start_postgres(USER, PASSWORD, DB, scale=10,
                            settings={"max_connections": str(max(300, max(args.clients) + 50 + 2 * args.pool_size))})
        pythons = {new_name: args.python, old_name: args.old_python or args.python}
        for name, root in ((new_name, new_root), (old_name, old_root)):
            workdir = tempfile.mkdtemp(prefix="odissey-ab-run-", dir=trees)
            proc, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode=args.mode,
                                                 pool_size=args.pool_size, workdir=workdir, root=root,
                                                 python=pythons[name], extra=args.extra + "\n" if args.extra else "")
            procs[name] = (proc, port)
            for protocol in runs[name] if args.warmup else ():
                pgbench(port, USER, PASSWORD, DB, clients=max(args.clients), jobs=args.jobs,
                        protocol=protocol, seconds=args.warmup, connect=args.connect)

        Key = Tuple[str, int, str]
        results: Dict[Key, List[Tuple[float, float, float]]] = {}
        failures: Dict[Key, List[str]] = {}
        for round_ in range(args.rounds):
            order = list(procs.items()) if round_ % 2 == 0 else list(reversed(procs.items()))
            for clients in args.clients:
                for protocol in args.protocol:
                    for name, (proc, port) in order:
                        if protocol not in runs[name]:
                            continue
                        key = (name, clients, protocol)
                        before, server_before = cpu_seconds(proc.pid), postgres_cpu_seconds(pg)
                        try:
                            tps = pgbench(port, USER, PASSWORD, DB, clients=clients, jobs=args.jobs,
                                          protocol=protocol, seconds=args.seconds, connect=args.connect)
                        except PgbenchFailed as exc:
                            failures.setdefault(key, []).append(exc.reason)
                            print(f"round {round_ + 1}: {name:12} -c {clients:3} -M {protocol:8} FAILED: "
                                  f"{exc.reason}", flush=True)
                            continue
                        transactions = tps * args.seconds
                        per_tx = (cpu_seconds(proc.pid) - before) / transactions * 1e6
                        server_per_tx = (postgres_cpu_seconds(pg) - server_before) / transactions * 1e6
                        results.setdefault(key, []).append((tps, per_tx, server_per_tx))
                        print(f"round {round_ + 1}: {name:12} -c {clients:3} -M {protocol:8} {tps:8.0f} tps "
                              f"{per_tx:6.1f} us CPU/tx (PostgreSQL {server_per_tx:5.1f})", flush=True)

        def medians(key: Key) -> Optional[Tuple[float, float, float]]:
            if key in failures or key not in results:
                return None
            rows = results[key]
            return (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows),
                    statistics.median(r[2] for r in rows))

        print(f"\npgbench -S{' -C' if args.connect else ''} -j {args.jobs}, {args.mode} pooling, pool size {args.pool_size}, {args.python}{' (old: ' + args.old_python + ')' if args.old_python else ''}, "
              f"{args.seconds}s x {args.rounds} rounds, medians\n")
        print(f"| clients | protocol | Odissey | TPS | CPU µs / tx | vs {old_name} | PostgreSQL CPU µs / tx |")
        print("|---|---|---|---|---|---|---|")
        for clients in args.clients:
            for protocol in args.protocol:
                old = medians((old_name, clients, protocol))
                for name in procs:
                    key = (name, clients, protocol)
                    if protocol not in runs[name]:
                        continue
                    if key in failures:
                        print(f"| {clients} | {protocol} | {name} | failed in {len(failures[key])} of "
                              f"{args.rounds} rounds: {failures[key][0]} | | | |")
                        continue
                    found = medians(key)
                    assert found is not None
                    tps, cpu, server = found
                    versus = f"{(cpu / old[1] - 1) * 100:+.1f} %" if old and name != old_name else ""
                    print(f"| {clients} | {protocol} | {name} | {tps:.0f} | {cpu:.1f} | {versus} | {server:.1f} |")
        for name in procs:
            for clients in args.clients:
                prepared, extended = medians((name, clients, "prepared")), medians((name, clients, "extended"))
                if prepared and extended:
                    print(f"\n{name}, -c {clients}: prepared against extended: TPS x{prepared[0] / extended[0]:.2f}, "
                          f"Odissey CPU {prepared[1] - extended[1]:+.1f} µs/tx "
                          f"({(prepared[1] / extended[1] - 1) * 100:+.1f} %), "
                          f"PostgreSQL CPU {prepared[2] - extended[2]:+.1f} µs/tx")
    finally:
        for proc, _port in procs.values():
            stop(proc)
        if pg is not None:
            pg.stop()
        remove_worktrees(made, trees)


if __name__ == "__main__":
    main()
