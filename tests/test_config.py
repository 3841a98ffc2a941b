"""Configuration loading: every problem named by its key path; docs match the schema."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from odissey import config
from odissey.config import SCHEMA, ConfigError, parse, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


def minimal(**route_extra: object) -> dict:
    return {
        "listen": ["tcp:6432"],
        "storages": {"pg": {"host": "127.0.0.1"}},
        "routes": [{"database": "db", "user": "u", "storage": "pg",
                    "auth": {"method": "trust"}, **route_extra}],
    }


def routes(*bodies: dict[str, Any]) -> tuple[config.Route, ...]:
    """Parsed routes (each body defaults to trust on storage pg)."""
    return parse({
        "listen": ["tcp:0"],
        "storages": {"pg": {"host": "127.0.0.1"}},
        "routes": [{"storage": "pg", **body} for body in bodies],
    }).routes


class ConfigTests(SynchronousTestCase):
    def problems(self, document: object) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            parse(document)
        return caught.exception.problems

    def test_minimal_defaults(self) -> None:
        """A minimal config loads with documented defaults."""
        cfg = parse(minimal())
        route = cfg.routes[0]
        self.assertEqual((route.pool.mode, route.pool.size, route.pool.wait_timeout), ("session", 20, 30.0))
        self.assertEqual(route.pool.reset_query, "DISCARD ALL")
        self.assertEqual(cfg.storages["pg"].port, 5432)
        self.assertEqual(cfg.limits.max_clients, 1000)

    def test_workers(self) -> None:
        """workers defaults to 1, takes 1..64 or auto (one per CPU), and names its key when wrong."""
        self.assertEqual(parse(minimal()).workers, 1)
        self.assertEqual(parse({**minimal(), "workers": 3}).workers, 3)
        self.assertEqual(parse({**minimal(), "workers": "auto"}).workers, min(os.cpu_count() or 1, 64))
        for bad in (0, 65, "many", True):
            self.assertEqual(self.problems({**minimal(), "workers": bad}),
                             [f"workers: must be auto or an integer from 1 to 64, got {bad!r}"
                              if not isinstance(bad, str) else
                              f'workers: must be auto or an integer from 1 to 64, got "{bad}"'])

    def test_pool_size_named_by_path(self) -> None:
        """A bad value names its key path and shows what was given."""
        self.assertEqual(
            self.problems(minimal(pool={"size": "ten"})),
            ['routes[0].pool.size: must be a positive integer, got "ten"'],
        )

    def test_every_problem_reported(self) -> None:
        """Unknown keys, wrong types and dangling storages are all reported at once."""
        doc = minimal(storage="nowhere", pool={"mode": "statement", "sise": 3})
        doc["limits"] = {"login_timeout": "soon"}
        found = self.problems(doc)
        self.assertIn('limits.login_timeout: must be a duration like 15s, got "soon"', found)
        self.assertTrue(any(p.startswith("routes[0].pool.sise: unknown key (expected one of: mode, size,")
                            for p in found), found)
        self.assertIn('routes[0].pool.mode: must be session or transaction, got "statement"', found)
        self.assertIn('routes[0].storage: names unknown storage "nowhere" (known: pg)', found)

    def test_password_required(self) -> None:
        """A password method without a password is refused."""
        self.assertEqual(
            self.problems(minimal(auth={"method": "md5"})),
            ["routes[0].auth.password: is required for method md5"],
        )

    def test_md5_secret_needs_one_user(self) -> None:
        """An md5 secret on a route matching any user cannot work and is refused."""
        doc = minimal(user="*", auth={"method": "md5", "password": "md5" + "0" * 32})
        self.assertIn("bound to one user name", self.problems(doc)[0])

    def test_scram_secret_not_for_server(self) -> None:
        """A SCRAM secret cannot log in to a server."""
        doc = minimal(server={"password": "SCRAM-SHA-256$4096:c2FsdA==$a:b"})
        self.assertIn("routes[0].server.password: a SCRAM secret cannot answer", self.problems(doc)[0])

    def test_password_from_env_and_file(self) -> None:
        """Passwords come from an environment variable or a file (relative to the config)."""
        os.environ["ODISSEY_TEST_PW"] = "from-env"
        cfg = parse(minimal(auth={"method": "md5", "password": {"env": "ODISSEY_TEST_PW"}}))
        self.assertEqual(cfg.routes[0].auth.password, config.Secret("plain", "from-env"))
        secret_file = Path(self.mktemp())
        secret_file.write_text("from-file\n")
        cfg = parse(minimal(server={"password": {"file": str(secret_file.resolve())}}))
        self.assertEqual(cfg.routes[0].server.password, config.Secret("plain", "from-file"))
        found = self.problems(minimal(server={"password": {"env": "ODISSEY_NOT_SET_ANYWHERE"}}))
        self.assertEqual(found, ['routes[0].server.password.env: environment variable '
                                 '"ODISSEY_NOT_SET_ANYWHERE" is not set'])

    def test_pool_defaults(self) -> None:
        """pool_defaults fill in what a route's pool leaves out; a route overrides them."""
        doc = minimal(pool={"size": 3})
        doc["pool_defaults"] = {"mode": "transaction", "size": 9, "query_timeout": "2s"}
        pool = parse(doc).routes[0].pool
        self.assertEqual((pool.mode, pool.size, pool.query_timeout), ("transaction", 3, 2.0))
        doc["pool_defaults"] = {"size": 0}
        self.assertEqual(self.problems(doc), ["pool_defaults.size: must be a positive integer, got 0"])

    def test_duplicate_routes(self) -> None:
        """Two routes for the same database and user are refused."""
        doc = minimal()
        doc["routes"].append(dict(doc["routes"][0]))
        self.assertEqual(self.problems(doc), ["routes[1]: duplicates routes[0] (database 'db', user 'u')"])

    def test_empty_and_garbage(self) -> None:
        """An empty document or a list at the top level is refused clearly."""
        self.assertIn("(top level): the configuration is empty", self.problems(None))
        self.assertIn("(top level): must be a mapping, got list", self.problems([1]))

    def test_yaml_syntax_error(self) -> None:
        """A YAML syntax error is a ConfigError naming the file."""
        path = self.mktemp()
        Path(path).write_text("listen: [\n")
        with self.assertRaises(ConfigError) as caught:
            config.load(path)
        self.assertIn("invalid YAML", caught.exception.problems[0])

    def test_durations_and_sizes(self) -> None:
        """Durations and sizes accept units and bare numbers, and refuse nonsense."""
        self.assertEqual([parse_duration(v) for v in ("5s", "250ms", "1m", "2h", 3)], [5, 0.25, 60, 7200, 3])
        self.assertEqual([parse_size(v) for v in ("64MB", "512kB", 10)], [64 << 20, 512 << 10, 10])
        for bad in ("5 parsecs", "-1s", True):
            self.assertRaises(ValueError, parse_duration, bad)

    def test_example_configs_load(self) -> None:
        """Every example configuration in docs/ loads without errors."""
        examples = sorted((ROOT / "docs" / "examples").glob("*.yaml"))
        self.assertTrue(examples)
        for path in examples:
            config.load(str(path))

    def test_reference_documents_every_key(self) -> None:
        """docs/configuration.md documents exactly the keys the loader accepts."""
        text = (ROOT / "docs" / "configuration.md").read_text()
        documented = set(re.findall(r"^#+ `([^`]+)`", text, re.M))
        accepted = set()
        self.assertEqual(SCHEMA["pool_defaults"], SCHEMA["routes[].pool"])  # documented once
        for section, keys in SCHEMA.items():
            if section == "pool_defaults":
                continue
            for key in keys:
                accepted.add(f"{section}.{key}" if section else key)
        self.assertEqual(documented, accepted)

    def test_demo_config_is_what_readme_says(self) -> None:
        """The demo serves database demo to user demo with SCRAM on 127.0.0.1:6432."""
        demo = yaml.safe_load((ROOT / "docs" / "examples" / "demo.yaml").read_text())
        cfg = parse(demo)
        self.assertEqual(cfg.listen[0], "tcp:6432:interface=127.0.0.1")
        by_db = {r.database: r for r in cfg.routes}
        self.assertEqual(by_db["demo"].auth.method, "scram-sha-256")
        self.assertEqual(by_db["demo"].pool.mode, "session")
        tx = by_db["demo_tx"]
        self.assertEqual((tx.user, tx.pool.mode, tx.pool.size, tx.server.database), ("demo", "transaction", 4, "demo"))
        self.assertEqual(tx.auth.password.value, "demo")
        self.assertEqual(cfg.admin_users, ("demo",))  # README: psql -U demo odissey -c 'SHOW POOLS'
        self.assertEqual(cfg.metrics_listen, "tcp:9127:interface=127.0.0.1")  # README: curl …:9127/metrics

    def test_peers_example_is_what_deployment_says(self) -> None:
        """docs/examples/peers.yaml is instance 1 of 3, every instance listed, and the
        pools of all three fit in the 180 server connections its comment promises."""
        cfg = config.load(str(ROOT / "docs" / "examples" / "peers.yaml"))
        self.assertEqual((cfg.peer_id, sorted(cfg.peers)), (1, [2, 3]))
        self.assertEqual({p.port for p in cfg.peers.values()}, {6432})
        instances = len(cfg.peers) + 1
        self.assertEqual(instances * sum(r.pool.size for r in cfg.routes), 180)

    def test_console_users(self) -> None:
        """admin_users/stats_users must name users some route serves; no route may use a
        console database name."""
        doc = minimal()
        doc["admin_users"] = ["u"]
        doc["stats_users"] = ["nobody", 3]
        self.assertEqual(self.problems(doc), ['stats_users: must be a list of user names, got list'])
        doc["stats_users"] = ["nobody"]
        self.assertEqual(self.problems(doc), [
            'stats_users[0]: no route serves user "nobody", so it has no password to log in to '
            'the console with'])
        doc = minimal(database="pgbouncer")
        self.assertEqual(self.problems(doc), [
            'routes[0].database: "pgbouncer" is the admin console\'s (reserved: odissey, pgbouncer)'])
        doc = minimal(user="*")
        doc["stats_users"] = ["anyone"]
        self.assertEqual(parse(doc).stats_users, ("anyone",))

    def test_stats_and_metrics_keys(self) -> None:
        """stats_period (PgBouncer's default 60 s), log_stats and metrics.listen are read
        and checked with their key paths."""
        cfg = parse(minimal())
        self.assertEqual((cfg.stats_period, cfg.log_stats, cfg.metrics_listen), (60.0, True, None))
        doc = minimal()
        doc.update(stats_period="15s", log_stats=False, metrics={"listen": "tcp:9127:interface=127.0.0.1"})
        cfg = parse(doc)
        self.assertEqual((cfg.stats_period, cfg.log_stats, cfg.metrics_listen),
                         (15.0, False, "tcp:9127:interface=127.0.0.1"))
        doc.update(stats_period="0s", log_stats="yes", metrics={"port": 9127})
        self.assertEqual(self.problems(doc), [
            'stats_period: must be a duration like 60s, got "0s"',
            'log_stats: must be true or false, got "yes"',
            "metrics.port: unknown key (expected one of: listen)",
            "metrics.listen: is required",
        ])


