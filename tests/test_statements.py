"""The prepared-statement layer on bytes: client chunks rewritten for a server, server
replies edited for the client, with the transaction tracker between them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from odissey.server import SERVER_COLLECT
from odissey.statements import COLLECT, NO_SUCH_STATEMENT, SCRATCH, Registry, ServerStatements, Statements
from odissey.transaction import CLIENT_WATCH, SERVER_WATCH, Transaction
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError
from odissey.wire.scanner import Scanner


def parse(name: bytes, sql: bytes) -> bytes:
    return m.parse(name, sql + b"\0\0\0")


def bind(name: bytes) -> bytes:
    return m.bind(b"", name, b"\0\0\0\0\0\0")


EXECUTE = m.message(b"E", b"\0\0\0\0\0")
BIND_COMPLETE = m.message(b"2")
#: The server's error for a Describe of Odissey's missing statement (a client's unknown name).
UNDEFINED = m.error_response(PoolerError(
    "26000", 'prepared statement "ODISSEY_NONE" does not exist', severity="ERROR"))


def messages(stream: bytes) -> list[bytes]:
    """A stream cut into its messages."""
    out, pos = [], 0
    while pos < len(stream):
        end = pos + 1 + int.from_bytes(stream[pos + 1:pos + 5], "big")
        out.append(stream[pos:end])
        pos = end
    return out


class Link:
    """One client's Statements in front of one server's cache, fed like the relay does."""

    def __init__(self, registry: Registry | None = None, server: ServerStatements | None = None) -> None:
        self.tx = Transaction()
        self.statements = Statements(registry or Registry(10), self.tx)
        self.statements.server = server or ServerStatements()
        self.scanner = Scanner(watch=CLIENT_WATCH, collect=COLLECT, strict=True)
        self.replies = Scanner(watch=SERVER_WATCH, collect=SERVER_COLLECT)

    def send(self, data: bytes) -> bytes:
        events = self.scanner.feed(data)
        partial = self.scanner.in_message()
        out, view = self.statements.client(data, events, partial is not None and partial[0] in COLLECT)
        self.tx.client(view, len(out))
        self.tx.settle()
        return out

    def immediate(self) -> bytes:
        out, self.statements.immediate = b"".join(self.statements.immediate), []
        return out

    def receive(self, data: bytes) -> bytes:
        events = self.replies.feed(data)
        data, events = self.statements.begin(data, events)
        self.tx.server(events)
        partial = self.replies.in_message()
        return self.statements.finish(partial[0] if partial else None, self.replies.kept())


class RewriteTests(unittest.TestCase):
    def test_named_parse_gets_odissey_name_and_later_is_answered_here(self):
        registry = Registry(10)
        server = ServerStatements()
        first = Link(registry, server)
        sent = first.send(parse(b"s1", b"select 1") + m.sync())
        name = registry.statement(b"select 1\0\0\0").name
        self.assertEqual(messages(sent), [parse(name, b"select 1"), m.sync()])
        first.receive(m.PARSE_COMPLETE + m.ready_for_query())
        second = Link(registry, server)  # another client, same text, same server
        self.assertEqual(second.send(parse(b"mine", b"select 1")), b"")
        self.assertEqual(second.immediate(), m.PARSE_COMPLETE)
        self.assertEqual(messages(second.send(bind(b"mine") + EXECUTE + m.sync())),
                         [bind(name), EXECUTE, m.sync()])
        self.assertEqual(registry.server_parses, 1)
        self.assertEqual(registry.client_parses, 2)

    def test_bind_on_a_server_without_the_statement_prepares_it_first(self):
        registry = Registry(10)
        link = Link(registry)
        link.send(parse(b"s", b"select 2") + m.sync())
        link.receive(m.PARSE_COMPLETE + m.ready_for_query())
        link.statements.server = ServerStatements()  # the next transaction lands elsewhere
        name = registry.statement(b"select 2\0\0\0").name
        sent = link.send(bind(b"s") + EXECUTE + m.sync())
        self.assertEqual(messages(sent), [parse(name, b"select 2"), bind(name), EXECUTE, m.sync()])
        # The injected Parse's reply is dropped, the rest reaches the client untouched.
        answer = m.PARSE_COMPLETE + BIND_COMPLETE + m.command_complete(b"SELECT 1") + m.ready_for_query()
        self.assertEqual(link.receive(answer), answer[5:])
        self.assertFalse(link.tx.pending)

    def test_unknown_and_duplicate_names_fail_on_the_server_with_postgresqls_error(self):
        link = Link()
        sent = link.send(bind(b"nope") + EXECUTE + m.sync())
        self.assertEqual(messages(sent), [m.describe(b"S", NO_SUCH_STATEMENT), EXECUTE, m.sync()])
        server_error = m.error_response(PoolerError(
            "26000", 'prepared statement "ODISSEY_NONE" does not exist', severity="ERROR"))
        out = link.receive(server_error + m.ready_for_query())
        fields = m.parse_error_fields(out[5:out.index(b"Z")])
        self.assertEqual((fields["C"], fields["M"]), ("26000", 'prepared statement "nope" does not exist'))
        link.send(parse(b"x", b"select 1") + m.sync())
        link.receive(m.PARSE_COMPLETE + m.ready_for_query())
        # PostgreSQL parses the query before it finds the name taken: so does the server,
        # twice under a scratch name, and the second Parse's error is reworded.
        sent = link.send(parse(b"x", b"select 1") + m.sync())
        self.assertEqual(messages(sent), [m.close(b"S", SCRATCH), parse(SCRATCH, b"select 1"),
                                          parse(SCRATCH, b"select 1"), m.sync()])
        taken = m.error_response(PoolerError(
            "42P05", 'prepared statement "ODISSEY_SCRATCH" already exists', severity="ERROR"))
        out = link.receive(m.CLOSE_COMPLETE + m.PARSE_COMPLETE + taken + m.ready_for_query())
        self.assertTrue(out.startswith(b"E"), out)
        self.assertIn(b'prepared statement "x" already exists', out)
        self.assertNotIn(b"SCRATCH", out)

    def test_eviction_spares_statements_of_the_current_attachment(self):
        registry = Registry(2)
        server = ServerStatements()
        link = Link(registry, server)
        for i in range(2):
            link.send(parse(b"s%d" % i, b"select %d" % i) + m.sync())
            link.receive(m.PARSE_COMPLETE + m.ready_for_query())
        # Same attachment: nothing may be closed, the cache grows past its size.
        link.send(parse(b"s2", b"select 2") + m.sync())
        link.receive(m.PARSE_COMPLETE + m.ready_for_query())
        self.assertEqual(len(server.prepared), 3)
        server.epoch += 1  # a later attachment
        sent = messages(link.send(parse(b"s3", b"select 3") + m.sync()))
        self.assertEqual([msg[:1] for msg in sent], [b"C", b"C", b"P", b"S"])
        out = link.receive(m.CLOSE_COMPLETE * 2 + m.PARSE_COMPLETE + m.ready_for_query())
        self.assertEqual(out, m.PARSE_COMPLETE + m.ready_for_query())
        self.assertEqual(len(server.prepared), 2)

    def test_a_skipped_parse_is_undone(self):
        """An error earlier in the batch makes the server skip a Parse: neither the client
        nor the server has the statement afterwards."""
        link = Link()
        link.send(bind(b"") + EXECUTE + parse(b"late", b"select 1") + m.sync())
        link.receive(m.error_response(PoolerError(
            "26000", "unnamed prepared statement does not exist", severity="ERROR")) + m.ready_for_query())
        self.assertNotIn(b"late", link.statements.named)
        self.assertEqual(len(link.statements.server.prepared), 0)  # type: ignore[union-attr]

    def test_a_skipped_unnamed_parse_does_not_outlive_a_later_simple_query(self):
        """A Parse of the unnamed statement skipped after an error, and a simple query
        sent after the Sync: the client has no unnamed statement (the query dropped it,
        whatever the undo of the Parse would give back), so its next Bind fails."""
        link = Link()
        link.send(parse(b"", b"select 1") + bind(b"zz") + parse(b"", b"select 2") + m.sync()
                  + m.query("select 3"))
        link.receive(m.PARSE_COMPLETE + UNDEFINED + m.ready_for_query()
                     + m.command_complete(b"SELECT 1") + m.ready_for_query())
        self.assertIsNone(link.statements.unnamed)
        sent = link.send(bind(b"") + EXECUTE + m.sync())
        self.assertEqual(messages(sent), [m.close(b"S", b""), bind(b""), EXECUTE, m.sync()])

    def test_a_skipped_deallocate_does_not_give_back_the_unnamed_statement_past_a_later_query(self):
        """A DEALLOCATE of a name parsed in the same batch (answered by Odissey) skipped
        after an error, then a simple query: no unnamed statement either."""
        link = Link()
        link.send(parse(b"a", b"select 1") + parse(b"", b"select 2") + bind(b"zz")
                  + m.query("deallocate a") + m.sync() + m.query("select 3"))
        link.receive(m.PARSE_COMPLETE * 2 + UNDEFINED + m.ready_for_query()
                     + m.command_complete(b"SELECT 1") + m.ready_for_query())
        self.assertIsNone(link.statements.unnamed)
        self.assertIn(b"a", link.statements.named)  # the DEALLOCATE never ran
        sent = link.send(bind(b"") + EXECUTE + m.sync())
        self.assertEqual(messages(sent), [m.close(b"S", b""), bind(b""), EXECUTE, m.sync()])

    def test_a_skipped_unnamed_parse_leaves_the_one_before(self):
        """With no simple query in between, a skipped Parse of the unnamed statement
        leaves the client the one it had."""
        link = Link()
        link.send(parse(b"", b"select 1") + m.sync())
        link.receive(m.PARSE_COMPLETE + m.ready_for_query())
        link.send(bind(b"zz") + parse(b"", b"select 2") + m.sync())
        link.receive(UNDEFINED + m.ready_for_query())
        self.assertEqual(link.statements.unnamed, b"select 1\0\0\0")

    def test_a_refused_unnamed_parse_leaves_no_unnamed_statement(self):
        """PostgreSQL drops the unnamed statement before it parses a new one: after a
        Parse it refuses, the client has none."""
        link = Link()
        link.send(parse(b"", b"select 1") + m.sync())
        link.receive(m.PARSE_COMPLETE + m.ready_for_query())
        link.send(parse(b"", b"selec 1") + m.sync())
        link.receive(m.error_response(PoolerError("42601", "syntax error", severity="ERROR")) + m.ready_for_query())
        self.assertIsNone(link.statements.unnamed)
        sent = link.send(bind(b"") + EXECUTE + m.sync())
        self.assertEqual(messages(sent), [m.close(b"S", b""), bind(b""), EXECUTE, m.sync()])

    def test_a_bind_pipelined_behind_a_batch_that_may_skip_its_parse_parses_again(self):
        """A Parse of the unnamed statement that an error before it in its batch would
        skip, and a Bind of it pipelined behind that batch's Sync: the Parse is sent
        again before the Bind, which otherwise would bind what the server held before
        (here another client's statement)."""
        registry = Registry(10)
        server = ServerStatements()
        other = Link(registry, server)
        other.send(parse(b"", b"select 42") + m.sync())
        other.receive(m.PARSE_COMPLETE + m.ready_for_query())
        link = Link(registry, server)
        sent = link.send(bind(b"zz") + parse(b"", b"select 1") + m.sync() + bind(b"") + EXECUTE + m.sync())
        self.assertEqual(messages(sent), [
            m.describe(b"S", NO_SUCH_STATEMENT), parse(b"", b"select 1"), m.sync(),
            parse(b"", b"select 1"), bind(b""), EXECUTE, m.sync()])

    def test_a_bind_behind_a_parse_that_cannot_be_skipped_goes_as_it_came(self):
        """A Parse sent with nothing unanswered before it (nothing can make the server
        skip it), or a Bind in the Parse's own batch: the Bind is sent alone (if the
        Parse fails, PostgreSQL's answer is the server's own)."""
        link = Link()
        sent = link.send(parse(b"", b"select 1") + m.sync() + bind(b"") + EXECUTE + m.sync()
                         + bind(b"zz") + parse(b"", b"select 2") + bind(b"") + EXECUTE + m.sync())
        self.assertEqual(messages(sent), [
            parse(b"", b"select 1"), m.sync(), bind(b""), EXECUTE, m.sync(),
            m.describe(b"S", NO_SUCH_STATEMENT), parse(b"", b"select 2"), bind(b""), EXECUTE, m.sync()])

    def test_a_close_skipped_after_deallocate_all_gives_back_a_name_parsed_after_it(self):
        """DEALLOCATE ALL, then a Parse, an error and a Close of the new name in the
        same batch: the Close was skipped, so the client keeps the name."""
        registry = Registry(10)
        link = Link(registry)
        link.send(m.query("deallocate all") + parse(b"c", b"select 1") + bind(b"zz")
                  + m.close(b"S", b"c") + m.sync())
        link.receive(m.command_complete(b"DEALLOCATE ALL") + m.ready_for_query()
                     + m.PARSE_COMPLETE + UNDEFINED + m.ready_for_query())
        statement = registry.statement(b"select 1\0\0\0")
        self.assertIs(link.statements.named.get(b"c"), statement)
        self.assertIn(statement.name, link.statements.server.prepared)
        self.assertEqual(messages(link.send(m.describe(b"S", b"c") + m.sync())),
                         [m.describe(b"S", statement.name), m.sync()])

    def test_reply_cut_by_a_read_is_still_dropped(self):
        link = Link()
        link.send(parse(b"s", b"select 5") + m.sync())
        link.receive(m.PARSE_COMPLETE + m.ready_for_query())
        link.statements.server = ServerStatements()
        link.send(bind(b"s") + EXECUTE + m.sync())
        answer = m.PARSE_COMPLETE + BIND_COMPLETE + m.command_complete(b"SELECT 1") + m.ready_for_query()
        got = link.receive(answer[:3]) + link.receive(answer[3:])
        self.assertEqual(got, answer[5:])


class ChunkingTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=30))
    def test_rewriting_does_not_depend_on_how_the_stream_is_cut(self, cuts):
        """However a client's stream arrives, what reaches the server is the same."""
        stream = (parse(b"a", b"select 1") + bind(b"a") + EXECUTE + parse(b"", b"select 2")
                  + bind(b"") + EXECUTE + m.close(b"S", b"a") + m.query("select 3") + m.sync())
        registry = Registry(10)
        whole = Link(registry).send(stream)
        link = Link(registry)
        out, pos = b"", 0
        for size in cuts:
            out += link.send(stream[pos:pos + size])
            pos += size
        out += link.send(stream[pos:])
        self.assertEqual(out, whole)
