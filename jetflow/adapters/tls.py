"""``jetflow up --tls``: a local certificate authority and a server certificate signed by
it, made once under ``<data>/tls/`` (``ca.pem``, ``server.pem``, ``server-key.pem``; the
keys 0600), for 127.0.0.1, ::1, localhost and this host's name. Clients trust ``ca.pem``
(every context file names it as ``ca``); to serve other names, replace the files with
certificates of your own, keeping their names, or give ``up`` yours
(``--tls-server-cert``, ``--tls-server-key``, ``--tls-server-ca``): :func:`given_tls`."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jetflow.adapters.credentials import write_private

__all__ = ["TlsFiles", "TlsError", "ensure_tls", "given_tls", "TLS_DIR"]

TLS_DIR = "tls"
VALID_DAYS = 825  # what browsers and most clients accept for a server certificate


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def server_block(self) -> str:
        """The nats-server ``tls`` configuration serving this certificate."""
        # (JSON strings are the configuration format's strings: any path, quoted right)
        return (f"tls {{\n  cert_file: {json.dumps(str(self.cert))}\n"
                f"  key_file: {json.dumps(str(self.key))}\n  timeout: 5\n}}\n")


class TlsError(ValueError):
    """Certificate files that cannot be served."""


def given_tls(ca: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
    """A certificate of one's own to serve (None when none is given): all three files, each
    readable, and the certificate and key a pair."""
    if not (ca or cert or key):
        return None
    if not (ca and cert and key):
        raise TlsError("a certificate of your own takes all three: --tls-server-cert, "
                       "--tls-server-key and --tls-server-ca (the CA clients trust)")
    files = TlsFiles(Path(ca).resolve(), Path(cert).resolve(), Path(key).resolve())
    for path, what in ((files.ca, "CA"), (files.cert, "server certificate"),
                       (files.key, "server key")):
        if not os.access(path, os.R_OK) or not path.is_file():
            raise TlsError(f"{what} {path}: not a readable file")
    try:
        private = serialization.load_pem_private_key(files.key.read_bytes(), None)
        public = x509.load_pem_x509_certificate(files.cert.read_bytes()).public_key()
        x509.load_pem_x509_certificate(files.ca.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TlsError(f"cannot read the certificate files as PEM: {exc}") from None
    same = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*same) != public.public_bytes(*same):
        raise TlsError(f"the server key {files.key} is not the key of {files.cert}")
    return files


def ensure_tls(data_dir: Path) -> TlsFiles:
    """The CA and server certificate under ``<data>/tls/``, made if missing."""
    directory = data_dir / TLS_DIR
    files = TlsFiles(directory / "ca.pem", directory / "server.pem",
                     directory / "server-key.pem")
    if all(p.is_file() for p in (files.ca, files.cert, files.key)):
        return files
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jetflow local CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.DNSName(socket.gethostname()),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_private(files.key, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    write_private(files.ca, ca.public_bytes(serialization.Encoding.PEM))
    return files
