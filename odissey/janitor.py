"""Periodic upkeep, like PgBouncer's janitor: pool upkeep, login and per-client timeouts.

Timeouts are checked here, about twice a second, rather than with a timer per client:
the relay only sets a flag on its hot path (no clock read per chunk), and one pass over
the clients is cheaper than rescheduling thousands of DelayedCalls on every message. The same pass
notices clients that left while their reading was paused.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from odissey.client import ClientFactory, ClientState
from odissey.flow import peer_closed
from odissey.logs import Logger
from odissey.pool import Pools

PERIOD = 0.5

log = Logger()


class Janitor:
    def __init__(self, clock: IReactorTime, pools: Pools, factory: ClientFactory) -> None:
        self.clock = clock
        self.pools = pools
        self.factory = factory

    def tick(self) -> None:
        """One pass. Each step is kept from the others' failures: a LoopingCall stops for
        good at its first exception, which would end every timeout with it."""
        now = self.clock.seconds()
        for step in (self._expire_logins, self._maintain_pools, self._enforce_timeouts):
            try:
                step(now)
            except Exception:
                log.failure("janitor: {step} failed", step=step.__name__)

    def _expire_logins(self, now: float) -> None:
        self.factory.expire_logins(now)

    def _maintain_pools(self, now: float) -> None:
        pools = self.pools
        for pool in [*pools.pools.values(), *pools.retired]:
            pool.maintain()
        if pools.retired:
            pools.sweep_retired({client.relay.pool for client in self.factory.clients
                                 if client.relay is not None})

    def _enforce_timeouts(self, now: float) -> None:
        for client in list(self.factory.clients):
            if client.paused and peer_closed(client.transport):
                client.transport.abortConnection()  # type: ignore[union-attr]
            elif client.relay is not None and client.state is not ClientState.PARAMS:
                # (a session client still logging in waits for its server: wait_timeout
                # bounds that, the client's idle timeout does not)
                client.relay.enforce_timeouts(now)
