"""Check, before starting a SuperNode or registering a key, that the SuperLink can be reached.

A SuperNode with a wrong CA, a SuperLink name missing from the certificate, a SuperLink
that is down or a port closed by a firewall only prints "Connection attempt failed,
retrying" (Flower 1.25) and retries forever. One TCP connection and one TLS handshake
from here tell these cases apart, and the error names the host, the port and the fix.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509

from ..errors import DeployError
from .processes import split_address

DEFAULT_CHECK_TIMEOUT_S = 5.0


def _names_in_certificate(der: bytes) -> list[str]:
    try:
        certificate = x509.load_der_x509_certificate(der)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return []
    return [str(entry.value) for entry in names]


def _presented_names(host: str, port: int, timeout_s: float) -> list[str]:
    """The names in the certificate the server presents (read without trusting it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return []
    return _names_in_certificate(der) if der else []


def check_superlink(address: str, ca_certificate: Path | None, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> None:
    """Raise DeployError (one line: host, port, fix) unless `address` accepts TCP and, with a CA, TLS."""
    host, port = split_address(address)
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as err:
        raise DeployError(f"cannot resolve {host} ({err.strerror}): check the name, or use the SuperLink's IP") from err
    except ConnectionRefusedError as err:
        raise DeployError(
            f"{host}:{port} refused the connection: no SuperLink listens there; start it (on that machine "
            f"`fedcifar-deploy superlink`, or `up --host 0.0.0.0`) or check the port"
        ) from err
    except TimeoutError as err:
        raise DeployError(
            f"{host}:{port} did not answer within {timeout_s:g} s: a firewall drops the port or the host is down; "
            f"open TCP port {port} on {host} to this machine"
        ) from err
    except OSError as err:
        raise DeployError(
            f"cannot reach {host}:{port} ({err.strerror or err}): check the network route, or open TCP port {port}"
        ) from err
    if ca_certificate is None:
        raw.close()
        return
    if not ca_certificate.is_file():
        raw.close()
        raise DeployError(f"CA certificate {ca_certificate} not found: copy ca.crt from the SuperLink machine")
    context = ssl.create_default_context(cafile=str(ca_certificate))
    context.set_alpn_protocols(["h2"])  # gRPC speaks HTTP/2
    try:
        with context.wrap_socket(raw, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as err:
        if err.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            names = _presented_names(host, port, timeout_s)
            raise DeployError(
                f"the certificate of {host}:{port} does not name {host} (it names {', '.join(names) or 'nothing'}): "
                f"connect with one of those names, or on the SuperLink machine re-run `up` with --tls-san {host} "
                "(same CA) and restart it"
            ) from err
        raise DeployError(
            f"the certificate of {host}:{port} is not signed by {ca_certificate} ({err.verify_message}): "
            "copy ca.crt from the SuperLink machine's certs folder"
        ) from err
    except ssl.SSLError as err:
        raise DeployError(
            f"TLS handshake with {host}:{port} failed ({err.reason or err}): is the SuperLink started with "
            "TLS (--tls / --ssl-certfile)? Without TLS use --insecure"
        ) from err
    except OSError as err:
        raise DeployError(f"{host}:{port} closed the connection during the TLS handshake ({err})") from err
    finally:
        raw.close()
