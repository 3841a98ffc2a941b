"""What a process owning an Odissey shares: listening, handing over, being asked to stop."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from odissey import lifecycle
from odissey.handover import Taken
from odissey.lifecycle import Stop, Stoppable, failed_start, given, hand_over, listener, stop_listening, within


class _Port:
    """A listening port that records what was done to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.done: list[str] = []
        self.stopped: Deferred[None] = Deferred()

    def stopReading(self) -> None:
        self.done.append("stopReading")

    def stopListening(self) -> Deferred[None]:
        self.done.append("stopListening")
        return self.stopped


class _Adopting:
    """A reactor that adopts a listening socket by duplicating its descriptor, as a real
    one does."""

    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, object]] = []

    def adoptStreamPort(self, fd: int, family: int, factory: object) -> _Port:
        self.adopted.append((os.dup(fd), family, factory))
        return _Port("adopted")


class ListenerTests(SynchronousTestCase):
    def test_adopts_the_socket_handed_over(self) -> None:
        """A ``listen`` entry whose socket the process before handed over is adopted, its
        descriptor closed (the port has its own copy) and no longer among those taken."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        taken = Taken()
        fd = os.dup(sock.fileno())
        taken.sockets["tcp:6432"] = (fd, socket.AF_INET)
        reactor, factory = _Adopting(), object()
        port = self.successResultOf(listener(reactor, "tcp:6432", factory, taken))
        for copy, _, _ in reactor.adopted:
            self.addCleanup(os.close, copy)
        self.assertEqual(port.name, "adopted")  # type: ignore[attr-defined]
        self.assertEqual([(family, f) for _, family, f in reactor.adopted], [(socket.AF_INET, factory)])
        self.assertEqual(taken.sockets, {})
        self.assertRaises(OSError, os.fstat, fd)


class HandoverTests(SynchronousTestCase):
    def test_given_adds_the_metrics_endpoint_when_it_listens(self) -> None:
        """A handover gives every listener by entry, and the metrics endpoint only when
        it is configured and listening."""
        app, metrics = _Port("app"), _Port("metrics")
        listening: dict[str, Any] = {"tcp:6432": app}
        self.assertEqual(given(listening, "tcp:9187", metrics),  # type: ignore[arg-type]
                         [("tcp:6432", app), ("tcp:9187", metrics)])
        self.assertEqual(given(listening, None, None), [("tcp:6432", app)])
        self.assertEqual(given(listening, "tcp:9187", None), [("tcp:6432", app)])

    def test_hand_over_stops_reading_without_closing(self) -> None:
        """After a handover every given socket, the metrics endpoint's too, is no longer
        read but not closed (closing a unix listener would unlink the new process's
        path), and all are kept."""
        app, metrics = _Port("app"), _Port("metrics")
        kept = hand_over([app], metrics)  # type: ignore[list-item, arg-type]
        self.assertEqual(kept, [app, metrics])
        self.assertEqual((app.done, metrics.done), (["stopReading"], ["stopReading"]))

    def test_stop_listening_leaves_borrowed_sockets_open(self) -> None:
        """Stopping, a socket taken over from the process before (not yet confirmed) is
        only no longer read; the others stop listening, and what that returns is waited on."""
        own, borrowed = _Port("own"), _Port("borrowed")
        stopped = stop_listening([own, borrowed], [borrowed])  # type: ignore[list-item]
        self.assertEqual(stopped, [own.stopped])
        self.assertEqual((own.done, borrowed.done), (["stopListening"], ["stopReading"]))


class WithinTests(SynchronousTestCase):
    def test_gives_up_when_it_takes_too_long(self) -> None:
        """``give_up`` is called once the wait has lasted ``seconds``."""
        clock, given_up = Clock(), []
        waiting: Deferred[None] = Deferred()
        waited = within(clock, waiting, 5.0, lambda: given_up.append(clock.seconds()))
        clock.advance(4.9)
        self.assertEqual(given_up, [])
        clock.advance(0.1)
        self.assertEqual(given_up, [5.0])
        waiting.callback(None)
        self.assertIsNone(self.successResultOf(waited))

    def test_done_in_time_cancels_the_timer(self) -> None:
        """A wait that ends in time leaves no timer behind and never gives up."""
        clock, given_up = Clock(), []
        waiting: Deferred[None] = Deferred()
        waited = within(clock, waiting, 5.0, lambda: given_up.append(True))
        waiting.callback(None)
        self.assertIsNone(self.successResultOf(waited))
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertEqual(given_up, [])


class _Owner(Stoppable):
    """An owner that records how it is stopped."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.under_way = False

    def stopping(self) -> bool:
        return self.under_way

    def halt(self) -> None:
        self.calls.append(f"halt {self.how.value}")
        self.under_way = True

    def hurry(self) -> None:
        self.calls.append("hurry")


