"""The post-login sequence fuzzer of tests/test_sequence_fuzz.py, run for longer.

Starts a throwaway PostgreSQL (TCP on 127.0.0.1, trust) and one Odissey process
(``twistd odissey`` on this working tree) with a route per configuration of the test
module, each for its own user so that their server connections can be told apart:

- ``tx1``: transaction mode, one server;
- ``reset``: transaction mode, one server, ``reset_after_transaction``;
- ``session``: session mode, one server (reset when the client leaves);
- ``tx2``: transaction mode, two servers, two fuzz clients at once.

Each configuration runs in its own thread, one run after another, for ``--seconds``: a
run is one or two fuzz clients playing a generated plan, then checkers on the same pool,
then the settle and commit checks (see the test module). A failed run is printed with its
seed and plan, and its user's backends are terminated so that the next runs start clean.
At the end it prints runs, runs/s and failures per configuration, the slowest runs, and
any traceback in Odissey's log; exits 1 if anything failed.

    nice -n 10 python bench/sequence_fuzz.py --seconds 300 --seed 1

Run ``r`` of configuration ``c`` (0..3 in the order above) has seed
``seed * 1_000_000 + r * 4 + c``; replay one in the test suite with
``ODISSEY_SEQ_SEED=<seed> python -m twisted.trial tests.test_sequence_fuzz.<Class>``
(the class of that configuration), or here with ``--replay <seed> --configs <name>``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import psycopg

from common import BOOT, ROOT, free_port, stop, wait_port  # also puts the working tree on sys.path
from odissey.postgres import LocalPostgres
from tests import test_sequence_fuzz as fz


@dataclass
class Config:
    name: str
    test_class: str
    pool: dict[str, Any]
    fuzzers: int
    session_state: bool

    @property
    def user(self) -> str:
        return f"fz_{self.name}"


CONFIGS = [
    Config("tx1", "TransactionPoolOfOneTests", {"mode": "transaction", "size": 1}, 1, False),
    Config("reset", "ResetAfterTransactionTests",
           {"mode": "transaction", "size": 1, "reset_after_transaction": True}, 1, True),
    Config("session", "SessionPoolOfOneTests", {"mode": "session", "size": 1}, 1, True),
    Config("tx2", "TransactionPoolOfTwoTests", {"mode": "transaction", "size": 2}, 2, False),
]


@dataclass
class Tally:
    runs: int = 0
    seconds: float = 0.0
    failures: list[fz.Run] = field(default_factory=list)
    slowest: list[tuple[float, int]] = field(default_factory=list)  # (seconds, seed)


def start_odissey(pg_port: int, configs: list[Config], workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    document = {
        "listen": [f"tcp:{port}:interface=127.0.0.1"],
        "limits": {"max_message_size": "1MB"},
        "storages": {"pg": {"host": "127.0.0.1", "port": pg_port, "connect_timeout": "10s"}},
        "routes": [
            {"database": fz.DATABASE, "user": c.user, "storage": "pg", "auth": {"method": "trust"},
             "pool": {"wait_timeout": "20s", "reset_timeout": "3s", **c.pool}}
            for c in configs
        ],
    }
    conf = Path(workdir) / "odissey.yaml"
    conf.write_text(json.dumps(document, indent=1))  # JSON is YAML
    with open(Path(workdir) / "odissey.out", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", BOOT, "--pidfile=", "-n", "--logfile", f"{workdir}/odissey.log",
             "odissey", "-c", str(conf)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_port(port, proc, name="Odissey")
        found = re.search(r"odissey package: (\S+)", (Path(workdir) / "odissey.out").read_text())
        if not found or not found.group(1).startswith(str(ROOT / "odissey")):
            raise RuntimeError(f"Odissey runs {found.group(1) if found else '?'}, not the working tree {ROOT}")
    except BaseException:
        stop(proc)
        raise
    return proc, port


def terminate_backends(connect: Callable[[], psycopg.Connection], user: str) -> None:
    """After a failure: start the next runs on fresh server connections."""
    with connect() as su:
        su.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", (user,))
    time.sleep(0.5)


def run_seeds(base: int, index: int) -> Iterator[int]:
    """Run r of configuration ``index``: seed ``base * 1_000_000 + r * 4 + index``."""
    r = 0
    while True:
        yield base * 1_000_000 + r * len(CONFIGS) + index
        r += 1


def drive(target: fz.Target, seeds: Iterable[int], deadline: float, tally: Tally, lock: threading.Lock,
          verbose: bool) -> None:
    for seed in seeds:
        if time.monotonic() > deadline:
            return
        try:
            run = fz.run_once(target, seed)
        except Exception as exc:  # noqa: BLE001 - the fuzzer's own bug: report it, go on
            run = fz.Run(seed, [], [f"the run itself failed: {exc!r}"], 0.0, set())
        with lock:
            tally.runs += 1
            tally.seconds += run.seconds
            tally.slowest = sorted(tally.slowest + [(run.seconds, seed)], reverse=True)[:5]
            if run.problems:
                tally.failures.append(run)
                print(f"FAILED {target.user}: {run.report()}", flush=True)
            elif verbose:
                print(f"ok {target.user} seed {seed} {run.seconds:.2f}s", flush=True)
        if run.problems:
            terminate_backends(target.direct, target.user)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: random, printed)")
    parser.add_argument("--configs", default=",".join(c.name for c in CONFIGS))
    parser.add_argument("--replay", type=int, default=None, help="run this one seed (per chosen config)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    base = args.seed if args.seed is not None else random.randrange(1 << 20)
    chosen = [c for c in CONFIGS if c.name in args.configs.split(",")]
    print(f"sequence fuzz: seed {base}, {args.seconds:.0f} s, configs {[c.name for c in chosen]}", flush=True)

    workdir = tempfile.mkdtemp(prefix="odissey-seqfuzz-")
    pg = LocalPostgres(
        port=free_port(), users={c.user: "unused" for c in chosen}, databases={fz.DATABASE: chosen[0].user},
        hba=["host all all 127.0.0.1/32 trust"],
        settings={"listen_addresses": "127.0.0.1", "max_connections": "100"},
    )
    odissey: Optional[subprocess.Popen] = None
    failed = True
    try:
        pg.start()

        def connect() -> psycopg.Connection:
            return psycopg.connect(host=pg.socket_dir, port=pg.port, user="postgres", dbname=fz.DATABASE,
                                   autocommit=True)

        fz.prepare_table(connect)
        odissey, port = start_odissey(pg.port, chosen, workdir)
        targets = []
        for c in chosen:
            t = fz.Target(port, c.pool["size"], c.fuzzers, c.session_state, connect, user=c.user)
            t.baseline = fz.baseline(t)
            targets.append(t)
        tallies = {c.name: Tally() for c in chosen}
        lock = threading.Lock()
        started = time.monotonic()
        deadline = started + args.seconds
        threads = []
        for c, t in zip(chosen, targets):
            index = CONFIGS.index(c)
            seeds = [args.replay] if args.replay is not None else run_seeds(base, index)
            threads.append(threading.Thread(target=drive, args=(t, seeds, deadline, tallies[c.name], lock,
                                                                 args.verbose or args.replay is not None)))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - started
        # still serving, and nothing left behind
        for t in targets:
            _pid, _values, problems = fz.check(t, "chk-final", 0)
            problems += fz.settle(t)
            if problems:
                print(f"final check {t.user}: {problems}")
                tallies[next(c.name for c in chosen if c.user == t.user)].failures.append(
                    fz.Run(-1, [], problems, 0.0, set()))
        log = Path(f"{workdir}/odissey.log").read_text(errors="replace")
        tracebacks = log.count("Traceback")
        total = sum(t.runs for t in tallies.values())
        print(f"\n{total} runs in {elapsed:.0f} s: {total / elapsed:.1f} runs/s (seed {base})")
        for c in chosen:
            tally = tallies[c.name]
            seeds_failed = ", ".join(str(r.seed) for r in tally.failures[:10])
            print(f"  {c.name:8} ({c.test_class}): {tally.runs} runs, {tally.runs / elapsed:.1f}/s, "
                  f"mean {tally.seconds / max(tally.runs, 1):.2f} s, {len(tally.failures)} failed"
                  + (f" (seeds {seeds_failed})" if seeds_failed else "")
                  + f"; slowest {', '.join(f'{s:.1f}s #{seed}' for s, seed in tally.slowest[:3])}")
        print(f"  tracebacks in Odissey's log: {tracebacks}")
        failed = any(t.failures for t in tallies.values()) or tracebacks > 0
        if failed:
            print(f"  logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        return 1 if failed else 0
    finally:
        if odissey is not None:
            stop(odissey)
        pg.stop()


if __name__ == "__main__":
    sys.exit(main())
