"""Builders and parsers of the messages the pooler speaks itself."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation
from odissey.wire.scanner import Scanner


def single(data: bytes) -> tuple[int, bytes]:
    events = Scanner(collect_all=True).feed(data)
    assert len(events) == 1
    kind, body, _ = events[0]
    assert body is not None
    return kind, body


class MessageTests(SynchronousTestCase):
    def test_error_response_fields(self) -> None:
        """An ErrorResponse carries severity, SQLSTATE, message, detail and hint."""
        err = PoolerError("28P01", "password authentication failed", detail="d", hint="h")
        kind, body = single(m.error_response(err))
        self.assertEqual(chr(kind), "E")
        self.assertEqual(
            m.parse_error_fields(body),
            {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "password authentication failed",
             "D": "d", "H": "h"},
        )

    def test_parameter_status_round_trip(self) -> None:
        """ParameterStatus parses back to the name and value it was built from."""
        _, body = single(m.parameter_status("TimeZone", "Europe/Paris"))
        self.assertEqual(m.parse_parameter_status(body), ("TimeZone", "Europe/Paris"))

    def test_backend_key_data(self) -> None:
        """BackendKeyData round-trips signed 32-bit values."""
        _, body = single(m.backend_key_data(12345, -5))
        self.assertEqual(m.parse_backend_key_data(body), (12345, -5))

    def test_sasl_initial_response(self) -> None:
        """SASLInitialResponse parses into mechanism and data."""
        _, body = single(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
        self.assertEqual(m.parse_sasl_initial_response(body), ("SCRAM-SHA-256", b"n,,n=,r=abc"))

    def test_sasl_initial_response_bad_length(self) -> None:
        """A SASLInitialResponse whose length disagrees with its data is refused."""
        _, body = single(m.sasl_initial_response("SCRAM-SHA-256", b"abc"))
        with self.assertRaises(ProtocolViolation):
            m.parse_sasl_initial_response(body + b"x")

    def test_password(self) -> None:
        """A password message must be one NUL-terminated string."""
        self.assertEqual(m.parse_password(b"secret\0"), b"secret")
        with self.assertRaises(ProtocolViolation):
            m.parse_password(b"sec\0ret\0")

    def test_authentication_request(self) -> None:
        """Authentication requests parse into their code and payload."""
        _, body = single(m.authentication_md5(b"salt"))
        self.assertEqual(m.parse_authentication(body), (m.AUTH_MD5, b"salt"))
        _, body = single(m.authentication_sasl(["SCRAM-SHA-256"]))
        code, payload = m.parse_authentication(body)
        self.assertEqual(m.parse_sasl_mechanisms(payload), ["SCRAM-SHA-256"])

    def test_cstring_refuses_nul(self) -> None:
        """A string with a NUL byte cannot be put on the wire."""
        with self.assertRaises(ValueError):
            m.query("select 1\0; drop table x")

    @given(st.binary(max_size=60))
    def test_parsers_raise_only_codec_errors(self, body: bytes) -> None:
        """Garbage bodies raise nothing but the codec's error type."""
        for parse in (
            m.parse_error_fields,
            m.parse_parameter_status,
            m.parse_authentication,
            m.parse_backend_key_data,
            m.parse_password,
            m.parse_sasl_initial_response,
        ):
            try:
                parse(body)
            except ProtocolViolation:
                pass
