"""Property-based fuzzing of the exec server, one real execd for the whole module.

(a) arbitrary bytes as HTTP requests on a raw socket: a parseable HTTP reply with a JSON body
    (or a clean hang-up when the request line is empty), never a 500, the server alive after;
(b) arbitrary JSON bodies to every endpoint: a JSON 2xx/4xx, never a 5xx;
(c) every endpoint with a missing, wrong, prefix-of or extended token: 401 JSON and no effect;
(d) file API confinement: generated paths ('..', '.', absolute host paths, symlinks in the root
    that point outside, NUL, long names, unicode) never read the sentinel secret outside the
    root and never create or change anything outside it.

`/shutdown` with the right token is left out of (a) and (b): it ends the server by design.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox_agent import execd
from test_execd import Server, short_dir, spawn

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENDPOINTS = ("/exec", "/files/read", "/files/write", "/files/list")
FILE_ENDPOINTS = ("/files/read", "/files/write", "/files/list")
SECRET = "sentinel-" + secrets.token_hex(16)
SENTINEL_NAME = "sentinel-file-" + secrets.token_hex(4) + ".txt"


class Fuzzed:
    """The server, its root, and the sentinel directory beside the root that must stay untouched."""

    def __init__(self, server: Server, base: Path, outside: Path) -> None:
        self.server = server
        self.base = base
        self.root = server.root
        self.outside = outside
        self.escape = Path("/tmp") / ("execd-fuzz-escape-" + secrets.token_hex(6))
        self.links = {
            "evil": outside / SENTINEL_NAME,
            "evildir": outside,
            "rel": Path("../outside"),
            "up": Path(".."),
            "hostroot": Path("/"),
            "dangling": outside / "created-through-a-dangling-link.txt",
            "loop": Path("loop"),
            "sub/deep": Path("../../outside"),
            "escape": self.escape,
        }

    def reset_links(self) -> None:
        """Put the symlinks back (a write inside the root may legitimately replace one)."""
        for name, target in self.links.items():
            link = self.root / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            else:
                link.unlink(missing_ok=True)
            link.symlink_to(target)

    def snapshot(self) -> dict[str, tuple[str, int, str]]:
        """Everything under the root's parent except the root itself: type, mode and content."""
        seen: dict[str, tuple[str, int, str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.base):
            if Path(dirpath) == self.base:
                dirnames[:] = [d for d in dirnames if self.base / d != self.root]
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st_ = path.lstat()
                if path.is_symlink():
                    seen[str(path)] = ("link", st_.st_mode, os.readlink(path))
                elif path.is_file():
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    seen[str(path)] = ("file", st_.st_mode, digest)
                else:
                    seen[str(path)] = ("dir", st_.st_mode, "")
        return seen


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    base = tmp_path_factory.mktemp("fuzz")
    outside = base / "outside"
    outside.mkdir()
    (outside / SENTINEL_NAME).write_text(SECRET)
    (outside / "nested").mkdir()
    (outside / "nested" / "also-secret.txt").write_text(SECRET)
    run_dir = short_dir()
    server = spawn(base / "root", run_dir)
    state = Fuzzed(server, base, outside)
    state.reset_links()
    yield state
    server.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(state.escape, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state.escape.unlink()


def assert_alive(f: Fuzzed) -> None:
    assert f.server.proc.poll() is None, "the exec server died"
    health = httpx.get(f.server.base_url + "/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json()["ok"] is True


def json_error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict)
    return body


# --------------------------------------------------------------------------- (a) raw bytes

METHODS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "BREW", "get", ""])
TARGETS = st.one_of(
    st.sampled_from(
        [
            "/healthz",
            "/exec",
            "/files/read",
            "/files/write",
            "/files/list",
            "/shutdown",
            "/",
            "*",
            "/healthz?x=1",
            "/files/read#frag",
            "http://execd/files/list",
            "//files/read",
            "/%2e%2e/",
        ]
    ),
    st.text(max_size=40),
)
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 extra", "FTP/1.0", ""])
HEADER_NAMES = st.sampled_from(
    [
        "Content-Length",
        "Transfer-Encoding",
        "Expect",
        "Connection",
        "Authorization",
        "Host",
        "X-Custom",
        " Folded",
        "",
    ]
)
HEADER_VALUES = st.one_of(
    st.sampled_from(["0", "5", "-1", "1_0", "99999999999", "chunked", "100-continue", "close"]),
    st.text(max_size=30),
)


