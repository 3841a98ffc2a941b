"""The lease ledger: the global pool size across workers, and no starvation."""

from __future__ import annotations

import random

from twisted.trial.unittest import TestCase

from odissey.leases import Grant, Ledger, Reclaim
from tests.harness import run_seed


class LedgerTests(TestCase):
    def test_grants_within_size(self) -> None:
        """Requests are granted at once up to the size, then wait."""
        ledger = Ledger()
        self.assertEqual(ledger.request("p", 2, 0, "a"), [Grant(0, "a")])
        self.assertEqual(ledger.request("p", 2, 1, "b"), [Grant(1, "b")])
        self.assertEqual(ledger.request("p", 2, 1, "c"), [Reclaim(0, "p", idle_only=True)])
        self.assertEqual(ledger.held("p"), {0: 1, 1: 1})
        self.assertEqual(ledger.waiting("p"), 1)

    def test_release_grants_first_waiter(self) -> None:
        """A returned lease goes to the oldest waiting request."""
        ledger = Ledger()
        ledger.request("p", 1, 0, "a")
        ledger.request("p", 1, 1, "b")
        ledger.request("p", 1, 2, "c")
        actions = ledger.release("p", 0)
        self.assertIn(Grant(1, "b"), actions)
        self.assertEqual(ledger.held("p"), {1: 1})

    def test_resize_grants_or_holds_back(self) -> None:
        """A reload's larger size grants waiting requests at once; a smaller one grants
        nothing until enough leases have returned."""
        ledger = Ledger()
        ledger.request("p", 1, 0, "a")
        ledger.request("p", 1, 0, "b")
        self.assertEqual(ledger.resize("p", 2), [Grant(0, "b")])
        self.assertEqual(ledger.resize("p", 2), [])
        self.assertEqual(ledger.resize("p", 1), [])
        ledger.request("p", 1, 0, "c")
        self.assertEqual(ledger.release("p", 0), [])
        self.assertEqual(ledger.release("p", 0), [Grant(0, "c")])
        self.assertEqual(ledger.resize("q", 5), [])

    def test_pools_are_separate(self) -> None:
        """Each pool has its own size."""
        ledger = Ledger()
        ledger.request("p", 1, 0, "a")
        self.assertEqual(ledger.request("q", 1, 0, "b"), [Grant(0, "b")])

    def test_starving_worker_reclaims(self) -> None:
        """A worker holding nothing gets a server taken from the one holding most."""
        ledger = Ledger()
        for i in range(3):
            ledger.request("p", 4, 0, f"a{i}")
        ledger.request("p", 4, 1, "b0")
        actions = ledger.request("p", 4, 2, "c0")
        self.assertEqual(actions, [Reclaim(0, "p")])
        self.assertEqual(ledger.release("p", 0), [Grant(2, "c0")])

    def test_reclaim_in_flight_covers_one_waiter(self) -> None:
        """A second waiter asks for a second reclaim, not the same one twice."""
        ledger = Ledger()
        for i in range(4):
            ledger.request("p", 4, 0, f"a{i}")
        self.assertEqual(ledger.request("p", 4, 1, "b0"), [Reclaim(0, "p")])
        self.assertEqual(ledger.request("p", 4, 1, "b1"), [Reclaim(0, "p")])
        self.assertEqual(ledger.request("p", 4, 1, "b2"), [Reclaim(0, "p", idle_only=True)])

    def test_split_by_one_takes_only_idle(self) -> None:
        """Two workers one lease apart take only idle servers from each other, never
        busy ones (which would change hands on every transaction)."""
        ledger = Ledger()
        for i in range(2):
            ledger.request("p", 3, 0, f"a{i}")
        ledger.request("p", 3, 1, "b0")
        self.assertEqual(ledger.request("p", 3, 1, "b1"), [Reclaim(0, "p", idle_only=True)])
        self.assertEqual(ledger.reclaimed("p", 0, False), [])  # nothing idle: b1 waits
        self.assertEqual(ledger.request("p", 3, 0, "a2"), [Reclaim(1, "p", idle_only=True)])

    def test_refusal_tries_another_worker(self) -> None:
        """A worker with nothing to give is skipped until the pool's next release."""
        ledger = Ledger()
        ledger.request("p", 2, 0, "a")
        ledger.request("p", 2, 1, "b")
        self.assertEqual(ledger.request("p", 2, 2, "c"), [Reclaim(0, "p")])
        self.assertEqual(ledger.reclaimed("p", 0, False), [Reclaim(1, "p")])
        self.assertEqual(ledger.reclaimed("p", 1, False), [])
        self.assertEqual(ledger.release("p", 1), [Grant(2, "c")])

    def test_withdraw_only_a_waiting_request(self) -> None:
        """A waiting request can be withdrawn (and is never granted); a granted one not."""
        ledger = Ledger()
        ledger.request("p", 1, 0, "a")
        ledger.request("p", 1, 1, "b")
        ledger.request("p", 1, 1, "c")
        self.assertTrue(ledger.withdraw("p", "b"))
        self.assertFalse(ledger.withdraw("p", "a"))
        self.assertFalse(ledger.withdraw("q", "a"))
        self.assertEqual(ledger.release("p", 0), [Grant(1, "c")])

    def test_retry_asks_refusers_again(self) -> None:
        """After a refusal, retry asks the same worker again while someone still waits."""
        ledger = Ledger()
        ledger.request("p", 1, 0, "a")
        self.assertEqual(ledger.request("p", 1, 1, "b"), [Reclaim(0, "p")])
        self.assertEqual(ledger.reclaimed("p", 0, False), [])
        self.assertEqual(ledger.retry("p"), [Reclaim(0, "p")])
        self.assertEqual(ledger.retry("p"), [])  # (nobody refused since)

    def test_forget_returns_leases_and_drops_requests(self) -> None:
        """A dead worker's leases go to the waiters; its own waiting requests vanish."""
        ledger = Ledger()
        ledger.request("p", 2, 0, "a0")
        ledger.request("p", 2, 0, "a1")
        ledger.request("p", 2, 0, "a2")
        ledger.request("p", 2, 1, "b0")
        self.assertEqual([a for a in ledger.forget(0) if isinstance(a, Grant)], [Grant(1, "b0")])
        self.assertEqual(ledger.held("p"), {1: 1})
        self.assertEqual(ledger.waiting("p"), 0)

    def test_unknown_release_is_ignored(self) -> None:
        """A release the ledger never granted (a restarted worker's) changes nothing."""
        ledger = Ledger()
        self.assertEqual(ledger.release("p", 0), [])
        ledger.request("p", 1, 1, "b")
        self.assertEqual(ledger.release("p", 0), [])
        self.assertEqual(ledger.held("p"), {1: 1})

    def test_random_never_over_size_and_everyone_served(self) -> None:
        """Random requests, releases, refusals and deaths: never more than the size held,
        and once every holder gives back, every request still waiting is granted."""
        seed = run_seed(self)
        rnd = random.Random(seed)
        ledger = Ledger()
        size, workers = 4, 3
        holding = {w: 0 for w in range(workers)}
        asked: list[Reclaim] = []
        granted: set[str] = set()
        requested: set[str] = set()

        def apply(actions: list) -> None:
            for action in actions:
                if isinstance(action, Grant):
                    holding[action.worker] += 1
                    granted.add(str(action.ticket))
                else:
                    asked.append(action)
            self.assertLessEqual(sum(holding.values()), size, f"seed {seed}")

        for step in range(2000):
            worker = rnd.randrange(workers)
            roll = rnd.random()
            if roll < 0.4:
                ticket = f"{worker}-{step}"
                requested.add(ticket)
                apply(ledger.request("p", size, worker, ticket))
            elif roll < 0.7 and holding[worker]:
                holding[worker] -= 1
                apply(ledger.release("p", worker))
            elif roll < 0.9 and asked:
                reclaim = asked.pop(rnd.randrange(len(asked)))
                gave = holding[reclaim.worker] > 0 and rnd.random() < 0.8
                apply(ledger.reclaimed("p", reclaim.worker, gave))
                if gave:
                    holding[reclaim.worker] -= 1
                    apply(ledger.release("p", reclaim.worker))
            elif roll > 0.995:
                holding[worker] = 0
                requested = {t for t in requested if not t.startswith(f"{worker}-") or t in granted}
                apply(ledger.forget(worker))
            self.assertEqual(ledger.held("p"), {w: n for w, n in holding.items() if n}, f"seed {seed}")
        while any(holding.values()):  # (each release may grant a waiting request)
            for worker in range(workers):
                while holding[worker]:
                    holding[worker] -= 1
                    apply(ledger.release("p", worker))
        self.assertEqual(requested - granted, set(), f"seed {seed}")
