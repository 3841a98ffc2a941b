"""The master of a multi-worker Odissey (``workers: N`` with N > 1).

The twistd process becomes the master: it starts managed PostgreSQL servers, opens
every listener and stops reading from them, and spawns N workers (``python -m
odissey.worker`` on the master's own interpreter, so a PyPy master gets PyPy workers)
that inherit the listening sockets and accept from them. Each worker talks to the
master over AMP on a socketpair. The master holds the global lease ledger (so
``pool.size`` is one limit over all workers) and the client-slot ledger (so are
``max_clients``, see :mod:`odissey.slots`), forwards cancels between workers,
restarts a worker that dies, and owns the process's lifecycle: a signal, a worker's
console SHUTDOWN (the worker asks, :class:`~odissey.commands.Shutdown`) or a handover to
a new master (``handover_socket``: the master hands over the listening sockets it
holds) stops it, and it tells every worker how to stop (:class:`~odissey.commands.Stop`)
and logs what they held.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
from collections import Counter
from typing import Any, Hashable, Optional, Union

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.protocols import amp
from twisted.python.failure import Failure

import odissey
from odissey.auth.secrets import InThread, reactor_threads
from odissey.cancel import KeyLayout
from odissey.commands import (REPORT_PERIOD, Accepting, Admit, Cancel, ConfigPart, Figures, Lease, Order, Others,
                              Reclaim, Reconfigure, Release, Reload, Report, Show, ShowHere, Shutdown, Spare, Stats,
                              Stop as StopCommand, Withdraw, config_parts, rows_json, slots_from, slots_json)
from odissey import tls
from odissey.config import Config, ConfigError, load as load_config
from odissey.handover import HandoverServer, take as take_sockets
from odissey.leases import Action, Grant, Ledger
from odissey.lifecycle import FAILED, Stop, Stoppable, failed_start, given, hand_over, install_signals, listener, stop_listening, within
from odissey.logs import Logger, Observer, observe_for, speed_up_twistd_text
from odissey.metrics import MetricsResource, MetricsSite, Snapshot
from odissey.postgres import LocalPostgres
from odissey.pypy import compile_sooner, nursery_advice
from odissey.reload import Plan, plan as plan_reload
from odissey.service import OdisseyService, managed_postgres, start_managed, with_storage_hosts
from odissey import slots
from odissey.systemd import Notifier
from odissey.wire import errors

log = Logger()

#: A worker that dies sooner than this after its start is restarted only this long after
#: its start (a crash loop costs one start per period, not a busy loop).
RESTART_DELAY = 1.0
#: How long workers have beyond shutdown_timeout to finish at shutdown before they are
#: killed (their own drain ends every client at shutdown_timeout).
STOP_PATIENCE = 10.0
#: What systemd tells the master only (notify socket, watchdog, activated sockets).
SYSTEMD_ONLY = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                          "LISTEN_PID", "LISTEN_FDNAMES"})
#: How soon workers that had no server to give are asked again while a request waits.
RECLAIM_RETRY = 0.1
#: How long the master waits for a worker's statistics at shutdown.
STATS_PATIENCE = 2.0
#: How long a login waiting for other workers to spare client slots waits for one that
#: does not answer: then that worker counts as having spared none (its answer, when it
#: comes, is still counted: the slots it gave back are free again).
SPARE_PATIENCE = 1.0


class WorkerStartFailed(Exception):
    """A worker exited with a failed start's status before every worker had accepted
    once: the master's own start fails (restarting it would fail the same way)."""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def service_for(config: Config) -> Union[OdisseyService, "Master"]:
    """The root service of a twistd process: itself the whole Odissey for ``workers:
    1``; else a master that starts the workers (its workers inherit its environment,
    PyPy's nursery size with it)."""
    compile_sooner()
    advice = nursery_advice()
    if advice is not None:
        log.warn("{advice}", advice=advice)
    if config.workers > 1:
        return Master(config)
    return OdisseyService(config, process=True)


