"""The master's ledger of server-connection leases: ``pool.size`` across all workers.

A worker asks for a lease before it opens a server connection and gives it back when
that connection closes, so the sum over workers never passes the pool's size. The
ledger is a pure state machine: each call returns what the master must do (grant a
waiting request, ask a worker to give a server up); it does no I/O and reads no clock.

No starvation: a worker whose request waits while the pool is full gets a server
taken from another worker (:class:`Reclaim`, answered with :meth:`Ledger.reclaimed`):
any server, busy ones included (the next to come back), when it holds none at all or
when the other holds at least two more than it does; otherwise only a spare idle one
(a server nobody has needed for a while is better used where somebody waits; the
worker decides what is spare, see ``Pool.shed``). Busy splits that differ
by one are left alone, so two busy workers settle instead of taking connections from
each other on every transaction; a pool of size 1 shared by two busy workers does
change hands, at the cost of one connect per hand-over.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Hashable, NamedTuple, Union


class Grant(NamedTuple):
    """The request ``ticket`` of ``worker`` has its lease now (a ticket is whatever the
    master needs to answer that request)."""

    worker: int
    ticket: object


class Reclaim(NamedTuple):
    """Ask ``worker`` to give up one server of ``pool``: close an idle one, or (unless
    ``idle_only``) the next busy one when it comes back; answer with
    :meth:`Ledger.reclaimed`."""

    worker: int
    pool: Hashable
    idle_only: bool = False


Action = Union[Grant, Reclaim]


class _PoolLeases:
    __slots__ = ("size", "held", "waiting", "reclaiming", "refused")

    def __init__(self, size: int) -> None:
        self.size = size
        self.held: Counter[int] = Counter()
        self.waiting: deque[tuple[int, object]] = deque()
        #: Reclaims asked of a worker and not yet paid back by a release.
        self.reclaiming: Counter[int] = Counter()
        #: Workers that had nothing to give since this pool's last release.
        self.refused: set[int] = set()


class Ledger:
    """Leases per pool (any hashable key), each pool with the size its requests name."""

    def __init__(self) -> None:
        self._pools: dict[Hashable, _PoolLeases] = {}

    def request(self, pool: Hashable, size: int, worker: int, ticket: object) -> list[Action]:
        """``worker`` wants one more server of ``pool``; the size is the route's (the
        latest request's wins, so a reload that changes it takes effect)."""
        leases = self._pools.get(pool)
        if leases is None:
            leases = self._pools[pool] = _PoolLeases(size)
        leases.size = size
        leases.waiting.append((worker, ticket))
        return self._serve(pool, leases)

    def resize(self, pool: Hashable, size: int) -> list[Action]:
        """A reload changed the pool's size: a larger one grants waiting requests now; a
        smaller one grants none until enough servers have closed."""
        leases = self._pools.get(pool)
        if leases is None or leases.size == size:
            return []
        leases.size = size
        return self._serve(pool, leases)

    def release(self, pool: Hashable, worker: int) -> list[Action]:
        """``worker`` closed one server of ``pool``."""
        leases = self._pools.get(pool)
        if leases is None or leases.held[worker] <= 0:
            return []
        leases.held[worker] -= 1
        if leases.reclaiming[worker] > 0:
            leases.reclaiming[worker] -= 1
        leases.refused.clear()
        return self._serve(pool, leases)

    def reclaimed(self, pool: Hashable, worker: int, gave: bool) -> list[Action]:
        """``worker``'s answer to a :class:`Reclaim`: True when a server will close
        (its release follows), False when it had none to give."""
        leases = self._pools.get(pool)
        if leases is None or gave or leases.reclaiming[worker] <= 0:
            return []
        leases.reclaiming[worker] -= 1
        leases.refused.add(worker)
        return self._serve(pool, leases)

    def withdraw(self, pool: Hashable, ticket: object) -> bool:
        """Drop a waiting request; False when it is not waiting (granted already)."""
        leases = self._pools.get(pool)
        if leases is None:
            return False
        for entry in leases.waiting:
            if entry[1] is ticket:
                leases.waiting.remove(entry)
                return True
        return False

    def retry(self, pool: Hashable) -> list[Action]:
        """Ask again the workers that had nothing to give (a server that was still
        connecting then may be idle now), for the requests still waiting."""
        leases = self._pools.get(pool)
        if leases is None or not leases.refused:
            return []
        leases.refused.clear()
        return self._serve(pool, leases)

    def forget(self, worker: int) -> list[Action]:
        """``worker`` is gone: its leases return (the kernel closed its connections)
        and its waiting requests are dropped."""
        actions: list[Action] = []
        for pool, leases in self._pools.items():
            leases.held.pop(worker, None)
            leases.reclaiming.pop(worker, None)
            leases.refused.discard(worker)
            leases.waiting = deque(entry for entry in leases.waiting if entry[0] != worker)
            actions += self._serve(pool, leases)
        return actions

    def held(self, pool: Hashable) -> dict[int, int]:
        """Leases of ``pool`` by worker (those holding any)."""
        leases = self._pools.get(pool)
        return {w: n for w, n in leases.held.items() if n > 0} if leases is not None else {}

    def waiting(self, pool: Hashable) -> int:
        leases = self._pools.get(pool)
        return len(leases.waiting) if leases is not None else 0

    def _serve(self, pool: Hashable, leases: _PoolLeases) -> list[Action]:
        """Grant waiting requests in order while there is room; then ask for servers
        back for the waiters that no reclaim in flight covers."""
        actions: list[Action] = []
        held, waiting = leases.held, leases.waiting
        total = sum(held.values())
        while waiting and total < leases.size:
            worker, ticket = waiting.popleft()
            held[worker] += 1
            total += 1
            actions.append(Grant(worker, ticket))
        reclaiming = leases.reclaiming
        covered = sum(reclaiming.values())
        gaining: Counter[int] = Counter()
        for index, (worker, _ticket) in enumerate(waiting):
            if index < covered:  # (the oldest waiters are the ones reclaims in flight serve)
                gaining[worker] += 1
                continue
            chosen = self._victim(leases, worker, held[worker] + gaining[worker])
            if chosen is None:
                continue
            victim, idle_only = chosen
            reclaiming[victim] += 1
            gaining[worker] += 1
            actions.append(Reclaim(victim, pool, idle_only))
        return actions

    @staticmethod
    def _victim(leases: _PoolLeases, worker: int, has: int) -> tuple[int, bool] | None:
        """The worker to take a server from for ``worker`` (which has ``has``): the one
        holding most (after reclaims in flight), and whether only an idle server of its
        may be taken (when taking a busy one would not be fair)."""
        best, most = None, 0
        for other, count in leases.held.items():
            if other == worker or other in leases.refused:
                continue
            left = count - leases.reclaiming[other]
            if left > most:
                best, most = other, left
        if best is None:
            return None
        return best, not (has == 0 or most >= has + 2)
