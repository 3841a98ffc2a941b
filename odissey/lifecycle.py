"""How an Odissey process starts listening, hands its sockets over, and stops.

Two kinds of process own an Odissey's lifecycle: a single Odissey (the root service,
odissey/service.py) and, with workers, their master (odissey/workers.py). Both listen
on the same ``listen`` entries (or take them over from the process running before),
hand them over to a new process, are asked to stop the same ways (a signal, console
SHUTDOWN, a handover), stop listening the same way, and end the process the same way
when their start fails (with exit status 1: see :func:`exit_failed`). What they share
of that lives here, both import it, and the service keeps only what is its own:
building the pooler from a Config, starting it, and stopping it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from odissey.handover import Taken
from odissey.logs import Logger

log = Logger()


def listener(reactor: Any, description: str, factory: Any, taken: Taken | None) -> "Deferred[IListeningPort]":
    """Listen on one ``listen`` entry: the socket the process running before handed
    over for it (see odissey/handover.py), else a new one."""
    handed = taken.sockets.pop(description, None) if taken is not None else None
    if handed is None:
        return serverFromString(reactor, description).listen(factory)
    fd, family = handed
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)  # (the port has its own copy)
    return succeed(port)


def given(listening: dict[str, IListeningPort], metrics_listen: str | None,
          metrics_port: IListeningPort | None) -> list[tuple[str, IListeningPort]]:
    """What a handover gives, by entry: the listeners and the metrics endpoint (its
    address could not be bound by the new process while this one holds it)."""
    metrics = [(metrics_listen, metrics_port)] if metrics_listen and metrics_port is not None else []
    return list(listening.items()) + metrics


def hand_over(ports: list[IListeningPort], metrics_port: IListeningPort | None) -> list[IListeningPort]:
    """After a handover: stop reading our copies of the given sockets, but keep them
    open until the process exits (closing a unix listener would unlink its path, the
    new process's now); returns them, to keep."""
    kept = ports + ([metrics_port] if metrics_port is not None else [])
    for port in kept:
        port.stopReading()  # type: ignore[attr-defined]
    return kept


def stop_listening(ports: list[IListeningPort], borrowed: list[IListeningPort]) -> list[Any]:
    """Stop listening on ``ports``. Those ``borrowed`` (taken over from the process
    running before, which a stop during start never confirmed) are still that process's:
    only no longer read here, never shut down nor a unix path unlinked, which would end
    its listening too."""
    stopped: list[Any] = []  # (what stopListening returns: a Deferred, or None)
    for port in ports:
        if port in borrowed:
            port.stopReading()  # type: ignore[attr-defined]
        else:
            stopped.append(port.stopListening())
    return stopped


class Signalled(TypingProtocol):
    """What owns a process, as its SIGTERM, SIGINT and SIGHUP handlers see it."""

    def stop_requested(self) -> bool:
        """A stop is asked for or under way."""

    def signalled(self) -> None:
        """The first SIGTERM or SIGINT: the stop will be graceful."""

    def hurry(self) -> None:
        """A second one: end every client now."""

    def reload(self) -> object:
        """SIGHUP."""


def install_signals(reactor: Any, owner: Signalled) -> None:
    """Our SIGTERM/SIGINT handlers replace the reactor's (installed just before): the
    first signal stops gracefully, a second one (the reactor's own would only log that it
    is already stopping) ends everyone now; SIGHUP reloads. The first one stops the
    reactor as the reactor's handler would, but without recording the signal, which
    would make twistd kill the process with it once stopped: a stop asked for exits 0,
    whoever asked (see :func:`exit_failed`)."""
    names: dict[int, str] = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def received(number: int, frame: object) -> None:
        if owner.stop_requested():
            log.info("signal {number} while stopping: ending every client now", number=number)
            reactor.callFromThread(owner.hurry)
        else:
            owner.signalled()
            log.info("received {signal}, shutting down", signal=names[number])
            reactor.callFromThread(reactor.stop)

    for number in names:
        signal.signal(number, received)
    signal.signal(signal.SIGHUP, lambda number, frame: reactor.callFromThread(owner.reload))


#: The exit status of a process whose start failed.
FAILED = 1


def exit_failed() -> None:
    """Make this process exit with status FAILED once it has exited as usual.

    A stop asked for (a signal, console SHUTDOWN, a handover) exits 0; a start that
    fails once twistd runs the reactor (a listen or metrics address in use, a managed
    PostgreSQL that does not start, a handover that fails) stops the reactor the same
    way, and twistd, which has no exit status to give (it only re-raises a signal the
    reactor recorded), would exit 0 too. So an exit handler, run after twistd's clean-up
    (pidfile removed, "Server Shut Down." logged), runs the exit handlers registered
    before it as the interpreter would, flushes stdout and stderr, and ends the process
    with the status (the interpreter's own finalisation, which would exit 0, is skipped).
    """
    atexit.unregister(_exit_with_failed)  # (once, however often a start fails)
    atexit.register(_exit_with_failed)


def _exit_with_failed() -> None:
    atexit.unregister(_exit_with_failed)
    atexit._run_exitfuncs()  # (the others, then none is left)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # (closed, or its reader gone: nothing to keep)
            pass
    os._exit(FAILED)


def failed_start(reactor: Any, failure: Failure, ready: "Deferred[Any]", owner: Signalled,
                 process: bool) -> None:
    """The start of a single Odissey or a master failed: log why, fail ``ready``, and,
    when ``owner`` owns the process, stop it with status FAILED, unless a stop was asked
    for meanwhile (a stop cuts a start short: the process exits 0). The failure may come
    before the reactor runs (a listen address in use fails in ``startService``): the
    reactor then stops as soon as it runs."""
    log.failure("Odissey could not start", failure)
    if not ready.called:
        ready.errback(failure)
    if not process:
        return
    if not owner.stop_requested():
        exit_failed()
    reactor.callWhenRunning(_stop, reactor)


def _stop(reactor: Any) -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # (already stopping)


def within(reactor: object, waiting: "Deferred[None]", seconds: float, give_up: object) -> "Deferred[None]":
    """Wait for ``waiting``, calling ``give_up`` if it takes longer than ``seconds``."""
    timer = reactor.callLater(seconds, give_up)  # type: ignore[attr-defined]

    def done(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    return waiting.addBoth(done)


class Stop(Enum):
    """How the pooler stops (see docs/operations.md#shutdown)."""

    #: SIGTERM: listeners close, transaction-mode clients are ended at their next
    #: transaction boundary, session-mode clients may finish, up to shutdown_timeout.
    GRACEFUL = "graceful"
    #: SHUTDOWN WAIT_FOR_CLIENTS: listeners close; exit once the last client has left.
    WAIT_FOR_CLIENTS = "wait_for_clients"
    #: Console SHUTDOWN, a second signal: every client is ended now.
    IMMEDIATE = "immediate"


class Stoppable(ABC):
    """How the owner of a process (a single Odissey, a workers' master) is asked to
    stop: a first SIGTERM/SIGINT gracefully, console SHUTDOWN as it says, a handover
    gracefully; asked for an immediate stop while stopping, it hurries the stop under
    way. The owner says whether it is stopping, and how to halt and to hurry."""

    #: How the stop goes (read by the owner's stopService).
    how = Stop.GRACEFUL
    #: A signal or :meth:`shutdown` has asked the reactor to stop.
    _stop_asked = False

    @abstractmethod
    def stopping(self) -> bool:
        """A stop is under way (the owner's own state says so)."""

    @abstractmethod
    def halt(self) -> None:
        """Begin the stop asked for, as :attr:`how` says."""

    @abstractmethod
    def hurry(self) -> None:
        """End every client now, whatever stop is under way."""

    def stop_requested(self) -> bool:
        return self._stop_asked or self.stopping()

    def signalled(self) -> None:
        """The first SIGTERM or SIGINT (its reactor handler stops the reactor)."""
        self.how = Stop.GRACEFUL
        self._stop_asked = True

    def shutdown(self, how: Stop) -> None:
        """Stop (console SHUTDOWN [WAIT_FOR_CLIENTS], a handover)."""
        if self.stop_requested():
            if how is Stop.IMMEDIATE:
                self.hurry()
            return
        self.how = how
        self._stop_asked = True
        log.info("shutdown requested ({how})", how=how.value)
        self.halt()