class WorkerLink(amp.AMP):
    """The master's end of one worker's AMP connection."""

    def __init__(self, master: "Master", number: int) -> None:
        super().__init__()
        self.master = master
        self.number = number

    @Lease.responder
    def lease(self, pool: str, size: int, request: int) -> "Deferred[dict[str, Any]]":
        return self.master.lease(self.number, pool, size, request)

    @Withdraw.responder
    def withdraw(self, pool: str, request: int) -> dict[str, Any]:
        self.master.withdraw(self.number, pool, request)
        return {}

    @Release.responder
    def release(self, pool: str) -> dict[str, Any]:
        self.master.apply(self.master.ledger.release(pool, self.number))
        return {}

    @Cancel.responder
    def cancel(self, pid: int, secret: int) -> "Deferred[dict[str, Any]]":
        return self.master.cancel(self.number, pid, secret).addCallback(lambda _: {})

    @Report.responder
    def report(self, pools: str) -> dict[str, Any]:
        self.master.shown[self.number] = json.loads(pools)
        return {}

    @Order.responder
    def order(self, verb: str, arg: Optional[str] = None) -> "Deferred[dict[str, Any]]":
        return self.master.order(verb, arg)

    @Reload.responder
    def reload(self) -> "Deferred[dict[str, Any]]":
        return self.master.reload().addCallback(lambda problems: {"problems": json.dumps(problems)})

    @Show.responder
    def show(self, what: str) -> "Deferred[dict[str, Any]]":
        return self.master.show(self.number, what).addCallback(lambda rows: {"rows": rows_json(rows)})

    @Admit.responder
    def admit(self, wants: str) -> "Deferred[dict[str, Any]]":
        return self.master.admit(self.number, slots_from(wants))

    @Accepting.responder
    def accepting(self) -> dict[str, Any]:
        self.master.accepted(self.number)
        return {}

    @Shutdown.responder
    def shutdown(self, how: str) -> dict[str, Any]:
        self.master.shutdown(Stop(how))
        return {}


class WorkersCollector:
    """The master's metrics: at each scrape every worker is asked for its snapshot
    (``Figures``, in pieces of one AMP value) and the numbers are added up, so the
    endpoint shows the whole process as of that moment. Scrapes that come while one is
    under way share its answer (a worker keeps one scrape's snapshot at a time)."""

    def __init__(self, master: "Master") -> None:
        self.master = master
        self.scrapes = 0
        self._sharing: Optional[list[Deferred[Snapshot]]] = None

    def snapshot(self) -> "Deferred[Snapshot]":
        mine: Deferred[Snapshot] = Deferred()
        if self._sharing is not None:
            self._sharing.append(mine)
            return mine
        self._sharing = [mine]
        self.scrapes += 1
        links = [p.link for p in self.master.processes.values() if p.link is not None]
        asked = [self.master.patient(self._read(link, self.scrapes)) for link in links]
        DeferredList(asked, consumeErrors=True).addCallback(self._added)
        return mine

    @inlineCallbacks
    def _read(self, link: amp.AMP, scrape: int):
        text, total = b"", 1
        while len(text) < total:
            answer = yield link.callRemote(Figures, scrape=scrape, offset=len(text))
            text += answer["part"]
            total = answer["total"]
        return Snapshot.from_json(text.decode())

    def _added(self, results: list[tuple[bool, Any]]) -> None:
        added = Snapshot.added(snapshot for ok, snapshot in results if ok)
        waiting, self._sharing = self._sharing or [], None
        for d in waiting:
            d.callback(added)


class _Ticket:
    """A lease request waiting in the ledger: answered through ``granted``."""

    __slots__ = ("granted", "asked_at")

    def __init__(self, asked_at: float) -> None:
        self.granted: Deferred[dict[str, Any]] = Deferred()
        self.asked_at = asked_at


class WorkerProcess(ProcessProtocol):
    """One worker process: hands it the config on stdin, tells the master when it ends."""

    def __init__(self, master: "Master", number: int, config: bytes) -> None:
        self.master = master
        self.number = number
        self.config = config
        self.pid: Optional[int] = None
        self.started_at = 0.0
        self.ended: Deferred[None] = Deferred()
        self.link: Optional[WorkerLink] = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.writeToChild(0, self.config)
        self.transport.closeChildFD(0)

    def processEnded(self, reason: Failure) -> None:
        self.master.ended(self, reason)
        self.ended.callback(None)


