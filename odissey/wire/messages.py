"""Builders for the messages the pooler says itself, and parsers for the few it reads whole.

Relayed traffic never passes through here: it is forwarded as the bytes that arrived. These
functions are for login, errors and the pooler's own queries.
"""

from __future__ import annotations

import struct
from typing import Iterable, Mapping, Sequence

from odissey.wire.errors import PoolerError, ProtocolViolation

_I32 = struct.Struct("!i")
_2I32 = struct.Struct("!ii")

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Authentication request codes (the Int32 after an 'R' header).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def message(kind: bytes, body: bytes = b"") -> bytes:
    """Frame ``body`` as one typed v3 message."""
    return kind + _I32.pack(len(body) + 4) + body


def cstring(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if b"\0" in data:
        raise ValueError("a protocol string cannot hold a NUL byte")
    return data + b"\0"


# -- backend messages (what the pooler says to clients) -----------------------------------


def error_fields(
    severity: str,
    sqlstate: str,
    text: str,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    body = (
        b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(sqlstate)
        + b"M" + cstring(text.replace("\0", ""))
    )
    if detail:
        body += b"D" + cstring(detail.replace("\0", ""))
    if hint:
        body += b"H" + cstring(hint.replace("\0", ""))
    return body + b"\0"


def error_response(error: PoolerError) -> bytes:
    return message(
        b"E", error_fields(error.severity, error.sqlstate, error.message, error.detail, error.hint)
    )




def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + payload)


def authentication_ok() -> bytes:
    return authentication(AUTH_OK)


def authentication_cleartext() -> bytes:
    return authentication(AUTH_CLEARTEXT)


def authentication_md5(salt: bytes) -> bytes:
    return authentication(AUTH_MD5, salt)


def authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(cstring(m) for m in mechanisms) + b"\0")


def authentication_sasl_continue(data: bytes) -> bytes:
    return authentication(AUTH_SASL_CONTINUE, data)


