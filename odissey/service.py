"""The root service: builds everything from a Config, starts it, and stops it cleanly."""

from __future__ import annotations

import dataclasses
import functools

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from odissey.auth.passthrough import Credentials
from odissey.auth.secrets import reactor_threads
from odissey.auth_query import AuthQueries
from odissey.client import ClientFactory
from odissey.config import ANY, Config, Storage
from odissey.console import Console
from odissey.janitor import PERIOD, Janitor
from odissey.metrics import MetricsResource, MetricsSite, PoolCollector
from odissey.pool import Pools
from odissey.postgres import LocalPostgres
from odissey.router import Router
from odissey.server import ServerConnection, connect
from odissey.stats import Period, Ticker
from odissey import tls
from odissey.wire import errors
from odissey.wire.errors import PoolerError

log = Logger()


def managed_postgres(storage: Storage) -> LocalPostgres:
    managed = storage.managed
    assert managed is not None
    return LocalPostgres(
        data_dir=managed.data_dir,
        port=storage.port,
        users=managed.users,
        databases=managed.databases,
        hba=managed.hba,
        settings=managed.settings,
    )


def with_storage_hosts(config: Config, hosts: dict[str, str]) -> Config:
    """The config with managed storages pointing at the sockets of the servers we started."""
    storages = {
        name: dataclasses.replace(s, host=hosts[name]) if name in hosts else s
        for name, s in config.storages.items()
    }
    routes = tuple(dataclasses.replace(r, storage=storages[r.storage.name]) for r in config.routes)
    return dataclasses.replace(config, storages=storages, routes=routes)