@st.composite
def raw_requests(draw: st.DrawFn, token: str) -> tuple[bytes, str]:
    """Bytes that look more or less like an HTTP request; and the method they use."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300)), ""
    method = draw(METHODS)
    target = draw(TARGETS)
    version = draw(VERSIONS)
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
    body = draw(st.one_of(st.binary(max_size=200), st.just(b'{"path": "."}')))
    authorized = draw(st.booleans())
    # The right token never goes with a request the server would act on for real.
    if execd.request_path(target) in ("/shutdown", "/exec"):
        authorized = False
    lines = [f"{method} {target} {version}".encode("utf-8", "surrogateescape")]
    if authorized:
        lines.append(f"Authorization: Bearer {token}".encode())
    for name, value in headers:
        if name == "Authorization":
            value = f"Bearer {value}"
        lines.append(f"{name}: {value}".encode("utf-8", "surrogateescape"))
    if draw(st.booleans()):
        lines.append(b"Content-Length: %d" % len(body))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    return eol.join(lines) + eol + eol + body, method


def read_replies(raw: socket.socket) -> bytes:
    chunks = []
    while chunk := raw.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def first_final_reply(data: bytes, method: str = "") -> tuple[int, dict[str, str], bytes]:
    """The first non-1xx reply in data: status, headers, body (none for a HEAD the server took
    as HEAD: the next reply, or the end, follows the head)."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"no complete reply head in {data[:200]!r}"
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 "), lines[0]
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.decode("latin-1").partition(":")
            assert colon, line
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            data = rest
            continue
        if method == "HEAD" and (rest == b"" or rest.startswith(b"HTTP/1.")):
            return status, headers, b""
        length = int(headers.get("content-length", "0"))
        assert len(rest) >= length, "a reply body shorter than its Content-Length"
        return status, headers, rest[:length]


@FUZZ
@given(data=st.data())
def test_any_bytes_get_an_http_reply_with_a_json_body(fuzzed: Fuzzed, data: st.DataObject) -> None:
    request, method = data.draw(raw_requests(fuzzed.server.token))
    with socket.create_connection(("127.0.0.1", fuzzed.server.ready["port"]), timeout=20) as raw:
        raw.sendall(request)
        raw.shutdown(socket.SHUT_WR)
        answer = read_replies(raw)
    first_line = request.split(b"\n", 1)[0]
    if not answer:
        # Only a request whose first line is empty is closed without a word (as a client that
        # connected and went away); anything else gets a reply.
        assert first_line.rstrip(b"\r") == b"", request[:200]
    else:
        status, headers, body = first_final_reply(answer, method)
        assert status != 500, body
        assert headers["content-type"] == "application/json"
        if not (method == "HEAD" and body == b""):
            reply = json.loads(body)
            assert isinstance(reply, dict)
            if status >= 400:
                assert set(reply["error"]) == {"code", "message"}
    assert fuzzed.server.proc.poll() is None, "the exec server died"


def test_the_server_still_serves_after_the_raw_fuzzing(fuzzed: Fuzzed) -> None:
    assert_alive(fuzzed)
    assert fuzzed.server.exec("echo alive")["stdout"] == "alive\n"


