"""The root service: builds everything from a Config, starts it, and stops it cleanly."""

from __future__ import annotations

import dataclasses
import functools
import os
from enum import Enum
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from odissey.auth.passthrough import Credentials
from odissey.auth.secrets import InThread, reactor_threads
from odissey.auth_query import AuthQueries
from odissey.cancel import CancelKeys, KeyLayout, Peering
from odissey.client import ClientConnection, ClientFactory
from odissey.config import ANY, Config, ConfigError, Storage, load as load_config
from odissey.console import Console
from odissey.drain import Drain, end_all
from odissey.handover import HandoverServer, Taken, take as take_sockets
from odissey.janitor import PERIOD, Janitor
from odissey.lifecycle import Stop, Stoppable, failed_start, given, hand_over, install_signals, listener, stop_listening, within
from odissey.logs import Logger, Observer, observe_for, speed_up_twistd_text
from odissey.metrics import MetricsResource, MetricsSite, PoolCollector
from odissey.pool import Pool, PoolKey, Pools, ServerConnector
from odissey.reload import RECONNECT, REPLACE, SAME, Plan, plan as plan_reload
from odissey.postgres import LocalPostgres
from odissey.router import Router
from odissey.systemd import Notifier
from odissey.server import ServerConnection, connect
from odissey.stats import Period, Ticker
from odissey import reading, tls

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


