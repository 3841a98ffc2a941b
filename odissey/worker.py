"""One worker process of a multi-worker Odissey: ``python -m odissey.worker``.

The master (:mod:`odissey.workers`) starts it with the listening sockets and one end of
a socketpair as inherited file descriptors, and the (started) configuration pickled on
its standard input. The worker then does everything one process does for the clients
its accept calls win: login, TLS, relay, reset. It asks the master over AMP only on the
connect/close path (a lease before opening a server connection, its return when the
connection closes, client slots when its own are used up, a cancel whose key another
worker issued) and for what its console does to the whole process (control commands,
RELOAD, SHOW CLIENTS/SERVERS, SHUTDOWN); the master asks it to carry those out, to apply
a reload, for its metrics, and to stop.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import signal
import socket
import sys
from typing import Any, Callable, Optional, Union

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import FileLogObserver, ILogObserver, globalLogBeginner
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from odissey.cancel import KeyLayout
from odissey.commands import (MAX_VALUE, REPORT_PERIOD, Accepting, Admit, Cancel, ConfigPart, Figures, Lease, Order,
                              Others, Reclaim, Reconfigure, Release, Reload, Report, Show, ShowHere, Shutdown, Spare,
                              Stats, Stop as StopCommand, Withdraw, pool_name, rows_json, slots_from, slots_json)
from odissey.config import Config, LogSettings, Route
from odissey.console import Console
from odissey.control import Control
from odissey.janitor import PERIOD
from odissey.lifecycle import Stop, failed_start
from odissey.logs import Lines, Logger, Observer
from odissey.metrics import PoolCollector
from odissey.pool import PoolKey, Pools, ServerConnector, Withdrawn
from odissey.pypy import compile_sooner
from odissey.server import ServerConnection, number_ids
from odissey.slots import Block
from odissey.service import OdisseyService
from odissey.wire.errors import PoolerError

log = Logger()


class MasterLink(amp.AMP):
    """The worker's end of its AMP connection to the master."""

    def __init__(self, service: "WorkerService") -> None:
        super().__init__()
        self.service = service
        #: Fires when the master is gone (then this worker has no reason to live).
        self.lost: Deferred[None] = Deferred()
        #: Pieces of a pickled configuration the master is sending (see Reconfigure).
        self.parts: list[bytes] = []
        #: The metrics snapshot of the scrape the master is reading (number, JSON).
        self.figures: tuple[int, bytes] = (-1, b"")
        #: The client slots this worker holds, and how many its clients use.
        self.block = Block()

    def release(self, pool: str) -> None:
        if self.transport is not None and not self.lost.called:
            self.callRemote(Release, pool=pool)

    def admit(self, route: Route) -> "Deferred[str]":
        """:class:`~odissey.client.Admission`: into a free client slot this worker holds,
        here and now; else the master grants a block of slots (or refuses, when other
        workers have none to spare: the limits hold over all of them). The route's
        budget is its identity, which the master names alike before and after a reload."""
        block = self.block
        wants = block.admit(route.identity, bool(route.pool.max_clients))
        if not wants:
            return succeed("")

        def answered(answer: dict[str, Any]) -> "Union[str, Deferred[str]]":
            if answer["refused"]:
                return answer["refused"]
            block.add(slots_from(answer["slots"]))
            return self.admit(route)

        return self.callRemote(Admit, wants=slots_json(wants)).addCallback(answered)

    def left(self, identity: str) -> None:
        """The client's slot stays here, free for this worker's next login."""
        self.block.leave(identity)

    @Spare.responder
    def spare(self, budgets: str) -> dict[str, Any]:
        """Another worker needs slots none are free of: give back those not in use."""
        return {"gave": slots_json(self.block.spare(tuple(json.loads(budgets))))}

    def order(self, verb: str, arg: Optional[str]) -> "Deferred[None]":
        """A console control command, for every worker: through the master (see
        :meth:`obey`); a refusal comes back as the PoolerError the console answers."""
        asking = self.callRemote(Order, verb=verb, arg=arg)

        def answered(answer: dict[str, Any]) -> None:
            if answer["sqlstate"]:
                raise PoolerError(answer["sqlstate"], answer["message"], severity="ERROR",
                                  hint=answer["hint"] or None)

        return asking.addCallback(answered)

    def show(self, what: str) -> "Deferred[list[list[Any]]]":
        """The other workers' rows of SHOW ``what`` (CLIENTS, SERVERS), through the master."""
        return self.callRemote(Show, what=what).addCallback(lambda answer: json.loads(answer["rows"]))

    @ShowHere.responder
    def show_here(self, what: str) -> dict[str, Any]:
        console = self.service.console
        assert console is not None
        return {"rows": rows_json(Console.SHOW[what](console)[1])}

    @Order.responder
    def obey(self, verb: str, arg: Optional[str] = None) -> "Deferred[dict[str, Any]]":
        """A control command the master sends every worker: carried out on this one's
        pools and clients, answered once done or with the refusal."""
        console = self.service.console
        assert console is not None
        try:
            done = Control.COMMANDS[verb](console.control, arg)
        except PoolerError as exc:
            return succeed(_refused(exc))
        if done is None:
            return succeed(_refused(None))
        def failed(failure: Failure) -> dict[str, Any]:
            failure.trap(PoolerError)
            return _refused(failure.value)

        return done.addCallbacks(lambda _: _refused(None), failed)

    @ConfigPart.responder
    def part(self, part: bytes) -> dict[str, Any]:
        self.parts.append(part)
        return {}

    @Reconfigure.responder
    def reconfigure(self) -> dict[str, Any]:
        """Apply the configuration the master read (a reload), as one process would."""
        new = pickle.loads(b"".join(self.parts))
        self.parts = []
        service = self.service
        problems = service.take(new)
        pools = service.pools.pools if service.pools is not None else {}
        sizes = {pool_name(key): pool.route.pool.size for key, pool in pools.items()}
        return {"problems": json.dumps(problems), "sizes": json.dumps(sizes)}

    @Figures.responder
    def figures_part(self, scrape: int, offset: int) -> dict[str, Any]:
        """This worker's metrics, for the master's endpoint (which adds up every worker's)."""
        if self.figures[0] != scrape:
            service = self.service
            factory = service.factory
            assert factory is not None and service.pools is not None
            snapshot = PoolCollector(service.pools, lambda: factory.clients,
                                     lambda: factory.login_failures).snapshot()
            self.figures = (scrape, snapshot.to_json().encode())
        text = self.figures[1]
        return {"part": text[offset:offset + MAX_VALUE], "total": len(text)}

    @Reclaim.responder
    def reclaim(self, pool: str, idle_only: bool) -> dict[str, Any]:
        found = self.service.pools.pools.get(PoolKey(*json.loads(pool))) if self.service.pools else None
        return {"gave": found.shed(idle_only) if found is not None else False}

    @Cancel.responder
    def cancel(self, pid: int, secret: int) -> "Deferred[dict[str, Any]]":
        factory = self.service.factory
        done = factory.cancel(pid, secret) if factory is not None else succeed(None)
        return done.addCallback(lambda _: {})

    @StopCommand.responder
    def stop(self, how: str) -> dict[str, Any]:
        """The master stops the process (a signal, a console SHUTDOWN, a handover):
        this worker stops that way and exits."""
        self.service.shutdown(Stop(how))
        return {}

    @Stats.responder
    def stats(self) -> dict[str, Any]:
        return {"stats": json.dumps(self.service.snapshot())}

    @Others.responder
    def others(self, pools: str) -> dict[str, Any]:
        self.service.others = json.loads(pools)
        return {}

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


