"""The service's shutdown bookkeeping: what it waits for before the pooler stops."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from odissey.service import Live


class LiveTests(SynchronousTestCase):
    def test_closed_waits_for_cancel_requests(self) -> None:
        """Shutdown waits for a cancel request still talking to PostgreSQL, so no
        connection outlives the pooler (a CI run once caught one left open)."""
        live = Live()
        sent: Deferred[bool] = Deferred()
        self.assertIs(live.cancelling(sent), sent)
        closing = live.closed()
        self.assertNoResult(closing)
        sent.callback(True)
        self.assertIsNone(self.successResultOf(closing))
        self.assertEqual(live.cancels, set())
        self.assertIsNone(self.successResultOf(live.closed()))
