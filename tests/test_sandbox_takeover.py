"""Model-written code that tries to take over its exec server, on every backend and in the pod.

The attack (tests/attacks/takeover.py) runs as a command, as a model would run it: it looks for
the exec server and tries ptrace, /proc/PID/mem, /proc/PID/fd and environ, process_vm_readv,
pidfd_getfd, signals and replacing the socket file; with a listening socket in hand it kills
the real server and serves a fake one naming an escaping and an absolute output path.

- bwrap (as root: two uids; as another user: one uid, non-dumpable server, seccomp), docker and
  the pod: every attempt fails, the task goes on, nothing lands outside the output directory.
- process (no isolation): the socket file can be replaced and the server killed, so the takeover
  succeeds; the host still writes nothing outside the output directory and fails the task as
  sandbox_error (SandboxCompromised).
- The pod entry point against a replaced server: the same refusal, beneath --artifacts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ALL_BACKENDS, bwrap_works, task_doc
from fakeexecd import Handler, Reply, fake_execd_thread, file_reply, listing
from llmserver import ScriptedLLMServer, tool_call
from sandbox_agent.backends.base import ExecEndpoint
from sandbox_agent.execclient import ExecClient
from sandbox_agent.execd_cmdline import execd_command
from sandbox_agent.outputs import collect_outputs
from sandbox_agent.pod_entrypoint import install, private_dir
from sandbox_agent.result import ExitReason, Phase

ATTACK = Path(__file__).parent / "attacks" / "takeover.py"
ESCAPING = "../../x/PWNED.txt"
# Every way in the attack tries, and what a contained sandbox answers.
REFUSED = {"EPERM", "EACCES", "ESRCH"}
PROBES = ("ptrace_attach", "proc_mem_write", "proc_fd_list", "proc_environ", "process_vm_readv")


def report_of(observation: str) -> dict[str, Any]:
    line = next(x for x in observation.splitlines() if x.startswith("{"))
    report: dict[str, Any] = json.loads(line)
    return report


def observation(llm_server: ScriptedLLMServer, index: int) -> str:
    return str((llm_server.chat_requests[index].json or {})["messages"][-1]["content"])


def pwned_files(root: Path, allowed: Path) -> list[Path]:
    """Files named PWNED anywhere under `root` except beneath `allowed` (the output directory)."""
    return [p for p in root.rglob("*PWNED*") if not p.is_relative_to(allowed)]


def assert_contained(report: dict[str, Any], split: bool) -> None:
    assert report["servers"] >= 1, report  # the attack did find its target
    assert report["took_over"] is False, report
    for probe in PROBES:
        assert report[probe] in REFUSED, (probe, report)
    assert report.get("pidfd_getfd", report.get("pidfd_open")) in REFUSED | {"EBADF"}, report
    assert report.get("replace_socket", "EACCES") in REFUSED, report
    if split:
        # Another uid: the commands cannot even signal the exec server.
        assert report["signal"] == "EPERM", report


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_command_that_takes_over_the_exec_server_cannot_write_outside_the_output_dir(
    backend: str, tmp_path: Path, llm_server: ScriptedLLMServer, run_local: Any
) -> None:
    absolute = tmp_path / "abs-PWNED.txt"
    # On the process backend the attack's server kills the real one a second after this command:
    # the next command then finds it gone, and what the host asks afterwards reaches the fake.
    after = "sleep 10" if backend == "process" else "echo alive"
    llm_server.script(
        tool_call("execute_bash", {"command": f"python3 input/takeover.py {ESCAPING} {absolute}"}),
        tool_call("execute_bash", {"command": after}),
        tool_call("submit", {"answer": "done"}),
    )
    doc = task_doc(inputs=[{"path": "takeover.py", "content": ATTACK.read_text()}])
    outcome = run_local(doc, backend=backend)
    report = report_of(observation(llm_server, 1))
    result = outcome.result
    assert not absolute.exists()
    assert not (tmp_path / "x" / "PWNED.txt").exists()
    assert pwned_files(tmp_path, outcome.output_dir) == []
    if backend == "process":
        # No isolation: the commands share the server's uid and directory, so they can.
        assert report["took_over"] is True, report
        assert result.exit_reason is ExitReason.SANDBOX_ERROR
        assert result.phase is Phase.FAILED
        assert result.cause == "SandboxCompromised"
        assert repr(ESCAPING) in result.message
    else:
        assert_contained(report, split=backend == "docker" or os.geteuid() == 0)
        assert observation(llm_server, 2).endswith("alive")
        assert result.phase is Phase.SUCCEEDED, result.message
        assert result.answer == "done"


# --- bwrap started by an unprivileged user -----------------------------------------------------

UNPRIVILEGED_UID = 54321
_DRIVER = """
import asyncio, json, sys
from sandbox_agent.backends.base import SandboxConfig
from sandbox_agent.backends.bwrap import BwrapSandbox

