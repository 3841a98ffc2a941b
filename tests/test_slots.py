"""Client slots in blocks: the limits hold over all workers, and a login is refused only
at a limit (odissey/slots.py's promise)."""

from __future__ import annotations

import random
from collections import deque
from typing import NamedTuple, Optional, Union

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from odissey.slots import CLIENTS, Action, Block, Budget, Granted, Ledger, Refused, Spare
from tests.harness import run_seed


#: Two routes' identities (``Route.identity``: what a route matches, kept by a reload).
ROUTES = ["r0", "r1"]


class Model:
    """N workers' blocks and the master's ledger, every message delivered at once (the
    sequential model the docstring's second promise is about). A login names a route by
    its index in the configuration its worker has applied (``views``), as a worker
    matches it; its budget is the route's identity."""

    def __init__(self, workers: int, limit: int, route_limits: list[int]) -> None:
        self.ledger = Ledger(workers)
        self.blocks = [Block() for _ in range(workers)]
        self.clients: list[list[str]] = [[] for _ in range(workers)]
        self.limit = limit
        #: Each route's max_clients, by identity (a reload in the model only reorders).
        self.route_limits = dict(zip(ROUTES, route_limits))
        #: The routes in the master's configuration, and in each worker's, in file order.
        self.routes = list(ROUTES)
        self.views = [list(ROUTES) for _ in range(workers)]
        self.tickets = 0

    def limit_of(self, budget: Budget) -> int:
        return self.limit if budget == CLIENTS else self.route_limits[budget]

    def login(self, worker: int, index: int) -> bool:
        block, route = self.blocks[worker], self.views[worker][index]
        wants = block.admit(route, bool(self.route_limits[route]))
        while wants:
            self.tickets += 1
            asked = {budget: (self.limit_of(budget), n) for budget, n in wants.items()}
            if not self.deliver(self.ledger.request(worker, self.tickets, asked), self.tickets):
                return False
            wants = block.admit(route, bool(self.route_limits[route]))
        self.clients[worker].append(route)
        return True

    def logout(self, worker: int, which: int) -> None:
        if self.clients[worker]:
            route = self.clients[worker].pop(which % len(self.clients[worker]))
            self.blocks[worker].leave(route)

    def die(self, worker: int) -> None:
        self.blocks[worker] = Block()
        self.clients[worker] = []
        self.views[worker] = list(self.routes)  # (its restart reads the master's configuration)
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

    def logged_in(self, route: Optional[str] = None) -> int:
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
                route = ROUTES[arg]
                expected = model.logged_in() < limit and (
                    not route_limits[arg] or model.logged_in(route) < route_limits[arg])
                self.assertEqual(model.login(worker, arg), expected, (verb, worker, arg))
            elif verb == "logout":
                model.logout(worker, arg)
            else:
                model.die(worker)
            budgets: list[Budget] = [CLIENTS] + [r for r, lim in zip(ROUTES, route_limits) if lim]
            for budget in budgets:
                held = model.ledger.held(budget)
                self.assertLessEqual(sum(held.values()), model.limit_of(budget))
                for number, block in enumerate(model.blocks):
                    self.assertEqual(block.held[budget], held.get(number, 0))
                    self.assertLessEqual(block.used[budget], block.held[budget])


class Reconfigure(NamedTuple):
    """The master's new configuration, on its way to a worker: the routes in file order."""

    routes: list[str]


class Messages:
    """The same halves with every message in flight until a step delivers it: each
    worker's link is two FIFO queues (to the master, to the worker), delivered in any
    interleaving over workers, as the AMP links are. A reload reorders the routes: the
    master takes the new configuration at once, each worker when its Reconfigure
    arrives (behind what was already on its way to it), so for a while the master and
    the workers number the routes differently; the slots must not care."""

    def __init__(self, workers: int, limit: int, route_limits: list[int]) -> None:
        self.model = Model(workers, limit, route_limits)
        self.to_master: list[deque[tuple]] = [deque() for _ in range(workers)]
        self.to_worker: list[deque[Union[Action, Reconfigure]]] = [deque() for _ in range(workers)]
        #: Logins waiting for the master's answer, by ticket: (worker, route identity).
        self.asking: dict[int, tuple[int, str]] = {}

    def login(self, worker: int, index: int) -> None:
        """A login of the route at ``index`` in the worker's configuration."""
        self.admit(worker, self.model.views[worker][index])

    def admit(self, worker: int, route: str) -> None:
        model = self.model
        wants = model.blocks[worker].admit(route, bool(model.route_limits[route]))
        if not wants:
            model.clients[worker].append(route)
            return
        model.tickets += 1
        self.asking[model.tickets] = (worker, route)
        asked = {budget: (model.limit_of(budget), n) for budget, n in wants.items()}
        self.to_master[worker].append(("admit", model.tickets, asked))

    def die(self, worker: int) -> None:
        self.to_master[worker].clear()
        self.to_worker[worker].clear()
        self.asking = {t: (w, r) for t, (w, r) in self.asking.items() if w != worker}
        model = self.model
        model.blocks[worker] = Block()
        model.clients[worker] = []
        model.views[worker] = list(model.routes)
        self.send(model.ledger.forget(worker))

    def reload(self, order: list[str]) -> None:
        """A reload that puts the routes in ``order``."""
        self.model.routes = order
        for queue in self.to_worker:
            queue.append(Reconfigure(order))

    def to_master_from(self, worker: int) -> str:
        """Deliver the next message to the master: "" if none, else what it was
        ("admit"; "spared", with at least one slot given back)."""
        if not self.to_master[worker]:
            return ""
        message = self.to_master[worker].popleft()
        if message[0] == "admit":
            self.send(self.model.ledger.request(worker, message[1], message[2]))
            return "admit"
        self.send(self.model.ledger.spared(worker, message[1]))
        return "spared" if message[1] else "nothing spared"

    def to_worker_at(self, worker: int) -> bool:
        if not self.to_worker[worker]:
            return False
        action = self.to_worker[worker].popleft()
        block = self.model.blocks[worker]
        if isinstance(action, Reconfigure):
            self.model.views[worker] = action.routes
            return True
        if isinstance(action, Spare):
            self.to_master[worker].append(("spared", block.spare(action.budgets)))
            return True
        _worker, route = self.asking.pop(action.ticket)  # type: ignore[arg-type]
        if isinstance(action, Granted):  # (admitted again: what it had free may be gone)
            block.add(action.slots)
            self.admit(worker, route)
        return True

    def send(self, actions: list[Action]) -> None:
        for action in actions:
            self.to_worker[action.worker].append(action)


