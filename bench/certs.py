"""A throwaway CA and server certificates for 127.0.0.1, for the benchmarks that run
poolers with client TLS (bench/tls.py, bench/compare.py --tls-connect).

When run as root the poolers run as the postgres user, so the files are handed to it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
from pathlib import Path
from typing import Dict, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def postgres_owned(*paths: Path) -> None:
    """Hands ``paths`` to the postgres user when we are root (PgBouncer runs as it then)."""
    if os.geteuid() == 0:
        info = pwd.getpwnam("postgres")
        for path in paths:
            os.chown(path, info.pw_uid, info.pw_gid)


def make_certs(directory: Path) -> Dict[str, Tuple[Path, Path]]:
    """A throwaway CA and two server certificates for 127.0.0.1 signed by it, ECDSA P-256
    and RSA-2048: setup name -> (certificate file, key file)."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Odissey bench CA")).issuer_name(name("Odissey bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    keys: Dict[str, Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]] = {
        "ecdsa": ec.generate_private_key(ec.SECP256R1()),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    files: Dict[str, Tuple[Path, Path]] = {}
    for setup, key in keys.items():
        cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_file, key_file = directory / f"{setup}.crt", directory / f"{setup}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + ca.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        os.chmod(cert_file, 0o644)
        os.chmod(key_file, 0o600)
        postgres_owned(cert_file, key_file)
        files[setup] = (cert_file, key_file)
    return files
