"""A private PKI for tests, made with `cryptography`: a CA, and certificates it signs for an
IP address only (no DNS name) or for a client. Each is written as PEM: the certificate alone
(`cert_pem`, what a client trusts) and the key with the certificate (`bundle_pem`, what
mitmproxy's `certs` and `client_certs` read)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A key and its certificate, and where they were written as PEM."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_pem: Path
    """The certificate alone (for a CA: the file a client trusts)."""
    bundle_pem: Path
    """The key and the certificate in one file (what mitmproxy's `client_certs` reads)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Issued:
    folder.mkdir(parents=True, exist_ok=True)
    cert_bytes = cert.public_bytes(serialization.Encoding.PEM)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    (folder / f"{stem}.crt").write_bytes(cert_bytes)
    (folder / f"{stem}.pem").write_bytes(key_bytes + cert_bytes)
    return Issued(key, cert, folder / f"{stem}.crt", folder / f"{stem}.pem")


def make_ca(folder: Path, common_name: str) -> Issued:
    """A self-signed CA that may sign end-entity certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, common_name, key, cert)


def issue(ca: Issued, folder: Path, stem: str, *, ip: str | None = None, client: bool = False) -> Issued:
    """An end-entity certificate signed by `ca`: a server one for the IP address `ip` (and no
    other name), or a client one."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return _write(folder, stem, key, builder.sign(ca.key, hashes.SHA256()))