def _refused(error: Optional[PoolerError]) -> dict[str, Any]:
    """An Order's answer: done (None), or the refusal."""
    if error is None:
        return {"sqlstate": "", "message": "", "hint": ""}
    return {"sqlstate": error.sqlstate, "message": error.message, "hint": error.hint or ""}


class _Adopted:
    """A listening socket this worker shares: stopping stops accepting and closes this
    worker's descriptor of it, never unlinking a unix socket's path (the master owns
    it; after a handover another master does). New connections are refused once the
    master has shut the socket down (a socket it opened: its stopListening does, for
    every process) or every process has closed its descriptor (one it took over)."""

    def __init__(self, port: Any) -> None:
        self.port = port

    def stopListening(self) -> "Deferred[None]":
        if self.port.connected:  # (else the master's shutdown of the socket closed it)
            self.port.stopReading()
            self.port.socket.close()
        return succeed(None)


class WorkerService(OdisseyService):
    """An :class:`OdisseyService` that adopts the master's listeners, leases server
    connections from it, and tags its cancel keys with its number."""

    def __init__(self, config: Config, reactor: Any, number: int, workers: int,
                 listeners: list[tuple[int, int]]) -> None:
        super().__init__(config, reactor)
        self.managed = {}  # the master runs managed PostgreSQL; the config points at it
        self.number = number
        self.workers = workers
        self.listeners = listeners
        self.link: Optional[MasterLink] = None
        self._requests = itertools.count(1)
        #: Lease requests still waiting at the master, oldest first, by pool name.
        self.waiting: dict[str, list[int]] = {}
        #: The other workers' SHOW POOLS rows, as the master last sent them.
        self.others: list[list[Any]] = []

    def key_layout(self) -> KeyLayout:
        peer_id = self.config.peer_id
        return KeyLayout.of(peer_id, bool(peer_id), self.number, self.workers)

    def connector(self, connect: ServerConnector) -> ServerConnector:
        def leased(reactor: Any, route: Route, database: str, user: str) -> "Deferred[ServerConnection]":
            link = self.link
            assert link is not None
            name = pool_name(Pools.key_of(route, database, user))
            request = next(self._requests)
            waiting = self.waiting.setdefault(name, [])
            waiting.append(request)

            def granted(answer: dict[str, Any]) -> "Deferred[ServerConnection]":
                waiting.remove(request)
                if not answer["granted"]:
                    raise Withdrawn()
                return connect(reactor, route, database, user).addCallbacks(opened, failed)

            def opened(server: ServerConnection) -> ServerConnection:
                server.closed.addBoth(lambda _: link.release(name))
                return server

            def failed(failure: Failure) -> Failure:
                link.release(name)
                return failure

            asking = link.callRemote(Lease, pool=name, size=route.pool.size, request=request)
            return asking.addCallback(granted)

        return leased

    def withdraw_surplus(self) -> None:
        """Withdraw the newest lease requests still waiting at the master that no client
        needs now (see Pool.surplus): left there, they would be granted ahead of other
        workers' clients and open servers nobody uses. Runs with the janitor's period."""
        link = self.link
        if link is None or self.pools is None:
            return
        for name, waiting in self.waiting.items():
            pool = self.pools.pools.get(PoolKey(*json.loads(name))) if waiting else None
            surplus = pool.surplus() if pool is not None else 0
            for request in waiting[len(waiting) - min(surplus, len(waiting)):]:
                link.callRemote(Withdraw, pool=name, request=request)

    def built(self) -> None:
        withdrawing = TimerService(PERIOD, self.withdraw_surplus)
        withdrawing.clock = self.reactor
        withdrawing.setServiceParent(self)
        reporting = TimerService(REPORT_PERIOD, self.report)
        reporting.clock = self.reactor
        reporting.setServiceParent(self)
        assert self.factory is not None and self.console is not None
        self.console.elsewhere = lambda: self.others
        self.console.spread = self.link.order if self.link is not None else None
        self.console.gather = self.link.show if self.link is not None else None
        self.factory.ids = itertools.count(self.number + 1, self.workers)
        number_ids(itertools.count(self.number + 1, self.workers))
        self.factory.elsewhere = self._cancel_elsewhere
        self.factory.admission = self.link

    def report(self) -> None:
        """This worker's SHOW POOLS rows to the master, for the other workers' consoles."""
        link, console = self.link, self.console
        if link is not None and console is not None and not link.lost.called:
            link.callRemote(Report, pools=rows_json(console.pool_rows()))

    def _cancel_elsewhere(self, pid: int, secret: int) -> "Deferred[None]":
        """A key this worker did not issue: another worker's, reached through the master."""
        link = self.link
        if link is None or self.key_layout().worker_of(secret) == self.number:
            return succeed(None)
        asking = link.callRemote(Cancel, pid=pid, secret=secret)
        return asking.addBoth(lambda _: None)

    def reload_all(self) -> "Deferred[list[str]]":
        """Console RELOAD: the master re-reads the file and reloads every worker."""
        link = self.link
        assert link is not None
        return link.callRemote(Reload).addCallback(lambda answer: json.loads(answer["problems"]))

    def shutdown_all(self, how: Stop) -> None:
        """Console SHUTDOWN [WAIT_FOR_CLIENTS]: the master stops the whole process (it
        sends this worker and every other one a Stop)."""
        link = self.link
        assert link is not None
        log.info("asking the master to stop every worker ({how})", how=how.value)
        link.callRemote(Shutdown, how=how.value)

    def start_failed(self, failure: Failure) -> None:
        """A worker whose start failed (its certificates unreadable, say) ends its
        process with status 1, as a single Odissey does: the master logs that it died
        and starts another (it would otherwise stay up, accepting nothing)."""
        failed_start(self.reactor, failure, self.ready, self, process=True)

    def halt(self) -> None:
        """The worker's process ends with its service: stopping the reactor stops the
        service (a trigger), as the master's SIGTERM does."""
        self.reactor.stop()  # type: ignore[attr-defined]

    def listen(self) -> "Deferred[None]":
        """Adopt the master's listeners. The master serves ``metrics.listen`` (one
        address, which one process only can bind) with every worker's numbers added up
        (a worker answers its Figures), and the handover path."""
        for fd, family in self.listeners:
            port = self.reactor.adoptStreamPort(fd, family, self.factory)  # type: ignore[attr-defined]
            os.close(fd)  # (adopting duplicated it)
            self.ports.append(_Adopted(port))  # type: ignore[arg-type]
            log.info("accepting on {where}", where=port.getHost())
        if self.link is not None:
            self.link.callRemote(Accepting)
        return succeed(None)

    def snapshot(self) -> dict[str, Any]:
        """Clients, and servers per pool: what the master adds up over workers."""
        pools = {}
        for key, pool in (self.pools.pools.items() if self.pools is not None else ()):
            pools[str(key)] = {"active": len(pool.active), "idle": len(pool.idle),
                               "waiting": len(pool.waiters)}
        clients = len(self.factory.clients) if self.factory is not None else 0
        return {"clients": clients, "pools": pools}


