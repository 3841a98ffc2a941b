"""Auth without a network: verifiers judged by real SCRAM/md5 clients, and responders."""

from __future__ import annotations

import base64
import hashlib
import hmac

import scramp
from twisted.internet.defer import gatherResults, inlineCallbacks, maybeDeferred
from twisted.trial.unittest import TestCase

from odissey.auth import secrets, verifiers
from odissey.auth.responders import ServerAuthenticator
from odissey.auth.secrets import (
    SCRAM_ITERATIONS,
    ScramSecret,
    check_cleartext,
    derive_scram_secret,
    md5_hash,
    md5_response,
)
from odissey.auth.verifiers import ClientVerifiers, MD5Verifier, ScramVerifier, Verifier
from odissey.config import ClientAuth, Secret
from odissey.testing import in_this_thread
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation
from odissey.wire.scanner import Scanner


def body_of(message: bytes) -> bytes:
    (event,) = Scanner(collect_all=True).feed(message)
    return event[1] or b""


def scram_text(password: bytes, salt: bytes, iterations: int) -> str:
    """A stored SCRAM-SHA-256 secret made straight from RFC 5802 (not with Odissey's code)."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


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

    def test_md5_route_hashes_its_password_once_per_user(self) -> None:
        """A route's md5 verifiers hash its plain password once per user; each gets a
        salt of its own and checks its own salted answer."""
        hashed: list[str] = []
        real = verifiers.md5_stored

        def counted(secret: Secret, user: str) -> str:
            hashed.append(user)
            return real(secret, user)

        self.patch(verifiers, "md5_stored", counted)
        made = ClientVerifiers(in_this_thread)
        auth = ClientAuth("md5", Secret("plain", "pw"))
        for user in ("u", "u", "v", "u"):
            verifier = made.for_route(auth, user)
            assert isinstance(verifier, MD5Verifier)
            answer = md5_response(md5_hash("pw", user), verifier.salt) + b"\0"
            self.assertTrue(verifier.receive(answer).done)
            with self.assertRaises(PoolerError):
                made.for_route(auth, user).receive(answer)  # (another salt)
        self.assertEqual(hashed, ["u", "v"])

    def test_cleartext_against_every_secret_kind(self) -> None:
        """A cleartext password is checked against plain, md5 and SCRAM secrets."""
        scram = derive_scram_secret("pw")
        scram_text = (f"SCRAM-SHA-256${scram.iterations}:{base64.b64encode(scram.salt).decode()}"
                      f"${base64.b64encode(scram.stored_key).decode()}:{base64.b64encode(scram.server_key).decode()}")
        secrets = [Secret("plain", "pw"), Secret("md5", md5_hash("pw", "u")), Secret("scram", scram_text)]
        checks = [check_cleartext(s, "u", pw, in_this_thread) for s in secrets for pw in (b"pw", b"no")]
        return gatherResults(checks).addCallback(self.assertEqual, [True, False] * 3)

    def test_mock_is_indistinguishable_then_fails(self) -> None:
        """An unknown user gets a SCRAM challenge like any other and always fails 28P01."""
        mock = ClientVerifiers(in_this_thread).mock(ClientAuth("scram-sha-256", None), "ghost")
        self.assertEqual(mock.start().reply, m.authentication_sasl(["SCRAM-SHA-256"]))
        self.assertFalse(libpq_scram(mock, "anything"))  # type: ignore[arg-type]

    def test_mock_trust_refuses(self) -> None:
        """Where every route is trust, an unknown user is refused with 28000."""
        with self.assertRaises(PoolerError) as caught:
            ClientVerifiers(in_this_thread).mock(ClientAuth("trust", None), "ghost")
        self.assertEqual(caught.exception.sqlstate, "28000")

    def test_for_route_scram_derives_once(self) -> None:
        """Verifiers for a plain-password SCRAM route share one derived secret."""
        verifiers = ClientVerifiers(in_this_thread)
        auth = ClientAuth("scram-sha-256", Secret("plain", "pw"))
        d = maybeDeferred(verifiers.for_route, auth, "u")
        d.addCallback(lambda v1: verifiers.for_route(auth, "u").addCallback(lambda v2: (v1, v2)))

        def same(pair: tuple[ScramVerifier, ScramVerifier]) -> None:
            self.assertEqual(len(verifiers.scram_secrets._done), 1)
            self.assertTrue(libpq_scram(pair[0], "pw"))
            self.assertTrue(libpq_scram(pair[1], "pw"))

        return d.addCallback(same)


class CleartextTests(TestCase):
    """Cleartext passwords: the secret's own SCRAM parameters, and equal work for unknown users."""

    def setUp(self) -> None:
        self.derivations: list[tuple[bytes, int]] = []
        real = secrets.salted_password

        def counted(password: bytes, salt: bytes, iterations: int) -> bytes:
            self.derivations.append((salt, iterations))
            return real(password, salt, iterations)

        self.patch(secrets, "salted_password", counted)

    @inlineCallbacks
    def refused(self, verifier: Verifier, password: bytes):
        """Send ``password`` to a cleartext verifier, which must refuse it with 28P01."""
        try:
            yield maybeDeferred(verifier.receive, password + b"\0")
        except PoolerError as exc:
            self.assertEqual(exc.sqlstate, "28P01")
        else:
            self.fail("the password was accepted")

    @inlineCallbacks
    def test_scram_secret_iterations_respected(self):
        """A SCRAM secret made with 10,000 iterations accepts its password and refuses others."""
        salt = b"sixteen byte slt"
        secret = Secret("scram", scram_text(b"pw", salt, 10000))
        self.assertTrue((yield check_cleartext(secret, "u", b"pw", in_this_thread)))
        self.assertFalse((yield check_cleartext(secret, "u", b"pW", in_this_thread)))
        self.assertEqual(self.derivations, [(salt, 10000)] * 2)

    @inlineCallbacks
    def test_scram_secret_through_verifier(self):
        """A cleartext route with a 10,000-iteration SCRAM secret lets in the right password."""
        auth = ClientAuth("cleartext", Secret("scram", scram_text(b"pw", b"0123456789abcdef", 10000)))
        verifier = yield ClientVerifiers(in_this_thread).for_route(auth, "u")
        self.assertEqual(verifier.start().reply, m.authentication_cleartext())
        step = yield maybeDeferred(verifier.receive, b"pw\0")
        self.assertTrue(step.done)
        yield self.refused((yield ClientVerifiers(in_this_thread).for_route(auth, "u")), b"wrong")

    @inlineCallbacks
    def test_scram_secret_normalized_like_postgres(self):
        """Passwords are SASLprepped as libpq does, and used raw when SASLprep does not apply."""
        nbsp = Secret("scram", scram_text(b"pass word", b"0123456789abcdef", 4096))
        self.assertTrue((yield check_cleartext(nbsp, "u", "pass\u00a0word".encode(), in_this_thread)))
        raw = Secret("scram", scram_text(b"\xff\xfe", b"0123456789abcdef", 4096))
        self.assertTrue((yield check_cleartext(raw, "u", b"\xff\xfe", in_this_thread)))

    def test_derived_secret_matches_scramp(self) -> None:
        """Odissey derives the same SCRAM secret as scramp (and so as PostgreSQL) would."""
        salt = b"0123456789abcdef"
        made = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info("pw", SCRAM_ITERATIONS, salt)
        self.assertEqual(derive_scram_secret("pw", salt).auth_info(), made)

    def test_malformed_iterations_refused(self) -> None:
        """A SCRAM secret with no iterations is malformed, not a free pass for PBKDF2."""
        self.assertRaises(ValueError, ScramSecret.parse, "SCRAM-SHA-256$0:AAAA$AAAA:AAAA")

    @inlineCallbacks
    def test_unknown_user_derives_like_a_known_one(self):
        """An unknown user's cleartext password costs one default-count PBKDF2, like a wrong one."""
        known = ClientVerifiers(in_this_thread)
        for secret in (Secret("plain", "pw"), Secret("md5", md5_hash("pw", "u")),
                       Secret("scram", scram_text(b"pw", b"0123456789abcdef", SCRAM_ITERATIONS))):
            verifier = yield known.for_route(ClientAuth("cleartext", secret), "u")
            yield self.refused(verifier, b"wrong")
        yield self.refused(ClientVerifiers(in_this_thread).mock(ClientAuth("cleartext", None), "ghost"), b"wrong")
        self.assertEqual([count for _salt, count in self.derivations], [SCRAM_ITERATIONS] * 4)

    @inlineCallbacks
    def test_unknown_user_salt_stable(self):
        """Repeated tries for one unknown user derive with the same salt, as a real secret has."""
        mocks = ClientVerifiers(in_this_thread)
        for user in ("ghost", "ghost", "spook"):
            yield self.refused(mocks.mock(ClientAuth("cleartext", None), user), b"wrong")
        salts = [salt for salt, _count in self.derivations]
        self.assertEqual(salts[0], salts[1])
        self.assertNotEqual(salts[0], salts[2])
        self.assertEqual(len(salts[0]), 16)

    @inlineCallbacks
    def test_route_without_password_is_mocked(self):
        """A route with no client password refuses everyone, after the usual work."""
        verifier = yield ClientVerifiers(in_this_thread).for_route(ClientAuth("cleartext", None), "u")
        yield self.refused(verifier, b"")
        yield self.refused(verifier, b"anything")
        self.assertEqual(len(self.derivations), 1)

    def test_md5_mock_hashes_like_a_known_user(self) -> None:
        """An unknown md5 user's answer is hashed and compared exactly as a known user's is."""
        calls: list[bytes] = []
        real = verifiers.md5_response

        def counted(stored: str, salt: bytes) -> bytes:
            calls.append(salt)
            return real(stored, salt)

        self.patch(verifiers, "md5_response", counted)
        for verifier in (MD5Verifier("u", Secret("plain", "pw")), ClientVerifiers(in_this_thread).mock(ClientAuth("md5", None), "ghost")):
            with self.assertRaises(PoolerError):
                verifier.receive(md5_response(md5_hash("no", "u"), b"abcd") + b"\0")
        self.assertEqual(len(calls), 2)


