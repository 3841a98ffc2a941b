"""Run a generator of login steps at once, pausing only where a Deferred has to wait.

A login reads as an ``inlineCallbacks`` generator: it yields a Deferred wherever it may
wait (the client's password, an auth_query lookup, a pool's first server). Most of its
steps do not wait, and the one that does (the password) waits once. Twisted's
``inlineCallbacks`` pays for its generality at every step: a Deferred of its own per
generator, and each resumption run inside a copied ``contextvars`` context (under PyPy
that alone was 4.5 % of a login's time with ``pgbench -C``; docs/benchmarks.md). Here a
yielded value that is not a Deferred, or a Deferred that has already fired, is sent
straight back; a pending Deferred resumes the generator when it fires. What the
generator raises goes to ``failed``, as a Failure; nothing else is returned, since
nobody waits for a login as a whole (a client that leaves fails the Deferred its login
is waiting on, which ends the generator the same way).

Nested steps are plain generators run with ``yield from``.
"""

from __future__ import annotations

from typing import Any, Callable, Generator

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

Steps = Generator[Any, Any, None]

_WAITING = object()


def run(steps: Steps, failed: Callable[[Failure], None]) -> None:
    """Drive ``steps`` until it ends or waits on a Deferred (then resumed from its callback)."""
    _resume(steps, failed, None)


def _resume(steps: Steps, failed: Callable[[Failure], None], result: object) -> None:
    while True:
        try:
            if isinstance(result, Failure):
                yielded = result.throwExceptionIntoGenerator(steps)
            else:
                yielded = steps.send(result)
        except StopIteration:
            return
        except Exception:
            failed(Failure())
            return
        if type(yielded) is not Deferred and not isinstance(yielded, Deferred):
            result = yielded
            continue
        outcome: list[object] = [_WAITING]

        def fired(value: object, outcome: list[object] = outcome) -> None:
            if outcome[0] is _WAITING:  # fired while addBoth ran: the loop goes on
                outcome[0] = value
            else:
                _resume(steps, failed, value)

        yielded.addBoth(fired)
        if outcome[0] is _WAITING:
            outcome[0] = None  # from now on, fired() resumes the steps itself
            return
        result = outcome[0]
