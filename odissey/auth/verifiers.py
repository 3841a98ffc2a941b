"""Client-facing authentication: prove that a client knows its route's password.

Each verifier is a small exchange: ``start()`` gives the first AuthenticationRequest, then
``receive(body)`` takes the body of each password-type ('p') message the client sends and
returns what to answer and whether the client is now authenticated. A wrong password
raises 28P01. An unknown user goes through the same exchange as a known one (PostgreSQL's
"mock authentication"), so the two cannot be told apart.
"""

from __future__ import annotations

import base64
import hmac
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import scramp
from twisted.internet.defer import Deferred, inlineCallbacks

from odissey.auth.passthrough import Credential, PassThrough, recover_client_key
from odissey.auth.secrets import (
    SCRAM_ITERATIONS,
    InThread,
    ScramSecret,
    ScramSecrets,
    check_cleartext,
    md5_response,
    md5_stored,
    mock_scram_secret,
)
from odissey.config import ClientAuth, Secret
from odissey.entropy import random_bytes
from odissey.wire import errors
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation

SCRAM = "SCRAM-SHA-256"
#: md5 stored forms remembered (routes' users); past it the memory starts afresh.
MAX_REMEMBERED = 1024
_MECHANISM = scramp.ScramMechanism(SCRAM)


@dataclass(frozen=True)
class Step:
    reply: bytes  # messages to send back (may be empty)
    done: bool  # True once the client is authenticated


def password_failed(user: str) -> PoolerError:
    return PoolerError(
        errors.INVALID_PASSWORD, f'password authentication failed for user "{user}"'
    )


class Verifier(ABC):
    """Subclasses say what to ask first and how to judge each answer."""

    def __init__(self, user: str) -> None:
        self.user = user

    @abstractmethod
    def start(self) -> Step:
        """The first message of the exchange (nothing for trust)."""

    @abstractmethod
    def receive(self, body: bytes) -> "Step | Deferred[Step]":
        """Judge one password-type message; raise PoolerError to refuse."""

    def credential(self) -> Credential | None:
        """Once the client is in: what its exchange lets Odissey log in to PostgreSQL
        with in its name (SCRAM pass-through keys, a looked-up md5 secret), if anything."""
        return None


class TrustVerifier(Verifier):
    def start(self) -> Step:
        return Step(b"", True)

    def receive(self, body: bytes) -> Step:
        raise ProtocolViolation("unexpected password message")


class CleartextVerifier(Verifier):
    """A password in the clear, checked by :func:`check_cleartext` (one PBKDF2 in a thread
    whatever the secret, so an unknown user's mock secret costs the same)."""

    def __init__(self, user: str, secret: "Secret | ScramSecret", threads: InThread) -> None:
        super().__init__(user)
        self.secret = secret
        self.threads = threads

    def start(self) -> Step:
        return Step(m.authentication_cleartext(), False)

    @inlineCallbacks
    def receive(self, body: bytes):
        password = m.parse_password(body)
        # An empty password is refused at once, for known and unknown users alike.
        ok = False
        if password:
            ok = yield check_cleartext(self.secret, self.user, password, self.threads)
        if not ok:
            raise password_failed(self.user)
        return Step(b"", True)


class MD5Verifier(Verifier):
    def __init__(self, user: str, secret: Secret, pass_on: bool = False, stored: str | None = None) -> None:
        super().__init__(user)
        #: md5(password + user), as PostgreSQL stores it (``stored``: already known).
        self.stored = stored if stored is not None else md5_stored(secret, user)
        self.salt = random_bytes(4)
        #: An md5 secret looked up for this user answers the server's md5 challenge too.
        self._pass_on = pass_on and secret.kind == "md5"
        self._secret = secret

    def credential(self) -> Credential | None:
        return self._secret if self._pass_on else None

    def start(self) -> Step:
        return Step(m.authentication_md5(self.salt), False)

    def receive(self, body: bytes) -> Step:
        answer = m.parse_password(body)
        if not hmac.compare_digest(answer, md5_response(self.stored, self.salt)):
            raise password_failed(self.user)
        return Step(b"", True)


