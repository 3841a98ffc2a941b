"""SQLSTATEs and the pooler's error type.

Every refusal Odissey sends is a :class:`PoolerError`; it carries the SQLSTATE PostgreSQL
itself would use so that drivers map it to the same exception class they would get from
the server.
"""

from __future__ import annotations

# SQLSTATE codes (PostgreSQL's errcodes.txt); only the ones the pooler sends itself.
CONNECTION_FAILURE = "08006"
PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
INVALID_PASSWORD = "28P01"
INVALID_CATALOG_NAME = "3D000"
TOO_MANY_CONNECTIONS = "53300"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
#: PostgreSQL's class F0: a configuration file with errors (a refused RELOAD).
CONFIG_FILE_ERROR = "F0000"
IDLE_IN_TRANSACTION_SESSION_TIMEOUT = "25P03"
IDLE_SESSION_TIMEOUT = "57P05"
INTERNAL_ERROR = "XX000"
DUPLICATE_PREPARED_STATEMENT = "42P05"
UNDEFINED_PREPARED_STATEMENT = "26000"
SYNTAX_ERROR = "42601"
INSUFFICIENT_PRIVILEGE = "42501"
UNDEFINED_OBJECT = "42704"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"


class PoolerError(Exception):
    """An error the pooler reports to a client as an ErrorResponse.

    ``severity`` is ``FATAL`` when the client connection ends with the error, ``ERROR``
    when the client may go on.
    """

    def __init__(
        self,
        sqlstate: str,
        message: str,
        *,
        severity: str = "FATAL",
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail
        self.hint = hint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sqlstate}, {self.message!r})"

    def copy(self) -> "PoolerError":
        """The same error, fresh: no traceback, so keeping or re-raising it holds on to
        no frame (and so to no connection) of wherever it was raised before."""
        return PoolerError(self.sqlstate, self.message, severity=self.severity,
                           detail=self.detail, hint=self.hint)


class ProtocolViolation(PoolerError):
    """Bytes that are not a valid PostgreSQL v3 stream: the codec's only error type.

    ``offset`` is where, in the chunk being scanned, the offending message began
    (negative when its header started in an earlier chunk), so a relay can forward the
    complete messages before it and nothing after.
    """

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(PROTOCOL_VIOLATION, message)
        self.offset = offset


class UnsupportedProtocol(PoolerError):
    """A startup packet asking for a protocol major version other than 3."""

    def __init__(self, message: str) -> None:
        super().__init__(FEATURE_NOT_SUPPORTED, message)
