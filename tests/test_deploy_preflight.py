"""The SuperLink reachability check and the per-machine role options, on loopback only."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcifar_app.deploy.certificates import TlsFiles, ensure_node_key, ensure_tls_files
from fedcifar_app.deploy.preflight import check_superlink
from fedcifar_app.deploy.roles import SuperNodeOptions, remember_registered_key
from fedcifar_app.errors import DeployError


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[TlsFiles, int]]:
    """A TLS server on 127.0.0.1 whose certificate names only `localhost` (not 127.0.0.1)."""
    files = ensure_tls_files(tmp_path / "certs", ["localhost"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.server_certificate, files.server_key)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)  # so the thread sees `stop` (close() does not wake a blocked accept)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(5)
            try:
                context.wrap_socket(connection, server_side=True).close()
            except (ssl.SSLError, OSError):
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield files, server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def test_a_trusted_certificate_that_names_the_host_passes(tls_server) -> None:
    files, port = tls_server
    check_superlink(f"localhost:{port}", files.ca_certificate)


def test_a_name_missing_from_the_certificate_says_which_names_it_has(tls_server) -> None:
    files, port = tls_server
    with pytest.raises(DeployError) as caught:
        check_superlink(f"127.0.0.1:{port}", files.ca_certificate)
    message = str(caught.value)
    assert f"certificate of 127.0.0.1:{port} does not name 127.0.0.1 (it names localhost)" in message
    assert "--tls-san 127.0.0.1" in message and "\n" not in message


def test_a_wrong_ca_is_named(tls_server, tmp_path: Path) -> None:
    _, port = tls_server
    other = ensure_tls_files(tmp_path / "other", ["localhost"])
    with pytest.raises(DeployError, match=rf"localhost:{port} is not signed by .*other/ca.crt .*copy ca.crt"):
        check_superlink(f"localhost:{port}", other.ca_certificate)
    with pytest.raises(DeployError, match="not found: copy ca.crt"):
        check_superlink(f"localhost:{port}", tmp_path / "missing.crt")


def test_nothing_listening_is_named_with_host_and_port() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DeployError, match=rf"127.0.0.1:{port} refused the connection: no SuperLink listens there"):
        check_superlink(f"127.0.0.1:{port}", None)


def test_plain_tcp_to_a_tls_port_is_fine_without_a_ca(tls_server) -> None:
    _, port = tls_server
    check_superlink(f"127.0.0.1:{port}", None)


def test_supernode_options_refuse_what_flower_would_refuse_later(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="--node-config is empty"):
        SuperNodeOptions(tmp_path, "h:9092", " ")
    with pytest.raises(DeployError, match="--key needs --ca"):
        SuperNodeOptions(tmp_path, "h:9092", "partition-id=0 num-partitions=1", private_key=tmp_path / "k")
    with pytest.raises(DeployError, match="not found: make one with `fedcifar-deploy key`"):
        SuperNodeOptions(tmp_path, "h:9092", "x=1", ca_certificate=tmp_path / "ca", private_key=tmp_path / "k")


def test_a_registered_key_is_kept_for_the_next_up(tmp_path: Path) -> None:
    _, public = ensure_node_key(tmp_path / "node", "site-a")
    kept = remember_registered_key(tmp_path / "deploy", public)
    assert kept.parent == tmp_path / "deploy" / "keys" / "registered" and kept.read_bytes() == public.read_bytes()
    assert remember_registered_key(tmp_path / "deploy", public) == kept  # the same key once