# --------------------------------------------------------------------------- (b) JSON bodies

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(
    [
        "command",
        "timeout",
        "max_output_bytes",
        "path",
        "start_line",
        "end_line",
        "encoding",
        "max_bytes",
        "content",
        "mode",
        "append",
        "recursive",
        "max_entries",
    ]
)
FIELD_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from(["utf-8", "base64", ".", "f.txt", "sub/g.txt", "evil", "../x", "aGk="]),
    st.integers(min_value=-3, max_value=70000),
)


def tame(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """Keep /exec from running anything: a command becomes a shell comment (no newline)."""
    if endpoint == "/exec" and isinstance(body.get("command"), str):
        text = body["command"].replace("\n", " ")
        body["command"] = "# " + text
    if endpoint == "/exec" and isinstance(body.get("timeout"), int | float):
        body["timeout"] = min(body["timeout"], 30)
    return body


@FUZZ
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=st.dictionaries(st.one_of(FIELDS, st.text(max_size=8)), FIELD_VALUES, max_size=6),
)
def test_any_json_body_gets_a_json_2xx_or_4xx(
    fuzzed: Fuzzed, endpoint: str, body: dict[str, Any]
) -> None:
    fuzzed.reset_links()
    before = fuzzed.snapshot()
    content = json.dumps(tame(endpoint, body)).encode()
    response = fuzzed.server.client.post(endpoint, content=content)
    assert 200 <= response.status_code < 500, response.text
    reply = json_error(response)
    if response.status_code >= 400:
        assert set(reply["error"]) == {"code", "message"}
    assert SECRET not in response.text
    assert fuzzed.snapshot() == before
    assert fuzzed.server.proc.poll() is None


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), body=JSON_VALUES)
def test_json_that_is_not_an_object_is_a_bad_request(
    fuzzed: Fuzzed, endpoint: str, body: Any
) -> None:
    if isinstance(body, dict):
        body = [body]
    response = fuzzed.server.client.post(endpoint, content=json.dumps(body).encode())
    assert response.status_code == 400, response.text
    assert json_error(response)["error"]["code"] == "bad_request"


# --------------------------------------------------------------------------- (c) the token


def wrong_credentials(token: str) -> st.SearchStrategy[dict[str, str]]:
    prefixes = st.integers(0, len(token) - 1).map(lambda n: token[:n])
    wrong = st.one_of(
        prefixes,
        prefixes.map(lambda p: p + "x"),
        st.just(token + "x"),
        st.just(token + " " + token),
        st.just(token.swapcase()),
        st.just(token[1:]),
        # No line breaks: they would end the header line, not be part of the credential.
        st.text(max_size=50).filter(lambda t: t.strip() != token and not {"\r", "\n"} & set(t)),
    )
    return st.one_of(
        st.just({}),
        st.just({"Authorization": ""}),
        st.just({"Authorization": "Bearer"}),
        wrong.map(lambda t: {"Authorization": "Bearer " + t}),
        st.just({"Authorization": "Basic " + token}),
        st.just({"Authorization": "Token " + token}),
        st.just({"Authorization": token}),
        st.just({"X-Authorization": "Bearer " + token}),
    )