@implementer(ILogObserver)
class _Tagged:
    """Log events on the master's standard output, each naming this worker (as its
    ``log_system``): through the ``log`` section's observer when there is one (text or
    JSON, level, connection lines), else as twistd's text lines (written by
    :class:`~odissey.logs.Lines`, as the master's are)."""

    def __init__(self, number: int, settings: Optional[LogSettings]) -> None:
        self.system = f"worker {number}"
        self.inner: Callable[[dict[str, Any]], None] = (
            Observer(settings, sys.stdout) if settings is not None else FileLogObserver(sys.stdout, Lines()))

    def __call__(self, event: dict[str, Any]) -> None:
        self.inner({**event, "log_system": self.system})


def _listener(text: str) -> tuple[int, int]:
    fd, family = text.split(":")
    return int(fd), int(family)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m odissey.worker")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--link", type=int, required=True, help="the AMP socket's fd")
    parser.add_argument("--listener", type=_listener, action="append", default=[],
                        help="FD:ADDRESS_FAMILY of an inherited listening socket")
    args = parser.parse_args(argv)
    compile_sooner()
    config = pickle.load(sys.stdin.buffer)
    tagged = _Tagged(args.number, config.log)
    globalLogBeginner.beginLoggingTo([tagged], redirectStandardIO=False)

    from twisted.internet import reactor

    service = WorkerService(config, reactor, args.number, args.workers, args.listener)
    if isinstance(tagged.inner, Observer):
        service.log_observer = tagged.inner  # (a reload's log settings reach it)
    link = MasterLink(service)
    service.link = link
    factory = Factory.forProtocol(lambda: link)
    factory.noisy = False
    reactor.adoptStreamConnection(args.link, socket.AF_UNIX, factory)  # type: ignore[attr-defined]
    os.close(args.link)
    link.lost.addCallback(lambda _: reactor.stop() if reactor.running else None)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    # Ctrl-C reaches the whole process group: only the master decides when workers stop.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.callWhenRunning(service.startService)
    reactor.run()


if __name__ == "__main__":
    main()
