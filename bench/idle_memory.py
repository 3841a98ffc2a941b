"""Resident memory per idle, logged-in client: Odissey under each interpreter, and PgBouncer.

For each target it starts a fresh pooler (transaction mode, one md5 route, a small pool)
in front of a throwaway PostgreSQL, warms it up with short sessions (log in, one query,
leave), reads its VmRSS from /proc, then opens ``--clients`` connections (default 10,000)
that each log in to ReadyForQuery and stay idle (every 100th also runs one query, so the
pool holds servers), waits for the process to settle and reads VmRSS again. The report
gives (after - before) / N, the memory one idle client costs in the pooler's own process.
Kernel socket buffers are not in a process's RSS and are not counted.

    python bench/idle_memory.py --python python3 --python .ci/pypy/bin/python --pgbouncer

The clients are this process's own asyncio connections speaking the startup packet and
the md5 exchange by hand, opened in batches. RLIMIT_NOFILE is raised here (the poolers
inherit it). ``common.start_odissey`` writes ``limits.max_clients: 2000``; a ``sh``
wrapper rewrites that line to N + 100 before Odissey reads it, and PgBouncer's
``max_client_conn`` is raised the same way and reloaded with SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from common import start_odissey, start_postgres, stop
from compare import DB, PASSWORD, USER, pgbouncer_binary, start_pgbouncer

Connection = Tuple[asyncio.StreamReader, asyncio.StreamWriter]


class LoginFailed(RuntimeError):
    """The pooler answered a login or a query with an ErrorResponse."""


async def read_message(reader: asyncio.StreamReader) -> Tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    length = struct.unpack("!i", head[1:])[0]
    return head[:1], await reader.readexactly(length - 4)


async def until_ready(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads to ReadyForQuery, answering an md5 challenge on the way."""
    while True:
        kind, payload = await read_message(reader)
        if kind == b"E":
            fields = dict((f[:1], f[1:]) for f in payload.split(b"\0") if f)
            raise LoginFailed(f"{fields.get(b'C', b'?').decode()} {fields.get(b'M', b'?').decode()}")
        if kind == b"R" and struct.unpack("!i", payload[:4])[0] == 5:
            inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest().encode()
            answer = b"md5" + hashlib.md5(inner + payload[4:8]).hexdigest().encode() + b"\0"
            writer.write(b"p" + struct.pack("!i", len(answer) + 4) + answer)
        elif kind == b"R" and payload[:4] != b"\0\0\0\0":
            raise LoginFailed(f"unexpected authentication request {payload[:4]!r}")
        elif kind == b"Z":
            return


