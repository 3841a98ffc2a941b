"""How long a freshly started Odissey takes to reach full speed (PyPy's JIT warm-up).

Each run starts a new pooler process (no warm-up of any kind) in front of a throwaway
PostgreSQL and, as soon as it listens, runs ``pgbench -S -c C -j 2 -T 40 -P 1`` through it
(transaction pooling, pool size 20). Each progress line gives two speeds for that second:
pgbench's TPS, and the transactions per second of the pooler's own CPU time (shown as CPU
µs per transaction, read from /proc at each line), which other work on a shared machine
disturbs far less than TPS. For each, the steady speed is the median of the last 15
seconds, and the report gives the first second at 90 % of it ("reaches"), the second from
which every later second stays at or above 90 % ("stays"), the same for the median of the
5 seconds around each second ("stays, smoothed": one slow second does not count), and the
median speed of seconds 1-5, 6-10 and 11-15 as a share of the steady one. With 32 clients
and a pool of 20 clients wait for a server, so that path is measured too. Targets: Odissey
under CPython (for reference), Odissey under PyPy, and bench/floor.py (the bare Twisted
relay) under PyPy, the JIT's warm-up for Twisted alone.

    python bench/warmup.py --pypy .ci/pypy/bin/python --clients 8,32 \
        --protocol simple,prepared --rounds 3
    python bench/warmup.py --connect --targets odissey-cpython,odissey-pypy --clients 8 \
        --protocol simple --rounds 3    # pgbench -C: the login path's warm-up

Runs are interleaved (every target for one setting, then the next setting, round after
round), so that noise on a shared machine hits every target alike.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from common import cpu_seconds, pg_env, start_floor, start_odissey, start_postgres, stop

USER, PASSWORD, DB = "bench", "bench-pw", "bench"
TARGETS = ("odissey-cpython", "odissey-pypy", "floor-pypy")
#: Seconds at the end whose median is the steady speed.
STEADY = 15
#: Seconds shown per run.
SHOWN = 15


@dataclass
class Series:
    """A speed for each second (higher is faster), and where it becomes steady."""
    values: List[float]

    @property
    def steady(self) -> float:
        return statistics.median(self.values[-STEADY:])

    def reaches(self) -> Optional[int]:
        """The first second (1-based) at or above 90 % of the steady speed."""
        return next((i + 1 for i, v in enumerate(self.values) if v >= 0.9 * self.steady), None)

    def stays(self, smooth: bool) -> int:
        """The second (1-based) from which every second (or, with ``smooth``, every median
        of the 5 seconds around one) is at or above 90 % of the steady speed."""
        values = ([statistics.median(self.values[max(0, i - 2):i + 3]) for i in range(len(self.values))]
                  if smooth else self.values)
        below = [i + 1 for i, v in enumerate(values) if v < 0.9 * self.steady]
        return below[-1] + 1 if below else 1

    def window(self, first: int, last: int) -> float:
        """The median of seconds ``first``..``last`` (1-based), as a share of the steady speed."""
        return statistics.median(self.values[first - 1:last]) / self.steady


@dataclass
class Run:
    """One fresh process's seconds: ``tps`` is pgbench's, ``cpu`` the transactions per
    second of the pooler's own CPU time (1e6 / µs per transaction), which other work on
    the machine slows far less than it slows TPS."""
    target: str
    clients: int
    protocol: str
    tps: Series
    cpu: Series


def progress(port: int, pid: int, clients: int, protocol: str, seconds: int, jobs: int,
             connect: bool = False) -> Run:
    """``pgbench -S -P 1`` (``-C`` with ``connect``) against 127.0.0.1:``port``, reading
    process ``pid``'s CPU time at each progress line; the run's target and key are filled
    in by the caller."""
    command = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-n", "-S", "-P", "1",
               *(["-C"] if connect else []),
               "-c", str(clients), "-j", str(min(jobs, clients)), "-T", str(seconds), "-M", protocol, DB]
    tps: List[float] = []
    cpu: List[float] = []
    before = cpu_seconds(pid)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=pg_env(PASSWORD))
    assert proc.stderr is not None and proc.stdout is not None
    errors = []
    for line in proc.stderr:
        found = re.match(r"progress: [\d.]+ s, ([\d.]+) tps", line)
        if not found:
            errors.append(line)
            continue
        now = cpu_seconds(pid)
        tps.append(float(found.group(1)))
        cpu.append(tps[-1] / max(now - before, 1e-3))
        before = now
    output = proc.stdout.read()
    proc.wait()
    failed = re.search(r"number of failed transactions: (\d+)", output)
    if proc.returncode != 0 or len(tps) < STEADY + SHOWN // 2 or (failed and int(failed.group(1))):
        raise RuntimeError(f"{' '.join(command)} failed (status {proc.returncode}):\n{output}{''.join(errors)}")
    return Run("", clients, protocol, Series(tps), Series(cpu))


def start_target(target: str, pg_port: int, workdir: str, pypy: str) -> Tuple[subprocess.Popen, int]:
    python = pypy if target.endswith("-pypy") else sys.executable
    if target.startswith("floor"):
        return start_floor(pg_port, workdir, python, target)
    proc, port, _package = start_odissey(pg_port, USER, PASSWORD, DB, mode="transaction", pool_size=20,
                                         workdir=workdir, python=python, name=target)
    return proc, port


def second(value: Optional[float]) -> str:
    return "never" if value is None else f"{value:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pypy", default=str(Path(__file__).resolve().parent.parent / ".ci/pypy/bin/python"))
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--clients", default="8,32")
    parser.add_argument("--protocol", default="simple,prepared", help="pgbench -M values, comma-separated")
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--connect", action="store_true",
                        help="pgbench -C: a new connection per transaction (the login path's warm-up)")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {', '.join(sorted(unknown))}")
    clients_list = [int(c) for c in args.clients.split(",") if c]
    protocols = [p for p in args.protocol.split(",") if p]

    workdir = tempfile.mkdtemp(prefix="odissey-warmup-")
    pg = None
    runs: List[Run] = []
    try:
        pg = start_postgres(USER, PASSWORD, DB, scale=args.scale,
                            settings={"max_connections": str(max(100, max(clients_list) + 50))})
        for round_ in range(args.rounds):
            for clients in clients_list:
                for protocol in protocols:
                    for target in targets:
                        proc, port = start_target(target, pg.port, workdir, args.pypy)
                        try:
                            run = progress(port, proc.pid, clients, protocol, args.seconds, args.jobs,
                                           args.connect)
                        finally:
                            stop(proc)
                        run.target = target
                        runs.append(run)
                        print(f"round {round_ + 1}: {target:15} -c {clients:2} -M {protocol:8} {summary(run.tps)}; "
                              f"CPU {summary(run.cpu)}\n  TPS {' '.join(f'{t:.0f}' for t in run.tps.values)}"
                              f"\n  µs/tx {' '.join(f'{1e6 / t:.0f}' for t in run.cpu.values)}", flush=True)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report(runs, args, clients_list, protocols, targets)


def window(first: int, last: int) -> Callable[[Series], Optional[float]]:
    return lambda series: series.window(first, last)


def summary(series: Series) -> str:
    return (f"steady {series.steady:7.0f}/s, reaches 90 % at {second(series.reaches())} s, stays from "
            f"{series.stays(False)} s (smoothed {series.stays(True)} s)")


def report(runs: List[Run], args: argparse.Namespace, clients_list: List[int], protocols: List[str],
           targets: List[str]) -> None:
    print(f"\npgbench -S{' -C' if args.connect else ''} -j {args.jobs} -T {args.seconds} -P 1 from the first second of a fresh process; "
          f"transaction pooling, pool size 20; steady = median of the last {STEADY} s")
    for title, pick, cell in (("TPS, thousands", lambda r: r.tps, lambda v: f"{v / 1000:.1f}"),
                              ("pooler CPU µs per transaction", lambda r: r.cpu, lambda v: f"{1e6 / v:.0f}")):
        print(f"\n{title}, second by second\n")
        print("| target | clients | protocol | round | " + " | ".join(f"{s}s" for s in range(1, SHOWN + 1))
              + " | steady | reaches 90 % (s) | stays (s) | stays, smoothed (s) |")
        print("|---|---|---|---|" + "---|" * SHOWN + "---|---|---|---|")
        counts: Dict[Tuple[str, int, str], int] = {}
        for run in runs:
            key = (run.target, run.clients, run.protocol)
            counts[key] = counts.get(key, 0) + 1
            series = pick(run)
            print(f"| {run.target} | {run.clients} | {run.protocol} | {counts[key]} | "
                  + " | ".join(cell(v) for v in series.values[:SHOWN])
                  + f" | {cell(series.steady)} | {second(series.reaches())} | {series.stays(False)} "
                  f"| {series.stays(True)} |")

    print(f"\nmedians over {args.rounds} round(s); speed in seconds 1-5, 6-10, 11-15 as a share of the steady "
          f"speed, by TPS / by CPU per transaction; warm-up seconds likewise\n")
    print("| target | clients | protocol | steady TPS | steady µs/tx | 1-5 s | 6-10 s | 11-15 s | reaches 90 % (s) "
          "| stays (s) | stays, smoothed (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for clients in clients_list:
        for protocol in protocols:
            for target in targets:
                these = [r for r in runs if (r.target, r.clients, r.protocol) == (target, clients, protocol)]

                def both(of: Callable[[Series], Optional[float]], text: Callable[[float], str]) -> str:
                    """The median of ``of`` over these runs, by TPS / by CPU."""
                    parts = []
                    for series in ([r.tps for r in these], [r.cpu for r in these]):
                        values = [of(one) for one in series]
                        known = [v for v in values if v is not None]
                        parts.append(text(statistics.median(known)) if len(known) == len(values) else "never")
                    return " / ".join(parts)

                print(f"| {target} | {clients} | {protocol} | {statistics.median(r.tps.steady for r in these):.0f} "
                      f"| {statistics.median(1e6 / r.cpu.steady for r in these):.0f} | "
                      + " | ".join(both(window(a, b), lambda v: f"{v:.0%}") for a, b in ((1, 5), (6, 10), (11, 15)))
                      + f" | {both(Series.reaches, second)} | {both(lambda s: s.stays(False), second)} "
                      f"| {both(lambda s: s.stays(True), second)} |")


if __name__ == "__main__":
    main()