class ResponderTests(TestCase):
    def answer(self, auth: ServerAuthenticator, request: bytes) -> bytes:
        code, payload = m.parse_authentication(body_of(request))
        return self.successResultOf(maybeDeferred(auth.answer, code, payload))

    def refusal(self, auth: ServerAuthenticator, request: bytes) -> PoolerError:
        code, payload = m.parse_authentication(body_of(request))
        return self.failureResultOf(maybeDeferred(auth.answer, code, payload), PoolerError).value

    def test_md5_from_hash(self) -> None:
        """An md5 hash answers an md5 challenge exactly as the plain password would."""
        from_plain = self.answer(ServerAuthenticator("u", Secret("plain", "pw"), in_this_thread), m.authentication_md5(b"abcd"))
        from_hash = self.answer(ServerAuthenticator("u", Secret("md5", md5_hash("pw", "u")), in_this_thread), m.authentication_md5(b"abcd"))
        self.assertEqual(from_plain, from_hash)

    def test_cleartext_needs_plain(self) -> None:
        """A cleartext request cannot be answered from an md5 hash: a clear error, not a guess."""
        auth = ServerAuthenticator("u", Secret("md5", md5_hash("pw", "u")), in_this_thread)
        error = self.refusal(auth, m.authentication_cleartext())
        self.assertIn("configure the plain server password", error.message)

    def test_no_password_configured(self) -> None:
        """A password request with no server password configured says so."""
        error = self.refusal(ServerAuthenticator("u", None, in_this_thread), m.authentication_md5(b"salt"))
        self.assertIn("no server password", error.message)


class MockIterationTests(TestCase):
    def test_mock_copies_the_known_users_iteration_count(self) -> None:
        """An unknown user of a database whose users have 10,000-iteration SCRAM secrets
        is checked (cleartext) and challenged (SCRAM) with 10,000 iterations too."""
        secret = Secret("scram", scram_text(b"pw", b"0123456789abcdef", 10000))
        verifiers = ClientVerifiers(in_this_thread)
        cleartext = verifiers.mock(ClientAuth("cleartext", secret), "ghost")
        self.assertEqual(cleartext.secret.iterations, 10000)  # type: ignore[attr-defined]
        scram = verifiers.mock(ClientAuth("scram-sha-256", secret), "ghost")
        scram.start()
        first = scram.receive(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abcdefgh")[5:])
        self.assertIn(b",i=10000", first.reply)  # type: ignore[union-attr]
