"""TLS for both sides, built once at start from the configuration (pyOpenSSL).

PostgreSQL negotiates TLS inside its own protocol (SSLRequest, then ``S`` or ``N``), so
neither side can use Twisted's ``ssl:`` endpoints: the connection starts plain and the
protocol calls ``transport.startTLS`` with a connection creator from here once the
negotiation says so. :class:`ClientSide` is what Odissey presents to its clients (it is
the TLS *server* there); :class:`ServerSide` is how it connects to one storage (it is
the TLS *client* there, with libpq's ``sslmode`` meanings). Files are read when these
objects are made, so a broken certificate stops the start (or ``--check``), and a
rotated one is picked up only by a restart.
"""

from __future__ import annotations

import ipaddress
import weakref
from typing import Optional

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

from odissey.config import ClientTLS, Config, ConfigError, ServerTLS, Storage

#: The ALPN protocol PostgreSQL 17 registered; required with direct TLS.
ALPN = b"postgresql"
#: The first byte of a TLS record carrying a handshake: a direct-TLS ClientHello.
HANDSHAKE_RECORD = 0x16

_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
#: Options PostgreSQL sets too: no compression (CRIME), no renegotiation, no tickets.
_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET | getattr(SSL, "OP_NO_RENEGOTIATION", 0)


class TLSSetupError(Exception):
    """A certificate, key or CA file could not be used; ``key`` names the config key."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(f"{key}: {text}")
        self.key = key


def _base_context(method_key: str, min_version: str, ciphers: Optional[str]) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_options(_OPTIONS)
    ctx.set_min_proto_version(_VERSIONS[min_version])
    if ciphers:
        try:
            ctx.set_cipher_list(ciphers.encode("ascii"))
        except SSL.Error as exc:
            raise TLSSetupError(f"{method_key}.ciphers", f"no usable cipher in {ciphers!r} ({_reason(exc)})") from None
    return ctx


def _load_pair(ctx: SSL.Context, section: str, cert_file: str, key_file: str) -> None:
    try:
        ctx.use_certificate_chain_file(cert_file)
    except SSL.Error as exc:
        raise TLSSetupError(f"{section}.cert_file", f"cannot load {cert_file!r}: {_reason(exc)}") from None
    try:
        ctx.use_privatekey_file(key_file)
    except SSL.Error as exc:
        raise TLSSetupError(f"{section}.key_file", f"cannot load {key_file!r}: {_reason(exc)}") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSSetupError(f"{section}.key_file", f"{key_file!r} does not match {cert_file!r}") from None


def _load_ca(ctx: SSL.Context, key: str, ca_file: str) -> None:
    if ca_file == "system":
        ctx.set_default_verify_paths()
        return
    try:
        ctx.load_verify_locations(ca_file)
    except SSL.Error as exc:
        raise TLSSetupError(key, f"cannot load {ca_file!r}: {_reason(exc)}") from None


def _reason(exc: SSL.Error) -> str:
    """OpenSSL's error queue as one short text (the last reason is the useful one)."""
    parts = [p for p in exc.args[0] if isinstance(p, tuple)] if exc.args and isinstance(exc.args[0], list) else []
    if parts:
        return str(parts[-1][-1])
    return str(exc) or type(exc).__name__


def describe_failure(exc: BaseException) -> str:
    """A handshake failure as a short reason for a log line or an error message."""
    if isinstance(exc, SSL.Error):
        return _reason(exc)
    return str(exc) or type(exc).__name__


def common_name(cert: x509.Certificate) -> Optional[str]:
    """The certificate subject's CN (what ``cert`` authentication compares with the user)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def peer_certificate(transport: object) -> Optional[x509.Certificate]:
    """The verified certificate the peer presented over a started TLS transport, if any."""
    getter = getattr(transport, "getPeerCertificate", None)
    if getter is None:
        return None
    cert = getter()
    return None if cert is None else cert.to_cryptography()


def negotiated_protocol(transport: object) -> Optional[bytes]:
    """The ALPN protocol chosen on a transport after ``startTLS`` (None without ALPN)."""
    tls = getattr(transport, "protocol", None)
    return getattr(tls, "negotiatedProtocol", None)


# -- client-facing: Odissey is the TLS server ----------------------------------------------


def _select_alpn(_conn: SSL.Connection, offered: list) -> bytes:
    """Choose ``postgresql``; a client offering ALPN without it gets a fatal alert, as
    PostgreSQL 17 sends (it is speaking something else over TLS)."""
    if ALPN in offered:
        return ALPN
    # (OpenSSL's error-queue shape, which Twisted reads when the handshake fails)
    raise SSL.Error([("odissey", "alpn", "client offered ALPN without postgresql")])


@implementer(IOpenSSLServerConnectionCreator)
class ClientSide:
    """The TLS Odissey offers its clients (``tls:``), one context for every connection.

    ``allow`` and above answer SSLRequest with ``S``; ``require`` and above refuse a
    plaintext login; ``verify-ca`` and ``verify-full`` fail the handshake of a client
    without a certificate that verifies against ``ca_file`` (``verify-full`` also wants
    its CN to be the user name, checked at login). With ``ca_file`` set, any mode asks
    for a client certificate (optional below ``verify-ca``), for ``cert`` routes.
    """

    def __init__(self, tls: ClientTLS) -> None:
        self.mode = tls.mode
        self.require = tls.mode in ("require", "verify-ca", "verify-full")
        self.verify_user = tls.mode == "verify-full"
        self.has_ca = tls.ca_file is not None
        ctx = _base_context("tls", tls.min_version, tls.ciphers)
        assert tls.cert_file is not None and tls.key_file is not None  # (config checks)
        _load_pair(ctx, "tls", tls.cert_file, tls.key_file)
        if tls.ca_file is not None:
            _load_ca(ctx, "tls.ca_file", tls.ca_file)
            mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
            if tls.mode in ("verify-ca", "verify-full"):
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            ctx.set_verify(mode, _keep_verdict)
            # Tell clients which CAs we accept (libpq picks its certificate by them).
            try:
                ctx.set_client_ca_list([
                    _x509_name(c) for c in _pem_certificates(tls.ca_file)])
            except (OSError, ValueError):
                pass
        ctx.set_session_id(b"odissey")
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_alpn_select_callback(_select_alpn)
        self.context = ctx

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def _keep_verdict(_conn: SSL.Connection, _cert: object, _errno: int, _depth: int, ok: int) -> bool:
    """OpenSSL's own verdict on each certificate of the chain."""
    return bool(ok)


