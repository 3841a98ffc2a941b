"""reload.plan: the difference between two configurations, without I/O."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from odissey.config import parse
from odissey.reload import LIVE, RECONNECT, REPLACE, SAME, plan


def document() -> dict[str, Any]:
    return {
        "listen": ["tcp:6432"],
        "storages": {"a": {"host": "127.0.0.1", "port": 5432},
                     "b": {"host": "127.0.0.1", "port": 5433}},
        "routes": [
            {"database": "app", "user": "app", "storage": "a",
             "auth": {"method": "md5", "password": "x"}, "pool": {"mode": "transaction", "size": 4}},
            {"database": "app", "storage": "a", "pool": {"mode": "session"}},
            {"database": "other", "user": "u", "clients": ["10.0.0.0/8"], "storage": "b"},
        ],
    }


def kinds(old: dict[str, Any], new: dict[str, Any]) -> dict[str, str]:
    planned = plan(parse(old), parse(new))
    return {change.new.name: change.kind for change in planned.changes}


class PlanTests(SynchronousTestCase):
    def changed(self, edit: Any) -> dict[str, str]:
        new = copy.deepcopy(document())
        edit(new)
        return kinds(document(), new)

    def test_same(self) -> None:
        """An identical configuration changes nothing."""
        planned = plan(parse(document()), parse(document()))
        self.assertEqual({c.kind for c in planned.changes}, {SAME})
        self.assertEqual((planned.added, planned.removed, planned.listen_open,
                          planned.listen_close, planned.problems), ((), (), (), (), ()))
        self.assertEqual(planned.summary(), "no route or listener changed")

    def test_pool_size_and_timeouts_are_live(self) -> None:
        """Pool size, a pool timeout, and a storage's connect_timeout apply live."""
        def edit(new: dict[str, Any]) -> None:
            new["routes"][0]["pool"]["size"] = 8
            new["routes"][1]["pool"]["query_timeout"] = "5s"
            new["storages"]["b"]["connect_timeout"] = "1s"
        self.assertEqual(self.changed(edit), {"app/app": LIVE, "app/*": LIVE, "other/u": LIVE})

    def test_storage_login_auth_reconnect(self) -> None:
        """A storage's address, a server login, or client auth: the pool reconnects."""
        def edit(new: dict[str, Any]) -> None:
            new["routes"][0]["auth"]["password"] = "y"
            new["routes"][1]["server"] = {"user": "svc", "password": "p"}
            new["storages"]["b"]["port"] = 5434
        self.assertEqual(self.changed(edit), {"app/app": RECONNECT, "app/*": RECONNECT,
                                              "other/u": RECONNECT})

    def test_mode_replaces(self) -> None:
        """Pool mode and prepared statements are fixed at login: a new pool."""
        def edit(new: dict[str, Any]) -> None:
            new["routes"][0]["pool"]["mode"] = "session"
            new["routes"][1]["pool"]["max_prepared_statements"] = 0
        self.assertEqual(self.changed(edit), {"app/app": REPLACE, "app/*": REPLACE, "other/u": SAME})

    def test_routes_matched_by_rule_not_place(self) -> None:
        """Reordered routes are the same routes (only their indexes move); a route
        whose client networks changed is another route."""
        new = copy.deepcopy(document())
        new["routes"].reverse()
        new["routes"][0]["clients"] = ["192.168.0.0/16"]
        planned = plan(parse(document()), parse(new))
        self.assertEqual({c.new.name: (c.kind, c.old.index, c.new.index) for c in planned.changes},
                         {"app/app": (LIVE, 0, 2), "app/*": (SAME, 1, 1)})
        self.assertEqual([r.name for r in planned.added], ["other/u"])
        self.assertEqual([r.name for r in planned.removed], ["other/u"])
        self.assertEqual([r.clients for r in planned.removed], [parse(document()).routes[2].clients])

    def test_identity_survives_moves_and_settings(self) -> None:
        """A route keeps its identity (the client limits' name for it) when a reload
        moves it or changes its settings; routes differing in what they match differ."""
        new = copy.deepcopy(document())
        new["routes"].reverse()
        new["routes"][2]["pool"]["size"] = 9
        old_routes, new_routes = parse(document()).routes, parse(new).routes
        self.assertEqual([r.identity for r in old_routes], [r.identity for r in reversed(new_routes)])
        self.assertEqual(len({r.identity for r in old_routes}), 3)
        narrowed = copy.deepcopy(document())
        narrowed["routes"][2]["clients"] = ["10.1.0.0/16"]
        self.assertNotEqual(parse(narrowed).routes[2].identity, old_routes[2].identity)

    def test_listeners(self) -> None:
        """Listeners only in the new configuration open, those only in the old close."""
        new = copy.deepcopy(document())
        new["listen"] = ["tcp:6433", "unix:/tmp/odissey.sock"]
        planned = plan(parse(document()), parse(new))
        self.assertEqual(planned.listen_open, ("tcp:6433", "unix:/tmp/odissey.sock"))
        self.assertEqual(planned.listen_close, ("tcp:6432",))
        self.assertIn("listening on tcp:6433", planned.summary())

    def test_managed_storage_needs_restart(self) -> None:
        """Adding or changing a managed PostgreSQL is a problem, named by key path."""
        new = copy.deepcopy(document())
        new["storages"]["m"] = {"managed": {"users": {"app": "x"}}}
        planned = plan(parse(document()), parse(new))
        self.assertEqual(len(planned.problems), 1)
        self.assertTrue(planned.problems[0].startswith("storages.m.managed: "), planned.problems)

    def test_peering_needs_restart(self) -> None:
        """peer_id and peers are refused, not half-applied: keys already handed out name
        the running peer id."""
        old = copy.deepcopy(document())
        old["peer_id"] = 1
        new = copy.deepcopy(old)
        new["peer_id"] = 2
        new["peers"] = [{"id": 1, "host": "10.0.0.1"}]
        planned = plan(parse(old), parse(new))
        self.assertEqual([p.split(":")[0] for p in planned.problems], ["peer_id", "peers"])
        self.assertEqual(plan(parse(old), parse(copy.deepcopy(old))).problems, ())

    def test_managed_storage_keeps_its_socket(self) -> None:
        """An unchanged managed storage keeps the socket directory the running one has
        (the file names none), so its routes are unchanged."""
        doc = document()
        doc["storages"]["a"] = {"managed": {"users": {"app": "x"}}, "port": 5432}
        running = parse(doc)

        storage = dataclasses.replace(running.storages["a"], host="/tmp/pg-sock")
        running = dataclasses.replace(
            running, storages={**running.storages, "a": storage},
            routes=tuple(dataclasses.replace(r, storage=storage) if r.storage.name == "a" else r
                         for r in running.routes))
        planned = plan(running, parse(doc))
        self.assertEqual({c.kind for c in planned.changes}, {SAME})
        self.assertEqual(planned.config.storages["a"].host, "/tmp/pg-sock")
