"""Where Odissey's JIT code goes under PyPy: trace operations per transaction, by trace.

PyPy's sampling profilers give a whole trace to its outermost function, and this
machine's CPU has no hardware counters; what PyPy can say exactly is which compiled
traces ran and how often. This starts a throwaway PostgreSQL and Odissey (this working
tree, transaction mode, pool 20, ``--python`` a PyPy) with
``PYPYLOG=jit-log-opt,jit-backend-counts``, runs ``pgbench -S -c C -j 2 -t N`` twice (a
warm-up, then the run), stops Odissey and joins its log: each compiled loop and bridge
with its operations (``debug_merge_point`` markers left out) and how many times it was
entered or looped. The report gives operations per transaction (entries x operations,
over every transaction the process served, warm-up included) for the heaviest traces,
with the Python functions each one runs through, and how many frames (``call_assembler``)
and allocations it holds.

    python bench/jit_ops.py --python .ci/pypy/bin/python --clients 32 --protocol simple
    python bench/jit_ops.py --python .ci/pypy/bin/python --log /tmp/odissey-jit.log --keep
    python bench/jit_ops.py --python .ci/pypy/bin/python --connect --transactions 300  # logins

An entry executes a bridge only up to its first guard that fails, so a bridge that
dispatches (one for every read, say) is counted whole each time: read the figures as an
upper bound per trace, and compare runs with each other rather than with the CPU time.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from common import pgbench, start_odissey, start_postgres, stop
from compare import DB, PASSWORD, USER


@dataclass
class Trace:
    """One compiled loop or bridge of the log."""

    header: str = ""
    loop: Optional[int] = None  # "# Loop N"
    guard: Optional[int] = None  # the guard a bridge leaves from
    tokens: List[int] = field(default_factory=list)  # its labels' TargetTokens
    operations: int = 0
    frames: int = 0  # call_assembler: a call into another trace, through a frame
    allocations: int = 0
    functions: List[str] = field(default_factory=list)
    regex: bool = False  # runs inside the regular expression engine (rsre)


_MERGE = re.compile(r"debug_merge_point\(.*'([^;']+);([^:']+):(\d+)")
_ALLOCATION = re.compile(r"= (new|new_with_vtable|new_array|new_array_clear|newstr|newunicode)\(")


def traces(lines: List[str]) -> List[Trace]:
    """The optimised traces of a ``jit-log-opt`` log."""
    found: List[Trace] = []
    current: Optional[Trace] = None
    for line in lines:
        if "{jit-log-opt-loop" in line or "{jit-log-opt-bridge" in line:
            current = Trace()
        elif "jit-log-opt-loop}" in line or "jit-log-opt-bridge}" in line:
            if current is not None:
                found.append(current)
            current = None
        elif current is None:
            continue
        elif line.startswith("# Loop") or line.startswith("# bridge"):
            current.header = line
            loop = re.search(r"# Loop (\d+)", line)
            guard = re.search(r"out of Guard (0x[0-9a-f]+)", line)
            current.loop = int(loop.group(1)) if loop else None
            current.guard = int(guard.group(1), 16) if guard else None
        elif line.startswith("debug_merge_point"):
            merge = _MERGE.search(line)
            if merge:
                name = f"{merge.group(1)}@{os.path.basename(merge.group(2))}"
                if name not in current.functions:
                    current.functions.append(name)
        elif line.startswith("+"):  # an operation, at its offset in the machine code
            current.operations += 1
            current.regex = current.regex or "rsre" in line
            current.frames += "call_assembler" in line
            current.allocations += bool(_ALLOCATION.search(line))
        if current is not None and line.startswith("label("):
            token = re.search(r"TargetToken\((\d+)\)", line)
            if token:
                current.tokens.append(int(token.group(1)))
    return found


def counts(lines: List[str]) -> List[Tuple[str, int]]:
    """``jit-backend-counts``: (what, how many times), the last such section."""
    found: List[Tuple[str, int]] = []
    inside = False
    for line in lines:
        if "{jit-backend-counts" in line:
            inside, found = True, []
        elif "jit-backend-counts}" in line:
            inside = False
        elif inside and ":" in line:
            what, number = line.rsplit(":", 1)
            found.append((what, int(number)))
    return found


def report(lines: List[str], transactions: int, top: int) -> None:
    by_loop: Dict[int, Trace] = {}
    by_guard: Dict[int, Trace] = {}
    by_token: Dict[int, Trace] = {}
    for trace in traces(lines):
        if trace.loop is not None:
            by_loop[trace.loop] = trace
        if trace.guard is not None:
            by_guard[trace.guard] = trace
        for token in trace.tokens:
            by_token[token] = trace
    rows: List[Tuple[float, str, float, Trace]] = []
    for what, number in counts(lines):
        trace = None
        key = re.search(r"\d+", what)
        if key is None:
            continue
        if what.startswith("entry"):
            trace = by_loop.get(int(key.group()))
        elif what.startswith("bridge"):
            trace = by_guard.get(int(key.group()))
        elif what.startswith("TargetToken"):
            trace = by_token.get(int(key.group()))
        if trace is not None and number:
            per_tx = number / transactions
            rows.append((per_tx * trace.operations, what, per_tx, trace))
    rows.sort(key=lambda row: -row[0])
    total = sum(row[0] for row in rows)
    print(f"{transactions:,} transactions; {total:,.0f} trace operations per transaction in all\n")
    print("| ops / tx | entries / tx | ops | frames | allocations | trace | functions |")
    print("|---|---|---|---|---|---|---|")
    for weight, what, per_tx, trace in rows[:top]:
        kind = trace.header.split(" with ")[0].lstrip("# ")[:60] or what
        functions = " > ".join(trace.functions[:8]) or ("(a regular expression)" if trace.regex else "(built-in)")
        print(f"| {weight:,.0f} | {per_tx:.2f} | {trace.operations} | {trace.frames} | {trace.allocations} "
              f"| {kind} | {functions} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", required=True, help="a PyPy with Odissey's requirements installed")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--protocol", default="simple", choices=("simple", "extended", "prepared"))
    parser.add_argument("--transactions", type=int, default=4000, help="per client, in each of the two runs")
    parser.add_argument("--connect", action="store_true", help="pgbench -C: a login per transaction")
    parser.add_argument("--log-section", action="store_true",
                        help="Odissey with a `log: {format: text}` section (its own observer, as in production)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--log", help="where PYPYLOG writes (default: a temporary file)")
    parser.add_argument("--keep", action="store_true", help="keep the log")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="odissey-jit-")
    log = args.log or os.path.join(work, "pypylog")
    pg = start_postgres(USER, PASSWORD, DB, scale=1)
    try:
        os.environ["PYPYLOG"] = f"jit-log-opt,jit-backend-counts:{log}"
        try:
            proc, port, _ = start_odissey(pg.port, USER, PASSWORD, DB, mode="transaction", pool_size=20,
                                          workdir=work, python=args.python,
                                          extra="log: {format: text}\n" if args.log_section else "")
        finally:
            del os.environ["PYPYLOG"]
        try:
            for _run in range(2):
                pgbench(port, USER, PASSWORD, DB, clients=args.clients, jobs=2, protocol=args.protocol,
                        transactions=args.transactions, connect=args.connect)
        finally:
            stop(proc)  # (the counts are written as the process exits)
    finally:
        pg.stop()
    with open(log) as text:
        lines = text.read().splitlines()
    connect = " -C" if args.connect else ""
    print(f"pgbench -S{connect} -c {args.clients} -j 2 -M {args.protocol} -t {args.transactions}, twice; {args.python}\n")
    report(lines, 2 * args.clients * args.transactions, args.top)
    if not args.keep:
        os.unlink(log)


if __name__ == "__main__":
    main()
