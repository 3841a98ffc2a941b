"""pgbench against PostgreSQL direct, PgBouncer (when installed) and Odissey, in one run.

Runs are interleaved (direct, pgbouncer, odissey, direct, ...) so that noise on a shared
machine hits every target alike; the report gives median TPS, the ratio to PostgreSQL
direct and to PgBouncer, and the pooler's CPU seconds per 1000 transactions (from
/proc, user + system time of the pooler process during its runs).

    python bench/compare.py --mode transaction --clients 8,32 --protocol simple,extended \
        --seconds 20 --rounds 3 --pool-size 20

Needs PostgreSQL's server binaries and pgbench; PgBouncer is used when ``pgbouncer`` is on
the PATH (or /usr/sbin). Everything listens on 127.0.0.1 only and is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import cpu_seconds, free_port, pg_env, start_odissey, start_postgres, stop, wait_port

USER, PASSWORD, DB = "bench", "bench-pw", "bench"


def start_pgbouncer(pg_port: int, mode: str, pool_size: int, workdir: str) -> tuple[subprocess.Popen, int] | None:
    binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if binary is None:
        return None
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


def pgbench(port: int, clients: int, protocol: str, seconds: int) -> float:
    done = subprocess.run(
        ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-S", "-n",
         "-c", str(clients), "-j", str(min(clients, 4)), "-T", str(seconds), "-M", protocol, DB],
        capture_output=True, text=True, env=pg_env(PASSWORD),
    )
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    match = re.search(r"tps = ([\d.]+)", done.stdout)
    if done.returncode != 0 or not match or (failed and int(failed.group(1))):
        raise RuntimeError(f"pgbench failed on port {port}:\n{done.stdout}\n{done.stderr}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="transaction", choices=("session", "transaction"))
    parser.add_argument("--clients", default="8,32")
    parser.add_argument("--protocol", default="simple,extended")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--no-pgbouncer", action="store_true")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="odissey-bench-")
    pg = None
    procs: list[subprocess.Popen] = []
    try:
        pg = start_postgres(USER, PASSWORD, DB, scale=args.scale, settings={"max_connections": "300"})
        targets: dict[str, tuple[int, int | None]] = {"postgres": (pg.port, None)}
        if not args.no_pgbouncer:
            started = start_pgbouncer(pg.port, args.mode, args.pool_size, workdir)
            if started:
                procs.append(started[0])
                targets["pgbouncer"] = (started[1], started[0].pid)
        odissey, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode=args.mode,
                                                pool_size=args.pool_size, workdir=workdir)
        procs.append(odissey)
        targets["odissey"] = (port, odissey.pid)

        results: dict[tuple[str, int, str], list[float]] = {}
        cpu: dict[tuple[str, int, str], list[float]] = {}
        for _round in range(args.rounds):
            for clients in map(int, args.clients.split(",")):
                for protocol in args.protocol.split(","):
                    for name, (port, pid) in targets.items():
                        before = cpu_seconds(pid) if pid else 0.0
                        tps = pgbench(port, clients, protocol, args.seconds)
                        key = (name, clients, protocol)
                        results.setdefault(key, []).append(tps)
                        if pid:
                            used = cpu_seconds(pid) - before
                            cpu.setdefault(key, []).append(used / (tps * args.seconds / 1000))
                        print(f"round {_round + 1}: {name:9} -c {clients:3} -M {protocol:8} {tps:10.0f} tps",
                              flush=True)

        print(f"\npgbench -S, {args.mode} pooling, pool size {args.pool_size}, {args.seconds}s x {args.rounds} "
              f"rounds, medians\n")
        print("| clients | protocol | target | TPS | vs direct | vs PgBouncer | pooler CPU s / 1000 tx |")
        print("|---|---|---|---|---|---|---|")
        for clients in map(int, args.clients.split(",")):
            for protocol in args.protocol.split(","):
                direct = statistics.median(results[("postgres", clients, protocol)])
                bouncer = results.get(("pgbouncer", clients, protocol))
                for name in targets:
                    tps = statistics.median(results[(name, clients, protocol)])
                    vs_bouncer = f"{tps / statistics.median(bouncer):.2f}" if bouncer else "n/a"
                    per_k = cpu.get((name, clients, protocol))
                    per_k_text = f"{statistics.median(per_k):.3f}" if per_k else "-"
                    print(f"| {clients} | {protocol} | {name} | {tps:.0f} | {tps / direct:.2f} | "
                          f"{vs_bouncer} | {per_k_text} |")
    finally:
        for proc in procs:
            stop(proc)
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
