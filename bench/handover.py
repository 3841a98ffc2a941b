"""The cross-worker hand-over wait: how long a client on one worker waits for a server of
a full pool whose servers another worker holds.

Odissey with 2 workers and a transaction-mode pool of size 2, in front of a throwaway
PostgreSQL. Three raw-protocol clients (md5): two that land on worker 0 and one on
worker 1 (told apart by the worker number in their cancel keys). Each round, twice:

- *idle*: worker 0's clients take both servers (BEGIN; SELECT 1) and commit, so worker 0
  holds both idle; worker 1's client runs SELECT 1, timed from its send to its answer
  (worker 0 closes an idle server, worker 1 opens one);
- *busy*: worker 0's clients take both and stay in their transactions; worker 1's client
  sends SELECT 1; 0.1 s later one of worker 0's clients commits; timed from that COMMIT
  to worker 1's answer (the server that came back closes instead of serving worker 0's
  next client, and worker 1 opens one).

    python bench/handover.py --rounds 50

Prints p50, p99 and max per case, in milliseconds.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import time

from common import start_odissey, start_postgres, stop

from odissey.auth.secrets import md5_hash, md5_response
from odissey.cancel import KeyLayout
from odissey.wire import messages as m

USER, PASSWORD, DB = "bench", "bench-pw", "bench"
AUTH_MD5 = 5


class Client:
    """A blocking protocol-3 client with md5 login; knows which worker serves it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""
        self.sock.sendall(m.startup_message({"user": USER, "database": DB}))
        key = None
        while True:
            kind, body = self.read()
            if kind == b"R":
                code, payload = m.parse_authentication(body)
                if code == AUTH_MD5:
                    answer = md5_response(md5_hash(PASSWORD, USER), payload)
                    self.sock.sendall(m.password_message(answer + b"\0"))
            elif kind == b"K":
                key = m.parse_backend_key_data(body)
            elif kind == b"E":
                raise RuntimeError(m.parse_error_fields(body).get("M"))
            elif kind == b"Z":
                break
        assert key is not None
        self.worker = KeyLayout.of(0, False, 0, 2).worker_of(key[1])

    def read(self) -> tuple[bytes, bytes]:
        while len(self.buffer) < 5 or len(self.buffer) < 1 + int.from_bytes(self.buffer[1:5], "big"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by Odissey")
            self.buffer += chunk
        end = 1 + int.from_bytes(self.buffer[1:5], "big")
        kind, body, self.buffer = self.buffer[:1], self.buffer[5:end], self.buffer[end:]
        return kind, body

    def send(self, sql: str) -> None:
        self.sock.sendall(m.query(sql))

    def answer(self) -> None:
        """Read up to ReadyForQuery; an error is a failed benchmark."""
        while True:
            kind, body = self.read()
            if kind == b"E":
                raise RuntimeError(m.parse_error_fields(body).get("M"))
            if kind == b"Z":
                return

    def ask(self, sql: str) -> None:
        self.send(sql)
        self.answer()


def clients_on_workers(port: int) -> tuple[Client, Client, Client]:
    """Two clients on worker 0 and one on worker 1."""
    first: list[Client] = []
    second: list[Client] = []
    while len(first) < 2 or not second:
        client = Client(port)
        chosen = first if client.worker == 0 else second
        if (client.worker == 0 and len(first) < 2) or (client.worker == 1 and not second):
            chosen.append(client)
        else:
            client.sock.close()
    return first[0], first[1], second[0]


def report(name: str, waits: list[float]) -> None:
    ordered = sorted(waits)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(f"{name}: {len(waits)} hand-overs, p50 {statistics.median(ordered) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="odissey-handover-")
    pg = odissey = None
    try:
        pg = start_postgres(USER, PASSWORD, DB, scale=1)
        odissey, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode="transaction",
                                                pool_size=2, workdir=workdir, extra="workers: 2\n")
        a, b, other = clients_on_workers(port)
        idle: list[float] = []
        busy: list[float] = []
        for _ in range(args.rounds):
            for client in (a, b):
                client.ask("BEGIN; SELECT 1")
            for client in (a, b):
                client.ask("COMMIT")
            started = time.perf_counter()
            other.ask("SELECT 1")
            idle.append(time.perf_counter() - started)
            for client in (a, b):
                client.ask("BEGIN; SELECT 1")
            other.send("SELECT 1")
            time.sleep(0.1)
            started = time.perf_counter()
            a.ask("COMMIT")
            other.answer()
            busy.append(time.perf_counter() - started)
            b.ask("COMMIT")
        report("idle (worker 0 holds both servers idle)", idle)
        report("busy (worker 0's clients hold both in transactions, one commits)", busy)
    finally:
        if odissey is not None:
            stop(odissey)
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