class ScramVerifier(Verifier):
    """SCRAM-SHA-256 through scramp, adapted to PostgreSQL's empty SCRAM user name.

    libpq sends ``n=`` (the user is in the startup packet); scramp refuses an empty name,
    so it is shown a placeholder and then given back the exact ``client-first-message-bare``
    the client signed, because the proof covers those bytes.
    """

    def __init__(self, user: str, secret: ScramSecret) -> None:
        super().__init__(user)
        self.secret = secret
        self.server = _MECHANISM.make_server(lambda _name: secret.auth_info())
        self.stage = 0
        #: The client's ClientKey, recovered from its proof (SCRAM pass-through).
        self.client_key: bytes | None = None

    def credential(self) -> Credential | None:
        if self.client_key is None:
            return None
        return PassThrough(self.secret, self.client_key)

    def start(self) -> Step:
        return Step(m.authentication_sasl([SCRAM]), False)

    def receive(self, body: bytes) -> Step:
        self.stage += 1
        if self.stage == 1:
            return self._client_first(body)
        if self.stage == 2:
            return self._client_final(body)
        raise ProtocolViolation("unexpected SASL message after authentication")

    def _client_first(self, body: bytes) -> Step:
        mechanism, data = m.parse_sasl_initial_response(body)
        if mechanism != SCRAM:
            raise ProtocolViolation("client selected an invalid SASL authentication mechanism")
        text = _decode(data)
        parts = text.split(",", 2)
        if len(parts) != 3 or parts[0][:1] not in ("n", "y") or parts[1]:
            raise ProtocolViolation("malformed SCRAM message")
        bare = parts[2]
        shown = text
        if bare.startswith("n=,"):
            shown = f"{parts[0]},,n=*,{bare[3:]}"
        try:
            self.server.set_client_first(shown)
            self.server.client_first_bare = bare
            return Step(m.authentication_sasl_continue(self.server.get_server_first().encode()), False)
        except scramp.ScramException:
            raise ProtocolViolation("malformed SCRAM message") from None

    def _client_final(self, body: bytes) -> Step:
        text = _decode(body)
        try:
            self.server.set_client_final(text)
            final = self.server.get_server_final()
        except scramp.ScramException:
            raise password_failed(self.user) from None
        self.client_key = self._recover(text)
        return Step(m.authentication_sasl_final(final.encode()), True)

    def _recover(self, client_final: str) -> bytes | None:
        """The ClientKey behind the proof scramp has just accepted (RFC 5802's
        AuthMessage: client-first-bare, server-first, client-final without its proof)."""
        without_proof, _, proof = client_final.rpartition(",p=")
        server = self.server
        auth_message = f"{server.client_first_bare},{server.server_first},{without_proof}"
        try:
            return recover_client_key(
                self.secret.stored_key, auth_message.encode("utf-8"), base64.b64decode(proof))
        except ValueError:
            return None


class ExpiredVerifier(Verifier):
    """A user whose password has expired (``rolvaliduntil`` in the past): the exchange of
    its real secret runs to the end, then 28P01, as PostgreSQL does, so the right password
    and a wrong one cannot be told apart (CVE-2025-2291)."""

    def __init__(self, inner: Verifier) -> None:
        super().__init__(inner.user)
        self.inner = inner

    def start(self) -> Step:
        return self.inner.start()

    @inlineCallbacks
    def receive(self, body: bytes):
        step = yield self.inner.receive(body)
        if step.done:
            raise password_failed(self.user)
        return step


class CertVerifier(Verifier):
    """``cert`` authentication: the client's certificate, already verified against
    ``tls.ca_file`` during the handshake, must name the user in its CN. No exchange, so
    nothing is asked; refusals are PostgreSQL's 28000 wording."""

    def __init__(self, user: str, common_name: "str | None") -> None:
        super().__init__(user)
        self.common_name = common_name

    def start(self) -> Step:
        if self.common_name is None:
            raise PoolerError(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                              "connection requires a valid client certificate")
        if not hmac.compare_digest(self.common_name.encode(), self.user.encode()):
            raise PoolerError(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                              f'certificate authentication failed for user "{self.user}"')
        return Step(b"", True)

    def receive(self, body: bytes) -> Step:
        raise ProtocolViolation("unexpected password message")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("malformed SCRAM message: not UTF-8") from None