#: Logins, logouts and deliveries, weighted so that slots are often held unused while
#: another worker asks (what makes Spares give something back).
VERBS = ["login"] * 3 + ["logout"] * 2 + ["die", "reload"] + ["to_master"] * 3 + ["to_worker"] * 3


class InFlightTests(SynchronousTestCase):
    def test_limits_hold_with_messages_in_flight(self) -> None:
        """Logins, logouts, deaths, reloads that reorder the routes and message
        deliveries in random interleavings (300 runs of 120 steps; seeded, hypothesis
        rarely reaches a Spare that gives): at every moment the clients logged in over
        all workers are within every limit and no worker holds more than the master
        counts it; once every message is delivered, every login that asked has its
        answer and the master counts exactly what each worker holds."""
        seed = run_seed(self)
        rnd = random.Random(seed)
        gave = 0
        for _ in range(300):
            workers, limit = rnd.randint(1, 4), rnd.randint(1, 6)
            route_limits = [rnd.randint(0, 3), rnd.randint(0, 3)]
            messages = Messages(workers, limit, route_limits)
            model = messages.model
            for _ in range(120):
                verb, worker = rnd.choice(VERBS), rnd.randrange(workers)
                if verb == "login":
                    messages.login(worker, rnd.randrange(2))
                elif verb == "logout":
                    model.logout(worker, rnd.randrange(20))
                elif verb == "die":
                    messages.die(worker)
                elif verb == "reload":
                    messages.reload(rnd.sample(ROUTES, len(ROUTES)))
                elif verb == "to_master":
                    gave += messages.to_master_from(worker) == "spared"
                else:
                    messages.to_worker_at(worker)
                self.check(model, limit, route_limits, seed)
            while any(messages.to_master_from(w) or messages.to_worker_at(w) for w in range(workers)):
                pass
            self.assertEqual(messages.asking, {}, f"seed {seed}")
            for budget in [CLIENTS] + ROUTES:  # (and the master's count has not drifted)
                held = model.ledger.held(budget)
                self.assertEqual({n: b.held[budget] for n, b in enumerate(model.blocks) if b.held[budget]},
                                 held, f"seed {seed}")
        self.assertGreater(gave, 0, f"seed {seed}: no Spare gave anything back")

    def check(self, model: Model, limit: int, route_limits: list[int], seed: int) -> None:
        self.assertLessEqual(model.logged_in(), limit, f"seed {seed}")
        for route, route_limit in zip(ROUTES, route_limits):
            if route_limit:
                self.assertLessEqual(model.logged_in(route), route_limit, f"seed {seed}")
        for budget in [CLIENTS] + [r for r, lim in zip(ROUTES, route_limits) if lim]:
            held = model.ledger.held(budget)
            self.assertLessEqual(sum(held.values()), model.limit_of(budget), f"seed {seed}")
            for number, block in enumerate(model.blocks):
                self.assertLessEqual(block.held[budget], held.get(number, 0), f"seed {seed}")
                self.assertLessEqual(block.used[budget], block.held[budget], f"seed {seed}")


class LedgerTests(SynchronousTestCase):
    def test_grants_a_block_then_asks_only_when_used_up(self) -> None:
        """With room, a request gets a share of the free slots (half, split over the
        workers), so the next logins of that worker are admitted without asking."""
        ledger, block = Ledger(2), Block()
        self.assertEqual(block.admit("r0", limited=False), {CLIENTS: 1})
        (granted,) = ledger.request(0, "t", {CLIENTS: (100, 1)})
        self.assertEqual(granted, Granted(0, "t", {CLIENTS: 25}))
        block.add(granted.slots)
        for _ in range(25):
            self.assertEqual(block.admit("r0", limited=False), {})
        self.assertEqual(block.admit("r0", limited=False), {CLIENTS: 1})
        block.leave("r0")
        self.assertEqual(block.admit("r0", limited=False), {})  # (a logout's slot stays here)
        self.assertEqual(block.used[CLIENTS], 25)

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
        ledger.request(0, "a", {CLIENTS: (10, 1), "r3": (1, 1)})
        self.assertEqual(ledger.request(0, "b", {CLIENTS: (10, 1), "r3": (1, 1)}), [Refused(0, "b", "r3")])
        self.assertEqual(ledger.held("r3"), {0: 1})

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