class PeerConfigTests(SynchronousTestCase):
    def problems(self, **top: object) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            parse({**minimal(), **top})
        return caught.exception.problems

    def test_defaults_and_own_entry_skipped(self) -> None:
        """Without peer_id there is no peering; the list may hold this instance's own
        entry, which is skipped; port and connect_timeout have defaults; a host may be
        a unix socket directory."""
        self.assertEqual((parse(minimal()).peer_id, parse(minimal()).peers), (0, {}))
        cfg = parse({**minimal(), "peer_id": 2, "peers": [
            {"id": 1, "host": "10.0.0.1"}, {"id": 2, "host": "10.0.0.2"},
            {"id": 3, "host": "/run/odissey", "port": 7000, "connect_timeout": "250ms"}]})
        self.assertEqual(cfg.peer_id, 2)
        self.assertEqual(sorted(cfg.peers), [1, 3])
        self.assertEqual((cfg.peers[1].port, cfg.peers[1].connect_timeout), (6432, 5.0))
        unix = cfg.peers[3]
        self.assertEqual((unix.is_unix, unix.socket_path, unix.connect_timeout),
                         (True, "/run/odissey/.s.PGSQL.7000", 0.25))
        self.assertEqual(parse({**minimal(), "peer_id": 255}).peers, {})  # alone, for now

    def test_mistakes_named(self) -> None:
        """Duplicate ids, ids out of range, missing hosts, unknown keys and peers
        without peer_id are each named by their key path."""
        self.assertEqual(self.problems(peers=[
            {"id": 1, "host": "a"}, {"id": 1, "host": "b"}, {"id": 256, "host": "c", "weight": 1},
            {"port": 6432}, "d"]), [
            "peers: needs peer_id (this instance's own id among its peers)",
            "peers[1].id: duplicates peers[0].id (1)",
            "peers[2].weight: unknown key (expected one of: id, host, port, connect_timeout)",
            "peers[2].id: must be an integer from 1 to 255, got 256",
            "peers[3].id: is required",
            "peers[3].host: is required",
            'peers[4]: must be a mapping, got "d"',
        ])
        self.assertEqual(self.problems(peer_id=0, peers={"1": "a"}), [
            "peer_id: must be an integer from 1 to 255, got 0",
            "peers: must be a list of peers ({id, host, port}), got dict",
        ])
        self.assertEqual(self.problems(peer_id=1, peers=[{"id": 2, "host": "", "port": 0,
                                                          "connect_timeout": "0s"}]), [
            'peers[0].host: must be a host name or a unix socket directory, got ""',
            "peers[0].port: must be a TCP port number, got 0",
            'peers[0].connect_timeout: must be a duration like 5s, got "0s"',
        ])


class AuthQueryConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """query_user alone turns auth_query on with the schema-qualified default query."""
        auth = parse(minimal(user="*", auth={"method": "scram-sha-256", "query_user": "lookup"})).routes[0].auth
        assert auth.query is not None
        self.assertEqual(auth.query.query, config.DEFAULT_AUTH_QUERY)
        self.assertIn("pg_catalog.pg_shadow", auth.query.query)
        self.assertEqual((auth.query.user, auth.query.password, auth.query.database, auth.query.cache_ttl),
                         ("lookup", None, None, 5.0))
        self.assertIsNone(auth.password)

    def test_mistakes_named(self) -> None:
        """A query without $1, a password beside query_user, query keys without a query
        user and a trust route with a lookup are each refused by key path."""
        def problems(auth: dict) -> list[str]:
            with self.assertRaises(ConfigError) as caught:
                parse(minimal(auth=auth))
            return caught.exception.problems
        self.assertEqual(problems({"method": "md5", "query_user": "l", "query": "SELECT 1"}),
                         ["routes[0].auth.query: must take the user name as the parameter $1 "
                          "(it is never spliced in)"])
        self.assertIn("give either password or query_user",
                      problems({"method": "md5", "query_user": "l", "password": "pw"})[0])
        self.assertEqual(problems({"method": "md5", "password": "pw", "query_database": "x"}),
                         ["routes[0].auth.query_database: needs query_user (the user that runs the lookup)"])
        self.assertIn("nothing to look up", problems({"method": "trust", "query_user": "l"})[0])


