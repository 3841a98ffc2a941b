"""Cancel keys: unique, worker-tagged, and only the right secret finds a client."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from odissey.cancel import CancelKeys


class CancelKeyTests(SynchronousTestCase):
    def test_issue_find_release(self) -> None:
        """A key finds its owner only with the right secret, and not after release."""
        keys: CancelKeys[str] = CancelKeys()
        pid, secret = keys.issue("client-a")
        self.assertEqual(keys.find(pid, secret), "client-a")
        self.assertIsNone(keys.find(pid, secret ^ 1))
        keys.release(pid)
        self.assertIsNone(keys.find(pid, secret))

    def test_worker_number_in_pid(self) -> None:
        """The pid carries the worker number, so a cancel can be routed to its worker."""
        keys: CancelKeys[int] = CancelKeys(worker=5)
        pids = {keys.issue(i)[0] for i in range(1000)}
        self.assertEqual(len(pids), 1000)
        self.assertEqual({CancelKeys.worker_of(p) for p in pids}, {5})
        self.assertTrue(all(0 < p < 2**31 for p in pids))
