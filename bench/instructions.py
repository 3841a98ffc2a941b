"""Odissey's instructions per transaction, counted by callgrind, for one or more commits.

CPU time on the shared 2-core machine moves by 10-20 % from run to run; instruction counts
do not. Each commit (checked out in a temporary git worktree; ``.`` is this working tree)
runs as ``twistd odissey`` under ``valgrind --tool=callgrind`` with ``PYTHONHASHSEED=0``,
one transaction-mode route (``--mode session`` for session mode; pool 20, ``--pool-size``) in front of one throwaway PostgreSQL.
For each protocol: a warm-up, then ``pgbench -S -c 4 -j 1 -t N`` and ``-t 3N`` (``--clients``:
more clients than the pool has servers exercises the path where clients wait), the counters zeroed
before and dumped after each (``callgrind_control``); the report gives the marginal count,
(I(3N) - I(N)) / (2N x 4) instructions per transaction, in which start-up, logins and
idle polling cancel out. User-space instructions only: the kernel's work in the system
calls is not in them, so they say what Odissey's own code costs, not the whole CPU time.

    python bench/instructions.py b74d9f9 efcef45 d17cb2b --protocol simple,extended,prepared
    python bench/instructions.py HEAD . --clients 32 --pool-size 20 --floor
    python bench/instructions.py d2f4c67 . --connect --protocol simple --transactions 100

``--floor`` counts bench/floor.py too (this tree's, under the same interpreter): the bare
Twisted relay, what moving the bytes costs at all; with ``--connect``, bench/login_floor.py,
what a login costs a Twisted pooler at all.

A protocol that a commit cannot run (``-M prepared`` before prepared statements existed)
is reported as failed, never as a number.

CPython only: under PyPy, JIT compilation and major collections land unevenly in the
two runs (one try gave a negative marginal count), so PyPy is checked with
``bench/ab.py --python``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from common import (ROOT, PgbenchFailed, pgbench, remove_worktrees, start_floor, start_login_floor, start_odissey, start_postgres,
                    stop)
from compare import DB, PASSWORD, USER, protocols



def checkout(commit: str, parent: Path) -> Tuple[str, Path, bool]:
    """The short hash and tree of ``commit`` (a new worktree under ``parent``, or this
    working tree for ``.``), and whether a worktree was made."""
    if commit == ".":
        return "this tree", ROOT, False
    short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit],
                           check=True, capture_output=True, text=True).stdout.strip()
    tree = parent / short
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
    return short, tree, True


def counted(pid: int, workdir: str, port: int, protocol: str, clients: int, transactions: int,
            connect: bool = False) -> int:
    """Instructions a process (``pid``, under callgrind) spends on ``pgbench -t transactions``
    (``-C`` with ``connect``)."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    pgbench(port, USER, PASSWORD, DB, clients=clients, jobs=1, protocol=protocol, transactions=transactions,
            connect=connect)
    dumps = set(glob.glob(f"{workdir}/callgrind.out*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    (dump,) = set(glob.glob(f"{workdir}/callgrind.out*")) - dumps
    for line in Path(dump).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {dump}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commits", nargs="+", help="commits to count (. for this working tree)")
    parser.add_argument("--protocol", type=protocols, default=["simple", "extended"],
                        help="comma-separated pgbench -M values: simple, extended, prepared")
    parser.add_argument("--transactions", type=int, default=1000, help="N, per client")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--mode", choices=("transaction", "session"), default="transaction",
                        help="Odissey's pool mode")
    parser.add_argument("--floor", action="store_true", help="also count bench/floor.py (with --connect bench/login_floor.py)")
    parser.add_argument("--extra", default="",
                        help="YAML appended to Odissey's configuration, e.g. 'log: {connections: false}'")
    parser.add_argument("--connect", action="store_true",
                        help="pgbench -C: a login per transaction (what a login costs)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("needs valgrind (callgrind) and callgrind_control")

    os.environ["PYTHONHASHSEED"] = "0"
    trees = Path(tempfile.mkdtemp(prefix="odissey-instructions-"))
    made: List[Path] = []
    names: List[str] = []
    pg = None
    counts: Dict[Tuple[str, str], float] = {}
    failures: Dict[Tuple[str, str], str] = {}
    try:
        pg = start_postgres(USER, PASSWORD, DB, scale=10)
        for commit in args.commits + (["floor"] if args.floor else []):
            workdir = tempfile.mkdtemp(prefix="run-", dir=trees)
            wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/callgrind.out"]
            if commit == "floor" and args.connect:
                name = "login floor"
                proc, port = start_login_floor(pg.port, USER, PASSWORD, DB, workdir, wrapper=wrapper, patience=600)
            elif commit == "floor":
                name = "floor"
                proc, port = start_floor(pg.port, workdir, wrapper=wrapper, patience=600)
            else:
                name, root, new = checkout(commit, trees)
                if new:
                    made.append(root)
                proc, port, _package = start_odissey(
                    pg.port, USER, PASSWORD, DB, mode=args.mode, pool_size=args.pool_size, workdir=workdir,
                    root=root, wrapper=wrapper, patience=600, extra=args.extra + "\n" if args.extra else "")
            names.append(name)
            try:
                for protocol in args.protocol:
                    try:
                        pgbench(port, USER, PASSWORD, DB, clients=args.clients, jobs=1, protocol=protocol,
                                transactions=200)
                        short = counted(proc.pid, workdir, port, protocol, args.clients, args.transactions,
                                        args.connect)
                        long = counted(proc.pid, workdir, port, protocol, args.clients, 3 * args.transactions,
                                       args.connect)
                    except PgbenchFailed as exc:
                        failures[(name, protocol)] = exc.reason
                        print(f"{name} -M {protocol}: FAILED: {exc.reason}", flush=True)
                        continue
                    counts[(name, protocol)] = (long - short) / (2 * args.transactions * args.clients)
                    print(f"{name} -M {protocol}: {counts[(name, protocol)]:,.0f} instructions / tx", flush=True)
            finally:
                stop(proc, patience=120)

        print(f"\npgbench -S{' -C' if args.connect else ''} -c {args.clients} -j 1, {args.mode} pooling, pool size {args.pool_size}: "
              f"instructions per "
              f"transaction (callgrind, marginal between -t {args.transactions} and -t {3 * args.transactions})\n")
        print("| protocol | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for protocol in args.protocol:
            first = counts.get((names[0], protocol))
            cells = []
            for name in names:
                if (name, protocol) in failures:
                    cells.append(f"failed: {failures[(name, protocol)]}")
                    continue
                count = counts[(name, protocol)]
                versus = f" ({(count / first - 1) * 100:+.0f} %)" if first and name != names[0] else ""
                cells.append(f"{count:,.0f}{versus}")
            print(f"| {protocol} | " + " | ".join(cells) + " |")
    finally:
        if pg is not None:
            pg.stop()
        remove_worktrees(made, trees)


if __name__ == "__main__":
    main()
