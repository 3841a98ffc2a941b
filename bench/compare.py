"""pgbench against PostgreSQL direct, PgBouncer (when installed) and Odissey, in one run.

Runs are interleaved (direct, pgbouncer, odissey, direct, ...) so that noise on a shared
machine hits every target alike; the report gives median TPS, the ratio to PostgreSQL
direct and to PgBouncer, the pooler's CPU microseconds per transaction (from /proc, user
and system time of the pooler process during its runs) and PostgreSQL's (the postmaster and
all its processes), and, when both were run, each target's prepared against extended.

    python bench/compare.py --mode transaction --clients 32,200 \
        --protocol simple,extended,prepared --seconds 20 --rounds 3 --pool-size 20

``--protocol`` takes pgbench's ``-M`` values: simple, extended, prepared; each runs the
select-only script (``-S``), and also ``--tpcb`` the built-in tpcb-like one and ``--connect``
select-only with a new connection per transaction (``-C``, churn). ``--tls-connect`` adds
the TLS connection storm: ``-S -C`` with ``sslmode=require``; the poolers then allow client
TLS with a throwaway ECDSA certificate (bench/certs.py), the other loads run with
``sslmode=disable``, and PostgreSQL direct (no TLS here) is skipped for it; with ``-C`` the
pooler's CPU per transaction is its CPU per connection. PgBouncer before
1.21 has no prepared statements in transaction mode, so with it ``prepared`` is skipped
there (and said so in the report); ``--try-unsupported`` runs it anyway, to show how it
fails. A run whose pgbench fails (exit status, an error line, an aborted client, a failed
transaction) is reported as failed with pgbench's first error, never as a number.

Needs PostgreSQL's server binaries and pgbench; PgBouncer is used when ``pgbouncer`` is on
the PATH (or /usr/sbin). ``--odyssey BINARY`` adds Yandex Odyssey (bench/odyssey.py) with one
worker and with each ``--workers`` count. Everything listens on 127.0.0.1 only and is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from certs import make_certs
from common import (PgbenchFailed, free_port, pgbench, postgres_cpu_seconds, start_floor, start_login_floor,
                    start_odissey, start_postgres, stop, tree_cpu_times, wait_port)
from odyssey import start_odyssey

USER, PASSWORD, DB = "bench", "bench-pw", "bench"
PROTOCOLS = ("simple", "extended", "prepared")
#: The first PgBouncer with protocol-level prepared statements in transaction mode.
PGBOUNCER_PREPARED = (1, 21)


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def start_pgbouncer(binary: str, pg_port: int, mode: str, pool_size: int, workdir: str,
                    prepared: bool, tls: tuple[Path, Path] | None = None) -> tuple[subprocess.Popen, int]:
    """PgBouncer with one md5 database in front of 127.0.0.1:``pg_port``; ``prepared``
    turns on its prepared statements (1.21+), 200 per server as Odissey's default; ``tls``
    (certificate, key) allows client TLS."""
    port = free_port()
    userlist = Path(workdir) / "userlist.txt"
    userlist.write_text(f'"{USER}" "{PASSWORD}"\n')
    ini = Path(workdir) / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"{DB} = host=127.0.0.1 port={pg_port} dbname={DB}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = md5\nauth_file = {userlist}\n"
        f"pool_mode = {mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 2000\n"
        f"logfile = {workdir}/pgbouncer.log\n"
        + ("max_prepared_statements = 200\n" if prepared else "")
        + (f"client_tls_sslmode = allow\nclient_tls_cert_file = {tls[0]}\nclient_tls_key_file = {tls[1]}\n"
           if tls else "")
    )
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        info = pwd.getpwnam(user)
        for path in (workdir, userlist, ini):
            os.chown(path, info.pw_uid, info.pw_gid)
    proc = subprocess.Popen([binary, "-q", str(ini)], user=user,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, name="PgBouncer")
    except BaseException:
        stop(proc)
        raise
    return proc, port


def protocols(text: str) -> list[str]:
    chosen = [p for p in text.split(",") if p]
    unknown = set(chosen) - set(PROTOCOLS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"protocols are {', '.join(PROTOCOLS)}, not {text!r}")
    return chosen


def clients_list(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c]


#: (target, clients, load): the load is the -M protocol, with " tpcb" (the tpcb-like script
#: instead of -S), " -C" (a connection per transaction) or " -C tls" (the same with
#: sslmode=require) after it.
Key = tuple[str, int, str]


def pgbench_load(port: int, load: str, clients: int, jobs: int, seconds: int) -> float:
    """One pgbench run of ``load`` (see :data:`Key`)."""
    protocol, _, variant = load.partition(" ")
    return pgbench(port, USER, PASSWORD, DB, clients=clients, jobs=jobs, protocol=protocol,
                   seconds=seconds, select_only=variant != "tpcb", connect=variant.startswith("-C"),
                   sslmode="require" if variant == "-C tls" else "disable")


def median_text(values: list[float] | None, digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "-"


def median_difference(cpu: dict[Key, list[float]], first: Key, second: Key) -> str:
    """The median of ``first`` minus that of ``second``, signed, or ``-``."""
    if first not in cpu or second not in cpu:
        return "-"
    return f"{statistics.median(cpu[first]) - statistics.median(cpu[second]):+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="transaction", choices=("session", "transaction"))
    parser.add_argument("--clients", type=clients_list, default=[8, 32])
    parser.add_argument("--protocol", type=protocols, default=["simple", "extended"],
                        help="comma-separated pgbench -M values: simple, extended, prepared")
    parser.add_argument("--tpcb", action="store_true", help="also the tpcb-like script, each protocol")
    parser.add_argument("--connect", action="store_true",
                        help="also -S with a new connection per transaction (-C), each protocol")
    parser.add_argument("--tls-connect", action="store_true",
                        help="also -S -C with sslmode=require (the TLS connection storm), each protocol; "
                             "the poolers allow client TLS")
    parser.add_argument("--odyssey", metavar="BINARY",
                        help="also Yandex Odyssey, this binary, with 1 worker and each --workers count")
    parser.add_argument("--twisted-write", action="store_true",
                        help="the floor writes with plain transport.write (see bench/floor.py)")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (at most the clients)")
    parser.add_argument("--no-pgbouncer", action="store_true")
    parser.add_argument("--floor", action="store_true",
                        help="also bench/floor.py, the bare Twisted relay (one server connection per client)")
    parser.add_argument("--login-floor", action="store_true",
                        help="also bench/login_floor.py, the least a Twisted pooler does for a login "
                             "(what -C should be read against)")
    parser.add_argument("--floor-short-reads", action="store_true",
                        help="also the floor with Odissey's read path (bench/floor.py --short-reads)")
    parser.add_argument("--pypy", metavar="PYTHON",
                        help="also Odissey (and with --floor the floor) under this PyPy interpreter")
    parser.add_argument("--warmup", type=int, default=0,
                        help="seconds of unmeasured pgbench per target first (PyPy's JIT)")
    parser.add_argument("--workers", type=clients_list, default=[],
                        help="also Odissey with these numbers of worker processes (e.g. 2,4), and "
                             "with --pypy under PyPy too; its CPU is the master's and all workers'")
    parser.add_argument("--log-section", action="store_true",
                        help="Odissey with a `log: {format: text}` section: its own observer, on standard "
                             "output (into a file), instead of twistd's --logfile observer")
    parser.add_argument("--try-unsupported", action="store_true",
                        help="run -M prepared through a PgBouncer without prepared statements too")
    args = parser.parse_args()
    loads = list(args.protocol)
    loads += [f"{protocol} tpcb" for protocol in args.protocol] if args.tpcb else []
    loads += [f"{protocol} -C" for protocol in args.protocol] if args.connect else []
    loads += [f"{protocol} -C tls" for protocol in args.protocol] if args.tls_connect else []

    def skip_reason(name: str, load: str) -> str | None:
        return skipped.get((name, load)) or skipped.get((name, load.partition(" ")[0]))

    #: (workers, (target name, interpreter)) for each multi-worker Odissey.
    worker_targets = [(workers, target) for workers in args.workers
                      for target in ((f"odissey-w{workers}", sys.executable),
                                     (f"odissey-pypy-w{workers}", args.pypy)) if target[1]]
    workdir = tempfile.mkdtemp(prefix="odissey-bench-")
    os.chmod(workdir, 0o755)  # PgBouncer and Odyssey run as postgres when we are root
    pg = None
    procs: list[subprocess.Popen] = []
    #: Targets that are not run for a protocol, and why.
    skipped: dict[tuple[str, str], str] = {}
    try:
        # Every pooler keeps its pool of servers open while pgbench connects directly.
        poolers = 2 + len(worker_targets) + (1 + len(args.workers) if args.odyssey else 0) + bool(args.pypy)
        connections = max(args.clients) * (1 + 2 * args.login_floor) + 50 + poolers * args.pool_size
        pg = start_postgres(USER, PASSWORD, DB, scale=args.scale,
                            settings={"max_connections": str(max(300, connections))})
        targets: dict[str, tuple[int, int | None]] = {"postgres": (pg.port, None)}
        cert = make_certs(Path(workdir))["ecdsa"] if args.tls_connect else None
        odissey_extra = (f"tls: {{mode: allow, cert_file: '{cert[0]}', key_file: '{cert[1]}'}}\n"
                       if cert else "") + ("log: {format: text}\n" if args.log_section else "")
        for load in loads:
            if load.endswith(" -C tls"):
                skipped[("postgres", load)] = "PostgreSQL here has no TLS"
        binary = None if args.no_pgbouncer else pgbouncer_binary()
        if binary:
            version = pgbouncer_version(binary)
            prepared = version >= PGBOUNCER_PREPARED
            proc, port = start_pgbouncer(binary, pg.port, args.mode, args.pool_size, workdir, prepared, cert)
            procs.append(proc)
            targets["pgbouncer"] = (port, proc.pid)
            if args.mode == "transaction" and not prepared and not args.try_unsupported:
                skipped[("pgbouncer", "prepared")] = (
                    f"PgBouncer {'.'.join(map(str, version))} has no prepared statements in "
                    f"transaction mode (they came in 1.21)")
        odissey, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode=args.mode,
                                                pool_size=args.pool_size, workdir=workdir, extra=odissey_extra)
        procs.append(odissey)
        targets["odissey"] = (port, odissey.pid)
        for workers, (name, python) in worker_targets:
            proc, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode=args.mode,
                                                 pool_size=args.pool_size, workdir=workdir,
                                                 python=python, name=name,
                                                 extra=f"workers: {workers}\n" + odissey_extra)
            procs.append(proc)
            targets[name] = (port, proc.pid)
        if args.odyssey:
            for workers in [1, *args.workers]:
                name = "odyssey" if workers == 1 else f"odyssey-w{workers}"
                proc, port = start_odyssey(args.odyssey, pg.port, USER, PASSWORD, DB, mode=args.mode,
                                           pool_size=args.pool_size, workers=workers, workdir=Path(workdir),
                                           name=name, tls=cert)
                procs.append(proc)
                targets[name] = (port, proc.pid)
        if args.pypy:
            proc, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode=args.mode,
                                                 pool_size=args.pool_size, workdir=workdir,
                                                 python=args.pypy, name="odissey-pypy", extra=odissey_extra)
            procs.append(proc)
            targets["odissey-pypy"] = (port, proc.pid)
        floors = [(name, python, False) for name, python in (("floor", sys.executable), ("floor-pypy", args.pypy))
                  if args.floor and python]
        floors += [(name, python, True) for name, python in (("floor-sr", sys.executable), ("floor-sr-pypy", args.pypy))
                   if args.floor_short_reads and python]
        for name, python, short_reads in floors:
            proc, port = start_floor(pg.port, workdir, python, name, twisted_write=args.twisted_write,
                                     short_reads=short_reads)
            procs.append(proc)
            targets[name] = (port, proc.pid)
        for name, python in (("login-floor", sys.executable), ("login-floor-pypy", args.pypy)):
            if args.login_floor and python:
                proc, port = start_login_floor(pg.port, USER, PASSWORD, DB, workdir, python, name)
                procs.append(proc)
                targets[name] = (port, proc.pid)
                for load in loads:
                    if load.startswith("prepared") or load.endswith(" tls"):
                        skipped[(name, load)] = ("the login floor resets nothing on its kept servers (pgbench's "
                                                 "prepared statements would collide) and has no TLS")
        for name, (port, _pid) in targets.items():
            if args.warmup:
                for load in loads:
                    if not skip_reason(name, load):
                        try:
                            pgbench_load(port, load, max(args.clients), args.jobs, args.warmup)
                        except PgbenchFailed as exc:
                            print(f"warm-up of {name} -M {load} failed: {exc.reason}", flush=True)

        results: dict[Key, list[float]] = {}
        pooler_cpu: dict[Key, list[float]] = {}
        pooler_user: dict[Key, list[float]] = {}
        pooler_system: dict[Key, list[float]] = {}
        server_cpu: dict[Key, list[float]] = {}
        failures: dict[Key, list[str]] = {}
        for round_ in range(args.rounds):
            for clients in args.clients:
                for protocol in loads:
                    for name, (port, pid) in targets.items():
                        if skip_reason(name, protocol):
                            continue
                        key = (name, clients, protocol)
                        user_before, system_before = tree_cpu_times(pid) if pid else (0.0, 0.0)
                        server_before = postgres_cpu_seconds(pg)
                        try:
                            tps = pgbench_load(port, protocol, clients, args.jobs, args.seconds)
                        except PgbenchFailed as exc:
                            failures.setdefault(key, []).append(exc.reason)
                            print(f"round {round_ + 1}: {name:9} -c {clients:3} -M {protocol:8} "
                                  f"FAILED: {exc.reason}", flush=True)
                            continue
                        transactions = tps * args.seconds
                        results.setdefault(key, []).append(tps)
                        server_cpu.setdefault(key, []).append(
                            (postgres_cpu_seconds(pg) - server_before) / transactions * 1e6)
                        if pid:
                            user, system = tree_cpu_times(pid)
                            user = (user - user_before) / transactions * 1e6
                            system = (system - system_before) / transactions * 1e6
                            pooler_user.setdefault(key, []).append(user)
                            pooler_system.setdefault(key, []).append(system)
                            pooler_cpu.setdefault(key, []).append(user + system)
                        print(f"round {round_ + 1}: {name:9} -c {clients:3} -M {protocol:8} {tps:10.0f} tps"
                              f"  pooler {median_text(pooler_cpu.get(key, [])[-1:]):>5} µs/tx"
                              f"  postgres {server_cpu[key][-1]:5.1f} µs/tx", flush=True)

        def tps_of(key: Key) -> float | None:
            """The median TPS, or None when any round failed or nothing ran."""
            return None if key in failures or key not in results else statistics.median(results[key])

        print(f"\npgbench -S -j {args.jobs}, {args.mode} pooling, pool size {args.pool_size}, "
              f"{args.seconds}s x {args.rounds} rounds, medians\n")
        print("| clients | load | target | TPS | vs direct | vs PgBouncer | pooler CPU µs / tx "
              "| user | system | PostgreSQL CPU µs / tx |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for clients in args.clients:
            for protocol in loads:
                direct = tps_of(("postgres", clients, protocol))
                bouncer = tps_of(("pgbouncer", clients, protocol))
                for name in targets:
                    key = (name, clients, protocol)
                    if skip_reason(name, protocol):
                        print(f"| {clients} | {protocol} | {name} | skipped: {skip_reason(name, protocol)} "
                              f"| | | | | | |")
                        continue
                    if key in failures:
                        print(f"| {clients} | {protocol} | {name} | failed in {len(failures[key])} of "
                              f"{args.rounds} rounds: {failures[key][0]} | | | | | | |")
                        continue
                    median = statistics.median(results[key])
                    vs_direct = f"{median / direct:.2f}" if direct else "n/a"
                    vs_bouncer = f"{median / bouncer:.2f}" if bouncer else "n/a"
                    print(f"| {clients} | {protocol} | {name} | {median:.0f} | {vs_direct} | {vs_bouncer} | "
                          f"{median_text(pooler_cpu.get(key))} | {median_text(pooler_user.get(key))} | "
                          f"{median_text(pooler_system.get(key))} | {median_text(server_cpu.get(key))} |")

        if "prepared" in args.protocol and "extended" in args.protocol:
            print("\nprepared against extended, same target (medians; CPU as differences)\n")
            print("| clients | target | TPS prepared / extended | pooler CPU µs / tx | PostgreSQL CPU µs / tx |")
            print("|---|---|---|---|---|")
            for clients in args.clients:
                for name in targets:
                    prepared_key, extended_key = (name, clients, "prepared"), (name, clients, "extended")
                    prepared_tps, extended_tps = tps_of(prepared_key), tps_of(extended_key)
                    if prepared_tps is None or extended_tps is None:
                        continue
                    print(f"| {clients} | {name} | {prepared_tps / extended_tps:.2f} | "
                          f"{median_difference(pooler_cpu, prepared_key, extended_key)} | "
                          f"{median_difference(server_cpu, prepared_key, extended_key)} |")
        if skipped or failures:
            print()
            for (name, protocol), why in skipped.items():
                print(f"skipped: {name} -M {protocol}: {why}")
            for (name, clients, protocol), reasons in failures.items():
                print(f"failed: {name} -c {clients} -M {protocol} in {len(reasons)} of {args.rounds} rounds: "
                      f"{reasons[0]}")
    finally:
        for proc in procs:
            stop(proc)
        for _workers, (name, _python) in worker_targets:  # the masters' totals, logged as they stopped
            for log in (Path(workdir) / f"{name}.log", Path(workdir) / f"{name}.out"):  # (.out: --log-section)
                for line in (log.read_text().splitlines() if log.exists() else ()):
                    if "leases:" in line:
                        print(f"{name}: {line.split('] ', 1)[-1]}")
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
