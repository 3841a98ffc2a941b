"""Client parameters: options parsing, differences, and safe SET quoting."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from odissey.params import (
    CODECS,
    Fingerprints,
    differences,
    params_from,
    parse_options,
    quote_ident,
    quote_literal,
    set_query,
    set_statements,
    startup_wants,
)


class ParamsTests(SynchronousTestCase):
    def test_options_switches(self) -> None:
        """``-c a=b``, ``-ca=b`` and ``--a-b=c`` are all understood; escaped spaces kept."""
        self.assertEqual(
            parse_options(r"-c search_path=a\ b -cwork_mem=8MB --statement-timeout=5s -X"),
            [("search_path", "a b"), ("work_mem", "8MB"), ("statement_timeout", "5s")],
        )

    def test_startup_wants(self) -> None:
        """Startup keys become wanted parameters; user/database and read-only ones do not."""
        wants = startup_wants({"user": "u", "database": "d", "application_name": "x",
                               "server_version": "1", "options": "-c TimeZone=UTC"})
        self.assertEqual(wants, [("application_name", "x"), ("TimeZone", "UTC")])

    def test_differences(self) -> None:
        """Only differing values are set; unreported leftovers are reset; names ignore case."""
        wanted = params_from([("TimeZone", "UTC"), ("DateStyle", "ISO, MDY")])
        current = params_from([("timezone", "UTC"), ("DateStyle", "SQL"), ("search_path", "evil")])
        self.assertEqual(
            differences(wanted, current, frozenset({"timezone", "datestyle"})),
            [("DateStyle", "ISO, MDY"), ("search_path", None)],
        )
        self.assertEqual(differences(wanted, dict(wanted), frozenset()), [])

    def test_set_query(self) -> None:
        """One query sets and resets everything, each name and value quoted."""
        self.assertEqual(
            set_query([("TimeZone", "Europe/Paris"), ("my.opt", "a'b\\c"), ("search_path", None)]),
            "SET \"TimeZone\" TO E'Europe/Paris'; SET \"my\".\"opt\" TO E'a''b\\\\c'; "
            "RESET \"search_path\"",
        )

    def test_list_parameters_read_as_from_a_startup_packet(self) -> None:
        """A list parameter (search_path=a,b is two schemas at startup) is set with
        set_config, which reads the value as the startup packet does; SET would take
        'a,b' for one schema name."""
        self.assertEqual(
            set_query([("search_path", "a,b"), ("TimeZone", "UTC")], local=True),
            "SELECT pg_catalog.set_config(E'search_path', E'a,b', true); SET LOCAL \"TimeZone\" TO E'UTC'")

    @given(st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=40))
    def test_literal_never_ends_early(self, value: str) -> None:
        """A quoted value is one literal: no unescaped quote can end it early."""
        quoted = quote_literal(value)
        inner = quoted[2:-1]
        i = 0
        while i < len(inner):
            if inner[i] == "\\":
                i += 2
                continue
            if inner[i] == "'":
                self.assertEqual(inner[i + 1], "'")
                i += 2
                continue
            i += 1
        self.assertEqual(quote_ident('a"b'), '"a""b"')


class EncodingStatementsTests(SynchronousTestCase):
    def test_utf8_server_gets_one_query(self) -> None:
        """A server already in UTF8 gets the changes in one query."""
        current = params_from([("client_encoding", "UTF8")])
        self.assertEqual(set_statements([("x.y", "é")], {}, current), ["SET \"x\".\"y\" TO E'é'"])

    def test_other_encoding_switched_first_and_restored_last(self) -> None:
        """A server left in LATIN1 first gets client_encoding alone, then the changes with
        the client's own encoding set last."""
        current = params_from([("client_encoding", "LATIN1")])
        wanted = params_from([("client_encoding", "LATIN1")])
        first, second = set_statements([("x.y", "é")], wanted, current)
        self.assertEqual(first, "SET client_encoding TO 'UTF8'")
        self.assertTrue(second.endswith("SET \"client_encoding\" TO E'LATIN1'"), second)

    def test_codecs_exist(self) -> None:
        """Every PostgreSQL encoding in the table names a codec Python has."""
        import codecs
        for name in CODECS.values():
            codecs.lookup(name)


class FingerprintTests(SynchronousTestCase):
    def test_equal_sets_share_one_object(self) -> None:
        """Equal parameter sets get the very same fingerprint (compared by identity on
        every attach); a changed set a different one."""
        prints = Fingerprints()
        a = {"timezone": ("TimeZone", "UTC"), "datestyle": ("DateStyle", "ISO, MDY")}
        b = dict(reversed(list(a.items())))
        self.assertIs(prints.of(a), prints.of(b))
        b["timezone"] = ("TimeZone", "Europe/Paris")
        self.assertIsNot(prints.of(a), prints.of(b))
