"""Where Odissey's instructions go, per Python function: bytecodes executed per transaction.

callgrind (bench/instructions.py) counts the whole process but cannot name Python
functions; this counts, with ``sys.settrace`` opcode events, how many bytecodes each
function executes and how often it is called, per transaction of
``pgbench -S -c C -j 1 -t N`` (after an unmeasured warm-up), in this working tree's
``twistd odissey`` (one route, pool 20, CPython). Like callgrind's counts these do not
move with the machine's load; a bytecode is not a fixed number of instructions (a call
into C costs more than a load), so read them as "where", and callgrind as "how much".

    python bench/opcodes.py --protocol simple --clients 4
    python bench/opcodes.py --protocol simple --clients 4 --connect   # a login per transaction
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, pgbench, start_odissey, start_postgres, stop
from compare import DB, PASSWORD, USER, protocols

#: Runs BOOT with an opcode counter that SIGUSR1 starts and SIGUSR2 stops and writes out.
TRACER = '''
import collections, signal, sys
out, boot = sys.argv[1], sys.argv[3]
sys.argv = sys.argv[:1] + sys.argv[4:]  # what twistd parses: the options after -c BOOT
ops, calls = collections.Counter(), collections.Counter()
def tracer(frame, event, arg):
    code = frame.f_code
    key = (code.co_filename, code.co_firstlineno, code.co_name)
    if event == "call":
        calls[key] += 1
        frame.f_trace_opcodes = True
    elif event == "opcode":
        ops[key] += 1
    return tracer
def start(*_):
    sys.settrace(tracer)
def finish(*_):
    sys.settrace(None)
    with open(out, "w") as f:
        for key, n in ops.most_common():
            f.write("%d\\t%d\\t%s:%d:%s\\n" % (n, calls[key], *key))
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, finish)
exec(compile(boot, "<boot>", "exec"))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", type=protocols, default=["simple"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--transactions", type=int, default=500, help="per client")
    parser.add_argument("--mode", choices=("transaction", "session"), default="transaction")
    parser.add_argument("--connect", action="store_true", help="pgbench -C: a login per transaction")
    parser.add_argument("--top", type=int, default=40, help="functions listed")
    parser.add_argument("--extra", default="",
                        help="YAML appended to Odissey's configuration, e.g. 'log: {connections: false}'")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="odissey-opcodes-"))
    tracer, counts = workdir / "tracer.py", workdir / "opcodes.tsv"
    tracer.write_text(TRACER)
    python = workdir / "python"  # start_odissey runs ``python -c BOOT ...``: this takes its place
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {tracer} {counts} \"$@\"\n")
    python.chmod(0o755)
    pg = start_postgres(USER, PASSWORD, DB, scale=10)
    try:
        for protocol in args.protocol:
            proc, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode=args.mode, pool_size=20,
                                                 workdir=str(workdir), python=str(python),
                                                 extra=args.extra + "\n" if args.extra else "")
            try:
                pgbench(port, USER, PASSWORD, DB, clients=args.clients, jobs=1, protocol=protocol,
                        transactions=200, connect=args.connect)
                os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(0.5)
                pgbench(port, USER, PASSWORD, DB, clients=args.clients, jobs=1, protocol=protocol,
                        transactions=args.transactions, connect=args.connect)
                os.kill(proc.pid, signal.SIGUSR2)
                for _ in range(100):
                    if counts.exists() and counts.stat().st_size:
                        break
                    time.sleep(0.1)
                time.sleep(0.5)
            finally:
                stop(proc)
            report(protocol, args, counts)
            counts.unlink()
    finally:
        pg.stop()


def report(protocol: str, args: argparse.Namespace, counts: Path) -> None:
    transactions = args.transactions * args.clients
    rows = [line.split("\t") for line in counts.read_text().splitlines()]
    areas: dict = {}
    for ops, _calls, name in rows:
        area = "odissey" if f"{ROOT}/odissey/" in name else "twisted" if "/twisted/" in name else "other"
        areas[area] = areas.get(area, 0) + int(ops)
    total = sum(areas.values())
    print(f"\n-M {protocol}{' -C' if args.connect else ''}, {args.mode} mode: {total / transactions:,.0f} "
          "bytecodes / tx (" + ", ".join(f"{area} {n / transactions:,.0f}" for area, n in sorted(areas.items())) + ")")
    print("| bytecodes / tx | calls / tx | function |\n|---|---|---|")
    for ops, calls, name in rows[:args.top]:
        short = name.replace(f"{ROOT}/", "")
        short = short[short.index("twisted/"):] if "/twisted/" in short else short
        print(f"| {int(ops) / transactions:.0f} | {int(calls) / transactions:.2f} | `{short}` |")


if __name__ == "__main__":
    main()
