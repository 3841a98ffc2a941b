"""(database, user) -> Route, most specific rule first; and where a storage is reached."""

from __future__ import annotations

from typing import Sequence

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

from odissey.config import ANY, ClientAuth, Route, Storage


class Router:
    """Picks a route: exact database and user, then database with any user, then any
    database with that user, then the catch-all. Lookups are dictionary hits."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = {(r.database, r.user): r for r in routes}
        self._databases = {r.database for r in routes}

    def match(self, database: str, user: str) -> Route | None:
        for key in ((database, user), (database, ANY), (ANY, user), (ANY, ANY)):
            route = self._routes.get(key)
            if route is not None:
                return route
        return None

    def knows_database(self, database: str) -> bool:
        return database in self._databases or ANY in self._databases

    def mock_auth(self, database: str) -> ClientAuth:
        """How an unknown user of ``database`` is challenged.

        Like known users of that database (the first password route in the
        configuration: its method, and its secret, whose SCRAM iteration count the mock
        copies), so that the challenge does not reveal whether the user exists; trust
        only when every route of the database is trust (then nothing is secret).
        """
        auths = [r.auth for (db, _user), r in self._routes.items() if db in (database, ANY)]
        for auth in auths:
            if auth.method != "trust":
                return auth
        return ClientAuth("trust" if auths else "scram-sha-256", None)


def storage_endpoint(reactor: object, storage: Storage) -> IStreamClientEndpoint:
    """The client endpoint for a storage: a unix socket directory or a TCP host."""
    if storage.is_unix:
        return UNIXClientEndpoint(reactor, storage.socket_path, timeout=storage.connect_timeout)
    if ":" in storage.host:
        return TCP6ClientEndpoint(
            reactor, storage.host, storage.port, timeout=storage.connect_timeout
        )
    return TCP4ClientEndpoint(reactor, storage.host, storage.port, timeout=storage.connect_timeout)
