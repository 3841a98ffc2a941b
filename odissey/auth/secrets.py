"""Password derivations shared by both sides: md5 hashes and SCRAM-SHA-256 secrets.

PBKDF2 (the expensive part of SCRAM) always runs in a thread. scramp computes it inside
its own ``hi`` function and offers no hook for a precomputed SaltedPassword, so we wrap
that function with a bounded cache keyed by (hash, password, salt, iterations): a pool
opening twenty server connections with one password derives the key once, not twenty times.

Checking a client's cleartext password never uses that cache: it would keep what clients
typed (right or wrong) in memory, let them evict the servers' keys, and make a repeated try
faster than a new one. Instead every cleartext check, for a known user of any secret kind
or for an unknown one, costs one fresh PBKDF2 in a thread (see :func:`check_cleartext`).

Threads are whatever :data:`InThread` the caller passes: the service hands in its
reactor's pool (:func:`reactor_threads`), tests may run the work inline
(``odissey.testing.in_this_thread``). Nothing here reaches for the global reactor.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Callable

import scramp
import scramp.core
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from odissey.config import Secret

try:
    # The interpreter's own md5, as hashlib falls back to. hashlib's is OpenSSL's, which
    # PyPy reaches through cffi: 2.2 µs a hash there against 0.23 (0.34 against 0.19
    # under CPython), and every md5 login hashes once.
    from _md5 import md5 as _md5
except ImportError:  # (an interpreter built without its own hashes)
    _md5 = hashlib.md5

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
SCRAM_SALT_LENGTH = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
_PADDING_SALT = os.urandom(SCRAM_SALT_LENGTH)  # for derivations made only to take the time

#: Runs a blocking ``f(*args)`` off the reactor thread: ``threads(f, *args) -> Deferred``.
InThread = Callable[..., "Deferred[Any]"]


def reactor_threads(reactor: Any) -> InThread:
    """An :data:`InThread` on a reactor's own thread pool."""
    return functools.partial(deferToThreadPool, reactor, reactor.getThreadPool())


_pbkdf2 = scramp.core.hi


@functools.lru_cache(maxsize=256)
def _cached_pbkdf2(hf: object, password: bytes, salt: bytes, iterations: int) -> bytes:
    return _pbkdf2(hf, password, salt, iterations)


def _hi(hf: object, password: bytes, salt: bytes, iterations: object) -> bytes:
    return _cached_pbkdf2(hf, bytes(password), bytes(salt), int(iterations))  # type: ignore[call-overload]


if getattr(scramp.core.hi, "__name__", "") != "_hi":
    scramp.core.hi = _hi


def pbkdf2_cache_info() -> "functools._CacheInfo":
    """Hits and misses of the shared PBKDF2 cache (tests and stats read it)."""
    return _cached_pbkdf2.cache_info()


def md5_hash(password: str, user: str) -> str:
    """PostgreSQL's stored md5 form: ``md5`` + md5(password + user)."""
    return "md5" + _md5((password + user).encode()).hexdigest()


def md5_response(stored: str, salt: bytes) -> bytes:
    """The client's answer to AuthenticationMD5Password, from the stored md5 form."""
    return b"md5" + _md5(stored[3:].encode() + salt).hexdigest().encode()


def md5_stored(secret: Secret, user: str) -> str:
    """The md5 form of a plain or md5 secret (callers have ruled out SCRAM secrets)."""
    return secret.value if secret.kind == "md5" else md5_hash(secret.value, user)


@dataclass(frozen=True)
class ScramSecret:
    """What a SCRAM-SHA-256 verifier stores: never the password itself."""

    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    @classmethod
    def parse(cls, text: str) -> "ScramSecret":
        """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64 parts)."""
        try:
            head, keys = text[len("SCRAM-SHA-256$"):].split("$")
            iterations, salt = head.split(":")
            stored, server = keys.split(":")
            parsed = cls(
                base64.b64decode(salt, validate=True),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
                int(iterations),
            )
        except ValueError:
            raise ValueError("malformed SCRAM-SHA-256 secret") from None
        if parsed.iterations < 1 or not parsed.salt:
            raise ValueError("malformed SCRAM-SHA-256 secret")
        return parsed

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        return self.salt, self.stored_key, self.server_key, self.iterations


