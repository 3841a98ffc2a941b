"""The admin console's pool-control commands, with PgBouncer's semantics and words:
PAUSE, RESUME, DISABLE, ENABLE, RECONNECT, KILL, KILL_CLIENT, WAIT_CLOSE.

The console (``console.py``) parses a command, checks that its user is an admin, and
calls the method of the same name with the command's one argument (a database name,
a client id, or None). A method raises a :class:`PoolerError` to refuse, or returns a
Deferred when its reply must wait (PAUSE: for the servers to be released; WAIT_CLOSE:
for them to close). The state it changes lives in ``Pools``, per database name; the
mechanisms (a pool's pause, its servers marked to close) in ``pool.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Protocol as TypingProtocol, Sequence

from twisted.internet.defer import Deferred

from odissey.config import ANY, CONSOLE_DATABASES, Route
from odissey.logs import Logger
from odissey.pool import Pools
from odissey.wire import errors
from odissey.wire.errors import PoolerError

log = Logger()


class ControlledClient(TypingProtocol):
    """What the commands need of a client connection (``ClientConnection`` is one)."""

    id: str
    database: str

    @property
    def console(self) -> Any:
        """Its console session, None for a client of a pool."""

    def fail(self, error: PoolerError) -> None:
        """Send one FATAL error and close."""


def serves(database: str) -> bool:
    """The console's own databases, which no command controls."""
    return database in CONSOLE_DATABASES


def _refusal(sqlstate: str, message: str, **kwargs: Any) -> PoolerError:
    """A command refused: the console session goes on (ERROR, not FATAL)."""
    return PoolerError(sqlstate, message, severity="ERROR", **kwargs)


class Control:
    """The commands, over the pools and the client connections."""

    def __init__(self, routes: Callable[[], Sequence[Route]], pools: Pools,
                 clients: Callable[[], Iterable[ControlledClient]]) -> None:
        self.routes = routes
        self.pools = pools
        self.clients = clients

    def _database(self, name: Optional[str], doing: str) -> Optional[str]:
        """A database named to a command: one some route serves (or has pools of)."""
        if name is None:
            return None
        if serves(name):
            raise _refusal(errors.FEATURE_NOT_SUPPORTED, f"cannot {doing} admin db: {name}")
        if not any(route.database in (name, ANY) for route in self.routes()) and not self.pools.of(name):
            raise _refusal(errors.INVALID_CATALOG_NAME, f"no such database: {name}")
        return name

    @staticmethod
    def _required(name: Optional[str], verb: str) -> str:
        if name is None:
            raise _refusal(errors.SYNTAX_ERROR, "a database is required", hint=f"{verb} <db>")
        return name

    def _not_paused(self) -> None:
        if self.pools.paused_all:
            raise _refusal(errors.OBJECT_NOT_IN_PREREQUISITE_STATE, "already suspended/paused",
                           hint="RESUME first.")

    def pause(self, name: Optional[str]) -> "Deferred[None]":
        """No new server assignments; done once every server of the database (all:
        None) has been released and closed."""
        self._not_paused()
        database = self._database(name, "pause")
        done = self.pools.pause(database)
        done.addCallback(lambda _: log.info("PAUSE {what}: no server left open", what=database or "(all)"))
        return done

    def resume(self, name: Optional[str]) -> None:
        pools = self.pools
        if name is None:
            if not pools.paused_all and not pools.paused:
                raise _refusal(errors.OBJECT_NOT_IN_PREREQUISITE_STATE, "pooler is not paused/suspended")
        elif self._database(name, "resume") not in pools.paused:
            raise _refusal(errors.OBJECT_NOT_IN_PREREQUISITE_STATE, f"database {name} is not paused")
        pools.resume(name)

    def disable(self, name: Optional[str]) -> None:
        self.pools.disabled.add(self._required(self._database(name, "disable"), "DISABLE"))

    def enable(self, name: Optional[str]) -> None:
        self.pools.disabled.discard(self._required(self._database(name, "enable"), "ENABLE"))

    def reconnect(self, name: Optional[str]) -> None:
        self.pools.reconnect(self._database(name, "reconnect"))

    def kill(self, name: Optional[str]) -> None:
        """Drop the database's clients and servers at once; it stays paused until RESUME."""
        self._not_paused()
        database = self._database(name, "kill")
        command = "KILL" if database is None else f"KILL {database}"
        error = PoolerError(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command",
                            detail=f"{command} on the admin console")
        for client in list(self.clients()):
            if (client.console is None and client.database and not serves(client.database)
                    and database in (None, client.database)):
                client.fail(error.copy())
        self.pools.kill(database)

    def kill_client(self, name: Optional[str]) -> None:
        """Drop one client, by its id as SHOW CLIENTS and the logs show it (17 or c17)."""
        text = name or ""
        number = text[1:] if text[:1] in ("c", "C") else text
        if not number.isdigit():
            raise _refusal(errors.SYNTAX_ERROR, "invalid client pointer supplied",
                           hint="KILL_CLIENT <id>, the id column of SHOW CLIENTS.")
        wanted = f"c{int(number)}"
        client = next((c for c in self.clients() if c.id == wanted), None)
        if client is None:
            raise _refusal(errors.UNDEFINED_OBJECT, "client not found")
        client.fail(PoolerError(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command",
                                detail=f"KILL_CLIENT {name} on the admin console"))

    def wait_close(self, name: Optional[str]) -> "Deferred[None]":
        """Done once every server marked to close when released (RECONNECT,
        server_lifetime) has closed."""
        return self.pools.closing(self._database(name, "wait in"))

    COMMANDS: "dict[str, Callable[[Control, Optional[str]], Optional[Deferred[None]]]]" = {
        "PAUSE": pause, "RESUME": resume, "DISABLE": disable, "ENABLE": enable,
        "RECONNECT": reconnect, "KILL": kill, "KILL_CLIENT": kill_client, "WAIT_CLOSE": wait_close,
    }