class ClientVerifiers:
    """Makes the verifier for a route's method, or a mock one for an unknown user.

    A mock runs the same verifier class on a secret nobody knows, so it does the same
    work as a known user's wrong password: PBKDF2 in a thread for cleartext, one md5 for
    md5, the SCRAM exchange for SCRAM.
    """

    def __init__(self, threads: InThread) -> None:
        self.threads = threads
        self.scram_secrets = ScramSecrets(threads)
        self._mock_key = os.urandom(32)
        #: auth_query routes: the SCRAM iteration count their lookups last found.
        self._seen_iterations: dict[ClientAuth, int] = {}
        #: (configured secret, user) -> its md5 stored form (see md5_verifier).
        self._md5_stored: dict[tuple[str, str], str] = {}

    def for_route(self, auth: ClientAuth, user: str) -> "Verifier | Deferred[Verifier]":
        """The verifier for a route's own password; a Deferred only while a SCRAM
        secret is being derived (a login's usual path makes none)."""
        if auth.method == "trust":
            return TrustVerifier(user)
        if auth.password is None:  # the loader requires one; without it, nobody gets in
            return self.mock(auth, user)
        if auth.method == "cleartext":
            return CleartextVerifier(user, auth.password, self.threads)
        if auth.method == "md5":
            return self.md5_verifier(user, auth.password)
        return self.scram_secrets.get(auth.password).addCallback(lambda secret: ScramVerifier(user, secret))

    def md5_verifier(self, user: str, secret: Secret) -> MD5Verifier:
        """A route's md5 verifier, with the stored form of its password for this user
        remembered: one md5 per login (the client's answer) instead of two."""
        key = (secret.value, user)
        stored = self._md5_stored.get(key)
        if stored is None:
            if len(self._md5_stored) >= MAX_REMEMBERED:
                self._md5_stored.clear()
            stored = self._md5_stored[key] = md5_stored(secret, user)
        return MD5Verifier(user, secret, stored=stored)

    def for_lookup(self, auth: ClientAuth, user: str, secret: Secret | None, expired: bool) -> Verifier:
        """The verifier for a secret auth_query found (None: no such user, or no usable
        secret): unknown users get the mock exchange, expired ones their real exchange
        and then the same 28P01.

        Like PostgreSQL, an md5 route whose user has a SCRAM secret speaks SCRAM; a
        scram-sha-256 route cannot check an md5 secret, so that user is mocked."""
        verifier: Verifier
        scram = None
        if secret is not None and secret.kind == "scram":
            try:
                scram = ScramSecret.parse(secret.value)
            except ValueError:
                pass
            else:  # unknown users' mocks show the count real users' challenges show
                self._seen_iterations[auth] = scram.iterations
        mock_iterations = self._seen_iterations.get(auth)
        like = auth
        if auth.method == "md5" and mock_iterations is not None:
            # Users with SCRAM secrets get SCRAM on an md5 route: so do unknown ones (as
            # PostgreSQL mocks with its password_encryption).
            like = ClientAuth("scram-sha-256", None)
        if secret is None:
            return self.mock(like, user, mock_iterations)
        if auth.method == "cleartext":
            verifier = CleartextVerifier(user, scram or secret, self.threads)
        elif auth.method == "md5" and secret.kind == "md5":
            verifier = MD5Verifier(user, secret, pass_on=True)
        elif scram is not None:
            verifier = ScramVerifier(user, scram)
        else:  # md5 for SCRAM, a malformed secret, a plain one (PostgreSQL stores none)
            return self.mock(like, user, mock_iterations)
        return ExpiredVerifier(verifier) if expired else verifier

    def mock(self, like: ClientAuth, user: str, iterations: int | None = None) -> Verifier:
        """An exchange that looks like the one ``like`` asks for (its method, and its
        secret's SCRAM iteration count, or ``iterations``) and always ends in 28P01."""
        method = like.method
        if iterations is None:
            iterations = _iterations(like.password)
        if method == "trust":
            raise PoolerError(
                errors.INVALID_AUTHORIZATION_SPECIFICATION, f'role "{user}" does not exist'
            )
        if method == "cleartext":
            return CleartextVerifier(user, mock_scram_secret(self._mock_key, user, iterations), self.threads)
        if method == "md5":
            # 128 random bits as the plain password: hashed like a configured one.
            return MD5Verifier(user, Secret("plain", os.urandom(16).hex()))
        return ScramVerifier(user, mock_scram_secret(self._mock_key, user, iterations))


def _iterations(secret: Secret | None) -> int:
    """The SCRAM iteration count a secret was made with (PostgreSQL's default otherwise)."""
    if secret is not None and secret.kind == "scram":
        try:
            return ScramSecret.parse(secret.value).iterations
        except ValueError:
            pass
    return SCRAM_ITERATIONS
