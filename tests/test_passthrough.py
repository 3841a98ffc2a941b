"""SCRAM pass-through without a network: the ClientKey math on RFC 7677's example, the
verifier recovering a client's key, and the server-side exchange made from it."""

from __future__ import annotations

import base64
import hashlib
import hmac

import scramp
from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import TestCase

from odissey.auth.passthrough import (
    PassThrough,
    PassThroughClient,
    client_proof,
    recover_client_key,
    server_signature,
)
from odissey.auth.responders import ServerAuthenticator
from odissey.auth.secrets import ScramSecret
from odissey.auth.verifiers import ClientVerifiers, ExpiredVerifier, ScramVerifier
from odissey.config import ClientAuth, Secret
from odissey.testing import in_this_thread
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError
from tests.test_auth import body_of, libpq_scram, scram_text

# RFC 7677, section 3: user "user", password "pencil".
RFC_FIRST_BARE = "n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_FINAL_WITHOUT_PROOF = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_PROOF = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_SIGNATURE = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
RFC_AUTH_MESSAGE = f"{RFC_FIRST_BARE},{RFC_SERVER_FIRST},{RFC_FINAL_WITHOUT_PROOF}".encode()


def keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) straight from RFC 5802."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, hashlib.sha256(client_key).digest(), server_key


