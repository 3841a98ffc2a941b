"""eager.run: a login's generator, run at once where nothing waits."""

from __future__ import annotations

from typing import Any, Generator

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from odissey import eager


class EagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.seen: list[object] = []
        self.failures: list[Failure] = []

    def run_steps(self, steps: Generator[Any, Any, None]) -> None:
        eager.run(steps, self.failures.append)

    def test_fired_deferreds_and_values_sent_back_at_once(self) -> None:
        """Plain values and Deferreds that have fired are sent back before run returns."""
        def steps() -> Generator[Any, Any, None]:
            self.seen.append((yield 1))
            self.seen.append((yield succeed(2)))
            self.seen.append("done")

        self.run_steps(steps())
        self.assertEqual(self.seen, [1, 2, "done"])
        self.assertEqual(self.failures, [])

    def test_pending_deferred_resumes_from_its_callback(self) -> None:
        """A pending Deferred stops the steps; its result resumes them when it fires."""
        waiting: Deferred[str] = Deferred()

        def steps() -> Generator[Any, Any, None]:
            self.seen.append((yield waiting))
            self.seen.append((yield succeed("after")))

        self.run_steps(steps())
        self.assertEqual(self.seen, [])
        waiting.callback("password")
        self.assertEqual(self.seen, ["password", "after"])

    def test_failure_thrown_in_and_caught(self) -> None:
        """A failed Deferred raises its exception at the yield, where it can be caught."""
        def steps() -> Generator[Any, Any, None]:
            try:
                yield fail(ValueError("no"))
            except ValueError as exc:
                self.seen.append(str(exc))

        self.run_steps(steps())
        self.assertEqual(self.seen, ["no"])
        self.assertEqual(self.failures, [])

    def test_what_the_steps_raise_goes_to_failed(self) -> None:
        """An exception out of the steps, raised at once or after a wait (a client that
        left cancels what its login waits on), reaches ``failed`` with its type."""
        def at_once() -> Generator[Any, Any, None]:
            yield 1
            raise KeyError("x")

        waiting: Deferred[None] = Deferred()

        def later() -> Generator[Any, Any, None]:
            yield waiting

        self.run_steps(at_once())
        self.run_steps(later())
        waiting.cancel()
        self.assertEqual([f.type for f in self.failures], [KeyError, CancelledError])
        self.assertEqual(waiting.result, None)  # (consumed: no unhandled error is logged)

    def test_nested_steps_with_yield_from(self) -> None:
        """Nested steps run with ``yield from`` return their value to the outer ones,
        across a wait."""
        waiting: Deferred[bytes] = Deferred()

        def inner() -> Generator[Any, Any, str]:
            body = yield waiting
            return body.decode()

        def outer() -> Generator[Any, Any, None]:
            self.seen.append((yield from inner()))

        self.run_steps(outer())
        waiting.callback(b"md5abc")
        self.assertEqual(self.seen, ["md5abc"])
