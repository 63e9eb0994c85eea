"""Over HTTPS: REGISTER=api's unhashed upload of a staged file trusts what glanceclient trusts,
and so does the upload helper at a destination that PUTs the file itself."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.sandbox.glance_server import TOKEN
from tests.sandbox.images import make_qcow2
from tests.sandbox.old_python import oldest_python
from tests.sandbox.site import Sandbox, api_site_conf
from tests.support import Lines, run_upload_helper, settings_for

from migratio.adapters.glance_api import GlanceApi
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, Outcome

MiB = 1 << 20


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "migratio test glance")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "glance.pem", directory / "glance.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextmanager
def tls_front(endpoint: str, cert: Path, key: Path) -> Iterator[str]:
    """An HTTPS address that forwards every connection to the plain ``endpoint``."""
    back = urlsplit(endpoint)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                front = context.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                client.close()  # a client that did not trust the certificate
                continue
            glance = socket.create_connection((back.hostname or "", back.port or 80))
            threading.Thread(target=pump, args=(front, glance), daemon=True).start()
            threading.Thread(target=pump, args=(glance, front), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}{back.path}"
    finally:
        stop.set()
        listener.close()
        server.join(5)


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
@pytest.mark.parametrize("trust", ["OS_CACERT", "OS_INSECURE", "REQUESTS_CA_BUNDLE"])
def test_a_staged_file_goes_over_https_as_glanceclient_would(
    clean_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: str
) -> None:
    """The conversion goes unhashed over TLS (sendall) to an endpoint trusted through the site's
    OS_CACERT, OS_INSECURE, or the environment's REQUESTS_CA_BUNDLE (which requests, hence
    glanceclient, honours for every other call)."""
    sb = clean_sandbox
    cert, key = self_signed(tmp_path)
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=32 * MiB, data_bytes=12 * MiB)
    image_id = sb.source.upload_image(image, name="tls", disk_format="qcow2")
    exports = {
        "OS_CACERT": [f"OS_CACERT={cert}"],
        "OS_INSECURE": ["OS_INSECURE=true"],
        "REQUESTS_CA_BUNDLE": [],
    }[trust]
    if trust == "REQUESTS_CA_BUNDLE":
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))

    def hashed_upload(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the staged file was hashed again on the way")

    monkeypatch.setattr(GlanceApi, "upload", hashed_upload)
    with tls_front(sb.destination.endpoint, cert, key) as url:
        conf = api_site_conf(url, "DISK_FORMAT=raw", *exports)
        settings = settings_for(sb, tmp_path, **{"site-tls": conf})
        result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-tls"), Lines())

    assert result.outcome is Outcome.MIGRATED
    [copy] = sb.destination.find_by_property("source_uuid", image_id)
    assert (copy["status"], copy["size"]) == ("active", 32 * MiB)
    assert str(copy["converted_hash"]) == f"size:{32 * MiB} md5:{copy['checksum']}"


@pytest.mark.parametrize("python", ["python3", "oldest"])
def test_the_upload_helper_puts_over_https(
    clean_sandbox: Sandbox, tmp_path: Path, python: str
) -> None:
    """The helper at a destination, with ``OS_CACERT`` and ``OS_IMAGE_URL`` at an HTTPS
    Glance (TLS 1.3, whose session tickets make the socket readable before Glance has said
    anything): the image is active with the bytes. A token from a ~/.creds with CRLF line ends
    is used without its ``\\r``; an ``OS_CACERT`` that cannot be read sends the upload to the
    CLI, saying why."""
    sb = clean_sandbox
    cert, key = self_signed(tmp_path)
    data = os.urandom(3 * MiB + 1)
    interpreter = sys.executable if python == "python3" else str(oldest_python())
    with tls_front(sb.source.endpoint, cert, key) as url:
        creds = {"OS_AUTH_TOKEN": TOKEN + "\r", "OS_IMAGE_URL": url, "OS_CACERT": str(cert)}
        done, given = run_upload_helper(interpreter, creds, data, tmp_path, name="over-tls")
        assert done.returncode == 0, done.stderr
        assert "upload via http" in done.stdout.splitlines()
        [record] = [json.loads(x[6:]) for x in done.stdout.splitlines() if x[:6] == "image "]
        assert (record["status"], record["size"]) == ("active", len(data))
        assert sb.source.download_to(record["id"], tmp_path / "got").read_bytes() == data
        assert given == b""

        missing = {**creds, "OS_CACERT": str(tmp_path / "no-such.pem")}
        done, given = run_upload_helper(interpreter, missing, data, tmp_path, name="cli")
    assert done.returncode == 0, done.stderr
    [way] = [x for x in done.stdout.splitlines() if x.startswith("upload via")]
    assert way.startswith("upload via cli (OS_CACERT ") and "no-such.pem" in way
    assert given == data
