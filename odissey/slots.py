"""Client slots leased in blocks: ``limits.max_clients`` and a route's ``pool.max_clients``
over all workers, without asking the master at every login.

Each limit is a *budget* (:data:`CLIENTS` for ``limits.max_clients``, a route's
``Route.identity`` for its ``pool.max_clients``: what the route matches, which a reload
that keeps the route keeps, so the master and every worker name a route's budget alike
whichever of them has applied a reload yet). The master's :class:`Ledger` grants each
worker slots of a budget in blocks; the worker's :class:`Block` admits a login on its
own while it holds a free slot of every budget the login needs (a slot of
:data:`CLIENTS`, and one of the route's budget when the route has a limit), and asks the
master only when it holds none. A logout frees the slot in the worker, which keeps it
for its next login. A worker gives slots back only when the master asks
(:class:`Spare`): when another worker needs slots the ledger no longer has; it then
gives every slot of those budgets it is not using. A worker that dies has its slots
returned (:meth:`Ledger.forget`). Both halves are pure state machines: no I/O, no clock;
the master and the worker carry out what they return.

What is promised, for every budget with a limit:

- **Never over the limit.** The slots the master has granted, summed over workers, never
  pass the limit (a grant takes only free slots; a slot returns only once its worker has
  let it go), and a worker admits only into a slot it holds; so the logged-in clients,
  counted over every worker, never pass it either, at any moment. (After a reload lowers a
  limit below what is held, nothing is granted until enough has come back.)
- **Refused only at the limit.** When every :class:`Spare` is answered before anything else
  happens (how the unit tests drive it), a login is refused only when the logged-in
  clients of a budget it needs, counted over every worker, are at its limit. Messages
  in flight weaken this to: refused only when every worker asked had no unused slot of
  that budget when it answered.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import NamedTuple, Union

#: The budget of ``limits.max_clients``; a route's budget is its ``Route.identity`` (a
#: JSON list, never this word).
CLIENTS = "clients"

#: A budget: CLIENTS, or a route's identity.
Budget = str


class Granted(NamedTuple):
    """The request ``ticket`` of ``worker`` is granted: these slots are its now (at least
    what it asked for)."""

    worker: int
    ticket: object
    slots: dict[Budget, int]


class Refused(NamedTuple):
    """The request ``ticket`` of ``worker`` is refused: ``budget`` is at its limit."""

    worker: int
    ticket: object
    budget: Budget


class Spare(NamedTuple):
    """Ask ``worker`` to give back its unused slots of ``budgets``; answer with
    :meth:`Ledger.spared`."""

    worker: int
    budgets: tuple[Budget, ...]


Action = Union[Granted, Refused, Spare]


class _Request:
    __slots__ = ("worker", "ticket", "wants", "asked")

    def __init__(self, worker: int, ticket: object, wants: dict[Budget, tuple[int, int]]) -> None:
        self.worker = worker
        self.ticket = ticket
        #: Budget -> (its limit, 0 for none; how many slots the worker needs).
        self.wants = wants
        #: Workers asked to spare slots for this request that have not answered.
        self.asked: set[int] = set()


class Ledger:
    """The master's half: slots granted per budget and worker, and the requests waiting
    for other workers to spare some."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._held: defaultdict[Budget, Counter[int]] = defaultdict(Counter)
        self._waiting: list[_Request] = []

    def request(self, worker: int, ticket: object, wants: dict[Budget, tuple[int, int]]) -> list[Action]:
        """``worker`` needs slots: ``wants`` maps each budget to (its limit, 0 for none;
        how many). Granted now if there is room; else the workers holding slots of the
        full budgets are asked to spare theirs, and the request waits for their answers;
        refused when nobody else holds any."""
        request = _Request(worker, ticket, wants)
        short = self._short(request)
        if not short:
            return [self._grant(request)]
        actions: list[Action] = []
        for other in range(self.workers):
            holding = tuple(b for b in short if other != worker and self._held[b][other] > 0)
            if holding:
                request.asked.add(other)
                actions.append(Spare(other, holding))
        if not request.asked:
            return [Refused(worker, ticket, short[0])]
        self._waiting.append(request)
        return actions

    def spared(self, worker: int, slots: dict[Budget, int]) -> list[Action]:
        """``worker``'s answer to a :class:`Spare`: the slots it gave back (it no longer
        uses them)."""
        for budget, count in slots.items():
            held = self._held[budget]
            held[worker] = max(0, held[worker] - count)
        for request in self._waiting:
            request.asked.discard(worker)
        return self._serve()

    def forget(self, worker: int) -> list[Action]:
        """``worker`` is gone, and its clients with it: its slots return, its requests
        are dropped, and what it was asked to spare counts as answered."""
        for held in self._held.values():
            held.pop(worker, None)
        self._waiting = [r for r in self._waiting if r.worker != worker]
        for request in self._waiting:
            request.asked.discard(worker)
        return self._serve()

    def held(self, budget: Budget) -> dict[int, int]:
        """Slots of ``budget`` by worker (those holding any)."""
        return {w: n for w, n in self._held[budget].items() if n > 0}

    def _short(self, request: _Request) -> list[Budget]:
        """The budgets (CLIENTS first) that have too few free slots for ``request``."""
        return [budget for budget, (limit, count) in request.wants.items()
                if limit and limit - sum(self._held[budget].values()) < count]

    def _grant(self, request: _Request) -> Granted:
        """Grant what ``request`` wants, as a block: a share of what is free (half of it
        split over the workers), just what it asks while other requests wait."""
        slots: dict[Budget, int] = {}
        for budget, (limit, count) in request.wants.items():
            held = self._held[budget]
            free = limit - sum(held.values())
            block = free // (2 * self.workers) if limit and not self._waiting else 0
            slots[budget] = max(count, block)
            held[request.worker] += slots[budget]
        return Granted(request.worker, request.ticket, slots)

    def _serve(self) -> list[Action]:
        """Grant the waiting requests that fit now, oldest first; refuse those whose
        askees have all answered and that still do not fit."""
        actions: list[Action] = []
        for request in list(self._waiting):
            short = self._short(request)
            if short and request.asked:
                continue
            self._waiting.remove(request)
            actions.append(Refused(request.worker, request.ticket, short[0]) if short else self._grant(request))
        return actions


