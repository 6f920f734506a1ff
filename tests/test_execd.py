"""The exec server, run for real as a subprocess and driven over HTTP (TCP and unix socket)."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sandbox_agent
from sandbox_agent import execd

EXECD = Path(execd.__file__)
PY = shlex.quote(sys.executable)
# The interpreter that runs execd: EXECD_TEST_PYTHON=python3.8 checks the oldest supported one.
EXECD_PYTHON = os.environ.get("EXECD_TEST_PYTHON", sys.executable)


class Server:
    """A running execd and an authenticated client for it."""

    def __init__(
        self, proc: subprocess.Popen[bytes], root: Path, token: str, ready: dict[str, Any]
    ) -> None:
        self.proc = proc
        self.root = root
        self.token = token
        self.ready = ready
        self.socket_path = Path(ready["unix_socket"])
        self.base_url = f"http://127.0.0.1:{ready['port']}"
        self.client = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, json={} if body is None else body, **kwargs)

    def ok(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.post(path, body)
        assert response.status_code == 200, response.text
        reply: dict[str, Any] = response.json()
        return reply

    def exec(self, command: str, **fields: Any) -> dict[str, Any]:
        return self.ok("/exec", {"command": command, **fields})

    def error(self, path: str, body: Any, status: int) -> dict[str, str]:
        """POST and expect a JSON error reply with this status; return its error object."""
        response = self.post(path, body)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        error: dict[str, str] = response.json()["error"]
        return error

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch(
    root: Path,
    run_dir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    token: str = "",
    prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start execd on an ephemeral port and a unix socket; return (process, ready file, log).

    `prefix` runs it through another program, such as one that makes it PID 1 of a namespace.
    """
    ready = run_dir / "ready.json"
    log = run_dir / "execd.log"
    full_env = dict(os.environ if env is None else env)
    if token:
        full_env["EXECD_TOKEN"] = token
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*prefix, EXECD_PYTHON, str(EXECD), "--root", str(root), "--port", "0",
             "--unix-socket", str(run_dir / "execd.sock"), "--ready-file", str(ready), *extra],
            env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    return proc, ready, log


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if ready.exists():
            info: dict[str, Any] = json.loads(ready.read_text())
            return info
        if proc.poll() is not None:
            pytest.fail(f"execd exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"execd was not ready in time: {log.read_text()}")


def spawn(root: Path, run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    token = secrets.token_urlsafe(24)
    proc, ready, log = launch(root, run_dir, *extra, env=env, token=token)
    return Server(proc, root, token, wait_ready(proc, ready, log))


def short_dir() -> Path:
    # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="execd-test-", dir="/tmp"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start(tmp_path: Path, sock_dir: Path) -> Iterator[Callable[..., Server]]:
    """Start execd servers with extra arguments; every one is stopped at teardown."""
    servers: list[Server] = []

    def _start(*extra: str, env: dict[str, str] | None = None) -> Server:
        run_dir = sock_dir / str(len(servers))
        run_dir.mkdir()
        server = spawn(tmp_path / f"root{len(servers)}", run_dir, *extra, env=env)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start: Callable[..., Server]) -> Server:
    return start()


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_dead(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


# --- start-up, auth and health ------------------------------------------------------------


def test_ready_file_describes_the_listeners(server: Server) -> None:
    assert server.ready["pid"] == server.proc.pid
    assert isinstance(server.ready["port"], int)
    assert server.ready["port"] > 0
    assert server.ready["root"] == str(server.root)
    assert server.ready["version"] == execd.__version__
    assert server.root.is_dir(), "--root is created"


def test_version_matches_the_package() -> None:
    assert execd.__version__ == sandbox_agent.__version__


def test_start_up_imports_no_heavy_modules(tmp_path: Path, sock_dir: Path) -> None:
    """Start-up time is the sandbox's start time, and imports are most of it."""
    report = (
        "import os, sys, threading, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import execd\n"
        "def report():\n"
        "    while not os.path.exists(sys.argv[2]):\n"
        "        time.sleep(0.001)\n"
        "    print(' '.join(sorted(sys.modules)), flush=True)\n"
        "    os._exit(0)\n"
        "threading.Thread(target=report, daemon=True).start()\n"
        "execd.main(sys.argv[3:])\n"
    )
    ready = sock_dir / "ready.json"
    result = subprocess.run(
        [EXECD_PYTHON, "-I", "-S", "-c", report, str(EXECD.parent), str(ready),
         "--root", str(tmp_path / "root"), "--unix-socket", str(sock_dir / "s"),
         "--ready-file", str(ready)],
        env=dict(os.environ, EXECD_TOKEN="t"), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    heavy = {"argparse", "base64", "email", "hashlib", "hmac", "http", "secrets", "shutil", "ssl"}
    heavy |= {"tempfile", "traceback", "typing", "urllib"}
    assert not loaded & heavy


def test_healthz_answers_without_a_token(server: Server) -> None:
    response = httpx.get(server.base_url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "version": execd.__version__}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dXNlcjpwdw=="}],
    ids=["no-token", "wrong-token", "wrong-scheme"],
)
def test_requests_without_the_right_token_are_unauthorized(
    server: Server, headers: dict[str, str]
) -> None:
    for path in ("/exec", "/files/read", "/shutdown", "/nope"):
        response = httpx.post(server.base_url + path, json={"command": "true"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    assert server.proc.poll() is None


def test_no_token_exits_2_with_a_message(tmp_path: Path, sock_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EXECD_TOKEN"}
    proc, ready, log = launch(tmp_path / "root", sock_dir, env=env)
    assert proc.wait(timeout=30) == 2
    assert "EXECD_TOKEN" in log.read_text()
    assert not ready.exists()


def test_token_file_is_accepted(tmp_path: Path, sock_dir: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    env = {k: v for k, v in os.environ.items() if k != "EXECD_TOKEN"}
    proc, ready, log = launch(tmp_path / "root", sock_dir, "--token-file", str(token_file), env=env)
    try:
        info = wait_ready(proc, ready, log)
        response = httpx.post(
            f"http://127.0.0.1:{info['port']}/exec",
            json={"command": "echo ok"},
            headers={"Authorization": "Bearer file-token"},
        )
        assert response.json()["stdout"] == "ok\n"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_token_and_execd_variables_are_not_visible_to_commands(
    start: Callable[..., Server],
) -> None:
    env = dict(os.environ, EXECD_OTHER="x", VISIBLE="yes")
    server = start(env=env)
    out = server.exec("env")["stdout"]
    assert "VISIBLE=yes" in out
    assert server.token not in out
    assert "EXECD_" not in out


# --- the shell session --------------------------------------------------------------------


def test_cwd_and_exported_variables_persist_between_commands(server: Server) -> None:
    (server.root / "sub").mkdir()
    first = server.exec("cd sub && export GREETING='hello world' && LOCAL=1")
    assert first["cwd"] == str(server.root / "sub")
    second = server.exec('pwd; echo "$GREETING"; echo "$LOCAL"')
    assert second["stdout"] == f"{server.root / 'sub'}\nhello world\n1\n"
    assert second["cwd"] == str(server.root / "sub")


def test_the_session_starts_in_the_root(server: Server) -> None:
    assert server.exec("pwd")["stdout"] == f"{server.root}\n"


def test_stdout_and_stderr_are_captured_separately_with_exit_code_and_duration(
    server: Server,
) -> None:
    reply = server.exec("echo out; echo err >&2; printf tail; exit_code() { return 7; }; exit_code")
    assert reply["stdout"] == "out\ntail"
    assert reply["stderr"] == "err\n"
    assert reply["exit_code"] == 7
    assert reply["timed_out"] is False
    assert reply["session_restarted"] is False
    assert reply["stdout_truncated_bytes"] == 0
    assert reply["stderr_truncated_bytes"] == 0
    assert 0 <= reply["duration_seconds"] < 60


def test_timeout_kills_the_command_and_its_children_and_the_session_recovers(
    server: Server,
) -> None:
    (server.root / "keep").mkdir()
    server.exec("cd keep && export KEEP=yes")
    reply = server.exec("echo before; sleep 1000 & echo $! > child.pid; sleep 1000", timeout=1)
    assert reply["timed_out"] is True
    assert reply["exit_code"] == 124
    assert reply["session_restarted"] is True
    assert reply["stdout"] == "before\n"
    assert reply["cwd"] == str(server.root / "keep")
    child = int((server.root / "keep" / "child.pid").read_text())
    assert wait_dead(child), "the timed-out command's background child is still running"
    after = server.exec('pwd; echo "$KEEP"')
    assert after["stdout"] == f"{server.root / 'keep'}\nyes\n"
    assert after["session_restarted"] is False


@pytest.mark.parametrize(
    ("command", "status"),
    [("exit 3", 3), ("set -e; false; echo unreached", 1), ("kill -9 $$", 137)],
)
def test_a_command_that_ends_the_shell_returns_its_status_and_a_fresh_session_follows(
    server: Server, command: str, status: int
) -> None:
    (server.root / "d").mkdir()
    server.exec("cd d && export KEPT=1")
    reply = server.exec(command)
    assert reply["exit_code"] == status
    assert reply["session_restarted"] is True
    assert reply["timed_out"] is False
    assert "unreached" not in reply["stdout"]
    after = server.exec('echo "$KEPT"; pwd; false')
    assert after["stdout"] == f"1\n{server.root / 'd'}\n"
    assert after["exit_code"] == 1, "set -e leaked into the new session"


def test_a_background_job_does_not_delay_the_reply(server: Server) -> None:
    reply = server.exec("sleep 100 & echo started")
    assert reply["stdout"] == "started\n"
    assert reply["exit_code"] == 0
    assert reply["duration_seconds"] < 60


def test_stdin_is_dev_null(server: Server) -> None:
    reply = server.exec(
        f"cat; {PY} -c 'import sys; print(repr(sys.stdin.read()))'; read x; echo $?"
    )
    assert reply["stdout"] == "''\n1\n"
    assert reply["duration_seconds"] < 60


def test_redirecting_the_shells_own_output_does_not_hang_the_session(server: Server) -> None:
    reply = server.exec("exec 2>&1; echo to-stderr >&2", timeout=30)
    assert reply["timed_out"] is False
    assert reply["stdout"] == "to-stderr\n"
    assert server.exec("exec >/dev/null; echo hidden", timeout=30)["stdout"] == ""


def test_shell_state_other_than_exports_lives_until_the_session_restarts(server: Server) -> None:
    server.exec("f() { echo from-function; }; declare -g G=global")
    assert server.exec('f; echo "$G"')["stdout"] == "from-function\nglobal\n"


def test_huge_output_keeps_head_and_tail_around_an_omitted_marker(server: Server) -> None:
    script = "import sys; w = sys.stdout.write; w('HEAD'); w('x' * 5_000_000); w('TAIL')"
    reply = server.exec(f'{PY} -c "{script}"; echo err >&2', max_output_bytes=4096)
    out = reply["stdout"]
    cut = reply["stdout_truncated_bytes"]
    assert cut == 5_000_008 - 4096
    assert out.startswith("HEADxxx")
    assert out.endswith("xxxTAIL")
    assert f"\n[... {cut} bytes omitted ...]\n" in out
    assert len(out) < 4096 + 100
    assert reply["stderr"] == "err\n"
    assert reply["stderr_truncated_bytes"] == 0


def test_endless_output_until_timeout_stays_bounded(server: Server) -> None:
    reply = server.exec("yes", timeout=2, max_output_bytes=2048)
    assert reply["timed_out"] is True
    assert reply["stdout"].startswith("y\ny\n")
    assert reply["stdout_truncated_bytes"] > 1_000_000
    assert len(reply["stdout"]) < 2048 + 100
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    peak = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert peak is not None
    assert int(peak.group(1)) < 256 * 1024, "peak memory of execd in KiB"
    assert server.exec("echo alive")["stdout"] == "alive\n"


def test_invalid_utf8_output_is_replaced_not_fatal(server: Server) -> None:
    reply = server.exec(r"printf 'a\377b'")
    assert reply["stdout"] == "a\ufffdb"


def test_file_requests_are_served_while_a_command_runs(server: Server) -> None:
    (server.root / "f.txt").write_text("content\n")
    result: dict[str, Any] = {}

    def run() -> None:
        with httpx.Client(base_url=server.base_url, headers=server.client.headers) as c:
            result["exec"] = c.post("/exec", json={"command": "sleep 1; echo done"}).json()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    time.sleep(0.2)
    assert server.ok("/files/read", {"path": "f.txt"})["content"] == "content\n"
    assert "exec" not in result, "the file read did not wait for the command"
    worker.join(timeout=60)
    assert result["exec"]["stdout"] == "done\n"


# --- files --------------------------------------------------------------------------------


def test_read_returns_content_size_and_line_count(server: Server) -> None:
    (server.root / "a.txt").write_text("one\ntwo\nthree")
    reply = server.ok("/files/read", {"path": "a.txt"})
    assert reply == {
        "path": str(server.root / "a.txt"),
        "content": "one\ntwo\nthree",
        "encoding": "utf-8",
        "size": 13,
        "truncated": False,
        "total_lines": 3,
    }


@pytest.mark.parametrize(
    ("start_line", "end_line", "expected"),
    [(2, 3, "line2\nline3\n"), (4, -1, "line4\nline5\n"), (5, 9, "line5\n"), (7, None, "")],
)
def test_read_line_ranges_are_one_based_and_inclusive(
    server: Server, start_line: int, end_line: int | None, expected: str
) -> None:
    (server.root / "lines.txt").write_text("".join(f"line{i}\n" for i in range(1, 6)))
    body: dict[str, Any] = {"path": "lines.txt", "start_line": start_line}
    if end_line is not None:
        body["end_line"] = end_line
    reply = server.ok("/files/read", body)
    assert reply["content"] == expected
    assert reply["total_lines"] == 5


def test_read_max_bytes_truncates_without_splitting_a_character(server: Server) -> None:
    (server.root / "big.txt").write_text("a" * 100)
    reply = server.ok("/files/read", {"path": "big.txt", "max_bytes": 10})
    assert reply["content"] == "a" * 10
    assert reply["truncated"] is True
    assert reply["size"] == 100
    (server.root / "wide.txt").write_text("é" * 10)
    assert server.ok("/files/read", {"path": "wide.txt", "max_bytes": 5})["content"] == "éé"


def test_binary_content_round_trips_through_base64(server: Server) -> None:
    blob = bytes(range(256)) * 4
    encoded = base64.b64encode(blob).decode()
    body = {"path": "bin/blob", "content": encoded, "encoding": "base64"}
    written = server.ok("/files/write", body)
    assert written["size"] == len(blob)
    assert (server.root / "bin" / "blob").read_bytes() == blob
    reply = server.ok("/files/read", {"path": "bin/blob", "encoding": "base64"})
    assert base64.b64decode(reply["content"]) == blob
    assert reply["encoding"] == "base64"
    assert reply["size"] == len(blob)


def test_write_creates_parents_and_leaves_no_temporary_files(server: Server) -> None:
    reply = server.ok("/files/write", {"path": "deep/er/new.txt", "content": "héllo\n"})
    target = server.root / "deep" / "er" / "new.txt"
    assert reply == {"path": str(target), "size": len("héllo\n".encode())}
    assert target.read_text() == "héllo\n"
    assert target.stat().st_mode & 0o777 == 0o644
    server.ok("/files/write", {"path": "deep/er/new.txt", "content": "replaced"})
    assert target.read_text() == "replaced"
    assert sorted(p.name for p in target.parent.iterdir()) == ["new.txt"]


def test_write_mode_append_and_existing_mode(server: Server) -> None:
    script = server.root / "run.sh"
    server.ok("/files/write", {"path": "run.sh", "content": "#!/bin/sh\n", "mode": 0o755})
    assert script.stat().st_mode & 0o777 == 0o755
    server.ok("/files/write", {"path": "run.sh", "content": "#!/bin/sh\necho hi\n"})
    assert script.stat().st_mode & 0o777 == 0o755, "overwriting keeps the mode"
    reply = server.ok("/files/write", {"path": "run.sh", "content": "echo bye\n", "append": True})
    assert script.read_text() == "#!/bin/sh\necho hi\necho bye\n"
    assert reply["size"] == len(script.read_bytes())
    assert server.exec("./run.sh")["stdout"] == "hi\nbye\n"


def test_list_directory_plainly_and_recursively(server: Server) -> None:
    (server.root / "b" / "c").mkdir(parents=True)
    (server.root / "a.txt").write_text("12345")
    (server.root / "b" / "c" / "d.txt").write_text("")
    (server.root / "link").symlink_to("b")
    plain = server.ok("/files/list", {"path": "."})
    assert plain["path"] == str(server.root)
    assert plain["truncated"] is False
    assert [(e["path"], e["type"]) for e in plain["entries"]] == [
        ("a.txt", "file"), ("b", "dir"), ("link", "symlink"),
    ]  # fmt: skip
    assert plain["entries"][0]["size"] == 5
    deep = server.ok("/files/list", {"path": str(server.root), "recursive": True})
    assert [e["path"] for e in deep["entries"]] == ["a.txt", "b", "b/c", "b/c/d.txt", "link"]
    capped = server.ok("/files/list", {"path": ".", "recursive": True, "max_entries": 2})
    assert [e["path"] for e in capped["entries"]] == ["a.txt", "b"]
    assert capped["truncated"] is True


def test_missing_paths_are_no_such_file(server: Server) -> None:
    assert server.error("/files/read", {"path": "nope.txt"}, 404)["code"] == "no_such_file"
    assert server.error("/files/list", {"path": "nope"}, 404)["code"] == "no_such_file"


def test_directories_and_files_in_the_wrong_place_are_refused(server: Server) -> None:
    (server.root / "dir").mkdir()
    (server.root / "file").write_text("x")
    assert server.error("/files/read", {"path": "dir"}, 400)["code"] == "is_directory"
    assert server.error("/files/write", {"path": "dir", "content": ""}, 400)["code"] == (
        "is_directory"
    )
    assert server.error("/files/list", {"path": "file"}, 400)["code"] == "not_a_directory"
    assert server.error("/files/write", {"path": "file/x", "content": ""}, 400)["code"] == (
        "not_a_directory"
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for tests that change nothing: its root holds a file symlink and a directory
    symlink that both point outside the root."""
    base = tmp_path_factory.mktemp("shared")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    run_dir = short_dir()
    server = spawn(base / "root", run_dir)
    (server.root / "evil").symlink_to(outside / "secret.txt")
    (server.root / "evildir").symlink_to(outside)
    yield server
    server.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "evil", "evildir/secret.txt", "evildir/new.txt", "a/../../x"]
)
@pytest.mark.parametrize("endpoint", ["/files/read", "/files/write", "/files/list"])
def test_paths_that_resolve_outside_the_root_are_refused(
    shared: Server, endpoint: str, path: str
) -> None:
    error = shared.error(endpoint, {"path": path, "content": "pwned"}, 403)
    assert error["code"] == "path_outside_root"
    assert path in error["message"]
    outside = shared.root.parent / "outside"
    assert (outside / "secret.txt").read_text() == "secret"
    assert not (outside / "new.txt").exists()


def test_paths_inside_the_root_may_be_absolute_or_use_inner_symlinks(server: Server) -> None:
    (server.root / "real.txt").write_text("data")
    (server.root / "alias").symlink_to("real.txt")
    assert server.ok("/files/read", {"path": str(server.root / "real.txt")})["content"] == "data"
    assert server.ok("/files/read", {"path": "sub/../alias"})["content"] == "data"
    server.ok("/files/write", {"path": "alias", "content": "new"})
    assert (server.root / "alias").is_symlink(), "writing through a symlink keeps the link"
    assert (server.root / "real.txt").read_text() == "new"


# --- malformed requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        ("/exec", {}, "command"),
        ("/exec", {"command": 5}, "command"),
        ("/exec", {"command": ""}, "command"),
        ("/exec", {"command": "true", "timeout": "soon"}, "timeout"),
        ("/exec", {"command": "true", "timeout": 0}, "timeout"),
        ("/exec", {"command": "true", "timeout": 100000}, "timeout"),
        ("/exec", {"command": "true", "max_output_bytes": 10}, "max_output_bytes"),
        ("/exec", {"command": "true", "max_output_bytes": True}, "max_output_bytes"),
        ("/files/read", {"path": 7}, "path"),
        ("/files/read", {"path": "x", "encoding": "latin-1"}, "encoding"),
        ("/files/read", {"path": "x", "start_line": 0}, "start_line"),
        ("/files/read", {"path": "x", "start_line": 1, "encoding": "base64"}, "start_line"),
        ("/files/write", {"path": "x"}, "content"),
        ("/files/write", {"path": "x", "content": "!!", "encoding": "base64"}, "content"),
        ("/files/write", {"path": "x", "content": "", "append": "yes"}, "append"),
        ("/files/list", {"path": ".", "recursive": 1}, "recursive"),
    ],
)
def test_bad_fields_are_bad_requests_naming_the_field(
    shared: Server, endpoint: str, body: dict[str, Any], field: str
) -> None:
    error = shared.error(endpoint, body, 400)
    assert error["code"] == "bad_request"
    assert field in error["message"]


def test_malformed_requests_get_json_errors_and_the_server_keeps_serving(server: Server) -> None:
    c = server.client
    cases = [
        (c.post("/exec", content=b"{not json"), 400, "bad_request"),
        (c.post("/exec", content=b"[1, 2]"), 400, "bad_request"),
        (c.post("/exec", content=b"\xff\xfe"), 400, "bad_request"),
        (c.post("/exec", content=b"[" * 100_000 + b"]" * 100_000), 400, "bad_request"),
        (c.post("/nope", json={}), 404, "not_found"),
        (c.get("/exec"), 405, "method_not_allowed"),
        (c.put("/files/read", json={}), 405, "method_not_allowed"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
    with socket.create_connection(("127.0.0.1", server.ready["port"]), timeout=30) as raw:
        raw.sendall(b"GARBAGE\r\n\r\n")
        answer = b"".join(iter(lambda: raw.recv(65536), b"")).decode()
    assert answer.startswith("HTTP/1.")
    assert '"bad_request"' in answer
    assert server.exec("echo still here")["stdout"] == "still here\n"


def test_oversized_bodies_are_refused_with_413(start: Callable[..., Server]) -> None:
    server = start("--max-body-bytes", "1000")
    error = server.error("/exec", {"command": "echo " + "x" * 5000}, 413)
    assert error["code"] == "too_large"
    assert server.exec("echo small")["stdout"] == "small\n"


# --- transports and shutdown --------------------------------------------------------------


def test_the_unix_socket_serves_the_same_api(server: Server) -> None:
    transport = httpx.HTTPTransport(uds=str(server.socket_path))
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(transport=transport, base_url="http://execd", headers=headers) as c:
        assert c.get("/healthz").json()["ok"] is True
        assert c.post("/exec", json={"command": "echo via-uds"}).json()["stdout"] == "via-uds\n"
        assert (
            c.post("/exec", json={"command": "true"}, headers={"Authorization": ""}).status_code
            == 401
        )


def test_shutdown_exits_0_removes_the_socket_and_kills_the_session(server: Server) -> None:
    server.exec("sleep 1000 & echo $! > bg.pid")
    background = int((server.root / "bg.pid").read_text())
    assert server.ok("/shutdown", {}) == {"ok": True}
    assert server.proc.wait(timeout=30) == 0
    assert not server.socket_path.exists()
    assert wait_dead(background)


def test_sigterm_exits_cleanly(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert not server.socket_path.exists()


def test_a_stale_socket_file_is_replaced(tmp_path: Path, sock_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_dir / "execd.sock"))
    stale.close()
    proc, ready, log = launch(tmp_path / "root", sock_dir, token="t")
    try:
        info = wait_ready(proc, ready, log)
        transport = httpx.HTTPTransport(uds=info["unix_socket"])
        with httpx.Client(transport=transport) as c:
            assert c.get("http://execd/healthz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not Path("/bin/dash").exists(), reason="needs dash as a bash-less shell")
def test_without_bash_a_posix_sh_session_works(
    start: Callable[..., Server], tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to("/bin/dash")
    server = start(env={"PATH": str(bin_dir)})
    (server.root / "w").mkdir()
    assert server.exec('cd w; export V=1; echo "$0"')["stdout"].endswith("sh\n")
    assert server.exec("exit 4")["exit_code"] == 4
    reply = server.exec('echo "$V"; pwd')
    assert reply["stdout"] == f"1\n{server.root / 'w'}\n"
    assert server.exec("while :; do :; done", timeout=1)["timed_out"] is True
    assert server.exec('echo "$V"')["stdout"] == "1\n"


# --- the HTTP layer -----------------------------------------------------------------------


def read_reply(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP reply from a socket file: status, headers (lower-case names) and body."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def exchange(
    server: Server, data: bytes, replies: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes on one connection; read this many replies."""
    with socket.create_connection(("127.0.0.1", server.ready["port"]), timeout=30) as raw:
        raw.sendall(data)
        stream = raw.makefile("rb")
        return [read_reply(stream) for _ in range(replies)]


def closed_by_server(server: Server, data: bytes) -> bool:
    """Whether the server hangs up after answering this request."""
    with socket.create_connection(("127.0.0.1", server.ready["port"]), timeout=30) as raw:
        raw.sendall(data)
        stream = raw.makefile("rb")
        read_reply(stream)
        raw.settimeout(1)
        try:
            return stream.read(1) == b""
        except TimeoutError:
            return False


def exec_request(token: str, command: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    body = json.dumps({"command": command}).encode()
    lines = [f"POST /exec {version}", f"Authorization: Bearer {token}", *headers,
             f"Content-Length: {len(body)}"]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_a_connection_serves_requests_one_after_another(shared: Server) -> None:
    token = shared.token
    first = exec_request(token, "echo one")
    second = exec_request(token, "echo two")
    replies = exchange(shared, first + second, replies=2)
    assert [json.loads(body)["stdout"] for _, _, body in replies] == ["one\n", "two\n"]
    for status, headers, _ in replies:
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert "connection" not in headers


def test_connection_close_and_http_1_0_end_the_connection(shared: Server) -> None:
    token = shared.token
    assert not closed_by_server(shared, exec_request(token, "true"))
    assert closed_by_server(shared, exec_request(token, "true", "Connection: close"))
    assert closed_by_server(shared, exec_request(token, "true", version="HTTP/1.0"))
    keep = exec_request(token, "true", "Connection: keep-alive", version="HTTP/1.0")
    assert not closed_by_server(shared, keep)


def test_header_names_are_case_insensitive(shared: Server) -> None:
    body = b'{"command": "echo hi"}'
    request = b"POST /exec HTTP/1.1\r\nAUTHORIZATION: bearer %s\r\ncontent-LENGTH: %d\r\n\r\n%s" % (
        shared.token.encode(), len(body), body,
    )  # fmt: skip
    [(status, _, reply)] = exchange(shared, request)
    assert status == 200
    assert json.loads(reply)["stdout"] == "hi\n"


def test_expect_100_continue_is_answered_before_the_body(shared: Server) -> None:
    body = b'{"command": "echo late"}'
    head = b"POST /exec HTTP/1.1\r\nAuthorization: Bearer %s\r\nExpect: 100-continue\r\n" % (
        shared.token.encode()
    )
    with socket.create_connection(("127.0.0.1", shared.ready["port"]), timeout=30) as raw:
        raw.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        stream = raw.makefile("rb")
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        raw.sendall(body)
        status, _, reply = read_reply(stream)
    assert status == 200
    assert json.loads(reply)["stdout"] == "late\n"


def test_head_gets_headers_without_a_body(shared: Server) -> None:
    with socket.create_connection(("127.0.0.1", shared.ready["port"]), timeout=30) as raw:
        raw.sendall(b"HEAD /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        stream = raw.makefile("rb")
        # Only GET /healthz goes without a token.
        assert stream.readline().startswith(b"HTTP/1.1 401 ")
        headers = {}
        while (line := stream.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert int(headers["content-length"]) > 0
        # No body: the next bytes are the reply to the second request.
        status, _, body = read_reply(stream)
    assert status == 200
    assert json.loads(body)["ok"] is True


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "too_large", id="long-request-line"
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
            431,
            "too_large",
            id="long-header",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n",
            431,
            "too_large",
            id="many-headers",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400, "bad_request", id="no-colon"
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n folded: header\r\n\r\n", 400, "bad_request", id="folded"
        ),
        pytest.param(b"GET /healthz\r\n\r\n", 400, "bad_request", id="http-0.9"),
        pytest.param(b"GET /healthz HTTP/2.0\r\n\r\n", 505, "bad_request", id="http-2"),
        pytest.param(b"GET /healthz FTP/1.0\r\n\r\n", 400, "bad_request", id="not-http"),
        pytest.param(
            b"POST /exec HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
            id="chunked",
        ),
        pytest.param(
            b"POST /exec HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n",
            400,
            "bad_request",
            id="bad-length",
        ),
    ],
)
def test_requests_that_cannot_be_parsed_get_a_json_error_and_a_hang_up(
    shared: Server, request_bytes: bytes, status: int, code: str
) -> None:
    with socket.create_connection(("127.0.0.1", shared.ready["port"]), timeout=30) as raw:
        raw.sendall(request_bytes)
        stream = raw.makefile("rb")
        got, headers, body = read_reply(stream)
        assert stream.read() == b"", "the connection is closed after the error"
    assert got == status
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == code
    assert shared.exec("echo still here")["stdout"] == "still here\n"


def test_unknown_methods_are_not_allowed(shared: Server) -> None:
    request = b"BREW /exec HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n" % shared.token.encode()
    [(status, headers, body)] = exchange(shared, request)
    assert status == 405
    assert headers["allow"] == "POST"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


# --- as PID 1 -----------------------------------------------------------------------------

PID_NAMESPACE_LAUNCHERS = [
    ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
    ["bwrap", "--dev-bind", "/", "/", "--unshare-pid", "--as-pid-1", "--proc", "/proc",
     "--die-with-parent"],
    ["bwrap", "--unshare-user", "--dev-bind", "/", "/", "--unshare-pid", "--as-pid-1",
     "--proc", "/proc", "--die-with-parent"],
]  # fmt: skip


@pytest.fixture(scope="module")
def as_pid_1() -> list[str]:
    """A command prefix that runs a program as PID 1 of a new PID namespace."""
    for prefix in PID_NAMESPACE_LAUNCHERS:
        if shutil.which(prefix[0]) is None:
            continue
        probe = [*prefix, sys.executable, "-c", "import os; assert os.getpid() == 1"]
        if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return prefix
    pytest.skip("no PID namespace here (needs unshare as root, or bwrap)")


def namespace_init(launcher: int) -> int:
    """The host PID of the process that is PID 1 in the namespace a launcher process made."""
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            if fields["NSpid"].split()[-1] == "1" and is_descendant(
                int(status.parent.name), launcher
            ):
                return int(status.parent.name)
    pytest.fail("no PID 1 below the launcher")


def is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


def process_states(server: Server) -> dict[str, tuple[str, str, int]]:
    """Every process in the server's PID namespace: pid -> (name, state, parent pid)."""
    listing = server.exec("cat /proc/[0-9]*/stat 2>/dev/null; true")["stdout"]
    states = {}
    for line in listing.splitlines():
        head, _, rest = line.rpartition(")")
        pid, _, name = head.partition(" (")
        state, parent = rest.split()[:2]
        states[pid] = (name, state, int(parent))
    return states


def test_as_pid_1_it_reaps_orphans_and_exits_with_the_servers_status(
    as_pid_1: list[str], tmp_path: Path, sock_dir: Path
) -> None:
    token = secrets.token_urlsafe(24)
    proc, ready, log = launch(tmp_path / "root", sock_dir, token=token, prefix=as_pid_1)
    init = 0
    try:
        server = Server(proc, tmp_path / "root", token, wait_ready(proc, ready, log))
        init = namespace_init(proc.pid)
        assert server.ready["pid"] != 1, "the server runs in a child of PID 1"
        # A background job whose parent exits: it is re-parented to PID 1 and, once it exits,
        # stays a zombie unless PID 1 waits for it.
        server.exec("(sleep 0.5 & echo $! > orphan.pid); true")
        orphan = (server.root / "orphan.pid").read_text().strip()
        assert process_states(server)[orphan][2] == 1
        # So do the children of a command killed at its timeout.
        assert server.exec("sleep 1000 & sleep 1000", timeout=1)["timed_out"] is True
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = process_states(server)
            if not any(name == "sleep" for name, _, _ in states.values()):
                break
            time.sleep(0.1)
        assert not [s for s in states.values() if s[0] == "sleep" or s[1] == "Z"], states
        assert server.exec("echo alive")["stdout"] == "alive\n"
        server.client.close()
        os.kill(init, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert not server.socket_path.exists()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                if init:
                    os.kill(init, signal.SIGKILL)
            proc.kill()
            proc.wait()


# --- capture and line-slicing internals ---------------------------------------------------


@given(
    data=st.binary(max_size=300),
    after=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    limit=st.integers(min_value=2, max_value=64),
)
def test_a_sentinel_split_anywhere_is_found_and_output_is_capped(
    data: bytes, after: bytes, cuts: list[int], limit: int
) -> None:
    nonce = "ab" * 16
    stream = data + nonce.encode() + b":42\n" + after
    scanner = execd.StreamScanner(nonce.encode(), limit)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for lo, hi in itertools.pairwise(bounds):
        scanner.feed(stream[lo:hi])
    assert scanner.done
    assert scanner.status == b"42"
    text, omitted = scanner.capture.render()
    assert omitted == max(0, len(data) - limit)
    if omitted == 0:
        assert text == data.decode("utf-8", "replace")
    else:
        head = data[: limit // 2].decode("utf-8", "replace")
        tail = data[len(data) - (limit - limit // 2) :].decode("utf-8", "replace")
        assert text == f"{head}\n[... {omitted} bytes omitted ...]\n{tail}"


@given(
    lines=st.lists(
        st.sampled_from([b"", b"a", b"bb", b"\xc3\xa9", b"long line here"]), max_size=12
    ),
    final_newline=st.booleans(),
    start=st.integers(min_value=1, max_value=14),
    span=st.integers(min_value=-1, max_value=14),
    max_bytes=st.integers(min_value=1, max_value=80),
    chunk=st.integers(min_value=1, max_value=16),
)
def test_line_slicing_matches_a_simple_reference(
    lines: list[bytes], final_newline: bool, start: int, span: int, max_bytes: int, chunk: int
) -> None:
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    end = -1 if span == -1 else start + span
    reference = re.findall(rb"[^\n]*\n|[^\n]+$", data)
    wanted = b"".join(reference[start - 1 : None if end == -1 else end])
    content, truncated, total = execd.text_slice(io.BytesIO(data), start, end, max_bytes, chunk)
    assert total == len(reference)
    assert content == wanted[:max_bytes]
    assert truncated == (len(wanted) > max_bytes)


@given(
    obj=st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.text(), st.integers(), st.lists(st.text(), max_size=3)),
        max_size=4,
    )
)
def test_replies_encode_to_the_same_json_in_either_mode(obj: dict[str, Any]) -> None:
    data = execd.encode_reply(obj)
    assert json.loads(data.decode("utf-8")) == obj
    if any(isinstance(v, str) and not v.isascii() for v in obj.values()):
        assert data.isascii() is False, "non-ASCII output stays UTF-8, not \\u escapes"


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EFBIG"])
def test_a_full_disk_is_507_no_space_not_an_internal_error(code: str) -> None:
    import errno

    err = execd.os_error(OSError(getattr(errno, code), os.strerror(getattr(errno, code))), "f")
    assert (err.status, err.code) == (507, "no_space")
    assert "'f'" in err.message
    assert "free some space" in err.message
    assert execd.REASONS[507] == "Insufficient Storage"