async def main():
    sandbox = BwrapSandbox(SandboxConfig())
    endpoint = await sandbox.start()
    print(json.dumps({"uds": endpoint.uds, "token": endpoint.token,
                      "split": sandbox.split_users}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await sandbox.stop()

asyncio.run(main())
"""


@contextlib.contextmanager
def unprivileged_bwrap() -> Iterator[tuple[ExecEndpoint, bool]]:
    """A bwrap sandbox started by an unprivileged user (the backends need only the standard
    library to start one); as root, through setpriv to another uid."""
    prefix: list[str] = []
    python = sys.executable
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None or not os.access("/usr/bin/python3", os.X_OK):
            pytest.skip("needs setpriv and /usr/bin/python3 to act as an unprivileged user")
        prefix = [setpriv, f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}"]
        prefix += ["--clear-groups", "--"]
        python = "/usr/bin/python3"
    agent = str(Path(__file__).parents[1] / "agent")
    proc = subprocess.Popen(
        [*prefix, python, "-c", _DRIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": agent, "TMPDIR": "/tmp"},
        cwd="/",
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        line = proc.stdout.readline()
        assert line, "the unprivileged bwrap sandbox did not start"
        info = json.loads(line)
        yield (
            ExecEndpoint(token=info["token"], workspace="/workspace", uds=info["uds"]),
            info["split"],
        )
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.mark.bwrap
@pytest.mark.skipif(not bwrap_works(), reason="bubblewrap not installed or not usable")
def test_bwrap_started_by_an_unprivileged_user_contains_the_takeover(tmp_path: Path) -> None:
    """One uid for server and commands: non-dumpable server, seccomp, socket passed by fd."""
    absolute = tmp_path / "abs-PWNED.txt"

    async def attack(endpoint: ExecEndpoint) -> tuple[dict[str, Any], list[Any]]:
        async with ExecClient(endpoint) as client:
            await client.write_bytes("input/takeover.py", ATTACK.read_bytes())
            await client.write_bytes("output/result.txt", b"fine\n")
            res = await client.exec(f"python3 input/takeover.py {ESCAPING} {absolute}", 60)
            after = await client.exec("echo alive", 30)
            assert after.stdout == "alive\n"
            return report_of(res.stdout), await collect_outputs(client, tmp_path / "out")

    with unprivileged_bwrap() as (endpoint, split):
        assert split is False
        report, outputs = asyncio.run(attack(endpoint))
    assert report["uid"] == 1000
    assert_contained(report, split=False)
    assert [o.path for o in outputs] == ["result.txt"]
    assert pwned_files(tmp_path, tmp_path / "out") == []


# --- The pod entry point ---------------------------------------------------------------------


def pod_python(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox_agent.pod_entrypoint", *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def pod_root() -> Iterator[Path]:
    """Pod volumes below a directory every uid may pass through (pytest's tmp_path is root's
    alone), as a kubelet's volumes are."""
    root = Path(tempfile.mkdtemp(prefix="llmsandbox-podtest-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pod_task(path: Path, server: ScriptedLLMServer) -> Path:
    config = {
        "name": "takeover",
        "prompt": "Go.",
        "model": {"name": "scripted-model", "baseURL": server.base_url},
        "limits": {"maxSteps": 5},
    }
    path.write_text(json.dumps(config))
    return path


def run_pod_agent(root: Path, server: ScriptedLLMServer) -> tuple[dict[str, Any], Path]:
    term = root / "termination-log"
    artifacts = root / "artifacts"
    proc = pod_python(
        "run", "--task", str(pod_task(root / "task.json", server)), "--run-dir", str(root / "run"),
        "--termination-log", str(term), "--artifacts", str(artifacts), "--execd-timeout", "30",
        env={"OPENAI_API_KEY": "sk-pod"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(term.read_text())
    return result, artifacts


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
    reason="the pod's two-uid layout needs root (as the sandbox container starts) and a system python3",
)
def test_in_the_pod_the_takeover_fails_against_the_two_uid_layout(
    pod_root: Path, llm_server: ScriptedLLMServer
) -> None:
    """The sandbox container's command as the pod builder gives it: the exec server drops to the
    agent's uid (owner of private/), commands run as nobody."""
    for name in ("bin", "run", "workspace"):
        (pod_root / name).mkdir()
    (pod_root / "workspace").chmod(0o777)
    install(pod_root / "bin", pod_root / "run")
    # The init container runs as the agent's uid, and so made private/ its own.
    for path in (private_dir(pod_root / "run"), private_dir(pod_root / "run") / "token"):
        os.chown(path, 65532, 65532)
    (pod_root / "workspace" / "input").mkdir()
    shutil.copy(ATTACK, pod_root / "workspace" / "input" / "takeover.py")
    absolute = pod_root / "abs-PWNED.txt"
    command = execd_command(
        str(pod_root / "bin" / "execd.py"),
        str(pod_root / "run"),
        str(pod_root / "workspace"),
        users=((65532, 65532), (65534, 65534)),
    )
    sandbox = subprocess.Popen(
        ["/usr/bin/python3", *command[1:]],
        env={"PATH": "/usr/bin:/bin", "HOME": str(pod_root / "workspace")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        llm_server.script(
            tool_call(
                "execute_bash",
                {"command": f"python3 input/takeover.py {ESCAPING} {absolute}; echo x > output/a"},
            ),
            tool_call("submit", {"answer": "done"}),
        )
        result, artifacts = run_pod_agent(pod_root, llm_server)
    finally:
        sandbox.kill()
        sandbox.wait(timeout=30)
    report = report_of(observation(llm_server, 1))
    assert report["uid"] == 65534
    assert_contained(report, split=True)
    assert result["phase"] == "Succeeded", result
    assert [o["path"] for o in result["outputs"]] == ["a"]
    assert pwned_files(pod_root, artifacts / "output") == []


def test_the_pod_agent_writes_nothing_outside_its_artifacts_for_a_replaced_server(
    pod_root: Path, llm_server: ScriptedLLMServer
) -> None:
    """What a replaced exec server answers the pod's agent: escaping output paths."""
    absolute = pod_root / "abs-PWNED.txt"
    routes: dict[str, Handler] = {
        "/healthz": lambda _b: Reply({"ok": True}),
        "/files/write": lambda _b: Reply({"path": "/workspace/output/.keep", "size": 0}),
        "/files/list": lambda b: (
            listing(ESCAPING, str(absolute))
            if b.get("path") == "output"
            else Reply({"path": "/workspace/input", "entries": []})
        ),
        "/files/read": lambda _b: file_reply(b"pwned\n"),
        "/shutdown": lambda _b: Reply({"ok": True}),
    }
    run_dir = pod_root / "run"
    install(pod_root / "bin", run_dir)
    private = private_dir(run_dir)
    llm_server.script(tool_call("submit", {"answer": "42"}))
    with fake_execd_thread(private / "execd.sock", routes):
        (private / "ready.json").write_text("{}")
        result, artifacts = run_pod_agent(pod_root, llm_server)
    assert result["phase"] == "Failed"
    assert result["exitReason"] == "sandbox_error"
    assert result["cause"] == "SandboxCompromised"
    assert repr(ESCAPING) in result["message"]
    assert not absolute.exists()
    assert not (pod_root / "x").exists()
    assert pwned_files(pod_root, artifacts / "output") == []
