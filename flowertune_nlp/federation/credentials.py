"""TLS and SuperNode-authentication credentials for a Flower 1.42 federation, for prototyping.

Makes what Flower's own examples make, with the `cryptography` package instead of openssl:

- `ca.crt` / `ca.key`: a self-signed certificate authority;
- `server.pem` / `server.key`: the SuperLink's own TLS certificate. The SuperLink listens on
  loopback only, so it names 127.0.0.1 (IP SAN: its SuperExec and ServerApps dial it there, as
  does `flwr` on that machine or through an SSH tunnel) and localhost (DNS SAN: the Fleet proxy
  checks this name, since nginx 1.22 matches `proxy_ssl_name` against DNS names only);
- `proxy.pem` / `proxy.key`: the Fleet proxy's certificate, whose subject alternative names hold
  every public host name and IP address the SuperNodes dial (a name missing there fails the
  SuperNode's TLS handshake);
- `node-1` / `node-1.pub`, ...: one EC P-384 key pair per SuperNode in OpenSSH format; the public
  half is registered with `flwr supernode register`, the private half stays on the node
  (`flower-supernode --auth-supernode-private-key`).

Private keys are 0600 in a 0700 folder. This is for trying a federation out: a CA key lying next
to the certificates it signs is not a PKI. In production, certificates come from the
organisation's PKI and each node makes its own key pair on its own machine.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowertune_nlp.io import atomic_write_bytes, private_dir

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
PROXY_CERT, PROXY_KEY = "proxy.pem", "proxy.key"
# What dials the loopback-only SuperLink: its SuperExec and ServerApps and a local or tunnelled
# `flwr` (127.0.0.1), and the Fleet proxy, which checks the name localhost.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
DEFAULT_HOSTS = LOOPBACK_NAMES  # the proxy's names when everything runs on one machine
CREDENTIAL_FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, PROXY_CERT, PROXY_KEY)
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

    @property
    def proxy_certificate(self) -> Path:
        return self.directory / PROXY_CERT

    @property
    def proxy_key(self) -> Path:
        return self.directory / PROXY_KEY

    def node_key(self, number: int) -> Path:
        """The private key of node `number` (1-based, as in `site-1`)."""
        return self.directory / f"node-{number}"

    def node_public_key(self, number: int) -> Path:
        return self.directory / f"node-{number}.pub"

    def tls_complete(self) -> bool:
        return all(p.is_file() for p in (self.ca_certificate, self.server_certificate,
                                         self.server_key))

    def proxy_complete(self) -> bool:
        return self.proxy_certificate.is_file() and self.proxy_key.is_file()


def secret_folder(path: Path, ours: Sequence[str]) -> Path:
    """`path` as a 0700 folder for secrets: made so, or tightened if it is empty or holds one of
    `ours` (files this code writes there). Another folder that others can read is refused, so a
    mistyped `--out` never chmods a shared folder such as /tmp or a home directory."""
    path = Path(path).resolve()
    if (path.is_dir() and path.stat().st_mode & 0o077 and any(path.iterdir())
            and not any((path / name).exists() for name in ours)):
        raise ValueError(f"{path} is readable by other users and holds other files; private "
                         "keys and state go in a folder of their own (0700): give a new or "
                         "empty folder")
    return private_dir(path)


def subject_alternative_names_of(certificate: Path) -> set[str]:
    """The DNS names and IP addresses (as text) a PEM certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({str(n) for n in sans.get_values_for_type(x509.DNSName)}
            | {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)})


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
    atomic_write_bytes(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(public_path, public + f" {private_path.name}\n".encode())


def _write_pair(certificate: Path, key_path: Path, key: ec.EllipticCurvePrivateKey,
                cert: x509.Certificate) -> None:
    atomic_write_bytes(key_path, _pem_key(key), private=True)
    atomic_write_bytes(certificate, cert.public_bytes(serialization.Encoding.PEM))


def make_proxy_certificate(creds: Credentials, hosts: Sequence[str], days: int = 365) -> None:
    """The Fleet proxy's certificate for `hosts` (the names SuperNodes dial), signed by the CA
    in `creds` (whose key must be there)."""
    if not creds.ca_key.is_file():
        raise CredentialsExist(f"{creds.ca_key} is missing: the proxy certificate cannot be "
                               "signed; make new credentials with --force")
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(creds.ca_certificate.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{creds.ca_key}: not an EC key")
    _write_pair(creds.proxy_certificate, creds.proxy_key,
                *_make_server(ca_key, ca_cert, hosts, days))


def make_credentials(out: Path, hosts: Sequence[str] = DEFAULT_HOSTS, nodes: int = 3, *,
                     force: bool = False, days: int = 365) -> Credentials:
    """A CA, the SuperLink's loopback certificate, the Fleet proxy's certificate for `hosts`
    (the public names the SuperNodes dial), and `nodes` node key pairs, in the 0700 folder `out`.

    Refuses (CredentialsExist) when any of these files is already there, unless `force`: new
    keys silently invalidate every node registration and every copy of the old CA.
    """
    if nodes < 0:
        raise ValueError("--nodes must be >= 0")
    hosts = [h.strip() for h in hosts if h.strip()]
    subject_alternative_names(hosts)  # validate before writing anything
    creds = Credentials(Path(out).resolve())
    targets = [creds.directory / name for name in CREDENTIAL_FILES]
    for number in range(1, nodes + 1):
        targets += [creds.node_key(number), creds.node_public_key(number)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise CredentialsExist(
            f"{creds.directory} already holds credentials ({', '.join(p.name for p in existing)})"
            "; pass --force to replace them (registered nodes must then be registered again "
            "and every node needs the new ca.crt)")
    secret_folder(creds.directory, CREDENTIAL_FILES)
    ca_key, ca_cert = _make_ca(days)
    _write_pair(creds.ca_certificate, creds.ca_key, ca_key, ca_cert)
    _write_pair(creds.server_certificate, creds.server_key,
                *_make_server(ca_key, ca_cert, LOOPBACK_NAMES, days))
    make_proxy_certificate(creds, hosts, days)
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
