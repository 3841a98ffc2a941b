"""A soak of Odissey in transaction mode: steady load, connection churn and killed clients.

Starts a throwaway PostgreSQL (TCP on 127.0.0.1, md5) and Odissey in front of it (as a
separate ``twistd odissey`` process running this working tree's code), then for
``--seconds`` runs at once:

- steady load: ``pgbench -S -c 8`` through Odissey;
- churn: ``pgbench -S -C -c 4`` through Odissey (a new connection per transaction);
- killed clients: threads that open psycopg connections through Odissey, BEGIN, INSERT a
  row with a unique note (``kill-N``), then idle in the transaction, run a ``pg_sleep``,
  send half of a COPY FROM STDIN or keep inserting, and have their socket shut down
  (sometimes with SO_LINGER 0, so the final close is a reset) at a random moment; a share
  of them are child processes that ``os._exit`` at a random moment instead. Control
  clients commit rows (``ok-N``) and must find them committed; every connection first
  checks that its server is not inside somebody else's transaction.

Every ``--interval`` seconds it samples Odissey's RSS, CPU and sockets (client and server
side) and PostgreSQL's backends for the route's user (idle in transaction, transactions
older than ``--xact-age``). At the end it stops the load, lets the pool settle and checks:
Odissey alive, no transaction older than ``--xact-age`` at any sample, no backend in a
transaction, server connections <= pool size, no client socket left in Odissey, no
committed row of a killed client, every acknowledged control commit present, no dirty
server seen, no pgbench failure, no traceback in Odissey's log, RSS flat (median of the
last third of the samples against the middle third; the first third is warm-up). It
prints a summary and exits 1 when a check fails, keeping Odissey's and PostgreSQL's logs.

    python bench/soak.py --seconds 300 --seed 1

Randomness is seeded (printed; ``--seed`` repeats a schedule, not its timing).
Everything listens on 127.0.0.1 or a unix socket and is stopped at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from common import LocalPostgres, cpu_seconds, pg_env, start_odissey, start_postgres, stop

USER, PASSWORD, DB = "soak", "soak-pw", "soak"
TABLE = "soak_notes"
#: Kinds of killer iterations and their weights (``control`` commits and is not a kill).
KINDS: Dict[str, int] = {"idle": 20, "sleep": 20, "copy": 15, "inserts": 15, "process": 10, "control": 20}


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM of a process in KiB."""
    values: Dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def socket_counts(pid: int, listen_port: int, pg_port: int) -> Dict[str, int]:
    """A process's sockets: all, client side (local port ``listen_port``, listener excluded),
    server side (remote port ``pg_port``), matched by inode in /proc/net/tcp."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    counts = {"sockets": len(inodes), "clients": 0, "servers": 0}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] not in inodes or fields[3] == "0A":  # 0A: LISTEN
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == listen_port:
                counts["clients"] += 1
            elif int(fields[2].rsplit(":", 1)[1], 16) == pg_port:
                counts["servers"] += 1
    return counts


def scalar(conn: Any, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def dsn(port: int, application: str) -> str:
    return (f"host=127.0.0.1 port={port} dbname={DB} user={USER} password={PASSWORD} "
            f"connect_timeout=10 application_name={application}")


# --------------------------------------------------------------------------- pgbench


def pgbench_cmd(port: int, clients: int, seconds: int, builtin: str, connect: bool) -> List[str]:
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-n", "-b", builtin,
           "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "-P", "10"]
    if connect:
        cmd.append("-C")
    return cmd + [DB]


def pgbench_result(out: str, err: str, rc: int) -> Dict[str, Any]:
    def number(pattern: str, text: str = out) -> Optional[float]:
        found = re.search(pattern, text)
        return float(found.group(1)) if found else None

    progress = [float(x) for x in re.findall(r"progress: [\d.]+ s, ([\d.]+) tps", err)]
    return {
        "rc": rc,
        "tps": number(r"tps = ([\d.]+)"),
        "processed": number(r"number of transactions actually processed: (\d+)"),
        "failed": number(r"number of failed transactions: (\d+)"),
        "aborted": len(re.findall(r"client \d+ aborted", err)),
        "progress": progress,
        "errors": [line for line in err.splitlines() if not line.startswith("progress:")][:5],
    }


# --------------------------------------------------------------------------- killed clients


class Killers:
    """Threads that open connections through Odissey, start a transaction and get killed."""

    def __init__(self, port: int, seed: int, threads: int, rate: float, max_kills: int,
                 deadline: float) -> None:
        self.port = port
        self.seed = seed
        self.rate = rate
        self.max_kills = max_kills
        self.deadline = deadline
        self.lock = threading.Lock()
        self.next_slot = time.monotonic()
        self.iterations = 0
        self.kills: Dict[str, int] = {kind: 0 for kind in KINDS if kind != "control"}
        self.kills_after_insert = 0
        self.resets = 0
        self.acknowledged: List[str] = []
        self.uncertain: List[str] = []
        self.dirty: List[str] = []
        self.unexpected: List[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)
            if thread.is_alive():
                self.unexpected.append("a killer thread did not stop within 60 s")

    def _slot(self) -> Optional[int]:
        """Waits for the next iteration's turn (global rate); None when it is over."""
        with self.lock:
            if self.total_kills >= self.max_kills:
                return None
            slot = max(time.monotonic(), self.next_slot)
            self.next_slot = slot + 1.0 / self.rate
            self.iterations += 1
            number = self.iterations
        if slot >= self.deadline:
            return None
        time.sleep(max(0.0, slot - time.monotonic()))
        return number

    def _run(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-{index}")
        kinds, weights = list(KINDS), list(KINDS.values())
        while True:
            number = self._slot()
            if number is None:
                return
            kind = rng.choices(kinds, weights)[0]
            try:
                if kind == "control":
                    self._control(number, rng)
                elif kind == "process":
                    self._process(number, rng)
                else:
                    self._kill(number, kind, rng)
            except Exception as exc:  # noqa: BLE001 - a soak reports, it does not stop
                with self.lock:
                    self.unexpected.append(f"{kind} #{number}: {type(exc).__name__}: {exc}")

    def _connect(self, application: str):
        import psycopg

        return psycopg.connect(dsn(self.port, application), autocommit=True, prepare_threshold=None)

    def _probe(self, conn, what: str) -> None:
        """A fresh connection's server must not be inside another client's transaction."""
        from psycopg.pq import TransactionStatus

        same = scalar(conn, "SELECT now() = statement_timestamp()")
        status = conn.info.transaction_status
        if not same or status != TransactionStatus.IDLE:
            with self.lock:
                self.dirty.append(f"{what}: now() = statement_timestamp() is {same}, status {status.name}")

    def _kill(self, number: int, kind: str, rng: random.Random) -> None:
        import psycopg

        note = f"kill-{number}"
        conn = self._connect(f"soak-{kind}")
        # A dup of the socket: libpq may close its own descriptor on an error, and the number
        # could then belong to another thread's connection; the dup always means this socket.
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        reset = rng.random() < 0.5
        killing = threading.Event()
        killed = threading.Event()
        inserted = False

        def kill() -> None:
            killing.set()
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            killed.set()

        timer = threading.Timer(rng.uniform(0.0, 0.5), kill)
        try:
            self._probe(conn, f"{kind} #{number}")
            timer.start()
            try:
                conn.execute("BEGIN")
                conn.execute(f"INSERT INTO {TABLE} (note, kind) VALUES (%s, %s)", (note, kind))
                inserted = not killing.is_set()
                if kind == "sleep":
                    conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0.1, 2.0),))
                elif kind == "inserts":
                    for i in range(1000):
                        if killing.is_set():
                            break
                        conn.execute(f"INSERT INTO {TABLE} (note, kind) VALUES (%s, %s)", (f"{note}-{i}", kind))
                elif kind == "copy":
                    with conn.cursor() as cur:
                        with cur.copy(f"COPY {TABLE} (note, kind) FROM STDIN") as copy:
                            for i in range(rng.randint(10, 200)):
                                copy.write_row((f"{note}-copy{i}", "copy" + "." * 1000))
                            killed.wait(5)
                            raise ConnectionAbortedError("killed in the middle of a COPY")
                killed.wait(5)
            except (psycopg.Error, ConnectionAbortedError) as exc:
                if not killing.is_set():
                    with self.lock:
                        self.unexpected.append(f"{kind} #{number} before its kill: {exc}")
            killed.wait(5)
            if not killed.is_set():
                kill()
        finally:
            timer.cancel()
            if not killing.is_set():
                kill()
            killed.wait(5)
            conn.close()
            sock.close()
        with self.lock:
            self.kills[kind] += 1
            self.kills_after_insert += inserted
            self.resets += reset

    def _process(self, number: int, rng: random.Random) -> None:
        """A child process that connects, BEGINs, INSERTs and os._exit()s at a random moment."""
        note = f"kill-{number}"
        mode = rng.choice(("idle", "sleep"))
        reset = rng.random() < 0.5
        child = subprocess.Popen(
            [sys.executable, __file__, "--victim", dsn(self.port, "soak-process"), note, mode,
             f"{rng.uniform(0.0, 0.5):.3f}", "1" if reset else "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            out, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            err = "did not exit within 30 s\n" + err
        if child.returncode != 0 or "connected" not in out:
            with self.lock:
                self.unexpected.append(f"process #{number}: status {child.returncode}: {err.strip()[-300:]}")
        if "dirty" in out:
            with self.lock:
                self.dirty.append(f"process #{number}: {out.strip()}")
        with self.lock:
            self.kills["process"] += 1
            self.kills_after_insert += "inserted" in out
            self.resets += reset

    def _control(self, number: int, rng: random.Random) -> None:
        """Commits a row that must be there at the end, then leaves (half of them vanish)."""
        import psycopg

        note = f"ok-{number}"
        conn = self._connect("soak-control")
        try:
            self._probe(conn, f"control #{number}")
            conn.execute("BEGIN")
            conn.execute(f"INSERT INTO {TABLE} (note, kind) VALUES (%s, 'control')", (note,))
            try:
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                with self.lock:
                    self.uncertain.append(note)
                    self.unexpected.append(f"control #{number} COMMIT: {exc}")
                return
            with self.lock:
                self.acknowledged.append(note)
            if rng.random() < 0.5:
                with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            conn.close()


def victim_main(argv: List[str]) -> None:
    """Child process: connect, BEGIN, INSERT, then idle or sleep until os._exit fires."""
    import psycopg
    from psycopg.pq import TransactionStatus

    logging.getLogger("psycopg").setLevel(logging.ERROR)
    conninfo, note, mode, delay, reset = argv
    conn = psycopg.connect(conninfo, autocommit=True, prepare_threshold=None)
    if reset == "1":
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    print("connected", flush=True)
    same = scalar(conn, "SELECT now() = statement_timestamp()")
    if not same or conn.info.transaction_status != TransactionStatus.IDLE:
        print(f"dirty: {same} {conn.info.transaction_status.name}", flush=True)
    threading.Timer(float(delay), os._exit, (0,)).start()
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO {TABLE} (note, kind) VALUES (%s, 'process')", (note,))
    print("inserted", flush=True)
    if mode == "sleep":
        conn.execute("SELECT pg_sleep(10)")
    time.sleep(10)
    os._exit(3)  # the timer should have ended us long ago


# --------------------------------------------------------------------------- sampling


class Sampler:
    """Odissey's RSS and sockets, PostgreSQL's backends for USER, every ``interval`` seconds."""

    QUERY = (
        "SELECT count(*), count(*) FILTER (WHERE state = 'active'),"
        " count(*) FILTER (WHERE state LIKE 'idle in transaction%%'),"
        " count(*) FILTER (WHERE xact_start IS NOT NULL),"
        " count(*) FILTER (WHERE xact_start < now() - make_interval(secs => %s))"
        " FROM pg_stat_activity WHERE usename = %s"
    )

    def __init__(self, pg_conninfo: str, pid: int, port: int, pg_port: int, xact_age: float) -> None:
        import psycopg

        self.conn = psycopg.connect(pg_conninfo, autocommit=True)
        self.pid = pid
        self.port = port
        self.pg_port = pg_port
        self.xact_age = xact_age
        self.samples: List[Dict[str, Any]] = []
        self.start = time.monotonic()
        self.last_cpu = (self.start, cpu_seconds(pid))

    def take(self, phase: str) -> Dict[str, Any]:
        row = self.conn.execute(self.QUERY, (self.xact_age, USER)).fetchone()
        assert row is not None
        backends, active, idle_in_tx, in_xact, old = row
        status = proc_status(self.pid)
        now, cpu = time.monotonic(), cpu_seconds(self.pid)
        busy = 100.0 * (cpu - self.last_cpu[1]) / max(now - self.last_cpu[0], 1e-6)
        self.last_cpu = (now, cpu)
        sample: Dict[str, Any] = {
            "t": round(now - self.start, 1), "phase": phase, "rss": status["VmRSS"],
            "hwm": status["VmHWM"], "cpu": busy, "backends": backends, "active": active,
            "idle_in_tx": idle_in_tx, "in_xact": in_xact, "old_xacts": old,
        }
        sample.update(socket_counts(self.pid, self.port, self.pg_port))
        if old:
            sample["old_details"] = [
                f"pid {pid} {state} for {age:.1f}s in a transaction of {xact:.1f}s: {query!r}"
                for pid, state, age, xact, query in self.conn.execute(
                    "SELECT pid, state, extract(epoch FROM now() - state_change)::float8,"
                    " extract(epoch FROM now() - xact_start)::float8, left(query, 60)"
                    " FROM pg_stat_activity WHERE usename = %s"
                    " AND xact_start < now() - make_interval(secs => %s)", (USER, self.xact_age))
            ]
        return sample

    def record(self, phase: str) -> Dict[str, Any]:
        sample = self.take(phase)
        self.samples.append(sample)
        print(f"{sample['t']:7.1f}s {phase:6} RSS {sample['rss']:6d} KiB  CPU {sample['cpu']:3.0f}%  "
              f"clients {sample['clients']:3d}  servers {sample['servers']:3d}  "
              f"backends {sample['backends']:3d} (active {sample['active']}, idle in tx "
              f"{sample['idle_in_tx']}, in xact {sample['in_xact']}, xact > {self.xact_age:g}s "
              f"{sample['old_xacts']})", flush=True)
        for line in sample.get("old_details", ()):
            print(f"          old transaction: {line}", flush=True)
        return sample


# --------------------------------------------------------------------------- main


def median_of(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--victim":
        victim_main(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=300, help="load duration (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--steady-clients", type=int, default=8)
    parser.add_argument("--churn-clients", type=int, default=4)
    parser.add_argument("--builtin", default="select-only", choices=("select-only", "tpcb-like", "simple-update"),
                        help="pgbench script for steady load and churn (default select-only, i.e. -S)")
    parser.add_argument("--kill-threads", type=int, default=4)
    parser.add_argument("--kill-rate", type=float, default=5.0, help="killer iterations per second, all threads")
    parser.add_argument("--max-kills", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=10.0, help="sampling interval in seconds")
    parser.add_argument("--xact-age", type=float, default=5.0,
                        help="a transaction older than this (seconds) at a sample is reported")
    parser.add_argument("--settle", type=float, default=15.0, help="how long the pool may take to settle")
    parser.add_argument("--max-rss-growth", type=float, default=5.0,
                        help="largest RSS growth in %% (last third vs middle third) still called flat")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) even on success")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"seed {seed} (repeat with --seed {seed})", flush=True)

    import psycopg

    logging.getLogger("psycopg").setLevel(logging.ERROR)  # "error ignored terminating" after kills

    workdir = tempfile.mkdtemp(prefix="odissey-soak-")
    os.chmod(workdir, 0o755)
    pg: Optional[LocalPostgres] = None
    odissey: Optional[subprocess.Popen] = None
    loads: List[subprocess.Popen] = []
    ok = False
    try:
        pg = start_postgres(USER, PASSWORD, DB, scale=args.scale, settings={
            "max_connections": "100", "log_connections": "on", "log_disconnections": "on",
            "log_min_duration_statement": str(int(args.xact_age * 1000))})
        pgenv = pg_env(PASSWORD)
        with psycopg.connect(f"host=127.0.0.1 port={pg.port} dbname={DB} user={USER} password={PASSWORD}",
                             autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, note text NOT NULL, kind text NOT NULL,"
                         " at timestamptz NOT NULL DEFAULT clock_timestamp())")
        odissey, port, package = start_odissey(pg.port, USER, PASSWORD, DB, mode="transaction",
                                               pool_size=args.pool_size, workdir=workdir)
        print(f"PostgreSQL on 127.0.0.1:{pg.port}, Odissey (pid {odissey.pid}, {package}) on 127.0.0.1:{port}, "
              f"work directory {workdir}", flush=True)
        sampler = Sampler(f"host={pg.socket_dir} port={pg.port} dbname={DB} user=postgres", odissey.pid,
                          port, pg.port, args.xact_age)
        baseline = sampler.record("before")

        steady_out = open(Path(workdir) / "steady.out", "w+")
        steady_err = open(Path(workdir) / "steady.err", "w+")
        churn_out = open(Path(workdir) / "churn.out", "w+")
        churn_err = open(Path(workdir) / "churn.err", "w+")
        load_before = os.getloadavg()
        started = time.monotonic()
        loads.append(subprocess.Popen(pgbench_cmd(port, args.steady_clients, args.seconds, args.builtin, False),
                                      stdout=steady_out, stderr=steady_err, env=pgenv))
        loads.append(subprocess.Popen(pgbench_cmd(port, args.churn_clients, args.seconds, args.builtin, True),
                                      stdout=churn_out, stderr=churn_err, env=pgenv))
        killers = Killers(port, seed, args.kill_threads, args.kill_rate, args.max_kills,
                          started + args.seconds - 1)
        killers.start()

        max_backends = max_servers = 0
        crashed = False
        tick = 1
        while any(p.poll() is None for p in loads):
            wake = started + tick * args.interval
            while time.monotonic() < wake and any(p.poll() is None for p in loads):
                time.sleep(0.2)
            if odissey.poll() is not None:
                crashed = True
                print(f"Odissey exited with status {odissey.returncode}", flush=True)
                break
            if time.monotonic() >= wake:
                sample = sampler.record("load")
                max_backends = max(max_backends, sample["backends"])
                max_servers = max(max_servers, sample["servers"])
                tick += 1
        for proc in loads:
            try:
                proc.wait(timeout=args.seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        killers.join()
        load_seconds = time.monotonic() - started
        load_after = os.getloadavg()
        results = {}
        for name, proc, out, err in (("steady", loads[0], steady_out, steady_err),
                                     ("churn", loads[1], churn_out, churn_err)):
            out.seek(0)
            err.seek(0)
            results[name] = pgbench_result(out.read(), err.read(), proc.returncode)
            out.close()
            err.close()

        # Settle: no backend in a transaction or running, servers within the pool, no
        # client socket left in Odissey, no Odissey socket beyond listener and servers.
        settle_start = time.monotonic()
        final = baseline
        while time.monotonic() - settle_start < args.settle and not crashed:
            final = sampler.take("settle")
            if (final["in_xact"] == 0 and final["active"] == 0 and final["backends"] <= args.pool_size
                    and final["servers"] <= args.pool_size and final["clients"] == 0
                    and final["sockets"] - baseline["sockets"] <= final["servers"]):
                break
            time.sleep(0.5)
        settled_in = time.monotonic() - settle_start
        if odissey.poll() is not None:
            crashed = True
        if not crashed:
            final = sampler.record("end")

        committed_kills = scalar(sampler.conn, f"SELECT count(*) FROM {TABLE} WHERE note LIKE 'kill-%'")
        committed_kill_notes = [r[0] for r in sampler.conn.execute(
            f"SELECT note FROM {TABLE} WHERE note LIKE 'kill-%' ORDER BY id LIMIT 10")]
        present = {r[0] for r in sampler.conn.execute(f"SELECT note FROM {TABLE} WHERE note LIKE 'ok-%'")}
        missing = sorted(set(killers.acknowledged) - present)
        phantom = sorted(present - set(killers.acknowledged) - set(killers.uncertain))
        health = "not tried"
        if not crashed:
            try:
                with psycopg.connect(dsn(port, "soak-health"), autocommit=True, prepare_threshold=None) as conn:
                    count = scalar(conn, f"SELECT count(*) FROM {TABLE}")
                health = f"ok ({count} rows in {TABLE})"
            except psycopg.Error as exc:
                health = f"failed: {exc}"
        log_text = Path(f"{workdir}/odissey.log").read_text(errors="replace")
        tracebacks = len(re.findall(r"Traceback \(most recent call last\)|Unhandled Error", log_text))
        not_reused = re.findall(r"not reused after [^:]+: (.*)", log_text)
        reasons: Dict[str, int] = {}
        for reason in not_reused:
            key = re.sub(r"\d+", "N", reason.strip())
            reasons[key] = reasons.get(key, 0) + 1

        # RSS: the samples taken under load; the first third is warm-up.
        load_rss = [s["rss"] for s in sampler.samples if s["phase"] == "load"]
        third = len(load_rss) // 3
        middle = median_of(load_rss[third:2 * third]) if third else None
        last = median_of(load_rss[2 * third:]) if third else None
        growth = (last - middle) if middle is not None and last is not None else None
        growth_pct = 100.0 * growth / middle if growth is not None and middle else None
        old_samples = sum(1 for s in sampler.samples if s["phase"] == "load" and s["old_xacts"])
        extra_sockets = final["sockets"] - baseline["sockets"] - final["servers"]

        # A check is (name, result, passed); passed None: could not be judged (too short a run).
        checks: List[Tuple[str, str, Optional[bool]]] = [
            ("Odissey still running", "no" if crashed else "yes", not crashed),
            (f"load samples with a transaction older than {args.xact_age:g}s", str(old_samples), old_samples == 0),
            ("backends in a transaction at the end (idle in tx)",
             f"{final['in_xact']} ({final['idle_in_tx']})", final["in_xact"] == 0),
            ("server connections at the end: PostgreSQL backends / Odissey sockets (pool size)",
             f"{final['backends']} / {final['servers']} ({args.pool_size})",
             final["backends"] <= args.pool_size and final["servers"] <= args.pool_size),
            ("client sockets left in Odissey at the end", str(final["clients"]), final["clients"] == 0),
            ("other Odissey sockets beyond its listener", str(extra_sockets), extra_sockets <= 0),
            ("committed rows of killed clients", str(committed_kills) + (
                f" e.g. {committed_kill_notes}" if committed_kills else ""), committed_kills == 0),
            ("acknowledged control commits missing", f"{len(missing)} of {len(killers.acknowledged)}",
             not missing),
            ("control rows committed but never acknowledged", str(len(phantom)), not phantom),
            ("dirty servers seen by new clients", str(len(killers.dirty)), not killers.dirty),
            ("killer errors before the kill", str(len(killers.unexpected)), not killers.unexpected),
            ("tracebacks in Odissey's log", str(tracebacks), tracebacks == 0),
            ("query through Odissey after the soak", health, health.startswith("ok")),
        ]
        for name, result in results.items():
            fine = (result["rc"] == 0 and result["failed"] == 0 and result["aborted"] == 0
                    and result["tps"] is not None)
            checks.append((f"pgbench {name}: status, failed tx, aborted clients",
                           f"{result['rc']}, {result['failed']:.0f}, {result['aborted']}"
                           if result["failed"] is not None else f"{result['rc']}, ?, {result['aborted']}", fine))
        flat = None if growth_pct is None else growth_pct <= args.max_rss_growth
        checks.append((f"RSS growth, last third vs middle third (limit {args.max_rss_growth:g}%)",
                       f"{growth:+.0f} KiB ({growth_pct:+.2f}%)" if growth_pct is not None
                       else "too few samples to judge", flat))

        print(f"\nsoak: {args.seconds}s, seed {seed}, pool size {args.pool_size}, pgbench -b {args.builtin} "
              f"steady -c {args.steady_clients}, churn -C -c {args.churn_clients}, load ran {load_seconds:.0f}s, "
              f"settled in {settled_in:.1f}s; machine load average {load_before[0]:.1f} before, "
              f"{load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f} (1/5/15 min) after; "
              f"{os.cpu_count()} CPUs\n")
        rss_all = [s["rss"] for s in sampler.samples]
        print("| RSS KiB | before load | first load sample | middle-third median | last-third median | "
              "last load sample | after settle | peak (VmHWM) |")
        print("|---|---|---|---|---|---|---|---|")
        fmt = (lambda v: f"{v:.0f}" if v is not None else "-")
        print(f"| | {baseline['rss']} | {fmt(load_rss[0] if load_rss else None)} | {fmt(middle)} | {fmt(last)} | "
              f"{fmt(load_rss[-1] if load_rss else None)} | {final['rss']} | {final['hwm']} |")
        print(f"\nRSS samples under load (KiB): {' '.join(str(v) for v in load_rss)}")
        load_cpu = [s["cpu"] for s in sampler.samples if s["phase"] == "load"]
        print(f"RSS min / median / max over all {len(rss_all)} samples: {min(rss_all)} / "
              f"{statistics.median(rss_all):.0f} / {max(rss_all)} KiB; Odissey CPU median under load "
              f"{fmt(median_of(load_cpu))}%; most PostgreSQL backends / Odissey server sockets at a "
              f"load sample: {max_backends} / {max_servers}\n")
        print("| pgbench | TPS | transactions | failed | aborted clients | progress TPS min / median / max |")
        print("|---|---|---|---|---|---|")
        for name, result in results.items():
            progress = result["progress"]
            spread = (f"{min(progress):.0f} / {statistics.median(progress):.0f} / {max(progress):.0f}"
                      if progress else "-")
            print(f"| {name} | {fmt(result['tps'])} | {fmt(result['processed'])} | {fmt(result['failed'])} | "
                  f"{result['aborted']} | {spread} |")
            for line in result["errors"]:
                print(f"    {name} stderr: {line}")
        kills = ", ".join(f"{kind} {count}" for kind, count in killers.kills.items())
        print(f"\nkills: {killers.total_kills} ({kills}); {killers.kills_after_insert} after their INSERT was "
              f"acknowledged; {killers.resets} with SO_LINGER 0; control commits: {len(killers.acknowledged)}")
        if reasons:
            print("servers Odissey closed instead of reusing: " +
                  "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda i: -i[1])))
        for what in killers.dirty[:5] + killers.unexpected[:10]:
            print(f"    {what}")
        print("\n| check | result | ok |")
        print("|---|---|---|")
        for name, result_text, fine in checks:
            print(f"| {name} | {result_text} | {'n/a' if fine is None else 'yes' if fine else 'NO'} |")
        ok = all(fine is not False for _name, _result, fine in checks)
        print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}", flush=True)
        sampler.conn.close()
    finally:
        for proc in loads:
            if proc.poll() is None:
                proc.kill()
        if odissey is not None and not stop(odissey):
            print("Odissey did not stop within 30 s of SIGTERM; killed", flush=True)
        if pg is not None:
            if pg.data_dir and os.path.exists(f"{pg.data_dir}/server.log"):
                shutil.copy(f"{pg.data_dir}/server.log", f"{workdir}/postgres.log")
            pg.stop()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