def within(reactor: object, waiting: "Deferred[None]", seconds: float, give_up: object) -> "Deferred[None]":
    """Wait for ``waiting``, calling ``give_up`` if it takes longer than ``seconds``."""
    timer = reactor.callLater(seconds, give_up)  # type: ignore[attr-defined]

    def done(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    return waiting.addBoth(done)


class Live:
    """Every server connection until it closes, and every cancel request until its
    connection closes: what shutdown waits for, so nothing outlives the pooler.

    Kept by the service, which owns the lifecycle; connections are handed it as their
    :class:`~odissey.server.Tracker`."""

    def __init__(self) -> None:
        self.servers: set[ServerConnection] = set()
        self.cancels: set[Deferred[None]] = set()

    def add(self, server: ServerConnection) -> None:
        self.servers.add(server)
        server.closed.addCallback(lambda _: self.servers.discard(server))

    def cancelling(self, sent: "Deferred[bool]") -> "Deferred[bool]":
        """Track a cancel request until it is done; returns ``sent`` untouched."""
        finished: Deferred[None] = Deferred()
        self.cancels.add(finished)

        def done(result: object) -> object:
            self.cancels.discard(finished)
            finished.callback(None)
            return result

        sent.addBoth(done)
        return sent

    def closed(self) -> "Deferred[None]":
        """Fires once every server and cancel connection known now has closed."""
        waiting = [server.closed for server in self.servers] + list(self.cancels)
        return DeferredList(waiting).addCallback(lambda _: None)

    def abort_servers(self) -> None:
        """Shutdown's patience ran out: cut every server connection still open (a
        cancel request gives up by itself within its storage's connect timeout)."""
        for server in list(self.servers):
            server.abort()


class OdisseyService(MultiService):
    """Starts managed PostgreSQL servers (if any), then listens; stops in reverse order.

    ``ready`` fires with the listening ports once clients can connect.
    """

    def __init__(self, config: Config, reactor: object = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.managed: dict[str, LocalPostgres] = {
            name: managed_postgres(s) for name, s in config.storages.items() if s.managed
        }
        self.ports: list[IListeningPort] = []
        self.metrics_port: IListeningPort | None = None
        self.factory: ClientFactory | None = None
        self.pools: Pools | None = None
        self.auth_queries: AuthQueries | None = None
        self.live = Live()
        self.threads = reactor_threads(reactor)
        self.ready: Deferred[list[IListeningPort]] = Deferred()
        self._starting: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._starting = self._start()
        self._starting.addErrback(self._start_failed)

    @inlineCallbacks
    def _start(self):
        hosts = {}
        for name, postgres in self.managed.items():
            log.info("starting managed PostgreSQL for storage {name}", name=name)
            yield self.threads(postgres.start)
            log.info("managed PostgreSQL {name} is up (socket in {dir})", name=name,
                     dir=postgres.socket_dir)
            hosts[name] = postgres.socket_dir
        self.config = with_storage_hosts(self.config, hosts)
        # Certificates and keys are read once, here: rotating them takes a restart.
        client_tls, server_tls = tls.load(self.config)
        credentials = Credentials()
        self.pools = Pools(self.reactor, functools.partial(
            connect, tracker=self.live, threads=self.threads, credentials=credentials,
            tls=server_tls))
        self.auth_queries = AuthQueries(self.reactor, self.threads, self.live, tls=server_tls)
        router = Router(self.config.routes)
        period = Period(self.reactor.seconds(), self.config.stats_period)
        console = Console(self.config, router, self.pools,
                          lambda: self.factory.clients if self.factory is not None else (),
                          self.reactor, period)
        self.factory = ClientFactory(
            self.reactor, router, self.pools, self.config.limits, self.threads,
            auth_queries=self.auth_queries, credentials=credentials, tls=client_tls,
            console=console,
        )
        for route in self.config.routes:
            if route.pool.min_size and not route.block and ANY not in (route.database, route.user):
                self.pools.get(route, route.database, route.user)  # warmed by the janitor
        janitor = TimerService(PERIOD, Janitor(self.reactor, self.pools, self.factory).tick)
        janitor.clock = self.reactor
        janitor.setServiceParent(self)
        pools = self.pools
        ticker = TimerService(self.config.stats_period, Ticker(
            self.reactor, period, lambda: [(str(key), pool.stats) for key, pool in pools.pools.items()],
            self.config.log_stats).turn)
        ticker.clock = self.reactor
        ticker.setServiceParent(self)
        for description in self.config.listen:
            port = yield serverFromString(self.reactor, description).listen(self.factory)
            log.info("listening on {where}", where=description)
            self.ports.append(port)
        if self.config.metrics_listen is not None:
            factory = self.factory
            collector = PoolCollector(self.pools, lambda: factory.clients, lambda: factory.login_failures)
            self.metrics_port = yield serverFromString(self.reactor, self.config.metrics_listen).listen(
                MetricsSite(MetricsResource(collector, self.threads)))
            log.info("serving metrics on {where}", where=self.config.metrics_listen)
        self.ready.callback(self.ports)

    def _start_failed(self, failure):
        log.failure("Odissey could not start", failure)
        if not self.ready.called:
            self.ready.errback(failure)
        if self.reactor.running:
            self.reactor.stop()

    def _abort_clients(self) -> None:
        for client in list(self.factory.clients if self.factory else ()):
            if client.transport is not None:
                client.transport.abortConnection()  # type: ignore[attr-defined]

    @inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self._starting is not None and not self._starting.called:
            yield self._starting
        ports = self.ports + ([self.metrics_port] if self.metrics_port is not None else [])
        yield DeferredList([port.stopListening() for port in ports])
        self.ports, self.metrics_port = [], None
        if self.factory is not None:
            for client in list(self.factory.clients):
                client.fail(PoolerError(
                    errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
            yield within(self.reactor, self.factory.drained(), 5.0, self._abort_clients)
        if self.pools is not None:
            self.pools.close()
        if self.auth_queries is not None:
            self.auth_queries.close()
        yield within(self.reactor, self.live.closed(), 5.0, self.live.abort_servers)
        for postgres in self.managed.values():
            yield self.threads(postgres.stop)
