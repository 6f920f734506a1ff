"""The exec server, and the attack script the tests run in sandboxes, keep to Python 3.8: sandbox
images bring whatever python3 they have."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXECD = REPO / "agent" / "sandbox_agent" / "execd.py"
STANDALONE = [EXECD, REPO / "tests" / "attacks" / "takeover.py"]


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_the_file_parses_as_python_3_8(path: Path) -> None:
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


def python38() -> str | None:
    """A working Python 3.8: EXECD_TEST_PYTHON, or python3.8 on PATH."""
    for candidate in (os.environ.get("EXECD_TEST_PYTHON"), shutil.which("python3.8")):
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.mark.skipif(
    python38() is None, reason="no Python 3.8 here (EXECD_TEST_PYTHON or python3.8)"
)
def test_the_exec_server_serves_under_python_3_8(tmp_path: Path) -> None:
    python = python38()
    assert python is not None
    (tmp_path / "token").write_text("t" * 32)
    server = subprocess.Popen(
        [python, "-I", "-S", str(EXECD), "--root", str(tmp_path / "ws"), "--port", "0",
         "--token-file", str(tmp_path / "token"), "--ready-file", str(tmp_path / "ready.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _CLIENT, str(tmp_path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["0", "hello", "written"]


_CLIENT = """
import asyncio, json, sys, time
from pathlib import Path
from sandbox_agent.backends.base import ExecEndpoint
from sandbox_agent.execclient import ExecClient
root = Path(sys.argv[1])
for _ in range(500):
    if (root / "ready.json").exists():
        break
    time.sleep(0.02)
port = json.loads((root / "ready.json").read_text())["port"]
async def main():
    endpoint = ExecEndpoint(token="t" * 32, workspace=str(root / "ws"), url=f"http://127.0.0.1:{port}")
    async with ExecClient(endpoint) as client:
        res = await client.exec("echo hello", 30)
        await client.write_text("f.txt", "written")
        text = await client.read_text("f.txt")
        print(res.exit_code, res.stdout.strip(), text.content)
asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching a child's uid needs root")
def test_commands_take_the_command_user_on_python_3_8_too() -> None:
    """Before 3.9 Popen has no user/group arguments: run_as demotes in preexec_fn instead."""
    script = (
        "import sys, subprocess; sys.path.insert(0, sys.argv[1]); import execd; "
        "execd.sys = type('S', (), {'version_info': (3, 8)})(); "
        "kwargs = execd.run_as((65534, 65534)); assert set(kwargs) == {'preexec_fn'}; "
        "print(subprocess.run(['/bin/sh', '-c', 'id -u; id -G'], capture_output=True, text=True, **kwargs).stdout)"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(EXECD.parent)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["65534", "65534"]
