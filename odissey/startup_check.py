"""Startup parameters checked on a real server before the client is logged in.

PostgreSQL refuses a login whose startup packet sets a parameter it does not know, to a
value it does not accept, or that the user may not set (FATAL, with the parameter's own
SQLSTATE). Odissey logs clients in without a server, then carries their parameters to
each server with SET; unchecked, a bad one would fail the client's first query instead.
So each (parameter, value) pair a pool has not seen accepted yet is tried once on one of
its servers, inside a transaction that is rolled back (``SET LOCAL``), and remembered.
Drivers send the same few pairs on every login, so this costs one round trip per pool
and pair, not one per login. application_name is never checked: PostgreSQL accepts any.
"""

from __future__ import annotations

from typing import Dict, Iterable, Set, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks

from odissey.params import set_query
from odissey.pool import Pool, PoolKey
from odissey.server import ServerConnection, server_error

Pair = Tuple[str, str]

#: Pairs remembered per pool; past it the memory starts afresh (a client inventing
#: values cannot make it grow without bound).
MAX_REMEMBERED = 1000
_ALWAYS_ACCEPTED = frozenset({"application_name"})


class StartupChecks:
    """The pairs each pool's servers have accepted."""

    def __init__(self) -> None:
        self._accepted: Dict[PoolKey, Set[Pair]] = {}

    def unchecked(self, pool: Pool, wants: Iterable[Pair]) -> list[Pair]:
        accepted = self._accepted.get(pool.key, set())
        return [(name, value) for name, value in wants
                if name.lower() not in _ALWAYS_ACCEPTED and (name.lower(), value) not in accepted]

    @inlineCallbacks
    def check(self, pool: Pool, client_id: str, pairs: list[Pair]):
        """Try ``pairs`` on one of the pool's servers; raise the server's error, as FATAL,
        for the first one it refuses."""
        server = pool.take(client_id)
        if server is None:
            server = yield pool.wait(client_id)
        failures = yield _try(server, pairs)
        pool.release(server)
        if failures:
            raise server_error(failures[0])
        accepted = self._accepted.setdefault(pool.key, set())
        if len(accepted) + len(pairs) > MAX_REMEMBERED:
            accepted.clear()
        accepted.update((name.lower(), value) for name, value in pairs)


def _try(server: ServerConnection, pairs: list[Pair]) -> "Deferred[list[dict[str, str]]]":
    """BEGIN; SET LOCAL …; ROLLBACK, read as UTF-8 (see params.set_statements)."""
    statements = []
    encoding = server.params.get("client_encoding", ("client_encoding", "UTF8"))[1]
    if encoding.upper() not in ("UTF8", "UNICODE"):
        statements.append("SET client_encoding TO 'UTF8'")
    statements += ["BEGIN", set_query(list(pairs), local=True), "ROLLBACK"]
    return server.run(statements)