class Master(Stoppable, MultiService):
    """The twistd service when ``workers`` is more than 1. ``ready`` fires with the
    listening ports once every worker accepts on them."""

    def __init__(self, config: Config, reactor: Any = None, threads: Optional[InThread] = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.threads = threads if threads is not None else reactor_threads(reactor)
        #: systemd's sd_notify: READY=1 once the workers are started (workers never notify).
        self.notifier = Notifier(reactor, os.environ)
        self.managed: dict[str, LocalPostgres] = {
            name: managed_postgres(s) for name, s in config.storages.items() if s.managed
        }
        self.ports: list[IListeningPort] = []
        #: Ports taken over from the master running before, until the handover is
        #: confirmed (see lifecycle.stop_listening).
        self.borrowed: list[IListeningPort] = []
        #: The same ports, by their ``listen`` entry (what a handover gives).
        self.listeners: dict[str, IListeningPort] = {}
        #: Serves ``handover_socket`` (a new master takes the listeners through it).
        self.handover: Optional[HandoverServer] = None
        #: Listening ports given to a new master: kept (open, unread) until we exit.
        self._handed_over: list[IListeningPort] = []
        #: The workers that have said they accept (Accepting), and the wait for all.
        self.accepting: set[int] = set()
        self._all_accepting: Deferred[None] = Deferred()
        #: The ``log`` section's observer under twistd (a reload changes its settings).
        self.log_observer: Optional[Observer] = None
        #: The Prometheus endpoint (metrics.listen), served by the master for all workers.
        self.metrics_port: Optional[IListeningPort] = None
        self.ledger = Ledger()
        self.layout = KeyLayout.of(config.peer_id, bool(config.peer_id), 0, config.workers)
        self.processes: dict[int, WorkerProcess] = {}
        #: From now on a worker that ends is not restarted.
        self._stopping = False
        self.ready: Deferred[list[IListeningPort]] = Deferred()
        self._starting: Optional[Deferred[None]] = None
        #: Seconds each lease that had to wait waited (a server handed over from another
        #: worker, or freed by one of the same worker): logged at shutdown.
        self.lease_waits: list[float] = []
        self.cancels_forwarded = 0
        #: Lease requests waiting in the ledger, by (worker, the worker's request number).
        self.waiting: dict[tuple[int, int], _Ticket] = {}
        #: The client slots granted to each worker (the global client limits).
        self.slots = slots.Ledger(config.workers)
        #: Admits (a worker's block of client slots used up) and Spares asked: logged at shutdown.
        self.admits = 0
        self.spares = 0
        self._retrying: set[Hashable] = set()
        self.restarts = 0
        #: Each worker's SHOW POOLS rows, as it last reported them.
        self.shown: dict[int, list[list[Any]]] = {}
        relaying = TimerService(REPORT_PERIOD, self.relay_pools)
        relaying.clock = reactor
        relaying.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd, the ``log`` section's observer goes on the application, as for
        a single process; workers use their own."""
        self.log_observer = observe_for(self.config.log, parent)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        speed_up_twistd_text()
        self.reactor.callWhenRunning(install_signals, self.reactor, self)
        self._starting = self._start()
        self._starting.addErrback(self._start_failed)

    @inlineCallbacks
    def _start(self):
        hosts = yield start_managed(self.managed, self.threads)
        self.config = with_storage_hosts(self.config, hosts)
        path = self.config.handover_socket
        taken = (yield take_sockets(self.reactor, path)) if path else None
        idle = Factory()
        idle.noisy = False
        for description in self.config.listen:
            handed = taken is not None and description in taken.sockets
            port = yield listener(self.reactor, description, idle, taken)
            port.stopReading()  # (in the same turn: the master never accepts; workers do)
            if handed:
                self.borrowed.append(port)
            log.info("listening on {where}{how} (for {n} workers)", where=description,
                     how=" (socket taken over)" if handed else "", n=self.config.workers)
            self.ports.append(port)
            self.listeners[description] = port
        where = self.config.metrics_listen
        if where is not None:
            handed = taken is not None and where in taken.sockets
            site = MetricsSite(MetricsResource(WorkersCollector(self), self.threads))
            self.metrics_port = yield listener(self.reactor, where, site, taken)
            if handed:
                self.borrowed.append(self.metrics_port)
            log.info("serving metrics on {where}{how} (every worker's)", where=where,
                     how=" (socket taken over)" if handed else "")
        for number in range(self.config.workers):
            self.spawn(number)
        yield self._all_accepting
        if taken is not None:
            # Only now: until our workers accept, the old master's still do.
            taken.confirm()
            self.borrowed = []
            log.info("took over the listening sockets of the Odissey running before; it drains")
        if path:
            self.handover = HandoverServer(self)
            self.handover.listen(self.reactor, path)
        self.notifier.ready()
        self.ready.callback(self.ports)

    def accepted(self, number: int) -> None:
        """Worker ``number`` accepts on the listeners (once all have, the master is ready)."""
        self.accepting.add(number)
        if len(self.accepting) == self.config.workers and not self._all_accepting.called:
            self._all_accepting.callback(None)

    def reload(self) -> "Deferred[list[str]]":
        """SIGHUP, console RELOAD in any worker: read the file again, check it as a
        single process would (and that it keeps what workers inherit at start: the
        listeners and their number), then send it to every worker, which applies its
        difference. Fires with the problems (then nothing changed anywhere) once every
        worker has applied it."""
        problems = self._reload_problems()
        if isinstance(problems, list):
            for problem in problems:
                log.warn("reload refused: {problem}", problem=problem)
            return succeed(problems)
        planned = problems
        self.config = planned.config
        if self.log_observer is not None and self.config.log is not None:
            self.log_observer.settings = self.config.log
        parts = config_parts(pickle.dumps(self.config))
        asked = []
        numbers = []
        for number, process in self.processes.items():
            link = process.link
            if link is None or link.transport is None:
                continue
            for part in parts:
                link.callRemote(ConfigPart, part=part)
            asked.append(link.callRemote(Reconfigure))
            numbers.append(number)
        self.notifier.reloading()
        done = DeferredList(asked, consumeErrors=True)
        return done.addCallback(self._reloaded, numbers, planned.summary())

    def _reload_problems(self) -> Union[list[str], Plan]:
        """The plan of a reload, or the problems that refuse it."""
        source = self.config.source
        if source is None:
            return ["(top level): the configuration was not read from a file"]
        if self._stopping or not self.ready.called:
            return ["(top level): Odissey is not running, not reloading"]
        try:
            new = load_config(source)
            tls.load(new)
        except ConfigError as exc:
            return list(exc.problems)
        planned = plan_reload(self.config, new)
        problems = list(planned.problems)
        problems += [f"{key}: inherited by workers at start; changing it needs a restart"
                     for key in ("workers", "listen") if getattr(new, key) != getattr(self.config, key)]
        return problems or planned

    def _reloaded(self, results: list[tuple[bool, Any]], numbers: list[int], summary: str) -> list[str]:
        """Every worker has answered a Reconfigure: the lease ledger takes the pools' new
        sizes. (Client slots are kept by route identity, which a reload keeps.)"""
        problems: list[str] = []
        for number, (ok, answer) in zip(numbers, results):
            if not ok:
                continue  # (a worker that died: its restart reads the new configuration)
            theirs = json.loads(answer["problems"])
            problems += [f"worker {number}: {p}" for p in theirs]
            for pool, size in json.loads(answer["sizes"]).items():
                self.apply(self.ledger.resize(pool, size))
        self.notifier.reloaded()
        for problem in problems:
            log.warn("reload: {problem}", problem=problem)
        log.info("reloaded {source} in {n} workers: {summary}", source=self.config.source,
                 n=len(numbers), summary=summary)
        return problems

    def _start_failed(self, failure: Failure) -> None:
        failed_start(self.reactor, failure, self.ready, self, process=True)

    def spawn(self, number: int) -> None:
        """Start worker ``number`` with the listeners and a fresh AMP socketpair."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        link = WorkerLink(self, number)
        factory = Factory.forProtocol(lambda: link)
        factory.noisy = False
        self.reactor.adoptStreamConnection(mine.fileno(), socket.AF_UNIX, factory)
        mine.close()
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, 3: theirs.fileno()}
        args = [sys.executable, "-m", "odissey.worker", "--number", str(number),
                "--workers", str(self.config.workers), "--link", "3"]
        for index, port in enumerate(self.ports):
            fd = 4 + index
            child_fds[fd] = port.fileno()  # type: ignore[attr-defined]
            args += ["--listener", f"{fd}:{port.socket.family}"]  # type: ignore[attr-defined]
        # The worker runs this very package, wherever it was imported from.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(odissey.__file__)))
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = {name: value for name, value in os.environ.items() if name not in SYSTEMD_ONLY}
        process = WorkerProcess(self, number, pickle.dumps(self.config))
        process.link = link
        transport = self.reactor.spawnProcess(
            process, sys.executable, args, env={**env, "PYTHONPATH": path}, childFDs=child_fds)
        theirs.close()
        process.pid = transport.pid
        process.started_at = self.reactor.seconds()
        self.processes[number] = process
        log.info("worker {number} started, pid {pid}", number=number, pid=process.pid)

    def ended(self, process: WorkerProcess, reason: Failure) -> None:
        """A worker exited: its leases return; unless we are stopping, it restarts. One
        whose start failed (status 1: certificates unreadable, say) before every worker
        has accepted fails the master's start (exit status 1, as a single Odissey's),
        rather than being restarted every second while the master never gets ready."""
        number = process.number
        if self.processes.get(number) is process:
            del self.processes[number]
        if process.link is not None and process.link.transport is not None:
            process.link.transport.loseConnection()
        self.apply(self.ledger.forget(number))
        self.admitted(self.slots.forget(number))
        self.shown.pop(number, None)
        self.waiting = {key: ticket for key, ticket in self.waiting.items() if key[0] != number}
        how = reason.value
        if self._stopping:
            log.info("worker {number} stopped, pid {pid} ({how})", number=number, pid=process.pid, how=how)
            return
        if (not self._all_accepting.called and isinstance(how, ProcessTerminated)
                and how.exitCode == FAILED):
            self._all_accepting.errback(WorkerStartFailed(
                f"worker {number} (pid {process.pid}) could not start: see its log above"))
            self._stopping = True  # (after: the master's failed start is not a stop asked for)
            return
        self.restarts += 1
        delay = max(0.0, process.started_at + RESTART_DELAY - self.reactor.seconds())
        log.warn("worker {number} died, pid {pid} ({how}); restarting in {delay:.1f}s",
                 number=number, pid=process.pid, how=how, delay=delay)
        self.reactor.callLater(delay, self._restart, number)

    def _restart(self, number: int) -> None:
        if not self._stopping and number not in self.processes:
            self.spawn(number)

    # -- leases ----------------------------------------------------------------------------

    def lease(self, worker: int, pool: str, size: int, request: int) -> "Deferred[dict[str, Any]]":
        ticket = _Ticket(self.reactor.seconds())
        actions = self.ledger.request(pool, size, worker, ticket)
        immediate = Grant(worker, ticket) in actions
        if not immediate:
            self.waiting[worker, request] = ticket
            ticket.granted.addCallback(self._waited, ticket, worker, request)
        self.apply(actions)
        return ticket.granted

    def _waited(self, result: dict[str, Any], ticket: _Ticket, worker: int, request: int) -> dict[str, Any]:
        self.waiting.pop((worker, request), None)
        if result["granted"]:
            self.lease_waits.append(self.reactor.seconds() - ticket.asked_at)
        return result

    def withdraw(self, worker: int, pool: str, request: int) -> None:
        """A worker no longer needs a request that is waiting (if it still is)."""
        ticket = self.waiting.get((worker, request))
        if ticket is not None and self.ledger.withdraw(pool, ticket):
            ticket.granted.callback({"granted": False})

    def apply(self, actions: list[Action]) -> None:
        """Do what the ledger decided: answer granted requests, ask workers for servers."""
        for action in actions:
            if isinstance(action, Grant):
                ticket = action.ticket
                assert isinstance(ticket, _Ticket)
                ticket.granted.callback({"granted": True})
                continue
            process = self.processes.get(action.worker)
            if process is None or process.link is None:
                self._reclaimed(False, action.pool, action.worker)
                continue
            asking = process.link.callRemote(Reclaim, pool=action.pool, idle_only=action.idle_only)
            asking.addCallbacks(lambda answer: answer["gave"], lambda _failure: False)
            asking.addCallback(self._reclaimed, action.pool, action.worker)

    def _reclaimed(self, gave: bool, pool: Hashable, worker: int) -> None:
        """A worker's answer to a reclaim. One that had nothing to give (its servers were
        still connecting) is asked again shortly, so a waiting request is served within
        a bounded time even when no server closes meanwhile."""
        self.apply(self.ledger.reclaimed(pool, worker, gave))
        if not gave and self.ledger.waiting(pool) and pool not in self._retrying:
            self._retrying.add(pool)
            self.reactor.callLater(RECLAIM_RETRY, self._retry, pool)

    def _retry(self, pool: Hashable) -> None:
        self._retrying.discard(pool)
        if not self._stopping:
            self.apply(self.ledger.retry(pool))

    def relay_pools(self) -> None:
        """Send each worker the other workers' SHOW POOLS rows (its console adds them)."""
        for number, process in self.processes.items():
            if process.link is not None and process.link.transport is not None:
                others = [row for other, rows in self.shown.items() if other != number for row in rows]
                process.link.callRemote(Others, pools=rows_json(others))

    # -- client limits -------------------------------------------------------------------

    def admit(self, worker: int, wants: dict[slots.Budget, int]) -> "Deferred[dict[str, Any]]":
        """A login on ``worker`` found none of its own client slots free in ``wants``'
        budgets: grant it a block (see :mod:`odissey.slots`), once other workers have
        spared theirs if none are free, or refuse: "clients" (limits.max_clients is
        reached over all workers) or "route" (the route's max_clients is)."""
        self.admits += 1
        ticket: Deferred[dict[str, Any]] = Deferred()
        limits = {budget: (self.limit_of(budget), count) for budget, count in wants.items()}
        self.admitted(self.slots.request(worker, ticket, limits))
        return ticket

    def limit_of(self, budget: slots.Budget) -> int:
        """A budget's limit as configured now (0: none; a route a reload removed has none).
        (A scan of the routes: Admits are rare, one per block of slots.)"""
        if budget == slots.CLIENTS:
            return self.config.limits.max_clients
        return next((route.pool.max_clients for route in self.config.routes if route.identity == budget), 0)

    def admitted(self, actions: list[slots.Action]) -> None:
        """Do what the slot ledger decided: answer admissions, ask workers to spare slots."""
        for action in actions:
            if isinstance(action, slots.Granted):
                action.ticket.callback({"refused": "", "slots": slots_json(action.slots)})  # type: ignore[attr-defined]
                continue
            if isinstance(action, slots.Refused):
                refused = "clients" if action.budget == slots.CLIENTS else "route"
                action.ticket.callback({"refused": refused, "slots": "[]"})  # type: ignore[attr-defined]
                continue
            process = self.processes.get(action.worker)
            if process is None or process.link is None:
                self.admitted(self.slots.spared(action.worker, {}))
                continue
            self.spares += 1
            asking = process.link.callRemote(Spare, budgets=json.dumps(list(action.budgets)))
            # A worker that hangs must not hold every waiting login up to login_timeout.
            # Its answer is not given up on: what it spares, it no longer holds.
            silent = self.reactor.callLater(SPARE_PATIENCE, self._spare_silent, action.worker)
            asking.addCallbacks(lambda answer: slots_from(answer["gave"]), lambda _failure: {})
            asking.addCallback(self._spare_answered, action.worker, silent)

    def _spare_silent(self, worker: int) -> None:
        """``worker`` has not answered a Spare for SPARE_PATIENCE: the logins waiting on it
        go on as if it had spared nothing."""
        self.admitted(self.slots.spared(worker, {}))

    def _spare_answered(self, gave: dict[slots.Budget, int], worker: int, silent: Any) -> None:
        if silent.active():
            silent.cancel()
        self.admitted(self.slots.spared(worker, gave))

    def show(self, asking: int, what: str) -> "Deferred[list[list[Any]]]":
        """The rows of SHOW ``what`` of every worker but ``asking`` (a worker silent for
        STATS_PATIENCE is left out)."""
        links = [p.link for n, p in self.processes.items() if n != asking and p.link is not None]
        asked = [self.patient(link.callRemote(ShowHere, what=what)) for link in links]

        def joined(results: list[tuple[bool, Any]]) -> list[list[Any]]:
            return [row for ok, answer in results if ok for row in json.loads(answer["rows"])]

        return DeferredList(asked, consumeErrors=True).addCallback(joined)

    # -- console control commands ---------------------------------------------------------

    def order(self, verb: str, arg: Optional[str]) -> "Deferred[dict[str, Any]]":
        """A console control command from one worker, carried out by every worker;
        answered once all have answered. KILL_CLIENT is done if one worker had the
        client; any other command is refused if a worker refused it (they hold the same
        configuration and commands, so they agree)."""
        links = [p.link for p in self.processes.values() if p.link is not None]
        asked = [link.callRemote(Order, verb=verb, arg=arg) for link in links]

        def combined(results: list[tuple[bool, Any]]) -> dict[str, Any]:
            answers = [answer for ok, answer in results if ok]
            if not answers:
                return {"sqlstate": errors.INTERNAL_ERROR, "message": "no worker answered", "hint": ""}
            done = [a for a in answers if not a["sqlstate"]]
            refused = [a for a in answers if a["sqlstate"]]
            if refused and (verb != "KILL_CLIENT" or not done):
                return refused[0]
            return done[0]

        return DeferredList(asked, consumeErrors=True).addCallback(combined)

    # -- cancel ----------------------------------------------------------------------------

    def cancel(self, sender: int, pid: int, secret: int) -> "Deferred[None]":
        """A cancel key another worker issued: to its owner, answered once it landed."""
        owner = self.layout.worker_of(secret)
        process = self.processes.get(owner)
        if owner == sender or process is None or process.link is None:
            return succeed(None)
        self.cancels_forwarded += 1
        asking = process.link.callRemote(Cancel, pid=pid, secret=secret)
        return asking.addBoth(lambda _: None)

    # -- shutdown --------------------------------------------------------------------------

    def stopping(self) -> bool:
        return self._stopping

    def halt(self) -> None:
        """A worker's console SHUTDOWN, a handover: the whole process stops, as on
        SIGTERM (the reactor's shutdown runs :meth:`stopService`) but as ``how`` says."""
        self.reactor.stop()

    def hurry(self) -> None:
        """A second signal or SHUTDOWN while stopping: every worker ends its clients now
        (and is killed if it has not exited STOP_PATIENCE later)."""
        self.how = Stop.IMMEDIATE
        if self._stopping:
            self._tell_workers(Stop.IMMEDIATE)
            self.reactor.callLater(STOP_PATIENCE, self._kill_all)

    def _tell_workers(self, how: Stop) -> None:
        """Every worker stops ``how`` (one without a link yet gets SIGTERM: graceful)."""
        for process in list(self.processes.values()):
            if process.link is not None:
                process.link.callRemote(StopCommand, how=how.value)
            elif process.transport is not None:
                process.transport.signalProcess("TERM")

    # -- handover (handover.Giver) ----------------------------------------------------------

    def listening(self) -> list[tuple[str, IListeningPort]]:
        return given(self.listeners, self.config.metrics_listen, self.metrics_port)

    def handed_over(self) -> None:
        """A new master has the listening sockets, and its workers accept: ours drain
        as on SIGTERM and we exit. Our copies stay open, unread, until we exit (closing
        a unix listener would remove its path, the new master's now)."""
        log.info("handed the listening sockets over to a new process; draining")
        self._handed_over = hand_over(self.ports, self.metrics_port)
        self.ports, self.listeners, self.metrics_port = [], {}, None
        self.shutdown(Stop.GRACEFUL)

    def patient(self, asked: Deferred[Any]) -> Deferred[Any]:
        """A question to a worker, given up (cancelled) after STATS_PATIENCE: a worker
        that hangs must not hold up a scrape or the shutdown."""
        timer = self.reactor.callLater(STATS_PATIENCE, asked.cancel)
        return asked.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])

    @inlineCallbacks
    def gather(self):
        """The workers' statistics added up: clients, and servers per pool."""
        asked = [self.patient(p.link.callRemote(Stats)) for p in self.processes.values() if p.link is not None]
        answers = yield DeferredList(asked, consumeErrors=True)
        clients, active, idle = 0, Counter(), Counter()
        for ok, answer in answers:
            if not ok:
                continue
            stats = json.loads(answer["stats"])
            clients += stats["clients"]
            for pool, counts in stats["pools"].items():
                active[pool] += counts["active"]
                idle[pool] += counts["idle"]
        return {"clients": clients, "workers": len(answers),
                "pools": {pool: {"active": active[pool], "idle": idle[pool]} for pool in set(active) | set(idle)}}

    def _kill_all(self) -> None:
        for process in list(self.processes.values()):
            log.warn("worker {number} (pid {pid}) did not stop in time, killing it",
                     number=process.number, pid=process.pid)
            process.transport.signalProcess("KILL")  # type: ignore[union-attr]

    @inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self._starting is not None and not self._starting.called:
            if not self._all_accepting.called:
                self._all_accepting.cancel()  # (a worker that never accepts holds nothing up)
            yield self._starting
        self._stopping = True
        if self.handover is not None:
            self.handover.close()
        # Our descriptors close now; each worker closes its own as it stops, and then
        # the kernel refuses new connections, as a single process's closed listener does.
        ports = self.ports + ([self.metrics_port] if self.metrics_port is not None else [])
        yield DeferredList(stop_listening(ports, self.borrowed))
        self.ports, self.listeners, self.metrics_port, self.borrowed = [], {}, None, []
        self.notifier.stopping()
        totals = yield self.gather()
        pools = ", ".join(f"{pool}: {c['active']} active, {c['idle']} idle"
                          for pool, c in sorted(totals["pools"].items())) or "no pools"
        log.info("shutting down {workers} workers ({how}): {clients} clients; servers {pools}",
                 workers=totals["workers"], how=self.how.value, clients=totals["clients"], pools=pools)
        waits = self.lease_waits
        log.info("leases: {n} waited (p50 {p50:.1f} ms, p99 {p99:.1f} ms); {cancels} cancels "
                 "forwarded between workers; {restarts} worker restarts; client slots: {admits} "
                 "admits, {spares} spares asked",
                 n=len(waits), p50=percentile(waits, 0.5) * 1000 if waits else 0.0,
                 p99=percentile(waits, 0.99) * 1000 if waits else 0.0,
                 cancels=self.cancels_forwarded, restarts=self.restarts, admits=self.admits,
                 spares=self.spares)
        ended = DeferredList([process.ended for process in self.processes.values()])
        self._tell_workers(self.how)
        if self.how is Stop.WAIT_FOR_CLIENTS:
            yield ended  # (however long the clients stay; a signal or SHUTDOWN hurries it)
        else:
            yield within(self.reactor, ended, self.config.shutdown_timeout + STOP_PATIENCE, self._kill_all)
        for postgres in self.managed.values():
            yield self.threads(postgres.stop)
        self.notifier.stopped()
