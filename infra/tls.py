"""TLS for the NBD capturer's clients (NBD_OPT_STARTTLS), with x509 certificates.

A certificate directory follows the layout qemu and libnbd use, so one directory can serve
both ends: ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem`` for the server;
``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem`` for a client (libnbd's
``tls-certificates=DIR``, qemu's ``tls-creds-x509,dir=DIR``). With ``ca-cert.pem``
present the server requires a client certificate signed by that CA: NBD has no other
authentication, so this is what keeps strangers off the source volume.

``create_certificates`` makes a private CA and a server and a client certificate with
``cryptography`` (``x2x nbd-certs DIR``), for operators without a PKI of their own.
"""
from __future__ import annotations

import datetime
import enum
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from journal.choices import parse_choice
from journal.errors import BadInput

CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
#: How long generated certificates are valid.
VALIDITY = datetime.timedelta(days=825)


class TLSMode(str, enum.Enum):
    """Whether the NBD server offers TLS (``on``) or insists on it (``require``)."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"

    @classmethod
    def parse(cls, text: str) -> "TLSMode":
        return parse_choice(cls, text, "--tls", "off, on (clients may upgrade with "
                            "STARTTLS) or require (plain-text clients are refused)")


def server_context(directory: str | Path) -> ssl.SSLContext:
    """The TLS context of an NBD server from a certificate directory (see module doc)."""
    d = Path(directory)
    missing = [n for n in (SERVER_CERT, SERVER_KEY) if not (d / n).is_file()]
    if missing:
        raise BadInput(f"TLS certificate directory {d} lacks {', '.join(missing)}; create "
                       f"one with 'x2x nbd-certs {d}' or copy your own certificates there")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(d / SERVER_CERT, d / SERVER_KEY)
        if (d / CA_CERT).is_file():
            ctx.load_verify_locations(d / CA_CERT)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:
        raise BadInput(f"TLS certificates in {d} cannot be used: {e}") from None
    return ctx


def create_certificates(directory: str | Path, hosts: list[str]) -> list[Path]:
    """A new CA, a server certificate for ``hosts`` (names or IP addresses) and a client
    certificate, all in ``directory``; keys are written with mode 0600. Refuses to
    overwrite existing files. Returns the files written."""
    d = Path(directory)
    names = [CA_CERT, "ca-key.pem", SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY]
    present = [n for n in names if (d / n).exists()]
    if present:
        raise BadInput(f"{d} already holds {', '.join(present)}; pick an empty directory")
    if not hosts:
        raise BadInput("name at least one host the clients connect to (--host)")
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x2x NBD CA")])
    ca = (_builder(ca_name, ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    written = [_write(d / CA_CERT, ca.public_bytes(serialization.Encoding.PEM)),
               _write_key(d / "ca-key.pem", ca_key)]
    for cert_name, key_name, usage, san in (
            (SERVER_CERT, SERVER_KEY, ExtendedKeyUsageOID.SERVER_AUTH, _san(hosts)),
            (CLIENT_CERT, CLIENT_KEY, ExtendedKeyUsageOID.CLIENT_AUTH, None)):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                hosts[0] if san else "x2x NBD client")])
        b = (_builder(subject, ca_name, key)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san is not None:
            b = b.add_extension(san, critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        written += [_write(d / cert_name, cert.public_bytes(serialization.Encoding.PEM)),
                    _write_key(d / key_name, key)]
    return written


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY))


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return path
