"""TLS and SuperNode-authentication credentials for a Flower 1.42 federation, for prototyping.

Makes what Flower's own examples make, with the `cryptography` package instead of openssl:

- `ca.crt` / `ca.key`: a self-signed certificate authority;
- `server.pem` / `server.key`: the SuperLink's TLS certificate, signed by that CA, whose subject
  alternative names hold every host name and IP address the SuperNodes and `flwr` will dial
  (a name missing there fails the TLS handshake);
- `node-1` / `node-1.pub`, ...: one EC P-384 key pair per SuperNode in OpenSSH format; the public
  half is registered with `flwr supernode register`, the private half stays on the node
  (`flower-supernode --auth-supernode-private-key`).

Private keys are written 0600. This is for trying a federation out: a CA key lying next to the
certificates it signs is not a PKI. In production, certificates come from the organisation's
PKI and each node makes its own key pair on its own machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowertune_nlp.io import atomic_write_bytes

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CURVE = ec.SECP384R1  # P-384, as Flower's examples (`ssh-keygen -t ecdsa -b 384`)


class CredentialsExist(FileExistsError):
    """Credentials are already there; overwriting them would lock out registered nodes."""


@dataclass(frozen=True)
class Credentials:
    """Where the files of one credentials folder are."""

    directory: Path

    @property
    def ca_certificate(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_certificate(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    def node_key(self, number: int) -> Path:
        """The private key of node `number` (1-based, as in `site-1`)."""
        return self.directory / f"node-{number}"

    def node_public_key(self, number: int) -> Path:
        return self.directory / f"node-{number}.pub"

    def tls_complete(self) -> bool:
        return all(p.is_file() for p in (self.ca_certificate, self.server_certificate,
                                         self.server_key))


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically, readable by its owner only from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def subject_alternative_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """IP SANs for addresses, DNS SANs for names (a client matches an IP only to an IP SAN)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ValueError("give at least one host name or IP address for the SuperLink")
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowertune-nlp prototype"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    now = datetime.datetime.now(datetime.UTC)
    subject = _name("flowertune-nlp prototype CA")
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                 hosts: Sequence[str], days: int
                 ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(subject_alternative_names(hosts)),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, data_encipherment=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_node_key(private_path: Path, public_path: Path, *, force: bool = False) -> None:
    """One SuperNode's EC P-384 key pair, OpenSSH format (what `flwr supernode register` and
    `flower-supernode --auth-supernode-private-key` read)."""
    if not force and (private_path.exists() or public_path.exists()):
        raise CredentialsExist(f"{private_path} already exists; pass --force to replace it "
                               "(its node must then be registered again)")
    key = ec.generate_private_key(CURVE())
    _write_private(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(public_path, public + f" {private_path.name}\n".encode())


def make_credentials(out: Path, hosts: Sequence[str] = DEFAULT_HOSTS, nodes: int = 3, *,
                     force: bool = False, days: int = 365) -> Credentials:
    """A CA, the SuperLink's certificate for `hosts`, and `nodes` node key pairs in `out`.

    Refuses (CredentialsExist) when any of these files is already there, unless `force`: new
    keys silently invalidate every node registration and every copy of the old CA.
    """
    if nodes < 0:
        raise ValueError("--nodes must be >= 0")
    hosts = [h.strip() for h in hosts if h.strip()]
    subject_alternative_names(hosts)  # validate before writing anything
    creds = Credentials(Path(out).resolve())
    targets = [creds.ca_certificate, creds.ca_key, creds.server_certificate, creds.server_key]
    for number in range(1, nodes + 1):
        targets += [creds.node_key(number), creds.node_public_key(number)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise CredentialsExist(
            f"{creds.directory} already holds credentials ({', '.join(p.name for p in existing)})"
            "; pass --force to replace them (registered nodes must then be registered again "
            "and every node needs the new ca.crt)")
    creds.directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca(days)
    server_key, server_cert = _make_server(ca_key, ca_cert, hosts, days)
    _write_private(creds.ca_key, _pem_key(ca_key))
    atomic_write_bytes(creds.ca_certificate, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(creds.server_key, _pem_key(server_key))
    atomic_write_bytes(creds.server_certificate,
                       server_cert.public_bytes(serialization.Encoding.PEM))
    for number in range(1, nodes + 1):
        make_node_key(creds.node_key(number), creds.node_public_key(number), force=True)
    return creds


def ensure_node_keys(directory: Path, count: int) -> list[Path]:
    """Node key pairs 1..count in `directory`, making only the missing ones (keys that exist
    may already be registered with a SuperLink)."""
    creds = Credentials(Path(directory).resolve())
    for number in range(1, count + 1):
        if not creds.node_key(number).is_file():
            make_node_key(creds.node_key(number), creds.node_public_key(number), force=True)
    return [creds.node_key(number) for number in range(1, count + 1)]
