"""Client TLS through Odissey and PgBouncer, in one run and with the same certificates
(issue 9): steady-state TPS, a connection storm, and the latency a connected client sees
while others handshake.

    python bench/tls.py --seconds 10 --rounds 3 --pypy .ci/pypy/bin/python

A throwaway CA signs two server certificates for 127.0.0.1, ECDSA P-256 and RSA-2048.
PostgreSQL speaks plain TCP (md5); every pooler (PgBouncer, Odissey, and with ``--pypy``
Odissey under PyPy) runs three times in front of it, transaction pooling, pool 20, md5:
without TLS, and with client TLS required (``client_tls_sslmode = require`` /
``tls: {mode: require}``) with each certificate. Measurements are interleaved (each
load through every pooler in turn, round after round) and reported as medians:

1. ``pgbench -S -c 32 -j 2 -T s``, ``PGSSLMODE=require`` (ECDSA), and ``disable`` against the
   plain poolers for reference: TPS, ratios, pooler CPU µs per transaction (user, system).
2. ``pgbench -S -C -c 32 -j 2 -T s``, ``PGSSLMODE=require``, for each certificate (and
   ``disable`` against the plain poolers): connections per second (pgbench's TPS with
   ``-C``, one connection per transaction) and pooler CPU µs per connection.
3. One client connected beforehand (psycopg, ``sslmode=require``) runs ``SELECT 1`` in a loop
   for ``--quiet`` seconds alone, then for ``--storm`` seconds while ``pgbench -S -C -c 32``
   (ECDSA) hammers the same pooler with handshakes: p50 and p99 per query and what the storm
   adds to them.

Needs PostgreSQL's server binaries, pgbench, PgBouncer, psycopg and cryptography; CPU is
read from /proc. Everything listens on 127.0.0.1 only and is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import psycopg

from certs import make_certs, postgres_owned
from common import PgbenchFailed, cpu_times, free_port, pgbench, start_odissey, start_postgres, stop, wait_port
from compare import pgbouncer_binary

USER, PASSWORD, DB = "bench", "bench-pw", "bench"
CLIENTS, JOBS = 32, 2
#: What each pooler runs with: no TLS, or client TLS required with one certificate.
SETUPS = ("plain", "ecdsa", "rsa")
#: (load name, setup, PGSSLMODE, pgbench -C): the pgbench loads of parts 1 and 2.
LOADS = (("-S", "plain", "disable", False), ("-S", "ecdsa", "require", False),
         ("-C", "plain", "disable", True), ("-C", "ecdsa", "require", True), ("-C", "rsa", "require", True))


class Target(NamedTuple):
    port: int
    pid: int


def start_pgbouncer(binary: str, pg_port: int, pool_size: int, workdir: Path,
                    cert: Optional[Tuple[Path, Path]]) -> Tuple[subprocess.Popen, int]:
    """PgBouncer (transaction pooling, md5) in front of 127.0.0.1:``pg_port``, requiring
    client TLS with ``cert`` (certificate, key) when given; its files go to ``workdir``."""
    port = free_port()
    workdir.mkdir()
    userlist, ini = workdir / "userlist.txt", workdir / "pgbouncer.ini"
    userlist.write_text(f'"{USER}" "{PASSWORD}"\n')
    tls = (f"client_tls_sslmode = require\nclient_tls_cert_file = {cert[0]}\nclient_tls_key_file = {cert[1]}\n"
           if cert else "")
    ini.write_text(
        f"[databases]\n{DB} = host=127.0.0.1 port={pg_port} dbname={DB}\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = md5\nauth_file = {userlist}\n"
        f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 2000\n"
        f"logfile = {workdir}/pgbouncer.log\n" + tls)
    postgres_owned(workdir, userlist, ini)
    proc = subprocess.Popen([binary, "-q", str(ini)], user="postgres" if os.geteuid() == 0 else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, name="PgBouncer")
    except BaseException:
        stop(proc)
        raise
    return proc, port


def run_pgbench(port: int, sslmode: str, seconds: int, connect: bool) -> float:
    """``pgbench -S [-C] -c 32 -j 2`` with ``PGSSLMODE=sslmode``; its TPS."""
    return pgbench(port, USER, PASSWORD, DB, clients=CLIENTS, jobs=JOBS, protocol="simple",
                   seconds=seconds, connect=connect, sslmode=sslmode)


def query_latencies(conn: psycopg.Connection, seconds: float) -> List[float]:
    """Each ``SELECT 1``'s latency in µs over ``seconds``, one query after another."""
    samples: List[float] = []
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        if start >= deadline:
            return samples
        conn.execute("SELECT 1", prepare=False).fetchone()
        samples.append((time.perf_counter() - start) * 1e6)


