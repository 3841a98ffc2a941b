"""Parameters carried to a server that another client left in its own client_encoding:
sent so that their bytes are read in the encoding they were written in."""

from __future__ import annotations

from typing import Any

import psycopg
from twisted.internet.defer import inlineCallbacks

from tests.harness import IntegrationTest, direct, route

CAFE = "caf\u00e9"
#: UTF-8 of "Á" ends in 0x81, an SJIS lead byte: read as SJIS it swallows the backslash
#: that quoting doubled, and ``\'`` (allowed by backslash_quote = on) ends the literal.
CRAFTED = "\u00c1\\'; CREATE TABLE pwned_by_sjis (); --"


class EncodingTests(IntegrationTest):
    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "transaction", "size": 1})]

    def leave_server_in(self, encoding: str, **startup: str) -> None:
        """A client in ``encoding`` uses the only server, leaving it in that encoding."""
        with psycopg.connect(self.odissey.dsn(client_encoding=encoding, **startup), autocommit=True) as conn:
            self.assertEqual(conn.execute("show client_encoding").fetchone()[0], encoding)

    def custom_setting(self) -> str:
        """A UTF-8 client whose startup asks for a non-ASCII custom setting reads it back."""
        dsn = self.odissey.dsn(options=f"-c odissey.tag={CAFE}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            return str(conn.execute("select current_setting('odissey.tag')").fetchone()[0])

    @inlineCallbacks
    def test_after_latin1_sjis_and_euc_jp_clients(self):
        """After a LATIN1, SJIS or EUC_JP client used the server, café comes back as café."""
        for encoding in ("LATIN1", "SJIS", "EUC_JP"):
            yield self.thread(self.leave_server_in, encoding)
            self.assertEqual((yield self.thread(self.custom_setting)), CAFE, encoding)

    @inlineCallbacks
    def test_no_injection_through_sjis(self):
        """A crafted application_name cannot end its quoted literal on a server left in SJIS
        with backslash_quote = on: no statement of its own runs."""
        yield self.thread(self.leave_server_in, "SJIS", options="-c backslash_quote=on")

        def crafted_login() -> str:
            with psycopg.connect(self.odissey.dsn(application_name=CRAFTED), autocommit=True) as conn:
                return str(conn.execute("select current_setting('application_name')").fetchone()[0])

        name = yield self.thread(crafted_login)
        with direct() as su:
            found = su.execute("select count(*) from pg_class where relname = 'pwned_by_sjis'").fetchone()[0]
        self.assertEqual(found, 0)
        self.assertTrue(name.endswith("; CREATE TABLE pwned_by_sjis (); --"), name)
