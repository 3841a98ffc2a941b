"""The AMP commands a master and its workers exchange (``twisted.protocols.amp``).

Only the connect/close path and rare events cross processes: a lease per server
connection opened, its return when the connection closes, a reclaim when another
worker starves, a cancel whose key another worker issued, a block of client slots when
a worker has used its own up (client limits), statistics (once a second, what the admin
console shows), and the operator's acts: console control commands, reloads, SHOW
CLIENTS/SERVERS, metrics scrapes and console SHUTDOWN. Nothing per transaction. A pool is named by :func:`pool_name`, the same string on both sides.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

from twisted.protocols import amp

from odissey.slots import Budget


#: How often workers report their pools and the master relays the others' (seconds).
REPORT_PERIOD = 1.0
#: The longest AMP value (65,535 bytes), less room for the rest of the box.
MAX_VALUE = 60_000


def rows_json(rows: list[list[object]]) -> str:
    """Console rows as one AMP string: as many as fit (a process with more pools than
    that shows the others' first ones only)."""
    text = json.dumps(rows)
    while len(text.encode()) > MAX_VALUE and rows:
        rows = rows[: len(rows) * 3 // 4]
        text = json.dumps(rows)
    return text


def pool_name(key: Sequence[object]) -> str:
    """A pool key (database, user, route) as one AMP string."""
    return json.dumps(list(key))


class Lease(amp.Command):
    """Worker -> master: may I open one more server connection of this pool? Answered
    once the lease is granted (it may wait: the pool's size is global), or with
    ``granted`` false once the worker has withdrawn the request. ``request`` is the
    worker's number for it."""

    arguments = [(b"pool", amp.Unicode()), (b"size", amp.Integer()), (b"request", amp.Integer())]
    response = [(b"granted", amp.Boolean())]


class Withdraw(amp.Command):
    """Worker -> master: nobody needs that waiting lease request any more (its clients
    were served by servers that came back); drop it unless it is already granted."""

    arguments = [(b"pool", amp.Unicode()), (b"request", amp.Integer())]
    response = []
    requiresAnswer = False


class Release(amp.Command):
    """Worker -> master: one server connection of this pool has closed."""

    arguments = [(b"pool", amp.Unicode())]
    response = []
    requiresAnswer = False


class Reclaim(amp.Command):
    """Master -> worker: another worker waits for this pool; give up one server, an idle
    one or (unless ``idle_only``) the next busy one to come back. True when one will
    close (its Release follows)."""

    arguments = [(b"pool", amp.Unicode()), (b"idle_only", amp.Boolean())]
    response = [(b"gave", amp.Boolean())]


class Cancel(amp.Command):
    """A CancelRequest for a key another worker issued: worker -> master -> owner.
    Answered once the cancel has landed (or there was nothing to cancel)."""

    arguments = [(b"pid", amp.Integer()), (b"secret", amp.Integer())]
    response = []


class Admit(amp.Command):
    """Worker -> master: a client logs in and the worker has no free slot of the
    budgets in ``wants`` (:func:`slots_json`, budget -> slots it lacks; see
    :mod:`odissey.slots`). ``refused`` is "" (then ``slots``, at least those, are the
    worker's), "clients" (limits.max_clients is reached) or "route" (its max_clients is)."""

    arguments = [(b"wants", amp.Unicode())]
    response = [(b"refused", amp.Unicode()), (b"slots", amp.Unicode())]


class Spare(amp.Command):
    """Master -> worker: another worker needs client slots of these budgets (JSON list)
    and none are free; give back every one not in use. Answered with those given
    (:func:`slots_json`)."""

    arguments = [(b"budgets", amp.Unicode())]
    response = [(b"gave", amp.Unicode())]


def slots_json(slots: Mapping[Budget, int]) -> str:
    """Client slots by budget (CLIENTS or a route's identity) as one AMP string."""
    return json.dumps([[budget, count] for budget, count in slots.items()])


def slots_from(text: str) -> dict[Budget, int]:
    return {budget: count for budget, count in json.loads(text)}


class Report(amp.Command):
    """Worker -> master, every second: this worker's SHOW POOLS rows, as JSON."""

    arguments = [(b"pools", amp.Unicode())]
    response = []
    requiresAnswer = False


class Others(amp.Command):
    """Master -> worker, every second: the other workers' SHOW POOLS rows, as JSON, so
    that the admin console in any worker shows the whole process."""

    arguments = [(b"pools", amp.Unicode())]
    response = []
    requiresAnswer = False


class Stats(amp.Command):
    """Master -> worker: what this worker holds, as JSON (clients; servers per pool)."""

    arguments = []
    response = [(b"stats", amp.Unicode())]


class Order(amp.Command):
    """A console control command (PAUSE, RESUME, ..., KILL_CLIENT) spanning workers:
    worker -> master, then master -> every worker. Answered once done (PAUSE: once the
    servers are released); ``sqlstate`` "" if done, else the refusal's SQLSTATE,
    message and hint."""

    arguments = [(b"verb", amp.Unicode()), (b"arg", amp.Unicode(optional=True))]
    response = [(b"sqlstate", amp.Unicode()), (b"message", amp.Unicode()), (b"hint", amp.Unicode())]


class Reload(amp.Command):
    """Worker -> master: console RELOAD. The master re-reads the file and, if it is
    valid, sends it to every worker; answered with the problems (JSON list, empty: done)."""

    arguments = []
    response = [(b"problems", amp.Unicode())]


class ConfigPart(amp.Command):
    """Master -> worker: the next piece of a pickled configuration (one AMP value holds
    64 KiB at most); the :class:`Reconfigure` that follows applies the pieces."""

    arguments = [(b"part", amp.String())]
    response = []
    requiresAnswer = False


class Reconfigure(amp.Command):
    """Master -> worker: apply the configuration sent in pieces, as a single process
    applies a reload. Answered with the problems (JSON list) and each pool's size after
    it (JSON {pool: size}, for the lease ledger). (Client slots need nothing: a route's
    budget is its identity, which a reload keeps.)"""

    arguments = []
    response = [(b"problems", amp.Unicode()), (b"sizes", amp.Unicode())]


def config_parts(pickled: bytes) -> list[bytes]:
    """A pickled configuration in pieces that fit an AMP value."""
    return [pickled[at:at + MAX_VALUE] for at in range(0, len(pickled), MAX_VALUE)] or [b""]


class Figures(amp.Command):
    """Master -> worker, at each scrape of the master's metrics endpoint: this worker's
    metrics snapshot (``Snapshot.to_json``), UTF-8, from ``offset`` on, at most one AMP
    value; ``total`` is the whole length. The worker takes the snapshot when a new
    ``scrape`` number asks (offset 0) and keeps it for that scrape's next pieces."""

    arguments = [(b"scrape", amp.Integer()), (b"offset", amp.Integer())]
    response = [(b"part", amp.String()), (b"total", amp.Integer())]


class Show(amp.Command):
    """Worker -> master: console SHOW CLIENTS or SHOW SERVERS; answered with the other
    workers' rows (JSON), which the master asks each of them for (:class:`ShowHere`)."""

    arguments = [(b"what", amp.Unicode())]
    response = [(b"rows", amp.Unicode())]


class ShowHere(amp.Command):
    """Master -> worker: this worker's rows of SHOW ``what`` (JSON)."""

    arguments = [(b"what", amp.Unicode())]
    response = [(b"rows", amp.Unicode())]


class Accepting(amp.Command):
    """Worker -> master, once: this worker accepts on the listeners now (the master
    says READY to systemd, and confirms a handover, once every worker has)."""

    arguments = []
    response = []
    requiresAnswer = False


class Shutdown(amp.Command):
    """Worker -> master: console SHUTDOWN (``how`` "immediate") or SHUTDOWN
    WAIT_FOR_CLIENTS ("wait_for_clients"). The master stops the whole process as on
    SIGTERM, but in this way (it sends every worker :class:`Stop`). The console has
    answered already: nothing comes back."""

    arguments = [(b"how", amp.Unicode())]
    response = []
    requiresAnswer = False


class Stop(amp.Command):
    """Master -> worker: stop the way ``how`` says (a :class:`~odissey.lifecycle.Stop`
    value: "graceful", "wait_for_clients", "immediate"), then exit. Sent again with
    "immediate" while a worker stops, it hurries that stop."""

    arguments = [(b"how", amp.Unicode())]
    response = []
    requiresAnswer = False
