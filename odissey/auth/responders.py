"""Server-facing authentication: answer whatever PostgreSQL asks, with a route's credentials."""

from __future__ import annotations

import scramp
from twisted.internet.defer import Deferred, succeed

from odissey.auth.passthrough import PassThrough, PassThroughClient
from odissey.auth.secrets import InThread, md5_response, md5_stored
from odissey.config import Secret
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError

SCRAM = "SCRAM-SHA-256"


class ServerAuthenticator:
    """One login's worth of answers to AuthenticationRequest messages.

    ``answer`` returns the bytes to send back (empty when nothing is due). SCRAM's client
    final message needs PBKDF2, which runs in a thread (and hits scramp's shared cache
    when the same password, salt and iteration count were seen before).
    """

    def __init__(
        self, user: str, secret: Secret | None, threads: InThread, passthrough: PassThrough | None = None
    ) -> None:
        self.user = user
        self.secret = secret
        self.passthrough = passthrough
        self._threads = threads
        self._scram: scramp.ScramClient | None = None
        self._relayed: PassThroughClient | None = None

    def answer(self, code: int, payload: bytes) -> "Deferred[bytes]":
        if code == m.AUTH_OK:
            return succeed(b"")
        if code == m.AUTH_CLEARTEXT:
            return succeed(m.password_message(m.cstring(self._plain("password"))))
        if code == m.AUTH_MD5:
            stored = md5_stored(self._needed("md5"), self.user)
            return succeed(m.password_message(md5_response(stored, payload) + b"\0"))
        if code == m.AUTH_SASL:
            mechanisms = m.parse_sasl_mechanisms(payload)
            if SCRAM not in mechanisms:
                raise self._refuse(f"server offers no supported SASL mechanism ({', '.join(mechanisms)})")
            if self.passthrough is not None and (self.secret is None or self.secret.kind != "plain"):
                self._relayed = PassThroughClient(self.passthrough)
                return succeed(m.sasl_initial_response(SCRAM, self._relayed.first()))
            self._scram = scramp.ScramClient([SCRAM], self.user or "*", self._plain("SCRAM-SHA-256"))
            first = self._scram.get_client_first()
            return succeed(m.sasl_initial_response(SCRAM, first.encode()))
        if self._relayed is not None and code in (m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL):
            return succeed(self._pass_through(code, payload))
        if code == m.AUTH_SASL_CONTINUE and self._scram is not None:
            client = self._scram
            try:
                client.set_server_first(payload.decode())
            except (scramp.ScramException, UnicodeDecodeError) as exc:
                raise self._refuse(f"invalid SCRAM message from server: {exc}") from None
            return self._threads(client.get_client_final).addCallback(
                lambda final: m.password_message(final.encode())
            )
        if code == m.AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.set_server_final(payload.decode())
            except (scramp.ScramException, UnicodeDecodeError):
                raise self._refuse("server's SCRAM signature is invalid") from None
            return succeed(b"")
        raise self._refuse(f"server asked for an unsupported authentication method ({code})")

    def _pass_through(self, code: int, payload: bytes) -> bytes:
        """SCRAM with the ClientKey a client's proof gave (auth/passthrough.py)."""
        relayed = self._relayed
        assert relayed is not None
        try:
            if code == m.AUTH_SASL_CONTINUE:
                return m.password_message(relayed.final(payload))
            relayed.check(payload)
            return b""
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._refuse(f"SCRAM pass-through for user \"{self.user}\": {exc}") from None

    def _needed(self, method: str) -> Secret:
        if self.secret is None:
            if self.passthrough is not None:
                raise self._refuse(
                    f"server asked for {method} authentication, but SCRAM pass-through needs "
                    f"PostgreSQL to authenticate user \"{self.user}\" with scram-sha-256"
                )
            raise self._refuse(
                f"server asked for {method} authentication but the route has no server password"
                " (SCRAM pass-through lends a client's key only after a client of this pool has"
                " logged in with SCRAM, and only to log in as that same user)"
            )
        return self.secret

    def _plain(self, method: str) -> str:
        secret = self._needed(method)
        if secret.kind != "plain":
            raise self._refuse(
                f"server asked for {method} authentication, which an md5 hash cannot answer; "
                "configure the plain server password"
            )
        return secret.value

    @staticmethod
    def _refuse(text: str) -> PoolerError:
        return PoolerError(errors.CONNECTION_FAILURE, f"server login failed: {text}")
