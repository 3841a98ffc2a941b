"""Password derivations shared by both sides: md5 hashes and SCRAM-SHA-256 secrets.

PBKDF2 (the expensive part of SCRAM) always runs in a thread. scramp computes it inside
its own ``hi`` function and offers no hook for a precomputed SaltedPassword, so we wrap
that function with a bounded cache keyed by (hash, password, salt, iterations): a pool
opening twenty server connections with one password derives the key once, not twenty times.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from dataclasses import dataclass

import scramp
import scramp.core
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from odissey.config import Secret

SCRAM_ITERATIONS = 4096
_MECHANISM = scramp.ScramMechanism("SCRAM-SHA-256")

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
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(stored: str, salt: bytes) -> bytes:
    """The client's answer to AuthenticationMD5Password, from the stored md5 form."""
    return b"md5" + hashlib.md5(stored[3:].encode() + salt).hexdigest().encode()


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
            return cls(
                base64.b64decode(salt, validate=True),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
                int(iterations),
            )
        except ValueError:
            raise ValueError("malformed SCRAM-SHA-256 secret") from None

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        return self.salt, self.stored_key, self.server_key, self.iterations


def derive_scram_secret(password: str, salt: bytes | None = None) -> ScramSecret:
    """PBKDF2 and friends; blocking, so call it through :func:`scram_secret`."""
    salt, stored, server, iterations = _MECHANISM.make_auth_info(
        password, iteration_count=SCRAM_ITERATIONS, salt=salt
    )
    return ScramSecret(salt, stored, server, iterations)


class ScramSecrets:
    """SCRAM secrets for configured passwords, derived once (in a thread) and kept."""

    def __init__(self) -> None:
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
            running = deferToThread(derive_scram_secret, secret.value)
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


def check_cleartext(secret: Secret, user: str, password: bytes) -> "Deferred[bool]":
    """Does a cleartext password match the configured secret (of any kind)?"""
    text = password.decode("utf-8", "replace")
    if secret.kind == "plain":
        return succeed(hmac.compare_digest(text.encode(), secret.value.encode()))
    if secret.kind == "md5":
        return succeed(hmac.compare_digest(md5_hash(text, user), secret.value))
    stored = ScramSecret.parse(secret.value)

    def check() -> bool:
        return derive_scram_secret(text, stored.salt).stored_key == stored.stored_key

    return deferToThread(check)


def mock_scram_secret(key: bytes, user: str) -> ScramSecret:
    """A secret no password matches, stable per user name (so repeated tries look alike)."""
    salt = hmac.new(key, b"salt:" + user.encode(), hashlib.sha256).digest()[:16]
    return ScramSecret(salt, os.urandom(32), os.urandom(32), SCRAM_ITERATIONS)
