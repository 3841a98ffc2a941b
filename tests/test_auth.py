"""Auth without a network: verifiers judged by real SCRAM/md5 clients, and responders."""

from __future__ import annotations

import base64

import scramp
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.trial.unittest import TestCase

from odissey.auth.responders import ServerAuthenticator
from odissey.auth.secrets import ScramSecret, check_cleartext, derive_scram_secret, md5_hash, md5_response
from odissey.auth.verifiers import ClientVerifiers, MD5Verifier, ScramVerifier
from odissey.config import ClientAuth, Secret
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation
from odissey.wire.scanner import Scanner


def body_of(message: bytes) -> bytes:
    (event,) = Scanner(collect_all=True).feed(message)
    return event[1] or b""


def libpq_scram(verifier: ScramVerifier, password: str) -> bool:
    """Drive a verifier the way libpq does (empty SCRAM user name); True if accepted."""
    client = scramp.ScramClient(["SCRAM-SHA-256"], "placeholder", password)
    first = client.get_client_first().replace("n=placeholder,", "n=,")
    client.client_first_bare = first[3:]
    step = verifier.receive(body_of(m.sasl_initial_response("SCRAM-SHA-256", first.encode())))
    code, payload = m.parse_authentication(body_of(step.reply))
    assert code == m.AUTH_SASL_CONTINUE
    client.set_server_first(payload.decode())
    final = client.get_client_final()
    try:
        step = verifier.receive(body_of(m.password_message(final.encode())))
    except PoolerError as exc:
        assert exc.sqlstate == "28P01"
        return False
    code, payload = m.parse_authentication(body_of(step.reply))
    client.set_server_final(payload.decode())  # the server proved itself too
    return step.done


class VerifierTests(TestCase):
    def test_scram_libpq_style(self) -> None:
        """SCRAM accepts the right password from a libpq-style client and refuses a wrong one."""
        secret = derive_scram_secret("pw")
        self.assertTrue(libpq_scram(ScramVerifier("u", secret), "pw"))
        self.assertFalse(libpq_scram(ScramVerifier("u", secret), "wrong"))

    def test_scram_secret_parse(self) -> None:
        """A stored SCRAM secret round-trips into the verifier's key material."""
        made = derive_scram_secret("pw", b"0123456789abcdef")
        text = (f"SCRAM-SHA-256${made.iterations}:{base64.b64encode(made.salt).decode()}"
                f"${base64.b64encode(made.stored_key).decode()}:{base64.b64encode(made.server_key).decode()}")
        self.assertEqual(ScramSecret.parse(text), made)
        self.assertRaises(ValueError, ScramSecret.parse, "SCRAM-SHA-256$garbage")

    def test_scram_wrong_mechanism(self) -> None:
        """Choosing a mechanism we did not offer is a protocol violation."""
        verifier = ScramVerifier("u", derive_scram_secret("pw"))
        with self.assertRaises(ProtocolViolation):
            verifier.receive(body_of(m.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=x")))

    def test_md5(self) -> None:
        """md5 checks the salted answer against plain or stored-md5 secrets."""
        for secret in (Secret("plain", "pw"), Secret("md5", md5_hash("pw", "u"))):
            verifier = MD5Verifier("u", secret)
            answer = md5_response(md5_hash("pw", "u"), verifier.salt) + b"\0"
            self.assertTrue(verifier.receive(answer).done)
            verifier = MD5Verifier("u", secret)
            with self.assertRaises(PoolerError):
                verifier.receive(md5_response(md5_hash("no", "u"), verifier.salt) + b"\0")

    def test_cleartext_against_every_secret_kind(self) -> None:
        """A cleartext password is checked against plain, md5 and SCRAM secrets."""
        scram = derive_scram_secret("pw")
        scram_text = (f"SCRAM-SHA-256${scram.iterations}:{base64.b64encode(scram.salt).decode()}"
                      f"${base64.b64encode(scram.stored_key).decode()}:{base64.b64encode(scram.server_key).decode()}")
        secrets = [Secret("plain", "pw"), Secret("md5", md5_hash("pw", "u")), Secret("scram", scram_text)]
        checks = [check_cleartext(s, "u", pw) for s in secrets for pw in (b"pw", b"no")]
        return gatherResults(checks).addCallback(self.assertEqual, [True, False] * 3)

    def test_mock_is_indistinguishable_then_fails(self) -> None:
        """An unknown user gets a SCRAM challenge like any other and always fails 28P01."""
        mock = ClientVerifiers().mock("scram-sha-256", "ghost")
        self.assertEqual(mock.start().reply, m.authentication_sasl(["SCRAM-SHA-256"]))
        self.assertFalse(libpq_scram(mock, "anything"))  # type: ignore[arg-type]

    def test_mock_trust_refuses(self) -> None:
        """Where every route is trust, an unknown user is refused with 28000."""
        with self.assertRaises(PoolerError) as caught:
            ClientVerifiers().mock("trust", "ghost")
        self.assertEqual(caught.exception.sqlstate, "28000")

    def test_for_route_scram_derives_once(self) -> None:
        """Verifiers for a plain-password SCRAM route share one derived secret."""
        verifiers = ClientVerifiers()
        auth = ClientAuth("scram-sha-256", Secret("plain", "pw"))
        d = maybeDeferred(verifiers.for_route, auth, "u")
        d.addCallback(lambda v1: verifiers.for_route(auth, "u").addCallback(lambda v2: (v1, v2)))

        def same(pair: tuple[ScramVerifier, ScramVerifier]) -> None:
            self.assertEqual(len(verifiers.scram_secrets._done), 1)
            self.assertTrue(libpq_scram(pair[0], "pw"))
            self.assertTrue(libpq_scram(pair[1], "pw"))

        return d.addCallback(same)


class ResponderTests(TestCase):
    def answer(self, auth: ServerAuthenticator, request: bytes) -> bytes:
        code, payload = m.parse_authentication(body_of(request))
        return self.successResultOf(maybeDeferred(auth.answer, code, payload))

    def refusal(self, auth: ServerAuthenticator, request: bytes) -> PoolerError:
        code, payload = m.parse_authentication(body_of(request))
        return self.failureResultOf(maybeDeferred(auth.answer, code, payload), PoolerError).value

    def test_md5_from_hash(self) -> None:
        """An md5 hash answers an md5 challenge exactly as the plain password would."""
        from_plain = self.answer(ServerAuthenticator("u", Secret("plain", "pw")), m.authentication_md5(b"abcd"))
        from_hash = self.answer(ServerAuthenticator("u", Secret("md5", md5_hash("pw", "u"))), m.authentication_md5(b"abcd"))
        self.assertEqual(from_plain, from_hash)

    def test_cleartext_needs_plain(self) -> None:
        """A cleartext request cannot be answered from an md5 hash: a clear error, not a guess."""
        auth = ServerAuthenticator("u", Secret("md5", md5_hash("pw", "u")))
        error = self.refusal(auth, m.authentication_cleartext())
        self.assertIn("configure the plain server password", error.message)

    def test_no_password_configured(self) -> None:
        """A password request with no server password configured says so."""
        error = self.refusal(ServerAuthenticator("u", None), m.authentication_md5(b"salt"))
        self.assertIn("no server password", error.message)
