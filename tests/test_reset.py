"""The reset policy against fake backends: what a server goes through after its client
leaves, before anyone else may use it, and when it is closed instead."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from odissey.server import ServerState
from odissey.wire import messages as m
from tests.test_relay import attached, relay_setup


class ResetTests(SynchronousTestCase):
    def test_open_transaction_rolled_back(self) -> None:
        """A client gone inside a transaction: ROLLBACK, then the server is pooled."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("BEGIN"))
        relay.clientGone()
        backends.flush()
        self.assertEqual(backends[0].queries(), ["BEGIN", "ROLLBACK"])
        self.assertEqual(pool.idle, [backends[0].server])

    def test_copy_failed_and_synced(self) -> None:
        """A client gone during COPY FROM STDIN: CopyFail + Sync, then the server is pooled."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("COPY t FROM STDIN"))
        relay.clientData(m.message(b"d", b"1\tone\n"))
        relay.clientGone()
        backends.flush()
        self.assertEqual(backends[0].kinds(), b"QdfS")
        self.assertEqual(pool.idle, [backends[0].server])

    def test_running_query_cancelled_and_settled_before_release(self) -> None:
        """A client gone mid-query: a cancel is sent at once, and the server returns to the
        pool only after PostgreSQL closed the cancel connection and a Sync came back."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("SELECT pg_sleep(10)"))
        backend = backends[0]
        relay.clientGone()
        packet = backend.accept_cancel(close=False)
        self.assertEqual(packet, m.cancel_request(*backend.key))
        backend.flush()
        self.assertEqual(pool.idle, [])
        self.assertNotIn(b"S", backend.kinds())
        backend.close_cancel()  # PostgreSQL has signalled the backend: one round trip now
        backend.flush()
        self.assertEqual(backend.kinds(), b"QS")
        self.assertEqual(pool.idle, [backend.server])

    def test_cancel_of_unknown_fate_closes_the_server(self) -> None:
        """A cancel whose connection PostgreSQL never closed may land later: the server is
        closed rather than reused."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("SELECT pg_sleep(10)"))
        backend = backends[0]
        relay.clientGone()
        backend.accept_cancel(close=False)
        reactor.advance(2)  # the storage's connect_timeout: we give up waiting
        backend.flush()
        self.assertEqual(backend.server.state, ServerState.CLOSED)
        self.assertEqual(pool.total, 0)

    def test_unsynced_extended_messages_close_the_server(self) -> None:
        """A client gone after Parse/Bind/Execute without Sync: the server is closed."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("select 1"))
        relay.clientData(m.message(b"P", b"\0select 1\0\0\0") + m.message(b"B", b"\0\0\0\0\0\0\0\0")
                         + m.message(b"E", b"\0\0\0\0\0"))
        backends.flush()
        relay.clientGone()
        backends.flush()
        self.assertEqual(backends[0].server.state, ServerState.CLOSED)
        self.assertTrue(backends[0].transport.disconnected)
        self.assertEqual(pool.total, 0)

    def test_timeout_closes_the_server(self) -> None:
        """A ROLLBACK that never completes within reset_timeout closes the server."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("BEGIN"))
        backend = backends[0]
        relay.clientGone()  # the ROLLBACK is sent, and never answered
        self.assertEqual(backend.server.state, ServerState.QUERY)
        reactor.advance(5)
        backend.flush()
        self.assertEqual(backend.server.state, ServerState.CLOSED)
        self.assertEqual(pool.total, 0)

    def test_failed_batch_then_goodbye_is_synced(self) -> None:
        """A failing Parse/Bind/Execute, a Query and Terminate in one write: the error
        leaves the server discarding until a Sync, so the drain sends one before the
        server is pooled."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("select 1"))
        relay.clientData(m.message(b"P", b"\0select 1/0\0\0\0") + m.message(b"B", b"\0\0\0\0\0\0\0\0")
                         + m.message(b"E", b"\0\0\0\0\0") + m.query("select 2") + m.terminate())
        relay.clientGone()
        backends.flush()
        self.assertEqual(backends[0].kinds()[-1:], b"S")
        self.assertEqual(pool.idle, [backends[0].server])