async def login(port: int, query: bool) -> Connection:
    """One client: startup packet, md5 password, ReadyForQuery; then ``SELECT 1`` if asked."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = struct.pack("!i", 196608) + f"user\0{USER}\0database\0{DB}\0\0".encode()
    writer.write(struct.pack("!i", len(body) + 4) + body)
    await until_ready(reader, writer)
    if query:
        sql = b"SELECT 1\0"
        writer.write(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
        await until_ready(reader, writer)
    return reader, writer


async def open_clients(port: int, count: int, batch: int, query_every: int) -> List[Connection]:
    clients: List[Connection] = []
    for start in range(0, count, batch):
        clients += await asyncio.gather(*(login(port, (start + i) % query_every == 0)
                                          for i in range(min(batch, count - start))))
    return clients


async def close_clients(clients: List[Connection]) -> None:
    for _reader, writer in clients:
        writer.write(b"X\0\0\0\4")
        writer.close()
    await asyncio.sleep(0.5)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def nofile_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def interpreter_name(python: str) -> str:
    return subprocess.run([python, "-c", "import platform; print(platform.python_implementation(), "
                                         "platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class Result:
    target: str
    interpreter: str
    clients: int
    before_kib: int
    after_kib: int
    login_seconds: float


def measure(target: str, interpreter: str, pid: int, port: int, args: argparse.Namespace) -> Result:
    """Warm-up sessions, RSS, N idle clients, RSS again (both after ``--settle`` seconds)."""
    print(f"{target} ({interpreter}), pid {pid}, open files limit {nofile_limit(pid)}", flush=True)

    async def warm_up() -> None:
        for _ in range(args.warmup_rounds):
            await close_clients(await open_clients(port, args.batch, args.batch, 1))

    asyncio.run(warm_up())
    time.sleep(args.settle)
    before = rss_kib(pid)

    async def hold() -> Tuple[int, float]:
        started = time.monotonic()
        clients = await open_clients(port, args.clients, args.batch, 100)
        took = time.monotonic() - started
        await asyncio.sleep(args.settle)
        after = rss_kib(pid)
        await close_clients(clients)
        return after, took

    after, took = asyncio.run(hold())
    result = Result(target, interpreter, args.clients, before, after, took)
    print(f"  before {before} KiB, after {after} KiB, {(after - before) / args.clients:.2f} KiB per client; "
          f"{args.clients} logins in {took:.1f} s", flush=True)
    return result


def raise_nofile(needed: int) -> None:
    """The soft open-files limit up to the hard one (raising the hard one needs
    CAP_SYS_RESOURCE, which a container often lacks); fails when that is below ``needed``."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"the open-files hard limit is {hard}, below the {needed} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append",
                        help="interpreter to run Odissey with (repeatable; default this one)")
    parser.add_argument("--pgbouncer", action="store_true", help="also PgBouncer")
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--pool-size", type=int, default=5)
    parser.add_argument("--batch", type=int, default=50, help="logins under way at once")
    parser.add_argument("--warmup-rounds", type=int, default=20,
                        help="batches of short sessions (log in, SELECT 1, leave) before the first reading")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before each reading")
    args = parser.parse_args()
    raise_nofile(args.clients + 1000)

    workdir = tempfile.mkdtemp(prefix="odissey-idle-")
    pg = None
    results: List[Result] = []
    try:
        pg = start_postgres(USER, PASSWORD, DB, scale=1)
        for python in args.python or [sys.executable]:
            interpreter = interpreter_name(python)
            name = f"odissey-{len(results)}"
            conf = Path(workdir) / f"{name}.yaml"
            limit = args.clients + 100
            wrapper = ("sh", "-c", f'sed -i "s/max_clients: 2000}}/max_clients: {limit}}}/" "$0" && exec "$@"',
                       str(conf))
            proc, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode="transaction",
                                                 pool_size=args.pool_size, workdir=workdir, wrapper=wrapper,
                                                 python=python, name=name)
            try:
                if f"max_clients: {limit}}}" not in conf.read_text():
                    raise RuntimeError(f"could not raise limits.max_clients in {conf}: {conf.read_text()}")
                results.append(measure("odissey", interpreter, proc.pid, port, args))
            finally:
                stop(proc)
        binary = pgbouncer_binary() if args.pgbouncer else None
        if args.pgbouncer and not binary:
            print("no pgbouncer on the PATH", flush=True)
        if binary:
            proc, port = start_pgbouncer(binary, pg.port, "transaction", args.pool_size, workdir, False)
            try:
                ini = Path(workdir) / "pgbouncer.ini"
                ini.write_text(ini.read_text().replace("max_client_conn = 2000",
                                                       f"max_client_conn = {args.clients + 100}"))
                proc.send_signal(signal.SIGHUP)  # if the reload did not take, login 2001 fails loudly
                time.sleep(1)
                version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
                results.append(measure("pgbouncer", version.splitlines()[0].strip(), proc.pid, port, args))
            finally:
                stop(proc)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{args.clients} idle logged-in clients, transaction pooling, pool size {args.pool_size}; "
          f"RSS from /proc/PID/status\n")
    print("| target | interpreter | N | RSS before (MiB) | RSS after (MiB) | KiB per client | logins / s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.target} | {r.interpreter} | {r.clients} | {r.before_kib / 1024:.1f} | {r.after_kib / 1024:.1f} "
              f"| {(r.after_kib - r.before_kib) / r.clients:.2f} | {r.clients / r.login_seconds:.0f} |")


if __name__ == "__main__":
    main()
