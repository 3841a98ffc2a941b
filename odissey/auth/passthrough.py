"""SCRAM pass-through: log in to PostgreSQL as a client, knowing only its SCRAM secret.

A SCRAM-SHA-256 secret (``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey``) lets Odissey check
a client's proof, but not answer a server's challenge: that takes the ClientKey, which the
secret only holds hashed (StoredKey = H(ClientKey)). The client's own proof gives it back
(RFC 5802: ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)), and with the ClientKey
and the StoredKey a proof for *any* exchange with the same salt and iteration count can be
made, without the password and without PBKDF2:

    ClientSignature' = HMAC(StoredKey, AuthMessage')
    ClientProof'     = ClientKey XOR ClientSignature'

So the server's exchange works only when PostgreSQL holds the same secret (same salt, same
iteration count, same keys) as Odissey. The ServerKey in the secret also lets Odissey check
the server's own signature, so a server that does not know the secret is caught too.

Recovered keys live in memory only (:class:`Credentials`), per pool (database, user), so
that server connections opened after the client's login can log in as well.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Dict, Tuple, Union

from odissey.auth.secrets import ScramSecret
from odissey.config import Secret


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("SCRAM proof has the wrong length")
    return bytes(x ^ y for x, y in zip(a, b))


def recover_client_key(stored_key: bytes, auth_message: bytes, proof: bytes) -> bytes:
    """The ClientKey behind a valid proof; ValueError if the proof does not match the key.

    Cheap (two SHA-256 runs): the check the verifier has already made, done again here
    so that nothing but a proven key is ever kept."""
    client_key = _xor(proof, _hmac(stored_key, auth_message))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
        raise ValueError("SCRAM proof does not match the stored key")
    return client_key


def client_proof(client_key: bytes, stored_key: bytes, auth_message: bytes) -> bytes:
    """The proof for an exchange whose AuthMessage is ``auth_message``."""
    return _xor(client_key, _hmac(stored_key, auth_message))


def server_signature(server_key: bytes, auth_message: bytes) -> bytes:
    return _hmac(server_key, auth_message)


@dataclass(frozen=True)
class PassThrough:
    """What a server login needs for SCRAM pass-through: the secret and its ClientKey."""

    secret: ScramSecret
    client_key: bytes

    def __repr__(self) -> str:
        return f"PassThrough(iterations={self.secret.iterations}, ***)"


class PassThroughClient:
    """The client's side of one SCRAM-SHA-256 exchange with PostgreSQL, from a ClientKey.

    ``first()``, then ``final(server_first)``, then ``check(server_final)``; each raises
    ValueError with a sentence that says what went wrong.
    """

    def __init__(self, keys: PassThrough, nonce: bytes | None = None) -> None:
        self.keys = keys
        self.nonce = base64.b64encode(nonce or os.urandom(18)).decode("ascii")
        self.first_bare = f"n=,r={self.nonce}"  # libpq's form: the user is in the startup packet
        self._expected = b""

    def first(self) -> bytes:
        return f"n,,{self.first_bare}".encode("ascii")

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8")
        fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        nonce, salt, iterations = fields.get("r", ""), fields.get("s", ""), fields.get("i", "")
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise ValueError("invalid SCRAM nonce from server")
        secret = self.keys.secret
        try:
            same = base64.b64decode(salt, validate=True) == secret.salt and int(iterations) == secret.iterations
        except ValueError:
            raise ValueError("malformed SCRAM message from server") from None
        if not same:
            raise ValueError(
                "SCRAM pass-through needs PostgreSQL to hold the same SCRAM secret as Odissey, "
                "but the server's salt or iteration count differs (was the password changed?)"
            )
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self.first_bare},{text},{without_proof}".encode("utf-8")
        proof = client_proof(self.keys.client_key, secret.stored_key, auth_message)
        self._expected = server_signature(secret.server_key, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode("ascii")

    def check(self, server_final: bytes) -> None:
        text = server_final.decode("utf-8", "replace")
        if not text.startswith("v="):
            raise ValueError(f"server refused the SCRAM proof ({text})")
        try:
            given = base64.b64decode(text[2:].split(",")[0], validate=True)
        except ValueError:
            raise ValueError("malformed SCRAM signature from server") from None
        if not self._expected or not hmac.compare_digest(given, self._expected):
            raise ValueError("server's SCRAM signature is invalid")


#: What a pool's server logins may use for a user: a secret (md5, from auth_query) or the
#: recovered SCRAM keys.
Credential = Union[Secret, PassThrough]


class Credentials:
    """Per pool (database, user): the credential its last client login left for server
    logins. In memory only; replaced by each newer login (a changed password wins)."""

    def __init__(self) -> None:
        self._known: Dict[Tuple[str, str], Credential] = {}

    def remember(self, database: str, user: str, credential: Credential) -> None:
        self._known[(database, user)] = credential

    def get(self, database: str, user: str) -> Credential | None:
        return self._known.get((database, user))
