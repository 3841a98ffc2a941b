"""Odissey's own work per login, in-process: a client's whole connection (startup,
md5 password, greeting, one transaction, Terminate, close) without sockets, reactor
or PostgreSQL.

``pgbench -C`` measures a login together with Twisted's accept, close and reactor
turns and the kernel's side of them; this measures only the part that is Odissey's
code: a ``ClientConnection`` on a ``StringTransport``, a transaction-mode pool of one
fake backend (odissey/testing.py) whose parameters are known, and a canned reply
handed to the server's ``dataReceived``. The client's side (building its messages,
hashing its md5 answer) is in the loop too, the same in every tree. The figure is
thread CPU time per login, the best of ``--repeats`` runs after one unmeasured run
(the JIT's warm-up under PyPy); like bench/relay_loop.py it runs under either
interpreter.

    python bench/login_loop.py --tree . --tree /tmp/old-tree
    .ci/pypy/bin/python bench/login_loop.py --tree . --tree /tmp/old-tree

Each ``--tree`` (a checkout of Odissey, e.g. ``git worktree add /tmp/old-tree HEAD``)
runs in a process of its own, alternating, ``--rounds`` times. Log lines go through
the ``log`` section's observer (``format: text``) to /dev/null, as twistd sets it up;
``--quiet`` turns the login and logout lines off (``connections: off``).
"""

from __future__ import annotations

import argparse
import sys
import time

USER, PASSWORD, DB = "u", "pw", "db"
QUERY_TEXT = "SELECT abalance FROM pgbench_accounts WHERE aid = 1;"
#: What libpq (pgbench) sends in its startup packet.
STARTUP = {"user": USER, "database": DB, "client_encoding": "UTF8"}


def measure(logins: int, repeats: int, logged: bool) -> None:
    """Run in the tree under test (on sys.path): print the best time per login."""
    import os

    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.logger import globalLogBeginner
    from twisted.python.failure import Failure

    from odissey import config
    from odissey.client import ClientConnection, ClientFactory
    from odissey.logs import Observer
    from odissey.pool import Pools
    from odissey.router import Router
    from odissey.testing import DEFAULT_PARAMS, FakeBackends, in_this_thread
    from odissey.wire import messages as m

    cfg = config.parse({
        "listen": ["tcp:0"],
        "storages": {"pg": {"host": "127.0.0.1"}},
        "routes": [{"database": DB, "user": USER, "storage": "pg",
                    "auth": {"method": "md5", "password": PASSWORD},
                    "pool": {"mode": "transaction", "size": 1}}],
    })
    # As twistd begins logging to the log section's observer (writing here to /dev/null):
    # what a line costs is then what it costs in a deployment with `log: {format: text}`.
    observer = Observer(config.LogSettings(format="text", connections=logged), open(os.devnull, "w"))
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)
    reactor = MemoryReactorClock()
    backends = FakeBackends(reactor)
    pools = Pools(reactor, lambda *_args: backends())
    factory = ClientFactory(reactor, Router(cfg.routes), pools, cfg.limits, in_this_thread)
    try:  # the client's side hashes the same way in every tree (the fastest md5 at hand)
        from _md5 import md5
    except ImportError:
        from hashlib import md5
    stored = md5((PASSWORD + USER).encode()).hexdigest().encode()
    startup, query, terminate = m.startup_message(STARTUP), m.query(QUERY_TEXT), m.terminate()
    reply = (m.message(b"T", b"\0\x01abalance\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0")
             + m.message(b"D", b"\0\x01\0\0\0\x015") + m.message(b"C", b"SELECT 1\0") + m.message(b"Z", b"I"))
    gone = Failure(ConnectionDone())
    peer = IPv4Address("TCP", "127.0.0.1", 40000)

    def log_in() -> tuple[ClientConnection, StringTransport]:
        client = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        client.makeConnection(transport)
        client.dataReceived(startup)
        salt = transport.value()[9:13]
        transport.clear()
        client.dataReceived(m.password_message(b"md5" + md5(stored + salt).hexdigest().encode() + b"\0"))
        return client, transport

    def login() -> None:
        client, transport = log_in()
        assert transport.value()[-6:] == b"Z\0\0\0\x05I", transport.value()
        client.dataReceived(query)
        server = backends.opened[0].server
        server.transport.clear()
        server.dataReceived(reply)
        client.dataReceived(terminate)
        client.connectionLost(gone)

    first, _transport = log_in()  # the pool's first server: opened, logged in, its parameters learnt
    backends.flush()
    reactor.advance(0)
    first.connectionLost(gone)

    def run() -> float:
        started = time.thread_time()
        for _ in range(logins):
            login()
        spent = time.thread_time() - started
        assert len(backends.opened) == 1 and not factory.clients
        return spent / logins * 1e6

    run()
    best = min(run() for _ in range(repeats))
    print(f"{best:.2f} µs / login (connection lines {'logged' if logged else 'off'})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="an Odissey checkout (repeatable; default .)")
    parser.add_argument("--logins", type=int, default=20000, help="per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quiet", action="store_true", help="log: {connections: off}")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        sys.path.insert(0, args.measure)
        measure(args.logins, args.repeats, not args.quiet)
        return
    from common import alternate_trees  # (not when measuring: it imports this checkout's odissey)

    alternate_trees(__file__, args.tree, args.rounds, ["--logins", str(args.logins), "--repeats", str(args.repeats),
                                                       *(["--quiet"] if args.quiet else [])])


if __name__ == "__main__":
    main()