@inlineCallbacks
def start_managed(managed: dict[str, LocalPostgres], threads: InThread):
    """Start managed PostgreSQL servers, one after the other; fires with the socket
    directory of each, by storage name."""
    hosts = {}
    for name, postgres in managed.items():
        log.info("starting managed PostgreSQL for storage {name}", name=name)
        yield threads(postgres.start)
        log.info("managed PostgreSQL {name} is up (socket in {dir})", name=name,
                 dir=postgres.socket_dir)
        hosts[name] = postgres.socket_dir
    return hosts


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
        cancel request, to a server or a peer, gives up by itself within its connect
        timeout)."""
        for server in list(self.servers):
            server.abort()


class Phase(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"  # listeners closed, clients leaving
    STOPPING = "stopping"  # clients gone (or ended), servers closing
    STOPPED = "stopped"


#: How long stopping waits for clients it ended, and for server connections, to close
#: before cutting them.
CLOSE_PATIENCE = 5.0


class _Operator:
    """The console's :class:`~odissey.console.Lifecycle`: its commands, in the service's terms."""

    def __init__(self, service: "OdisseyService") -> None:
        self.service = service

    def shutdown(self, wait_for_clients: bool) -> None:
        self.service.shutdown_all(Stop.WAIT_FOR_CLIENTS if wait_for_clients else Stop.IMMEDIATE)

    def reload(self) -> "Deferred[list[str]]":
        return self.service.reload_all()

    # (handover.Giver: what a new process starting with our handover_socket asks)

    def listening(self) -> list[tuple[str, IListeningPort]]:
        return given(self.service.listening, self.service.config.metrics_listen, self.service.metrics_port)

    def handed_over(self) -> None:
        self.service.handed_over()


class OdisseyService(Stoppable, MultiService):
    """Starts managed PostgreSQL servers (if any), then listens; stops in reverse order.

    ``ready`` fires with the listening ports once clients can connect. With
    ``process=True`` (twistd, the .tac) the service owns the process: SIGTERM and
    SIGINT stop it gracefully, a second one at once, and :meth:`shutdown` stops the
    reactor; otherwise (tests) :meth:`shutdown` stops just the service.
    """

    def __init__(self, config: Config, reactor: object = None, process: bool = False) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.process = process
        self.managed: dict[str, LocalPostgres] = {
            name: managed_postgres(s) for name, s in config.storages.items() if s.managed
        }
        self.ports: list[IListeningPort] = []
        #: Ports taken over from the process running before, until the handover is
        #: confirmed (see stop_listening).
        self.borrowed: list[IListeningPort] = []
        #: The same ports, by their ``listen`` entry (a reload opens and closes them).
        self.listening: dict[str, IListeningPort] = {}
        #: TLS to each storage, shared with the pools' connector and auth_query.
        self.server_tls: dict[str, tls.ServerSide] = {}
        self.console: Console | None = None
        #: systemd's sd_notify (when the service owns a process started by systemd).
        self.notifier = Notifier(reactor, os.environ if process else {})  # type: ignore[arg-type]
        #: The Prometheus endpoint (metrics.listen), when it is on.
        self.metrics_port: IListeningPort | None = None
        self.factory: ClientFactory | None = None
        self.pools: Pools | None = None
        self.auth_queries: AuthQueries | None = None
        self.live = Live()
        self.threads = reactor_threads(reactor)
        self.ready: Deferred[list[IListeningPort]] = Deferred()
        self.phase = Phase.STARTING
        self._starting: Deferred[None] | None = None
        self._stopping: Deferred[None] | None = None
        self.handover: HandoverServer | None = None
        #: Odissey's log observer (``log`` section, under twistd), or None.
        self.log_observer: Observer | None = None
        #: Listening ports given to a new process: kept (open, unread) until we exit.
        self._handed_over: list[IListeningPort] = []

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd, the ``log`` section's observer goes on the application."""
        self.log_observer = observe_for(self.config.log, parent)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        if self.process:
            speed_up_twistd_text()
            self.reactor.callWhenRunning(install_signals, self.reactor, self)  # type: ignore[attr-defined]
        self._starting = self._start()
        self._starting.addErrback(self.start_failed)

    @inlineCallbacks
    def _start(self):
        hosts = yield start_managed(self.managed, self.threads)
        self.config = with_storage_hosts(self.config, hosts)
        # Certificates and keys are read here and by each reload (for new connections).
        client_tls, server_tls = tls.load(self.config)
        self.server_tls.update(server_tls)  # (one dict, shared: a reload updates it in place)
        credentials = Credentials()
        self.pools = Pools(self.reactor, self.connector(functools.partial(
            connect, tracker=self.live, threads=self.threads, credentials=credentials,
            tls=self.server_tls)))
        self.auth_queries = AuthQueries(self.reactor, self.threads, self.live, tls=self.server_tls)
        router = Router(self.config.routes)
        period = Period(self.reactor.seconds(), self.config.stats_period)
        console = self.console = Console(
            self.config, router, self.pools,
            lambda: self.factory.clients if self.factory is not None else (),
            self.reactor, _Operator(self), period)
        peer_id = self.config.peer_id
        keys: CancelKeys[ClientConnection] = CancelKeys(self.key_layout())
        if peer_id:
            log.info("peer {id}: cancel requests for peers {peers} are forwarded to them",
                     id=peer_id, peers=", ".join(str(p) for p in sorted(self.config.peers)) or "(none)")
        self.factory = ClientFactory(
            self.reactor, router, self.pools, self.config.limits, self.threads, keys,
            auth_queries=self.auth_queries, credentials=credentials, tls=client_tls,
            console=console, peering=Peering(self.reactor, self.config.peers, self.live),
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
        self.built()
        # Reads for client and server connections skip Twisted's per-event log context.
        reading.install(self.reactor, (ClientConnection, ServerConnection))
        yield self.listen()
        self.phase = Phase.RUNNING
        self.notifier.ready()
        self.ready.callback(self.ports)

    def connector(self, connect: ServerConnector) -> ServerConnector:
        """How pools open server connections: directly, in one process (a worker asks
        its master for a lease first)."""
        return connect

    def key_layout(self) -> KeyLayout:
        """What each client's cancel secret says about who issued it: the peer id when
        peers are configured (a worker adds its number)."""
        peer_id = self.config.peer_id
        return KeyLayout.of(peer_id, bool(peer_id), 0, 1)

    def built(self) -> None:
        """Pools, client factory and console exist, nothing listens yet: where a worker
        connects them to its master."""

    @inlineCallbacks
    def serve_metrics(self, taken: Taken | None):
        """Open the Prometheus endpoint (``metrics.listen``), when it is configured."""
        where = self.config.metrics_listen
        if where is None:
            return
        factory = self.factory
        assert factory is not None and self.pools is not None
        collector = PoolCollector(self.pools, lambda: factory.clients, lambda: factory.login_failures)
        handed = taken is not None and where in taken.sockets
        self.metrics_port = yield listener(self.reactor, where, MetricsSite(MetricsResource(collector, self.threads)),
                                           taken)
        if handed:
            self.borrowed.append(self.metrics_port)
        log.info("serving metrics on {where}{how}", where=where, how=" (socket taken over)" if handed else "")

    @inlineCallbacks
    def listen(self):
        """Open the listeners and the metrics endpoint (or take them over from the
        process running before: the metrics address too, which the old process would
        hold until it exits), then serve the handover path."""
        path = self.config.handover_socket
        taken = (yield take_sockets(self.reactor, path)) if path else None
        for description in self.config.listen:
            yield self._listen(description, taken)
        yield self.serve_metrics(taken)
        if taken is not None:
            taken.confirm()
            self.borrowed = []
            log.info("took over the listening sockets of the Odissey running before; it drains")
        if path:
            self.handover = HandoverServer(_Operator(self))
            self.handover.listen(self.reactor, path)

    @inlineCallbacks
    def _listen(self, description: str, taken: Taken | None = None):
        handed = taken is not None and description in taken.sockets
        port = yield listener(self.reactor, description, self.factory, taken)
        if handed:
            self.borrowed.append(port)
        log.info("listening on {where}{how}", where=description, how=" (socket taken over)" if handed else "")
        self.ports.append(port)
        self.listening[description] = port

    def start_failed(self, failure: Failure) -> None:
        """The start failed: log why and fail ``ready``; owning the process, end it
        with status 1 (see lifecycle.failed_start)."""
        failed_start(self.reactor, failure, self.ready, self, self.process)

    # -- reloading -----------------------------------------------------------------------

    def reload(self) -> list[str]:
        """SIGHUP, console RELOAD: read the configuration file again and apply the
        difference (see odissey/reload.py). Returns the problems (each with its key
        path) that kept it from applying; then nothing changed."""
        source = self.config.source
        if self.phase is not Phase.RUNNING or self.factory is None or self.pools is None:
            problems = [f"(top level): Odissey is {self.phase.value}, not reloading"]
        elif source is None:
            problems = ["(top level): the configuration was not read from a file"]
        else:
            self.notifier.reloading()
            problems = self._reload(source)
            self.notifier.reloaded()
        for problem in problems:
            log.warn("reload refused: {problem}", problem=problem)
        return problems

    def reload_all(self) -> "Deferred[list[str]]":
        """Console RELOAD: this process's reload (a worker asks its master, which
        reloads every worker)."""
        return succeed(self.reload())

    def _reload(self, source: str) -> list[str]:
        try:
            new = load_config(source)
        except ConfigError as exc:
            return list(exc.problems)
        return self.take(new)

    def take(self, new: Config) -> list[str]:
        """Apply the difference to a loaded configuration (a reload; in a worker, the
        one its master read). Returns the problems that kept it from applying (then
        nothing changed)."""
        try:
            client_tls, server_tls = tls.load(new)
        except ConfigError as exc:
            return list(exc.problems)
        planned = plan_reload(self.config, new)
        if planned.problems:
            return list(planned.problems)
        self._apply(planned, client_tls, server_tls)
        log.info("reloaded {source}: {summary}", source=new.source, summary=planned.summary())
        return []

    def _apply(self, planned: Plan, client_tls: tls.ClientSide | None,
               server_tls: dict[str, tls.ServerSide]) -> None:
        factory, pools = self.factory, self.pools
        assert factory is not None and pools is not None and self.console is not None
        new = planned.config
        self.server_tls.clear()
        self.server_tls.update(server_tls)
        router = Router(new.routes)
        factory.router, factory.limits, factory.tls = router, new.limits, client_tls
        if self.log_observer is not None and new.log is not None:
            self.log_observer.settings = new.log
        self.console.configure(new, router)
        kept: dict[PoolKey, Pool] = {}
        by_index = {change.old.index: change for change in planned.changes}
        for pool in pools.pools.values():
            change = by_index.get(pool.route.index)
            if change is None or change.kind == REPLACE:
                continue  # retired: its clients keep it, new ones get a new pool
            if change.kind != SAME:
                pool.reconfigure(change.new, reconnect=change.kind == RECONNECT)
            else:
                pool.route = change.new
            kept[pools.key_of(change.new, pool.key.database, pool.key.user)] = pool
        pools.rekey(kept)
        self.config = new
        for description in planned.listen_close:
            port = self.listening.pop(description)
            self.ports.remove(port)
            port.stopListening()
            log.info("no longer listening on {where}", where=description)
        for description in planned.listen_open:
            self._listen(description).addErrback(self._listen_failed, description)

    @staticmethod
    def _listen_failed(failure: Failure, description: str) -> None:
        log.failure("reload: could not listen on {where}", failure, where=description)

    # -- stopping ------------------------------------------------------------------------

    def handed_over(self) -> None:
        """A new process has our listening sockets: stop reading them (closing a unix
        listener would remove its path, which is the new process's now; the process's
        exit closes our copies), then drain and exit as on SIGTERM."""
        log.info("handed the listening sockets over to a new process; draining")
        self._handed_over = hand_over(self.ports, self.metrics_port)
        self.ports, self.listening, self.metrics_port = [], {}, None
        self.shutdown(Stop.GRACEFUL)

    def stopping(self) -> bool:
        return self._stopping is not None

    def halt(self) -> None:
        """Carry out a shutdown: stop the reactor (its shutdown stops this service) when
        the service owns the process, else just the service."""
        if self.process:
            self.reactor.stop()  # type: ignore[attr-defined]
        else:
            self.stopService()

    def shutdown_all(self, how: Stop) -> None:
        """Console SHUTDOWN [WAIT_FOR_CLIENTS]: this process's shutdown (a worker asks
        its master, which stops every worker)."""
        self.shutdown(how)

    def hurry(self) -> None:
        """Stop now: end every client (57P01; cut if it has not gone within
        CLOSE_PATIENCE) and cut every server connection."""
        self.how = Stop.IMMEDIATE
        if self.factory is not None:
            end_all(self.factory)
        if self.phase is Phase.STOPPING:
            self.live.abort_servers()

    def _abort_clients(self) -> None:
        for client in list(self.factory.clients if self.factory else ()):
            if client.transport is not None:
                client.transport.abortConnection()  # type: ignore[attr-defined]

    def stopService(self) -> "Deferred[None]":
        """Stop as :attr:`how` says; fires once every connection is closed. Called
        again while stopping, returns the same Deferred."""
        if self._stopping is None:
            self._stopping = self._stop()
        return self._stopping

    @inlineCallbacks
    def _stop(self):
        if self._starting is not None and not self._starting.called:
            yield self._starting
        self.phase = Phase.DRAINING
        self.notifier.stopping()
        if self.handover is not None:
            self.handover.close()
        ports = self.ports + ([self.metrics_port] if self.metrics_port is not None else [])
        yield DeferredList(stop_listening(ports, self.borrowed))
        self.ports, self.metrics_port, self.borrowed = [], None, []
        self.listening = {}
        factory = self.factory
        if factory is not None:
            yield self._let_clients_go(factory)
            end_all(factory)
            yield within(self.reactor, factory.drained(), CLOSE_PATIENCE, self._abort_clients)
        self.phase = Phase.STOPPING
        yield super().stopService()
        if self.pools is not None:
            self.pools.close()
        if self.auth_queries is not None:
            self.auth_queries.close()
        patience = 0.0 if self.how is Stop.IMMEDIATE else CLOSE_PATIENCE
        yield within(self.reactor, self.live.closed(), patience, self.live.abort_servers)
        for postgres in self.managed.values():
            yield self.threads(postgres.stop)
        self.notifier.stopped()
        self.phase = Phase.STOPPED

    def _let_clients_go(self, factory: ClientFactory) -> "Deferred[None]":
        """The drain of a graceful or wait-for-clients stop (nothing for an immediate one)."""
        how = self.how
        if how is Stop.IMMEDIATE or not factory.clients:
            return succeed(None)
        log.info("draining {count} clients ({how})", count=len(factory.clients), how=how.value)
        drain = Drain(self.reactor, factory, how is Stop.GRACEFUL)  # type: ignore[arg-type]
        drain.start()
        if how is Stop.WAIT_FOR_CLIENTS:
            return drain.done
        timeout = self.config.shutdown_timeout

        def give_up() -> None:
            log.info("shutdown_timeout ({timeout:g}s) is over: ending {count} clients",
                     timeout=timeout, count=len(factory.clients))
            end_all(factory)

        return within(self.reactor, drain.done, timeout, give_up)