def authentication_sasl_final(data: bytes) -> bytes:
    return authentication(AUTH_SASL_FINAL, data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", _2I32.pack(pid, secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def command_complete(tag: bytes) -> bytes:
    return message(b"C", tag + b"\0")


def notice_response(sqlstate: str, text: str, detail: str | None = None) -> bytes:
    """A NOTICE: what the admin console's SHOW HELP says (as PgBouncer's does)."""
    return message(b"N", error_fields("NOTICE", sqlstate, text, detail))


#: Type OIDs of the columns the pooler's own result sets use.
TEXT_OID = 25
INT4_OID = 23
INT8_OID = 20


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """A RowDescription for (name, type OID) columns, all in text format."""
    body = [len(columns).to_bytes(2, "big")]
    for name, oid in columns:
        size = 8 if oid == INT8_OID else 4 if oid == INT4_OID else -1
        body.append(cstring(name) + struct.pack("!IhIhih", 0, 0, oid, size, -1, 0))
    return message(b"T", b"".join(body))


def data_row(values: Sequence[object]) -> bytes:
    """A DataRow of values in text format; None is NULL."""
    body = [len(values).to_bytes(2, "big")]
    for value in values:
        if value is None:
            body.append(b"\xff\xff\xff\xff")
        else:
            data = str(value).encode()
            body.append(_I32.pack(len(data)) + data)
    return message(b"D", b"".join(body))


EMPTY_QUERY_RESPONSE = b"I\0\0\0\4"


#: The two fixed replies the pooler synthesises most.
PARSE_COMPLETE = b"1\0\0\0\4"
CLOSE_COMPLETE = b"3\0\0\0\4"


def negotiate_protocol_version(minor: int, unrecognized: Sequence[str]) -> bytes:
    body = _I32.pack(minor) + _I32.pack(len(unrecognized))
    return message(b"v", body + b"".join(cstring(o) for o in unrecognized))


# -- frontend messages (what the pooler says to servers) ----------------------------------


def startup_message(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(protocol)
    for key, value in params.items():
        body += cstring(key) + cstring(value)
    body += b"\0"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _2I32.pack(8, SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _2I32.pack(pid, secret)


def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


def queries(statements: Iterable[str]) -> bytes:
    """Several simple-query messages pipelined; each gets its own ReadyForQuery."""
    return b"".join(query(s) for s in statements)


def terminate() -> bytes:
    return message(b"X")


def sync() -> bytes:
    return message(b"S")


def parse(name: bytes, tail: bytes) -> bytes:
    """Parse of ``name``; ``tail`` is a Parse body after the name (query, types)."""
    return message(b"P", name + b"\0" + tail)


def bind(portal: bytes, statement: bytes, tail: bytes) -> bytes:
    """Bind; ``tail`` is a Bind body after the two names (formats, values, result formats)."""
    return message(b"B", portal + b"\0" + statement + b"\0" + tail)


def describe(target: bytes, name: bytes) -> bytes:
    """Describe of a statement (``target`` b"S") or a portal (b"P")."""
    return message(b"D", target + name + b"\0")


def close(target: bytes, name: bytes) -> bytes:
    """Close of a statement (``target`` b"S") or a portal (b"P")."""
    return message(b"C", target + name + b"\0")


def copy_fail(reason: str) -> bytes:
    return message(b"f", cstring(reason))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstring(mechanism) + _I32.pack(len(data)) + data)


# -- parsers for bodies the pooler reads whole --------------------------------------------


def _cstrings(body: bytes, what: str) -> list[bytes]:
    if not body.endswith(b"\0"):
        raise ProtocolViolation(f"invalid {what} message: string is not terminated")
    return body[:-1].split(b"\0")


def cstring_at(body: bytes, start: int, what: str) -> tuple[bytes, int]:
    """The NUL-terminated string at ``start`` and the offset just after its NUL."""
    end = body.find(b"\0", start)
    if end < 0:
        raise ProtocolViolation(f"invalid {what} message format: string is not terminated")
    return body[start:end], end + 1


def parse_target(body: bytes, what: str) -> tuple[bytes, bytes]:
    """A Describe or Close body -> (b"S" or b"P", name)."""
    if body[:1] not in (b"S", b"P") or not body.endswith(b"\0") or body.find(b"\0") != len(body) - 1:
        raise ProtocolViolation(f"invalid {what} message format")
    return body[:1], body[1:-1]


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body -> {field code: value}."""
    fields: dict[str, str] = {}
    for part in _cstrings(body, "error"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    parts = _cstrings(body, "ParameterStatus")
    if len(parts) != 2:
        raise ProtocolViolation("invalid ParameterStatus message")
    return parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolViolation("invalid authentication request")
    return _I32.unpack_from(body)[0], body[4:]


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    return [m.decode() for m in payload.split(b"\0") if m]


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolViolation("invalid BackendKeyData message")
    pid, secret = _2I32.unpack(body)
    return pid, secret


def parse_password(body: bytes) -> bytes:
    if not body.endswith(b"\0") or b"\0" in body[:-1]:
        raise ProtocolViolation("invalid password packet")
    return body[:-1]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    end = body.find(b"\0")
    if end < 0 or len(body) < end + 5:
        raise ProtocolViolation("invalid SASLInitialResponse message")
    mechanism = body[:end].decode("ascii", "replace")
    (length,) = _I32.unpack_from(body, end + 1)
    data = body[end + 5 :]
    if length == -1:
        data = b""
    elif length != len(data):
        raise ProtocolViolation("invalid SASLInitialResponse message: length mismatch")
    return mechanism, data


def execute(portal: bytes, max_rows: int = 0) -> bytes:
    return message(b"E", portal + b"\0" + _I32.pack(max_rows))


def parameterised_query(sql: str, values: Sequence[str]) -> bytes:
    """One extended-protocol round (Parse, Bind, Execute, Sync of the unnamed statement)
    with ``values`` as text parameters $1, $2…: they travel apart from the SQL and are
    never spliced into it."""
    bound = b"".join(
        _I32.pack(len(data)) + data for data in (value.encode("utf-8") for value in values))
    return (
        parse(b"", cstring(sql) + b"\0\0")
        + bind(b"", b"", b"\0\0" + len(values).to_bytes(2, "big") + bound + b"\0\0")
        + execute(b"")
        + sync()
    )


def parse_data_row(body: bytes) -> list["bytes | None"]:
    """DataRow body -> its column values (None for NULL)."""
    if len(body) < 2:
        raise ProtocolViolation("invalid DataRow message")
    count = int.from_bytes(body[:2], "big")
    values: list[bytes | None] = []
    at = 2
    for _ in range(count):
        if at + 4 > len(body):
            raise ProtocolViolation("invalid DataRow message")
        (size,) = _I32.unpack_from(body, at)
        at += 4
        if size < 0:
            values.append(None)
            continue
        if at + size > len(body):
            raise ProtocolViolation("invalid DataRow message")
        values.append(body[at:at + size])
        at += size
    return values