def _pem_certificates(path: str) -> list:
    with open(path, "rb") as fh:
        return x509.load_pem_x509_certificates(fh.read())


def _x509_name(cert: x509.Certificate) -> "crypto.X509Name":
    return crypto.X509.from_cryptography(cert).get_subject()


# -- server-facing: Odissey is the TLS client ----------------------------------------------


class ServerSide:
    """How Odissey speaks TLS to one storage (``storages.*.tls``), libpq's meanings:
    ``prefer`` tries and falls back to plain on ``N``; ``require`` encrypts without
    checking who answers; ``verify-ca`` checks the chain against ``ca_file``;
    ``verify-full`` also checks the name (``server_name``, else the storage's host) with
    service-identity."""

    def __init__(self, tls: ServerTLS, storage: Storage) -> None:
        self.mode = tls.mode
        self.required = tls.mode != "prefer"
        self.name = tls.server_name or storage.host
        self.check_name = tls.mode == "verify-full"
        section = f"storages.{storage.name}.tls"
        ctx = _base_context(section, "TLSv1.2", None)
        if tls.cert_file is not None and tls.key_file is not None:
            _load_pair(ctx, section, tls.cert_file, tls.key_file)
        if tls.mode in ("verify-ca", "verify-full"):
            assert tls.ca_file is not None  # (config checks)
            _load_ca(ctx, f"{section}.ca_file", tls.ca_file)
            ctx.set_verify(SSL.VERIFY_PEER, _record_verdict)
        else:
            ctx.set_verify(SSL.VERIFY_NONE, _record_verdict)
        ctx.set_alpn_protos([ALPN])
        self.context = ctx
        self._sni = _sni(self.name)

    def connector(self) -> "Connector":
        """A connection creator for one connection, which keeps why verification failed."""
        return Connector(self)

    def check(self, cert: Optional[x509.Certificate]) -> Optional[str]:
        """After the handshake: why this server must not be trusted, or None."""
        if not self.check_name:
            return None
        if cert is None:
            return "server did not present a certificate"
        from service_identity import CertificateError, VerificationError
        from service_identity.cryptography import (
            verify_certificate_hostname,
            verify_certificate_ip_address,
        )

        try:
            try:
                address = ipaddress.ip_address(self.name)
            except ValueError:
                verify_certificate_hostname(cert, self.name)
            else:
                verify_certificate_ip_address(cert, str(address))
        except (VerificationError, CertificateError):
            names = ", ".join(_subject_names(cert)) or "no name"
            return f'server certificate does not match host name "{self.name}" (it names {names})'
        return None


def _sni(name: str) -> Optional[bytes]:
    """SNI is sent for host names, never for addresses (as libpq does)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name.encode("idna") if name and not name.startswith("/") else None
    return None


def _subject_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [n for n in [common_name(cert)] if n]
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)]


def _record_verdict(conn: SSL.Connection, _cert: object, errno: int, depth: int, ok: int) -> bool:
    """Keep OpenSSL's verdict, and its first reason, for the error the client will see."""
    if not ok:
        connector = _connectors.get(conn)
        if connector is not None and connector.error is None:
            connector.error = f"{_verify_error(errno)} (certificate depth {depth})"
    return bool(ok)


def _verify_error(errno: int) -> str:
    try:
        from OpenSSL._util import ffi, lib  # OpenSSL's own wording for X509_V_ERR_*

        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")
    except Exception:
        return f"verify error {errno}"


#: Each TLS connection to a storage -> its Connector, while the connection lives.
_connectors: "weakref.WeakKeyDictionary[SSL.Connection, Connector]" = weakref.WeakKeyDictionary()


@implementer(IOpenSSLClientConnectionCreator)
class Connector:
    """Creates the TLS connection of one server connection and remembers why the
    server's certificate was refused (``error``), for the message its client gets."""

    def __init__(self, side: ServerSide) -> None:
        self.side = side
        self.error: Optional[str] = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self.side.context, None)
        _connectors[conn] = self  # (Twisted takes the connection's app data for itself)
        if self.side._sni is not None:
            conn.set_tlsext_host_name(self.side._sni)
        return conn


# -- start -----------------------------------------------------------------------------------


def load(config: Config) -> "tuple[Optional[ClientSide], dict[str, ServerSide]]":
    """Every TLS context the configuration asks for; ConfigError naming keys otherwise."""
    problems: list[str] = []
    client: Optional[ClientSide] = None
    if config.tls.mode != "disable":
        try:
            client = ClientSide(config.tls)
        except TLSSetupError as exc:
            problems.append(str(exc))
    servers: dict[str, ServerSide] = {}
    for name, storage in config.storages.items():
        if storage.tls.mode == "disable":
            continue
        try:
            servers[name] = ServerSide(storage.tls, storage)
        except TLSSetupError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return client, servers