def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """SCRAM's SaltedPassword, PBKDF2-HMAC-SHA-256: the one expensive step (run it in a thread).

    Every client-side derivation goes through this name, so tests can count them.
    """
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def normalize_password(password: bytes) -> bytes:
    """SASLprep the way PostgreSQL does: a password that is not valid UTF-8, or that
    SASLprep rejects, is used as it is (libpq does the same, so both sides agree)."""
    try:
        return scramp.core.saslprep(password.decode("utf-8")).encode("utf-8")  # (1.4 has no utils.saslprep)
    except (UnicodeDecodeError, scramp.ScramException):
        return password


def scram_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) for a password; blocking (PBKDF2)."""
    salted = salted_password(normalize_password(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest(), server_key


def derive_scram_secret(password: str, salt: bytes | None = None) -> ScramSecret:
    """PBKDF2 and friends; blocking, so call it through :class:`ScramSecrets`."""
    if salt is None:
        salt = os.urandom(SCRAM_SALT_LENGTH)
    stored, server = scram_keys(password.encode("utf-8"), salt, SCRAM_ITERATIONS)
    return ScramSecret(salt, stored, server, SCRAM_ITERATIONS)


class ScramSecrets:
    """SCRAM secrets for configured passwords, derived once (in a thread) and kept."""

    def __init__(self, threads: InThread) -> None:
        self._threads = threads
        self._done: dict[str, ScramSecret] = {}
        self._running: dict[str, Deferred[ScramSecret]] = {}

    def get(self, secret: Secret) -> "Deferred[ScramSecret]":
        if secret.kind == "scram":
            return succeed(ScramSecret.parse(secret.value))
        known = self._done.get(secret.value)
        if known is not None:
            return succeed(known)
        running = self._running.get(secret.value)
        if running is None:
            running = self._threads(derive_scram_secret, secret.value)
            self._running[secret.value] = running

            def keep(result: ScramSecret) -> ScramSecret:
                self._done[secret.value] = result
                del self._running[secret.value]
                return result

            running.addCallback(keep)
        waiter: Deferred[ScramSecret] = Deferred()
        running.addBoth(_chain, waiter)
        return waiter


def _chain(result: object, waiter: Deferred[ScramSecret]) -> object:
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)  # type: ignore[arg-type]
    return result


def check_cleartext(
    secret: "Secret | ScramSecret", user: str, password: bytes, threads: InThread
) -> "Deferred[bool]":
    """Does a cleartext password match a secret (of any kind)?

    Always one PBKDF2 in a thread, and only constant-time comparisons: against a SCRAM
    secret with that secret's own salt and iteration count; against a plain or md5 secret
    with the default count and a throwaway salt, for nothing but the time it takes. An
    unknown user is checked against :func:`mock_scram_secret`, so a wrong password costs
    the same whether the user exists or not (as long as the route's SCRAM secret, if it
    has one, uses the default iteration count).
    """
    if isinstance(secret, ScramSecret):
        return threads(_matches_scram, secret, password)
    if secret.kind == "scram":
        return threads(_matches_scram, ScramSecret.parse(secret.value), password)
    if secret.kind == "md5":
        expected = secret.value.encode("ascii")
        given = b"md5" + _md5(password + user.encode("utf-8")).hexdigest().encode("ascii")
    else:
        expected, given = secret.value.encode("utf-8"), password
    return threads(_matches_digest, expected, given, password)


def _matches_scram(secret: ScramSecret, password: bytes) -> bool:
    stored, server = scram_keys(password, secret.salt, secret.iterations)
    return hmac.compare_digest(stored + server, secret.stored_key + secret.server_key)


def _matches_digest(expected: bytes, given: bytes, password: bytes) -> bool:
    scram_keys(password, _PADDING_SALT, SCRAM_ITERATIONS)  # the work a SCRAM secret costs
    # Hashed first so that the comparison's time does not depend on either length.
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())


def mock_scram_secret(key: bytes, user: str, iterations: int = SCRAM_ITERATIONS) -> ScramSecret:
    """A secret no password matches, stable per user name (so repeated tries look alike).

    Made like the known users' secrets (their iteration count, a 16-byte salt), so that
    checking a password against it costs what checking against a real one does, and a
    SCRAM challenge shows the same count.
    """
    salt = hmac.new(key, b"salt:" + user.encode(), hashlib.sha256).digest()[:SCRAM_SALT_LENGTH]
    return ScramSecret(salt, os.urandom(32), os.urandom(32), iterations)
