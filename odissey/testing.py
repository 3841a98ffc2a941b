"""Fakes for tests of Odissey and of code built on it (like ``treq.testing``).

``FakeServers`` stands in for the connector a Pool uses: each connection attempt is a
Deferred the test completes or fails by hand, so pool behaviour can be driven step by
step on a ``MemoryReactorClock`` without any network.
"""

from __future__ import annotations

import itertools

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from odissey.server import ServerState

_ids = itertools.count(1)


class FakeServer:
    """The parts of a ServerConnection a Pool looks at."""

    def __init__(self, params: list[tuple[str, str]] | None = None, now: float = 0.0) -> None:
        self.id = f"fake{next(_ids)}"
        self.created_at = self.used_at = now
        self.state = ServerState.IDLE
        self.last_client: str | None = None
        self.login_params = params or [
            ("application_name", ""), ("server_version", "15.0"), ("TimeZone", "UTC")]
        self.pool: object = None

    def close(self) -> None:
        self.state = ServerState.CLOSED

    def abort(self) -> None:
        self.state = ServerState.CLOSED


class FakeServers:
    """A connector whose connection attempts wait for the test to finish them."""

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock = clock
        self.attempts: list[Deferred[FakeServer]] = []

    def __call__(self) -> "Deferred[FakeServer]":
        attempt: Deferred[FakeServer] = Deferred()
        self.attempts.append(attempt)
        return attempt

    def succeed_next(self) -> FakeServer:
        server = FakeServer(now=self.clock.seconds() if self.clock else 0.0)
        self.attempts.pop(0).callback(server)
        return server

    def fail_next(self, error: Exception) -> None:
        self.attempts.pop(0).errback(error)
