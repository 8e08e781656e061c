"""TLS for the SuperLink (a CA and a server certificate) and SuperNode key pairs.

The CA's key is kept (DIR/certs/ca.key, owner-only) so that a SuperLink that
needs another name gets a new server certificate from the SAME CA: every
`ca.crt` already copied to other machines keeps working. A new CA is made only
when there is none yet.

Private keys (ca.key, server.key, each SuperNode's key) are written 0600 on purpose
(``write_private``); certificates and .pub files get the mode the umask gives any
new file, like the rest of the deploy folder (state.json, logs, control project).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import DeployError

CA_COMMON_NAME = "fedcifar deployment CA"
DEFAULT_VALID_DAYS = 365
ALL_INTERFACES = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA certificate (and its key) and the SuperLink's certificate and key live."""

    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path

    @classmethod
    def in_folder(cls, cert_dir: Path) -> TlsFiles:
        return cls(cert_dir / "ca.crt", cert_dir / "ca.key", cert_dir / "server.pem", cert_dir / "server.key")


def certificate_names(listen_host: str, extra_names: Sequence[str]) -> list[str]:
    """Host names and IPs the SuperLink certificate must cover: loopback, the
    address it listens on (unless all interfaces), and the extra names."""
    names = ["localhost", "127.0.0.1"]
    specific_host = [listen_host] if listen_host not in ALL_INTERFACES else []
    for name in [*specific_host, *extra_names]:
        if name not in names:
            names.append(name)
    return names


def subject_alternative_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses as IP entries (clients match IPs only against those), the rest as DNS."""
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _expires(certificate: x509.Certificate) -> datetime.datetime:
    expires = getattr(certificate, "not_valid_after_utc", None)  # cryptography >= 42
    return expires or certificate.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def certificate_covers(certificate_path: Path, names: Sequence[str]) -> bool:
    """True if the certificate exists, names all of `names`, and is valid past tomorrow."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
        covered = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    not_expired = _expires(certificate) > now + datetime.timedelta(days=1)
    return not_expired and all(entry in covered for entry in subject_alternative_names(names))


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (the mode is set before any byte lands)."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def _pem_private(key: ec.EllipticCurvePrivateKey, form: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def _new_ca(files: TlsFiles, valid_days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(files.ca_key, _pem_private(ca_key, serialization.PrivateFormat.PKCS8))
    files.ca_certificate.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    return ca_key, ca_certificate


def _load_ca(files: TlsFiles, names: Sequence[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The existing CA, or a DeployError when its key was never kept (deployments before ca.key)."""
    if not files.ca_key.is_file():
        raise DeployError(
            f"{files.server_certificate} does not name all of {', '.join(names)} and the CA's key is not in "
            f"{files.ca_key}, so no certificate from the same CA can be made; remove {files.ca_certificate.parent} "
            "to make a new CA, then copy the new ca.crt to every SuperNode and user machine"
        )
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    ca_certificate = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{files.ca_key} is not an EC key; remove {files.ca_certificate.parent} to make a new CA")
    return ca_key, ca_certificate


def ensure_tls_files(cert_dir: Path, names: Sequence[str], valid_days: int = DEFAULT_VALID_DAYS) -> TlsFiles:
    """A CA and a CA-signed SuperLink certificate whose SAN covers `names`.

    Kept as they are while they cover `names`. When a name is missing (another
    --tls-san) only the server certificate is made again, signed by the kept CA.
    """
    files = TlsFiles.in_folder(cert_dir)
    have_ca = files.ca_certificate.is_file()
    if have_ca and files.server_key.is_file() and certificate_covers(files.server_certificate, names):
        return files
    cert_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_certificate = _load_ca(files, names) if have_ca else _new_ca(files, valid_days)

    now = datetime.datetime.now(datetime.timezone.utc)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=valid_days), _expires(ca_certificate)))
        .add_extension(x509.SubjectAlternativeName(subject_alternative_names(names)), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(files.server_key, _pem_private(server_key, serialization.PrivateFormat.PKCS8))
    files.server_certificate.write_bytes(server_certificate.public_bytes(serialization.Encoding.PEM))
    return files


def ensure_node_key(key_dir: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format, as `flower-supernode` reads it.

    Same format as `ssh-keygen -t ecdsa -b 384 -N "" -f KEY`; kept across `up`s
    so a node keeps its identity. Returns (private key, public key).
    """
    private_path = key_dir / name
    public_path = key_dir / f"{name}.pub"
    if private_path.is_file() and public_path.is_file():
        return private_path, public_path
    key_dir.mkdir(parents=True, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP384R1())
    write_private(private_path, _pem_private(private_key, serialization.PrivateFormat.OpenSSH))
    public_line = private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path.write_bytes(public_line + f" {name}\n".encode())
    return private_path, public_path