@FUZZ
@given(data=st.data(), endpoint=st.sampled_from((*ENDPOINTS, "/shutdown", "/nope")))
def test_without_the_exact_token_every_endpoint_refuses_and_does_nothing(
    fuzzed: Fuzzed, data: st.DataObject, endpoint: str
) -> None:
    token = fuzzed.server.token
    headers = data.draw(wrong_credentials(token))
    marker = fuzzed.root / ("marker-" + secrets.token_hex(4))
    (fuzzed.root / "readable.txt").write_text("private")
    bodies = {
        "/exec": {"command": f"touch {marker}"},
        "/files/write": {"path": marker.name, "content": "written"},
        "/files/read": {"path": "readable.txt"},
        "/files/list": {"path": "."},
        "/shutdown": {},
        "/nope": {},
    }
    # Raw bytes: httpx refuses to send some of these header values at all.
    payload = json.dumps(bodies[endpoint]).encode()
    lines = [f"POST {endpoint} HTTP/1.1", "Connection: close", f"Content-Length: {len(payload)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + payload
    with socket.create_connection(("127.0.0.1", fuzzed.server.ready["port"]), timeout=30) as raw:
        raw.sendall(request)
        status, reply_headers, body = first_final_reply(read_replies(raw))
    assert status == 401, body
    assert reply_headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert reply_headers["www-authenticate"] == "Bearer"
    assert b"private" not in body
    assert b"readable.txt" not in body
    assert not marker.exists()
    assert fuzzed.server.proc.poll() is None


def test_after_the_refusals_the_right_token_still_works(fuzzed: Fuzzed) -> None:
    assert_alive(fuzzed)
    assert fuzzed.server.exec("echo ok")["stdout"] == "ok\n"
    assert not list(fuzzed.root.glob("marker-*"))


# --------------------------------------------------------------------------- (d) confinement


def component_strategy(f: Fuzzed) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "..",
                ".",
                "",
                "/",
                "//",
                "evil",
                "evildir",
                "rel",
                "up",
                "hostroot",
                "dangling",
                "loop",
                "sub",
                "deep",
                "escape",
                "outside",
                "root",
                "nested",
                SENTINEL_NAME,
                "also-secret.txt",
                "new.txt",
                "\x00",
                "a\x00b",
                "x" * 300,
                "é" * 200,
                "日本語",
                "\udcff",
                " ",
                "~",
                "$HOME",
                "%2e%2e",
            ]
        ),
        st.text(min_size=1, max_size=12),
    )


@st.composite
def hostile_paths(draw: st.DrawFn, f: Fuzzed) -> str:
    parts = draw(st.lists(component_strategy(f), min_size=1, max_size=8))
    prefix = draw(
        st.sampled_from(
            [
                "",
                "/",
                str(f.root) + "/",
                str(f.root) + "/../",
                str(f.base) + "/",
                str(f.outside) + "/",
                "/etc/",
                "/tmp/",
                str(f.escape) + "/",
                "/proc/self/root/",
                "/proc/self/cwd/",
            ]
        )
    )
    return prefix + "/".join(parts)


def revealed(response: httpx.Response) -> bool:
    """Whether a reply carries the sentinel's content, base64 included."""
    if SECRET in response.text:
        return True
    with contextlib.suppress(ValueError, KeyError, TypeError):
        content = response.json()["content"]
        return SECRET.encode() in base64.b64decode(content, validate=False)
    return False


@FUZZ
@given(data=st.data())
def test_the_file_api_never_reads_or_writes_outside_the_root(
    fuzzed: Fuzzed, data: st.DataObject
) -> None:
    fuzzed.reset_links()
    path = data.draw(hostile_paths(fuzzed))
    endpoint = data.draw(st.sampled_from(FILE_ENDPOINTS))
    body: dict[str, Any] = {"path": path}
    if endpoint == "/files/read":
        body["encoding"] = data.draw(st.sampled_from(["utf-8", "base64"]))
    elif endpoint == "/files/write":
        body["content"] = "pwned"
        body["append"] = data.draw(st.booleans())
    else:
        body["recursive"] = data.draw(st.booleans())
    before = fuzzed.snapshot()
    response = fuzzed.server.client.post(endpoint, content=json.dumps(body).encode())
    assert response.status_code in (200, 400, 403, 404), response.text
    json_error(response)
    assert not revealed(response), (path, response.text[:300])
    assert fuzzed.snapshot() == before, path
    assert not fuzzed.escape.exists(), path
    if response.status_code == 200:
        # What was served is the root or inside it, after every symlink.
        served = Path(response.json()["path"])
        assert served.is_relative_to(fuzzed.root), (path, str(served))
        # (A name that is not UTF-8 comes back with U+FFFD: a display name, not a usable path.)
        if endpoint == "/files/write" and "\ufffd" not in str(served):
            assert served.read_bytes().endswith(b"pwned")