class StoppableTests(SynchronousTestCase):
    def test_shutdown_halts_once_as_asked(self) -> None:
        """A shutdown sets how the stop goes and halts; asked again gracefully or to wait
        while stopping, it changes nothing."""
        owner = _Owner()
        owner.shutdown(Stop.WAIT_FOR_CLIENTS)
        owner.shutdown(Stop.GRACEFUL)
        owner.shutdown(Stop.WAIT_FOR_CLIENTS)
        self.assertEqual(owner.calls, ["halt wait_for_clients"])
        self.assertIs(owner.how, Stop.WAIT_FOR_CLIENTS)

    def test_immediate_while_stopping_hurries(self) -> None:
        """An immediate stop asked for while a stop is under way hurries that stop
        rather than starting another."""
        owner = _Owner()
        owner.shutdown(Stop.GRACEFUL)
        owner.shutdown(Stop.IMMEDIATE)
        self.assertEqual(owner.calls, ["halt graceful", "hurry"])

    def test_signal_makes_the_stop_graceful(self) -> None:
        """A first signal asks for a graceful stop (the reactor's handler stops the
        reactor; the owner does not halt itself), so a console SHUTDOWN after it only
        hurries, if immediate."""
        owner = _Owner()
        owner.how = Stop.WAIT_FOR_CLIENTS
        self.assertFalse(owner.stop_requested())
        owner.signalled()
        self.assertTrue(owner.stop_requested())
        self.assertIs(owner.how, Stop.GRACEFUL)
        owner.shutdown(Stop.WAIT_FOR_CLIENTS)
        owner.shutdown(Stop.IMMEDIATE)
        self.assertEqual(owner.calls, ["hurry"])


class _NotRunningYet:
    """A reactor that has not run yet: keeps what is to be called once it runs."""

    def __init__(self) -> None:
        self.when_running: list[tuple[Any, tuple[Any, ...]]] = []
        self.stopped = 0

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        self.when_running.append((f, args))

    def run(self) -> None:
        for f, args in self.when_running:
            f(*args)

    def stop(self) -> None:
        self.stopped += 1


class FailedStartTests(SynchronousTestCase):
    """A start that fails: the process stops with status 1 unless a stop was asked for."""

    def setUp(self) -> None:
        self.failing: list[bool] = []
        self.patch(lifecycle, "exit_failed", lambda: self.failing.append(True))
        self.reactor = _NotRunningYet()
        self.failure = Failure(CannotListenError("127.0.0.1", 6432, OSError("in use")))

    def test_owning_the_process_it_stops_and_fails(self) -> None:
        """Before the reactor runs (a listen address in use fails in startService),
        ``ready`` fails, the exit status is set, and the reactor stops once it runs."""
        ready: Deferred[object] = Deferred()
        failed_start(self.reactor, self.failure, ready, _Owner(), process=True)
        self.failureResultOf(ready, CannotListenError)
        self.assertEqual(self.failing, [True])
        self.assertEqual(self.reactor.stopped, 0)
        self.reactor.run()
        self.assertEqual(self.reactor.stopped, 1)
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)

    def test_a_stop_asked_for_meanwhile_exits_0(self) -> None:
        """A start cut short by a stop (a signal while a master waits for its workers)
        stops the reactor but keeps the exit status 0."""
        owner = _Owner()
        owner.signalled()
        failed_start(self.reactor, self.failure, Deferred(), owner, process=True)
        self.reactor.run()
        self.assertEqual((self.failing, self.reactor.stopped), ([], 1))
        self.flushLoggedErrors(CannotListenError)

    def test_not_owning_the_process_only_fails_ready(self) -> None:
        """A service that does not own the process (tests) neither stops the reactor nor
        sets an exit status."""
        ready: Deferred[object] = Deferred()
        failed_start(self.reactor, self.failure, ready, _Owner(), process=False)
        self.failureResultOf(ready, CannotListenError)
        self.reactor.run()
        self.assertEqual((self.failing, self.reactor.stopped), ([], 0))
        self.flushLoggedErrors(CannotListenError)