def percentiles(samples: List[float]) -> Tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49], cuts[98]


def latency_round(port: int, quiet: int, storm: int) -> Tuple[float, float, float, float, float]:
    """A client connected beforehand queries alone for ``quiet`` s, then for ``storm`` s while
    pgbench -C -c 32 (TLS) connects in a loop: (p50, p99 alone, p50, p99 under the storm, the
    storm's connections per second)."""
    with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname=DB,
                         sslmode="require", autocommit=True) as conn:
        query_latencies(conn, 1)
        alone = percentiles(query_latencies(conn, quiet))
        result: List[float] = []
        errors: List[str] = []

        def hammer() -> None:
            try:
                result.append(run_pgbench(port, "require", storm + 2, connect=True))
            except PgbenchFailed as exc:
                errors.append(exc.reason)

        thread = threading.Thread(target=hammer)
        thread.start()
        time.sleep(1)
        loaded = percentiles(query_latencies(conn, storm))
        thread.join()
    if errors:
        raise PgbenchFailed(errors[0], errors[0])
    return alone[0], alone[1], loaded[0], loaded[1], result[0]


def med(values: Optional[List[float]], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="each pgbench run of parts 1 and 2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet", type=int, default=5, help="part 3: seconds of the lone client")
    parser.add_argument("--storm", type=int, default=10, help="part 3: seconds under the storm")
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="seconds of unmeasured pgbench per load and target")
    parser.add_argument("--pypy", metavar="PYTHON", help="also Odissey under this PyPy interpreter")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="odissey-bench-tls-"))
    os.chmod(workdir, 0o755)
    pg = None
    procs: List[subprocess.Popen] = []
    try:
        certs = make_certs(workdir)
        pg = start_postgres(USER, PASSWORD, DB, scale=args.scale, settings={"max_connections": "200"})
        binary = pgbouncer_binary()
        if binary is None:
            raise SystemExit("PgBouncer is not installed")
        poolers = ["pgbouncer", "odissey"] + (["odissey-pypy"] if args.pypy else [])
        targets: Dict[Tuple[str, str], Target] = {}
        for setup in SETUPS:
            cert = certs.get(setup)
            proc, port = start_pgbouncer(binary, pg.port, args.pool_size, workdir / f"pgbouncer-{setup}", cert)
            procs.append(proc)
            targets[("pgbouncer", setup)] = Target(port, proc.pid)
            extra = f"tls: {{mode: require, cert_file: '{cert[0]}', key_file: '{cert[1]}'}}\n" if cert else ""
            for pooler in poolers[1:]:
                python = args.pypy if pooler == "odissey-pypy" else None
                proc, port, _package = start_odissey(
                    pg.port, USER, PASSWORD, DB, mode="transaction", pool_size=args.pool_size,
                    workdir=str(workdir), name=f"{pooler}-{setup}", extra=extra,
                    **({"python": python} if python else {}))
                procs.append(proc)
                targets[(pooler, setup)] = Target(port, proc.pid)
        if args.warmup:
            for load, setup, sslmode, connect in LOADS:
                for pooler in poolers:
                    try:
                        run_pgbench(targets[(pooler, setup)].port, sslmode, args.warmup, connect)
                    except PgbenchFailed as exc:
                        print(f"warm-up of {pooler} {load} {setup} failed: {exc.reason}", flush=True)

        Key = Tuple[str, str, str]  # (pooler, load, setup)
        tps: Dict[Key, List[float]] = {}
        user_cpu: Dict[Key, List[float]] = {}
        system_cpu: Dict[Key, List[float]] = {}
        latency: Dict[str, List[Tuple[float, float, float, float, float]]] = {}
        failures: Dict[Key, List[str]] = {}
        for round_ in range(args.rounds):
            for load, setup, sslmode, connect in LOADS:
                for pooler in poolers:
                    key = (pooler, load, setup)
                    target = targets[(pooler, setup)]
                    user_before, system_before = cpu_times(target.pid)
                    try:
                        result = run_pgbench(target.port, sslmode, args.seconds, connect)
                    except PgbenchFailed as exc:
                        failures.setdefault(key, []).append(exc.reason)
                        print(f"round {round_ + 1}: {pooler:12} {load} {setup:5} FAILED: {exc.reason}", flush=True)
                        continue
                    user, system = cpu_times(target.pid)
                    count = result * args.seconds
                    tps.setdefault(key, []).append(result)
                    user_cpu.setdefault(key, []).append((user - user_before) / count * 1e6)
                    system_cpu.setdefault(key, []).append((system - system_before) / count * 1e6)
                    print(f"round {round_ + 1}: {pooler:12} {load} {setup:5} {result:8.0f} tps  pooler "
                          f"{user_cpu[key][-1]:6.1f} user {system_cpu[key][-1]:6.1f} system µs/tx", flush=True)
            for pooler in poolers:
                try:
                    row = latency_round(targets[(pooler, "ecdsa")].port, args.quiet, args.storm)
                except (PgbenchFailed, psycopg.Error) as exc:
                    failures.setdefault((pooler, "latency", "ecdsa"), []).append(str(exc).splitlines()[0])
                    print(f"round {round_ + 1}: {pooler:12} latency FAILED: {exc}", flush=True)
                    continue
                latency.setdefault(pooler, []).append(row)
                print(f"round {round_ + 1}: {pooler:12} latency alone p50 {row[0]:.0f} p99 {row[1]:.0f} µs, "
                      f"under {row[4]:.0f} conn/s p50 {row[2]:.0f} p99 {row[3]:.0f} µs", flush=True)

        def tps_of(key: Key) -> Optional[float]:
            return None if key in failures or key not in tps else statistics.median(tps[key])

        def ratio(first: Optional[float], second: Optional[float]) -> str:
            return f"{first / second:.2f}" if first and second else "-"

        print(f"\n{CLIENTS} clients, pgbench -j {JOBS}, transaction pooling, pool size {args.pool_size}, "
              f"{args.seconds}s x {args.rounds} rounds, medians\n")
        print("| load | pooler | TLS (certificate) | TPS | vs PgBouncer | TLS / plain | "
              "pooler CPU µs / tx | user | system |")
        print("|---|---|---|---|---|---|---|---|---|")
        for load, setup, _sslmode, _connect in LOADS:
            for pooler in poolers:
                key = (pooler, load, setup)
                if key in failures:
                    print(f"| {load} | {pooler} | {setup} | failed in {len(failures[key])} of {args.rounds} rounds: "
                          f"{failures[key][0]} | | | | | |")
                    continue
                total = [u + s for u, s in zip(user_cpu.get(key, []), system_cpu.get(key, []))]
                plain = tps_of((pooler, load, "plain")) if setup != "plain" else None
                print(f"| {load} | {pooler} | {setup} | {med(tps.get(key))} | "
                      f"{ratio(tps_of(key), tps_of(('pgbouncer', load, setup)))} | "
                      f"{ratio(tps_of(key), plain) if plain else '-'} | {med(total, 1)} | "
                      f"{med(user_cpu.get(key), 1)} | {med(system_cpu.get(key), 1)} |")

        print(f"\nSELECT 1 latency of a connected TLS client, µs: alone ({args.quiet}s), then during "
              f"pgbench -S -C -c {CLIENTS} with sslmode=require, ECDSA ({args.storm}s); medians of {args.rounds} rounds\n")
        print("| pooler | alone p50 | alone p99 | storm p50 | storm p99 | added p50 | added p99 | storm conn/s |")
        print("|---|---|---|---|---|---|---|---|")
        for pooler in poolers:
            rows = latency.get(pooler, [])
            if not rows:
                print(f"| {pooler} | failed | | | | | | |")
                continue
            column = [[row[i] for row in rows] for i in range(5)]
            added50 = [row[2] - row[0] for row in rows]
            added99 = [row[3] - row[1] for row in rows]
            print(f"| {pooler} | {med(column[0])} | {med(column[1])} | {med(column[2])} | {med(column[3])} | "
                  f"{med(added50)} | {med(added99)} | {med(column[4])} |")
        for (pooler, load, setup), reasons in failures.items():
            print(f"failed: {pooler} {load} {setup} in {len(reasons)} of {args.rounds} rounds: {reasons[0]}")
    finally:
        for proc in procs:
            stop(proc)
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
