"""The operator's API client: TLS client credentials from a kubeconfig are loaded without
leaving key material on disk, and they authenticate against a server that demands them; a
Secret is read as metadata only."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import shutil
import ssl
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest

from sandbox_operator import kube
from sandbox_operator.kube import KubeClient

CLIENT_CN = "llmsandbox-operator-test"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(pki: Path, name: str, cn: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=pki,
    )  # fmt: skip
    (pki / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext",
        cwd=pki,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    pki = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca", "-days", "1", cwd=pki,
    )  # fmt: skip
    _signed(pki, "server", "localhost", "subjectAltName=IP:127.0.0.1\n")
    _signed(pki, "client", CLIENT_CN, "extendedKeyUsage=clientAuth\n")
    return pki


@contextlib.contextmanager
def mutual_tls_server(pki: Path) -> Iterator[str]:
    """An HTTPS server that refuses clients without a certificate from the CA and answers every
    GET with a Pod named after the client certificate's common name."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            peer = self.connection.getpeercert()
            subject = dict(item[0] for item in peer["subject"])
            body = json.dumps({"kind": "Pod", "metadata": {"name": subject["commonName"]}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    server_ctx.load_verify_locations(pki / "ca.crt")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory `tempfile` uses while the test runs: whatever the client leaves is here."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def inline_info(pki: Path, server: str, key: Path | None = None) -> kopf.ConnectionInfo:
    # As kopf reads a kubeconfig: *-data fields, base64-encoded.
    return kopf.ConnectionInfo(
        server=server,
        ca_data=b64(pki / "ca.crt"),
        certificate_data=b64(pki / "client.crt"),
        private_key_data=b64(key or pki / "client.key"),
    )


async def test_inline_client_credentials_authenticate_and_leave_nothing_on_disk(
    pki: Path, scratch: Path
) -> None:
    with mutual_tls_server(pki) as server:
        client = KubeClient(inline_info(pki, server))
        try:
            assert list(scratch.iterdir()) == []
            pod = await client.get("pods", "default", "anything")
        finally:
            await client.close()
    assert pod is not None
    assert pod["metadata"]["name"] == CLIENT_CN
    assert list(scratch.iterdir()) == []


def test_a_bad_client_key_fails_to_load_and_still_leaves_nothing(
    pki: Path, scratch: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "bad.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ssl.SSLError):
        kube._ssl_context(inline_info(pki, "https://127.0.0.1:1", key=garbage))
    assert list(scratch.iterdir()) == []


def test_while_loading_the_key_only_the_operator_can_read_it(pki: Path, scratch: Path) -> None:
    seen: list[tuple[int, int, bytes]] = []

    class Recorder:
        def load_cert_chain(self, certfile: str, keyfile: str | None = None) -> None:
            assert keyfile is not None
            key = Path(keyfile)
            seen.append(
                (
                    stat.S_IMODE(key.parent.stat().st_mode),
                    stat.S_IMODE(key.stat().st_mode),
                    key.read_bytes(),
                )
            )

    info = inline_info(pki, "https://127.0.0.1:1")
    kube._load_client_certificate_data(Recorder(), info)  # type: ignore[arg-type]
    ((dir_mode, key_mode, pem),) = seen
    assert (dir_mode, key_mode) == (0o700, 0o600)
    assert pem == (pki / "client.key").read_bytes()
    assert list(scratch.iterdir()) == []


async def test_a_secret_is_asked_for_as_metadata_only_and_its_data_is_not_kept() -> None:
    accepts: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            accepts.append(self.headers["Accept"])
            # A server that ignores the Accept header and returns the whole Secret.
            body = json.dumps(
                {
                    "kind": "Secret",
                    "metadata": {"name": "k", "namespace": "ns", "labels": {"a": "b"}},
                    "data": {"apiKey": base64.b64encode(b"sk-secret").decode()},
                }
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    client = KubeClient(kopf.ConnectionInfo(server=f"http://127.0.0.1:{httpd.server_address[1]}"))
    try:
        meta = await client.get_metadata("secrets", "ns", "k")
    finally:
        await client.close()
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert accepts == [kube.METADATA_ONLY]
    assert accepts[0].startswith("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1")
    assert meta is not None
    assert (meta.name, meta.labels) == ("k", {"a": "b"})
    assert "sk-secret" not in repr(meta.model_dump())
    assert client.calls == {("get", "secrets"): 1}
