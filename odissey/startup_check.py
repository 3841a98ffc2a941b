"""Startup parameters checked on a real server before the client is logged in.

PostgreSQL refuses a login whose startup packet sets a parameter it does not know, to a
value it does not accept, or that the user may not set (FATAL, with the parameter's own
SQLSTATE). Odissey logs clients in without a server, then carries their parameters to
each server with SET; unchecked, a bad one would fail the client's first query instead.
So each (parameter, value) pair a pool has not seen accepted yet is tried once on one of
its servers, inside a transaction that is rolled back (``SET LOCAL``), and remembered.
Drivers send the same few pairs on every login, so this costs two round trips per pool
and pair, not one per login. application_name is never checked: PostgreSQL accepts any.

The same try tells how PostgreSQL spells an accepted value of a parameter it reports
(client_encoding ``utf-8`` is ``UTF8``, DateStyle ``iso`` is ``ISO, MDY``): a client is
told that spelling in its ParameterStatus at login, as PostgreSQL tells it, and the
relay carries it, so the client is never told another value at its first query.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

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
    """The pairs each pool's servers have accepted, with each value as reported."""

    def __init__(self) -> None:
        #: (lower-case name, value asked for) -> value as PostgreSQL reports it
        self._accepted: Dict[PoolKey, Dict[Pair, str]] = {}

    def unchecked(self, pool: Pool, wants: Iterable[Pair]) -> list[Pair]:
        accepted = self._accepted.get(pool.key, {})
        return [(name, value) for name, value in wants
                if name.lower() not in _ALWAYS_ACCEPTED and (name.lower(), value) not in accepted]

    def canonical(self, pool: Pool, key: str, value: str) -> str:
        """How PostgreSQL reports the reported parameter ``key`` set to ``value``, as
        seen when the pair was checked (the value itself for a pair never checked)."""
        return self._accepted.get(pool.key, {}).get((key, value), value)

    @inlineCallbacks
    def check(self, pool: Pool, client_id: str, pairs: list[Pair]):
        """Try ``pairs`` on one of the pool's servers; raise the server's error, as FATAL,
        for the first one it refuses."""
        server = pool.take(client_id)
        if server is None:
            server = yield pool.wait(client_id)
        reported = pool.reported
        failures = yield _try(server, pairs, reported)
        spelled = {key: server.params[key][1] for key in reported if key in server.params}
        failures += yield server.run(["ROLLBACK"])
        pool.release(server)
        if failures:
            raise server_error(failures[0])
        accepted = self._accepted.setdefault(pool.key, {})
        if len(accepted) + len(pairs) > MAX_REMEMBERED:
            accepted.clear()
        last = {name.lower(): value for name, value in pairs}
        for key, value in ((name.lower(), value) for name, value in pairs):
            # (of a name given twice, only the spelling of the value that won is known)
            accepted[(key, value)] = spelled.get(key, value) if last[key] == value else value


def _try(server: ServerConnection, pairs: list[Pair], reported: frozenset[str]) -> "Deferred[list[dict[str, str]]]":
    """BEGIN; SET LOCAL …, read as UTF-8 (see params.set_statements), leaving the
    transaction open: the server has reported the values it took (PostgreSQL reports a
    changed parameter before its ReadyForQuery) until the caller's ROLLBACK.

    A reported parameter is first RESET to the session's default, as a fresh session
    would have it: some values are relative to the current one (DateStyle ``iso``
    keeps the current day/month order), which another client's SET may have changed."""
    statements = []
    encoding = server.params.get("client_encoding", ("client_encoding", "UTF8"))[1]
    if encoding.upper() not in ("UTF8", "UNICODE"):
        statements.append("SET client_encoding TO 'UTF8'")
    defaults: dict[str, tuple[str, None]] = {}
    for name, _value in pairs:
        if name.lower() in reported:
            defaults.setdefault(name.lower(), (name, None))
    statements += ["BEGIN", set_query(list(defaults.values()) + list(pairs), local=True)]
    return server.run(statements)
