"""Client slots in blocks: the limits hold over all workers, and a login is refused only
at a limit (odissey/slots.py's promise)."""

from __future__ import annotations

from collections import deque
from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from odissey.slots import CLIENTS, Action, Block, Budget, Granted, Ledger, Refused, Spare


class Model:
    """N workers' blocks and the master's ledger, every message delivered at once (the
    sequential model the docstring's second promise is about)."""

    def __init__(self, workers: int, limit: int, route_limits: list[int]) -> None:
        self.ledger = Ledger(workers)
        self.blocks = [Block() for _ in range(workers)]
        self.clients: list[list[int]] = [[] for _ in range(workers)]
        self.limit = limit
        self.route_limits = route_limits
        self.tickets = 0

    def limit_of(self, budget: Budget) -> int:
        return self.limit if budget == CLIENTS else self.route_limits[budget]  # type: ignore[index]

    def login(self, worker: int, route: int) -> bool:
        block = self.blocks[worker]
        wants = block.wants(route, bool(self.route_limits[route]))
        if wants:
            self.tickets += 1
            asked = {budget: (self.limit_of(budget), n) for budget, n in wants.items()}
            if not self.deliver(self.ledger.request(worker, self.tickets, asked), self.tickets):
                return False
        block.take(route)
        self.clients[worker].append(route)
        return True

    def logout(self, worker: int, which: int) -> None:
        if self.clients[worker]:
            route = self.clients[worker].pop(which % len(self.clients[worker]))
            self.blocks[worker].leave(route)

    def die(self, worker: int) -> None:
        self.blocks[worker] = Block()
        self.clients[worker] = []
        assert self.deliver(self.ledger.forget(worker), None) is None

    def deliver(self, actions: list[Action], ticket: object) -> Optional[bool]:
        """Carry out ``actions`` (and what answering them leads to): True if ``ticket``
        was granted, False if refused."""
        outcome = None
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Spare):
                given = self.blocks[action.worker].spare(action.budgets)
                queue.extend(self.ledger.spared(action.worker, given))
                continue
            assert action.ticket == ticket and outcome is None
            if isinstance(action, Granted):
                self.blocks[action.worker].add(action.slots)
            outcome = isinstance(action, Granted)
        return outcome

    def logged_in(self, route: Optional[int] = None) -> int:
        return sum(1 for clients in self.clients for r in clients if route is None or r == route)


operation = st.one_of(
    st.tuples(st.just("login"), st.integers(0, 3), st.integers(0, 1)),
    st.tuples(st.just("logout"), st.integers(0, 3), st.integers(0, 20)),
    st.tuples(st.just("die"), st.integers(0, 3), st.just(0)),
)


class PromiseTests(SynchronousTestCase):
    @given(st.integers(1, 4), st.integers(1, 8), st.lists(st.integers(0, 4), min_size=2, max_size=2),
           st.lists(operation, max_size=60))
    @settings(max_examples=400)
    def test_limits_hold_and_refusals_only_at_the_limit(self, workers, limit, route_limits, operations) -> None:
        """Random logins, logouts and deaths over N workers: a login is admitted exactly
        when the clients logged in over all workers are under limits.max_clients and
        (if it has one) the route's max_clients; the slots granted never pass a limit,
        and no worker uses more than it holds."""
        model = Model(workers, limit, route_limits)
        for verb, worker, arg in operations:
            worker %= workers
            if verb == "login":
                expected = model.logged_in() < limit and (
                    not route_limits[arg] or model.logged_in(arg) < route_limits[arg])
                self.assertEqual(model.login(worker, arg), expected, (verb, worker, arg))
            elif verb == "logout":
                model.logout(worker, arg)
            else:
                model.die(worker)
            budgets: list[Budget] = [CLIENTS] + [r for r, lim in enumerate(route_limits) if lim]
            for budget in budgets:
                held = model.ledger.held(budget)
                self.assertLessEqual(sum(held.values()), model.limit_of(budget))
                for number, block in enumerate(model.blocks):
                    self.assertEqual(block.held[budget], held.get(number, 0))
                    self.assertLessEqual(block.used[budget], block.held[budget])