class ClientKeyMathTests(TestCase):
    def setUp(self) -> None:
        self.client_key, self.stored_key, self.server_key = keys(
            b"pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)

    def test_rfc7677_proof_gives_back_the_client_key(self) -> None:
        """The ClientKey recovered from RFC 7677's proof is the one its password makes."""
        self.assertEqual(recover_client_key(self.stored_key, RFC_AUTH_MESSAGE, RFC_PROOF), self.client_key)

    def test_rfc7677_proof_and_signature_remade(self) -> None:
        """From the ClientKey and the secret alone, RFC 7677's proof and server signature are made again."""
        self.assertEqual(client_proof(self.client_key, self.stored_key, RFC_AUTH_MESSAGE), RFC_PROOF)
        self.assertEqual(server_signature(self.server_key, RFC_AUTH_MESSAGE), RFC_SERVER_SIGNATURE)

    def test_wrong_proof_recovers_nothing(self) -> None:
        """A proof for another message (or a forged one) is refused, never kept."""
        self.assertRaises(ValueError, recover_client_key, self.stored_key, RFC_AUTH_MESSAGE + b"x", RFC_PROOF)
        self.assertRaises(ValueError, recover_client_key, self.stored_key, RFC_AUTH_MESSAGE, RFC_PROOF[:-1])


SALT = b"0123456789abcdef"


class VerifierRecoveryTests(TestCase):
    def test_scram_login_leaves_the_client_key(self) -> None:
        """A libpq-style SCRAM login leaves the pass-through keys of that user; a failed one none."""
        secret = ScramSecret.parse(scram_text(b"pw", SALT, 4096))
        verifier = ScramVerifier("u", secret)
        self.assertTrue(libpq_scram(verifier, "pw"))
        self.assertEqual(verifier.credential(), PassThrough(secret, keys(b"pw", SALT, 4096)[0]))
        refused = ScramVerifier("u", secret)
        self.assertFalse(libpq_scram(refused, "wrong"))
        self.assertIsNone(refused.credential())

    def test_expired_user_refused_with_the_right_password(self) -> None:
        """An expired user goes through its real exchange and gets 28P01 even when right."""
        verifier = ClientVerifiers(in_this_thread).for_lookup(
            ClientAuth("scram-sha-256", None), "u", Secret("scram", scram_text(b"pw", SALT, 4096)), expired=True)
        self.assertIsInstance(verifier, ExpiredVerifier)
        self.assertEqual(verifier.start().reply, m.authentication_sasl(["SCRAM-SHA-256"]))
        client = scramp.ScramClient(["SCRAM-SHA-256"], "placeholder", "pw")
        first = client.get_client_first().replace("n=placeholder,", "n=,")
        client.client_first_bare = first[3:]
        step = self.successResultOf(maybeDeferred(
            verifier.receive, body_of(m.sasl_initial_response("SCRAM-SHA-256", first.encode()))))
        client.set_server_first(m.parse_authentication(body_of(step.reply))[1].decode())
        final = body_of(m.password_message(client.get_client_final().encode()))
        error = self.failureResultOf(maybeDeferred(verifier.receive, final), PoolerError).value
        self.assertEqual((error.sqlstate, error.message), ("28P01", 'password authentication failed for user "u"'))

    def test_lookup_of_nobody_is_the_mock(self) -> None:
        """No secret found: the same SCRAM challenge as anyone, then 28P01."""
        verifier = ClientVerifiers(in_this_thread).for_lookup(ClientAuth("scram-sha-256", None), "ghost", None, False)
        self.assertEqual(verifier.start().reply, m.authentication_sasl(["SCRAM-SHA-256"]))
        self.assertFalse(libpq_scram(verifier, "anything"))  # type: ignore[arg-type]


    def test_unknown_user_mocked_like_the_found_ones(self) -> None:
        """On an md5 auth_query route whose users have 10,000-iteration SCRAM secrets, an
        unknown user is challenged with SCRAM and 10,000 iterations too (as PostgreSQL
        mocks with its password_encryption)."""
        verifiers = ClientVerifiers(in_this_thread)
        auth = ClientAuth("md5", None)
        known = verifiers.for_lookup(auth, "u", Secret("scram", scram_text(b"pw", SALT, 10000)), False)
        ghost = verifiers.for_lookup(auth, "ghost", None, False)
        for verifier in (known, ghost):
            self.assertEqual(verifier.start().reply, m.authentication_sasl(["SCRAM-SHA-256"]))
            step = verifier.receive(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abcdefgh")[5:])
            self.assertIn(b",i=10000", step.reply)  # type: ignore[union-attr]


class PassThroughExchangeTests(TestCase):
    def exchange(self, server_secret: ScramSecret, held: PassThrough) -> PoolerError | None:
        """Odissey's ServerAuthenticator (pass-through) against Odissey's own SCRAM
        verifier standing for PostgreSQL; the refusal, if any."""
        postgres = ScramVerifier("u", server_secret)
        auth = ServerAuthenticator("u", None, in_this_thread, held)
        reply = self.successResultOf(maybeDeferred(auth.answer, m.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
        try:
            step = postgres.receive(body_of(reply))
            code, payload = m.parse_authentication(body_of(step.reply))
            reply = self.successResultOf(maybeDeferred(auth.answer, code, payload))
            step = postgres.receive(body_of(reply))
        except PoolerError as exc:
            return exc
        code, payload = m.parse_authentication(body_of(step.reply))
        self.assertEqual(code, m.AUTH_SASL_FINAL)
        done = maybeDeferred(auth.answer, code, payload)
        if self.successResultOf(done) != b"":
            raise AssertionError("nothing is due after the server's final message")
        self.assertTrue(step.done)
        return None

    def test_same_secret_logs_in(self) -> None:
        """With the ClientKey of a secret, Odissey logs in to a server holding that secret
        and checks the server's signature."""
        secret = ScramSecret.parse(scram_text(b"pw", SALT, 4096))
        self.assertIsNone(self.exchange(secret, PassThrough(secret, keys(b"pw", SALT, 4096)[0])))

    def test_other_salt_is_a_clear_error(self) -> None:
        """A server whose secret has another salt gets no proof: 08006 saying why."""
        ours = ScramSecret.parse(scram_text(b"pw", SALT, 4096))
        theirs = ScramSecret.parse(scram_text(b"pw", b"fedcba9876543210", 4096))
        held = PassThrough(ours, keys(b"pw", SALT, 4096)[0])
        postgres = ScramVerifier("u", theirs)
        auth = ServerAuthenticator("u", None, in_this_thread, held)
        first = self.successResultOf(maybeDeferred(auth.answer, m.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
        code, payload = m.parse_authentication(body_of(postgres.receive(body_of(first)).reply))
        error = self.failureResultOf(maybeDeferred(auth.answer, code, payload), PoolerError).value
        self.assertEqual(error.sqlstate, "08006")
        self.assertIn("same SCRAM secret", error.message)

    def test_forged_server_signature_is_refused(self) -> None:
        """A server that does not know the secret cannot fake its final signature."""
        secret = ScramSecret.parse(scram_text(b"pw", SALT, 4096))
        client = PassThroughClient(PassThrough(secret, keys(b"pw", SALT, 4096)[0]), nonce=b"n" * 18)
        client.first()
        client.final(f"r={client.nonce}xyz,s={base64.b64encode(SALT).decode()},i=4096".encode())
        self.assertRaises(ValueError, client.check, b"v=" + base64.b64encode(b"\0" * 32))

    def test_md5_request_explains_passthrough(self) -> None:
        """A server that asks md5 of a pass-through login gets a sentence naming the cause."""
        secret = ScramSecret.parse(scram_text(b"pw", SALT, 4096))
        auth = ServerAuthenticator("u", None, in_this_thread, PassThrough(secret, b"k" * 32))
        error = self.failureResultOf(maybeDeferred(auth.answer, m.AUTH_MD5, b"salt"), PoolerError).value
        self.assertIn("SCRAM pass-through needs PostgreSQL to authenticate", error.message)
