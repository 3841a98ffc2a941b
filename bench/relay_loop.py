"""The relay's own work per transaction, in-process: take, attach, forward, detach,
release and count, without sockets or PostgreSQL.

A transaction-mode pool of fake backends (odissey/testing.py) on a fake reactor; each
transaction is a client's Query handed to ``Relay.clientData`` and a canned
``SELECT``'s reply handed to the server's ``dataReceived``. Two shapes: one server per
client (``4 clients, pool 4``) and two clients on one server, so that every
transaction waits for the other's (the pool's queue and grant). The figure is thread
CPU time per transaction, the best of ``--repeats`` runs after one unmeasured run (the
JIT's warm-up under PyPy): on the loaded machine, far steadier than pgbench's
throughput, and it runs under any interpreter, which callgrind's counts do not.

    python bench/relay_loop.py --tree . --tree /tmp/old-tree
    ../.ci/pypy/bin/python bench/relay_loop.py --tree . --tree /tmp/old-tree --transactions 20000

Each ``--tree`` (a checkout of Odissey, e.g. ``git worktree add /tmp/old-tree 762f76e``)
runs in a process of its own, alternating, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import sys
import time

QUERY_TEXT = "SELECT abalance FROM pgbench_accounts WHERE aid = 1;"
SHAPES = (("4 clients, pool 4", 4, 4), ("2 clients, pool 1 (waiting)", 2, 1))


def measure(transactions: int, repeats: int) -> None:
    """Run in the tree under test (on sys.path): print one line per shape and setting."""
    from twisted.internet.testing import MemoryReactorClock

    from odissey import config
    from odissey.params import params_from
    from odissey.pool import Pool, PoolKey
    from odissey.relay import Relay
    from odissey.testing import DEFAULT_PARAMS, FakeBackends, FakeClient
    from odissey.wire import messages as m

    query = m.query(QUERY_TEXT)
    reply = (m.message(b"T", b"\0\x01abalance\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0")
             + m.message(b"D", b"\0\x01\0\0\0\x015") + m.message(b"C", b"SELECT 1\0") + m.message(b"Z", b"I"))

    def run(clients: int, size: int, statements: int) -> float:
        cfg = config.parse({
            "listen": ["tcp:0"], "storages": {"pg": {"host": "127.0.0.1"}},
            "routes": [{"database": "db", "user": "u", "storage": "pg",
                        "pool": {"mode": "transaction", "size": size, "max_prepared_statements": statements}}]})
        reactor = MemoryReactorClock()
        backends = FakeBackends(reactor)
        pool = Pool(PoolKey("db", "u"), cfg.routes[0], reactor, backends)
        pool.parameters_cache = list(DEFAULT_PARAMS)
        params = params_from(DEFAULT_PARAMS)
        relays = []
        for _ in range(clients):
            client = FakeClient()
            relays.append((Relay(client, pool, dict(params), {k: v for k, (_n, v) in params.items()}, 1 << 20),
                           client))
        for relay, _client in relays[:size]:
            relay.clientData(query)
        reactor.advance(0)
        backends.flush()  # (the servers open and answer their first query)
        servers = [backend.server for backend in backends.opened]
        assert len(servers) == size
        started = time.thread_time()
        for _ in range(transactions):
            for relay, _client in relays:
                relay.clientData(query)
            for _ in range(clients // size):
                for server in servers:
                    server.transport.clear()
                    server.dataReceived(reply)
            for _relay, client in relays:
                client.writes.clear()
                client.transport.clear()
        spent = time.thread_time() - started
        assert pool.stats.xacts == transactions * clients + size, "a transaction did not complete"
        return spent / (transactions * clients) * 1e9

    for label, clients, size in SHAPES:
        for statements in (0, 200):
            run(clients, size, statements)
            best = min(run(clients, size, statements) for _ in range(repeats))
            print(f"{label}, max_prepared_statements {statements}: {best:.0f} ns / tx", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="an Odissey checkout (repeatable; default .)")
    parser.add_argument("--transactions", type=int, default=3000, help="per client and run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        sys.path.insert(0, args.measure)
        measure(args.transactions, args.repeats)
        return
    from common import alternate_trees  # (not when measuring: it imports this checkout's odissey)

    alternate_trees(__file__, args.tree, args.rounds,
                    ["--transactions", str(args.transactions), "--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