class LedgerTests(SynchronousTestCase):
    def test_grants_a_block_then_asks_only_when_used_up(self) -> None:
        """With room, a request gets a share of the free slots (half, split over the
        workers), so the next logins of that worker are admitted without asking."""
        ledger, block = Ledger(2), Block()
        wants = block.wants(0, limited=False)
        self.assertEqual(wants, {CLIENTS: 1})
        (granted,) = ledger.request(0, "t", {CLIENTS: (100, 1)})
        self.assertEqual(granted, Granted(0, "t", {CLIENTS: 25}))
        block.add(granted.slots)
        for _ in range(25):
            self.assertEqual(block.wants(0, limited=False), {})
            block.take(0)
        self.assertEqual(block.wants(0, limited=False), {CLIENTS: 1})
        block.leave(0)
        self.assertEqual(block.wants(0, limited=False), {})  # (a logout's slot stays here)

    def test_full_budget_asks_holders_and_waits(self) -> None:
        """When the free slots run out, the workers holding some are asked to spare
        theirs; the request is granted from what they give, refused if they give
        nothing."""
        ledger = Ledger(3)
        ledger.request(0, "a", {CLIENTS: (2, 1)})
        ledger.request(1, "b", {CLIENTS: (2, 1)})
        asked = ledger.request(2, "c", {CLIENTS: (2, 1)})
        self.assertEqual(asked, [Spare(0, (CLIENTS,)), Spare(1, (CLIENTS,))])
        self.assertEqual(ledger.spared(0, {}), [])
        self.assertEqual(ledger.spared(1, {CLIENTS: 1}), [Granted(2, "c", {CLIENTS: 1})])
        self.assertEqual(ledger.held(CLIENTS), {0: 1, 2: 1})
        ledger.request(0, "d", {CLIENTS: (2, 1)})
        self.assertEqual(ledger.spared(2, {}), [Refused(0, "d", CLIENTS)])

    def test_route_budget_refusal_names_the_route(self) -> None:
        """A request short of its route's slots is refused with that budget, and what it
        was granted of neither budget stays free."""
        ledger = Ledger(2)
        ledger.request(0, "a", {CLIENTS: (10, 1), 3: (1, 1)})
        self.assertEqual(ledger.request(0, "b", {CLIENTS: (10, 1), 3: (1, 1)}), [Refused(0, "b", 3)])
        self.assertEqual(ledger.held(3), {0: 1})

    def test_dead_worker_slots_return_to_a_waiting_request(self) -> None:
        """A worker that dies gives back all it held, and counts as having answered."""
        ledger = Ledger(2)
        ledger.request(0, "a", {CLIENTS: (1, 1)})
        self.assertEqual(ledger.request(1, "b", {CLIENTS: (1, 1)}), [Spare(0, (CLIENTS,))])
        self.assertEqual(ledger.forget(0), [Granted(1, "b", {CLIENTS: 1})])
        self.assertEqual(ledger.held(CLIENTS), {1: 1})

    def test_lowered_limit_grants_nothing_until_under_it(self) -> None:
        """After a reload lowers a limit below what is held, a request is refused until
        enough slots have come back."""
        ledger = Ledger(1)
        ledger.request(0, "a", {CLIENTS: (4, 4)})
        self.assertEqual(ledger.request(0, "b", {CLIENTS: (2, 1)}), [Refused(0, "b", CLIENTS)])

    def test_renumber_moves_route_slots(self) -> None:
        """A reload that moves a route moves the slots held for it, on both sides."""
        ledger, block = Ledger(1), Block()
        (granted,) = ledger.request(0, "a", {CLIENTS: (10, 1), 1: (10, 1)})
        block.add(granted.slots)
        block.take(1)
        ledger.renumber(0, {1: 0})
        block.renumber({1: 0})
        self.assertEqual(ledger.held(0), {0: granted.slots[1]})
        self.assertEqual(ledger.held(1), {})
        self.assertEqual((block.held[0], block.used[0], block.used[1]), (granted.slots[1], 1, 0))
