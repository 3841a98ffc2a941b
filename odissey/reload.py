"""What a reload changes: the old and the new Config in, a :class:`Plan` out, no I/O.

The service applies the plan (``OdisseyService.reload``). Routes are matched across the
two configurations by what they match (database, user, client networks:
``Route.identity``), not by their place in the file, so reordering routes changes
nothing. For each matched pair the plan says how much must change:

- ``same``: nothing (equal routes; the index may have moved);
- ``live``: pool sizes, timeouts and limits: the pool takes the new route at once;
- ``reconnect``: storage, server login or client auth changed: the pool takes the new
  route, its idle servers close and its busy ones close when released;
- ``replace``: pool mode or prepared statements changed, which a client's relay
  fixed at login: existing clients keep the old pool to the end of their session, new
  ones get a new pool.

A route in the old configuration only is ``removed`` (its clients finish, new ones are
routed by the new rules); one in the new only is ``added``. A managed PostgreSQL cannot
be started, stopped or changed by a reload: that is a problem, and a plan with problems
is not applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from odissey.config import Config, Route, Storage

SAME, LIVE, RECONNECT, REPLACE = "same", "live", "reconnect", "replace"
#: Pool settings a client's relay reads once, at login.
_FIXED_AT_LOGIN = ("mode", "max_prepared_statements")
#: Storage settings that only matter to the next connection attempt.
_STORAGE_LIVE = ("connect_timeout", "retry_backoff")


@dataclass(frozen=True)
class Change:
    """One route present before and after."""

    old: Route
    new: Route
    kind: str  # SAME | LIVE | RECONNECT | REPLACE


@dataclass(frozen=True)
class Plan:
    config: Config
    changes: tuple[Change, ...]
    added: tuple[Route, ...]
    removed: tuple[Route, ...]
    listen_open: tuple[str, ...]
    listen_close: tuple[str, ...]
    #: Reasons the new configuration cannot be applied by a reload (key paths first).
    problems: tuple[str, ...]

    def summary(self) -> str:
        """One line for the log."""
        counts = {kind: 0 for kind in (LIVE, RECONNECT, REPLACE)}
        for change in self.changes:
            if change.kind in counts:
                counts[change.kind] += 1
        parts = [f"{n} routes {kind}" for kind, n in counts.items() if n]
        parts += [f"{len(self.added)} added"] if self.added else []
        parts += [f"{len(self.removed)} removed"] if self.removed else []
        parts += [f"listening on {', '.join(self.listen_open)}"] if self.listen_open else []
        parts += [f"no longer on {', '.join(self.listen_close)}"] if self.listen_close else []
        return "; ".join(parts) or "no route or listener changed"


def _storage_kind(old: Storage, new: Storage) -> str:
    if old == new:
        return SAME
    if dataclasses.replace(old, **{k: getattr(new, k) for k in _STORAGE_LIVE}) == new:
        return LIVE
    return RECONNECT


def change_kind(old: Route, new: Route) -> str:
    """How much a pool of ``old`` must change to serve ``new`` (same match rule)."""
    if any(getattr(old.pool, key) != getattr(new.pool, key) for key in _FIXED_AT_LOGIN):
        return REPLACE
    storage = _storage_kind(old.storage, new.storage)
    if (storage == RECONNECT or old.server != new.server or old.auth != new.auth
            or old.own_auth != new.own_auth):
        return RECONNECT
    if storage == LIVE or old.pool != new.pool or old.block != new.block:
        return LIVE
    return SAME if old.index == new.index else LIVE


def _managed_problems(old: Config, new: Config) -> list[str]:
    problems = []
    for name in sorted(set(old.storages) | set(new.storages)):
        before, after = old.storages.get(name), new.storages.get(name)
        was = before.managed if before is not None else None
        now = after.managed if after is not None else None
        if was != now:
            problems.append(f"storages.{name}.managed: a managed PostgreSQL is started and "
                            "stopped with Odissey; changing it needs a restart")
    return problems


def _restart_problems(old: Config, new: Config) -> list[str]:
    """Keys read once, at start: a reload that changes them is refused rather than
    half-applied (every cancel key handed out names the running peer id; the metrics
    endpoint and the stats period are set up once)."""
    problems = [f"{path}: read at start only; changing it needs a restart"
                for path, key in (("peer_id", "peer_id"), ("peers", "peers"),
                                  ("metrics.listen", "metrics_listen"),
                                  ("stats_period", "stats_period"))
                if getattr(old, key) != getattr(new, key)]
    return problems + _managed_problems(old, new)


def with_running_hosts(old: Config, new: Config) -> Config:
    """``new`` with its managed storages at the sockets the running ones use (the
    running config has them; a file never does)."""
    storages = dict(new.storages)
    for name, storage in new.storages.items():
        running = old.storages.get(name)
        if storage.managed is not None and running is not None and running.managed == storage.managed:
            storages[name] = dataclasses.replace(storage, host=running.host)
    routes = tuple(dataclasses.replace(r, storage=storages[r.storage.name]) for r in new.routes)
    return dataclasses.replace(new, storages=storages, routes=routes)


def plan(old: Config, new: Config) -> Plan:
    """The difference between the running configuration and a new one."""
    new = with_running_hosts(old, new)
    before = {r.identity: r for r in old.routes}
    after = {r.identity: r for r in new.routes}
    changes = tuple(Change(before[key], route, change_kind(before[key], route))
                    for key, route in after.items() if key in before)
    return Plan(
        config=new,
        changes=changes,
        added=tuple(route for key, route in after.items() if key not in before),
        removed=tuple(route for key, route in before.items() if key not in after),
        listen_open=tuple(d for d in new.listen if d not in old.listen),
        listen_close=tuple(d for d in old.listen if d not in new.listen),
        problems=tuple(_restart_problems(old, new)),
    )