class AccessRuleTests(SynchronousTestCase):
    """routes[].clients and routes[].block as the loader reads them; problems named by key path."""

    def problems(self, *bodies: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            routes(*bodies)
        return caught.exception.problems

    def test_clients_parsed(self) -> None:
        """CIDRs, bare addresses and "unix"; mapped IPv6 networks become IPv4; absent is None."""
        got = routes({"clients": ["10.0.0.0/8", "192.0.2.7", "::1", "unix", "::ffff:10.0.0.0/104"]},
                     {"user": "x"})
        self.assertEqual(got[0].clients, (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"),
                                          ipaddress.ip_network("::1/128"), "unix", ipaddress.ip_network("10.0.0.0/8")))
        self.assertIsNone(got[1].clients)
        self.assertEqual((got[0].block, got[0].own_auth), (False, True))

    def test_bad_network_named_by_position(self) -> None:
        """A bad CIDR names routes[i].clients[j] and what was given."""
        found = self.problems({"user": "a"}, {"user": "b"},
                              {"user": "c", "clients": ["10.0.0.300/8", "10.0.0.1/8", "unix", 7, "localhost"]})
        self.assertEqual(len(found), 4, found)
        self.assertTrue(found[0].startswith('routes[2].clients[0]: must be a network like 10.0.0.0/8 or "unix", '
                                            'got "10.0.0.300/8" ('), found)
        self.assertIn("routes[2].clients[1]", found[1])
        self.assertIn("has host bits set", found[1])
        self.assertEqual(found[2], 'routes[2].clients[3]: must be a network like 10.0.0.0/8 or "unix", got 7')
        self.assertIn('routes[2].clients[4]: must be a network like 10.0.0.0/8 or "unix", got "localhost"', found[3])

    def test_clients_must_be_a_non_empty_list(self) -> None:
        """An empty list would serve nobody: refused, saying how to serve everyone."""
        self.assertEqual(self.problems({"clients": []}),
                         ['routes[0].clients: must be a non-empty list of networks like 10.0.0.0/8 or "unix" '
                          '(leave it out to serve every address), got list'])
        self.assertIn("routes[0].clients", self.problems({"clients": "10.0.0.0/8"})[0])

    def test_block_is_a_boolean(self) -> None:
        """block takes true or false; a blocked route without auth asks what it shadows."""
        self.assertEqual(self.problems({"block": "yes"}), ['routes[0].block: must be true or false, got "yes"'])
        blocked = routes({"block": True}, {"user": "x", "block": True, "auth": {"method": "trust"}})
        self.assertEqual([(r.block, r.own_auth) for r in blocked], [(True, False), (True, True)])

    def test_same_pair_with_different_clients(self) -> None:
        """One pair may have several routes, unless a later one could never be chosen."""
        routes({"user": "u", "clients": ["unix"]}, {"user": "u", "clients": ["10.0.0.0/8"]}, {"user": "u"})
        self.assertEqual(self.problems({"user": "u", "clients": ["10.0.0.0/8", "unix"]},
                                       {"user": "u", "clients": ["10.1.0.0/16"]}),
                         ["routes[1]: never used: routes[0] before it already serves every address it lists "
                          "(database '*', user 'u')"])
        self.assertEqual(self.problems({"user": "u"}, {"user": "u", "clients": ["unix"]}),
                         ["routes[1]: never used: routes[0] before it already serves every address it lists "
                          "(database '*', user 'u')"])
        self.assertEqual(self.problems({"user": "u", "clients": ["unix"]}, {"user": "u", "clients": ["::1"]},
                                       {"user": "u", "clients": ["unix", "::1"]}),
                         ["routes[2]: never used: routes[0], routes[1] before it already serve every address it "
                          "lists (database '*', user 'u')"])