class Block:
    """A worker's half: the slots it holds per budget and how many its logged-in clients
    use (every client uses one of :data:`CLIENTS` and one of its route's budget; only
    limited budgets need held slots)."""

    def __init__(self) -> None:
        self.held: Counter[Budget] = Counter()
        self.used: Counter[Budget] = Counter()

    def admit(self, route: Budget, limited: bool) -> dict[Budget, int]:
        """A login of ``route``: admitted into a free slot of every budget it needs when
        this worker holds one (returns nothing), else what to ask the master for (budget
        -> slots; nothing taken). Once a grant has been added, admit again: the free
        slot a budget had when the worker asked may be gone since (another login took
        it, a Spare gave it back), so a grant does not by itself admit."""
        wants: dict[Budget, int] = {}
        for budget in (CLIENTS, route) if limited else (CLIENTS,):
            if self.used[budget] >= self.held[budget]:
                wants[budget] = self.used[budget] - self.held[budget] + 1
        if not wants:
            self.used[CLIENTS] += 1
            self.used[route] += 1
        return wants

    def add(self, slots: dict[Budget, int]) -> None:
        """The master granted these slots."""
        self.held.update(slots)

    def leave(self, route: Budget) -> None:
        """A client of ``route`` has gone: its slot is free (and stays here)."""
        self.used[CLIENTS] -= 1
        self.used[route] -= 1

    def spare(self, budgets: tuple[Budget, ...]) -> dict[Budget, int]:
        """Give back every unused slot of ``budgets`` (the master asks)."""
        given: dict[Budget, int] = {}
        for budget in budgets:
            count = max(0, self.held[budget] - self.used[budget])
            if count:
                self.held[budget] -= count
                given[budget] = count
        return given
