"""The agent's API key stays with the agent: never in the sandbox's environment, files or process
table, never in the trajectory, the result, the output files or any log, locally (`sandboxctl
run` on the process and bwrap backends) or in a pod (`python -m sandbox_agent.pod_entrypoint run`).

The scripted model looks for it from inside the sandbox (env, /proc/self/environ, every
process's environ, `ps eww`, grep over the workspace, /tmp and /run); whatever it finds would
land in an observation, so the check covers what the model saw, the trajectory and the logs.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import bwrap_works, task_doc
from llmserver import ScriptedLLMServer, echo_request_headers, tool_call
from sandbox_agent.events import Event
from sandbox_agent.execd_cmdline import execd_command
from sandbox_agent.local_commands import ProgressPrinter
from sandbox_agent.pod_entrypoint import _log as pod_log
from sandbox_agent.result import ExitReason
from sandbox_agent.runner import RunOptions, run_task
from sandbox_agent.taskfile import load_task_file
from test_pod_builder import container, make_task, pod_for

REPO = Path(__file__).resolve().parent.parent
# The checkout's own code for the subprocesses, installed or not.
PYTHONPATH = os.pathsep.join(
    [str(REPO / "agent"), str(REPO / "operator"), *filter(None, [os.environ.get("PYTHONPATH")])]
)
CANARY_PREFIX = "sk-canary-"
# A pattern for the key that is not the key: the commands below must not contain it.
FIND = f"{CANARY_PREFIX}[A-Za-z0-9]*"


def canary() -> str:
    return CANARY_PREFIX + secrets.token_hex(16)


def probes(workspace: str) -> list[tuple[str, dict[str, Any]]]:
    """Tool calls that hunt for the key from inside the sandbox, then save what they saw."""
    grep_roots = f"{workspace} /tmp /run $HOME"
    everything = (
        "env; echo ---; tr '\\0' '\\n' < /proc/self/environ; echo ---; "
        "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | sort -u; echo ---; "
        "ps eww -A 2>&1 || ps eww 2>&1"
    )
    return [
        ("execute_bash", {"command": "env"}),
        ("execute_bash", {"command": "tr '\\0' '\\n' < /proc/self/environ"}),
        ("execute_bash", {"command": "tr '\\0' '\\n' < /proc/$PPID/environ"}),
        (
            "execute_bash",
            {
                "command": "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' "
                f"| grep -a -o '{FIND}'; echo environ-scan-done"
            },
        ),
        ("execute_bash", {"command": "ps eww -A 2>&1 || ps eww 2>&1"}),
        (
            "execute_bash",
            {
                "command": f"timeout 120 grep -r -a -s -o --devices=skip '{FIND}' {grep_roots}; "
                "timeout 120 grep -r -a -s -l --devices=skip OPENAI_API_KEY "
                f"{grep_roots}; echo grep-done"
            },
        ),
        (
            "execute_bash",
            {"command": f"mkdir -p output && {{ {everything}; }} > output/probes.txt"},
        ),
        ("submit", {"answer": "nothing found"}),
    ]


def assert_absent(key: str, where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    assert key.encode() not in data, f"the API key leaked into {where}"


def assert_tree_clean(key: str, root: Path) -> int:
    """No file under root holds the key; returns how many files were checked."""
    count = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert_absent(key, str(path), path.read_bytes())
            count += 1
    return count


def assert_model_saw_no_key(key: str, server: ScriptedLLMServer) -> None:
    requests = server.chat_requests
    assert requests, "the model was never asked"
    for request in requests:
        # The key goes out only where it belongs: the Authorization header.
        assert request.headers["authorization"] == f"Bearer {key}"
        assert_absent(key, "a request body (what the model was shown)", request.body)
        for name, value in request.headers.items():
            if name != "authorization":
                assert_absent(key, f"request header {name}", value)


def observations(server: ScriptedLLMServer) -> list[str]:
    return [
        str(m.get("content"))
        for m in (server.chat_requests[-1].json or {})["messages"]
        if m.get("role") == "tool"
    ]


# A wrapper around `sandboxctl` that keeps the exec server's log and the sandbox workspace
# (both removed when the sandbox stops) for inspection.
KEEPER = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    from sandbox_agent.backends.base import Sandbox
    from sandbox_agent.cli import main

    keep = Path(sys.argv[1])
    stop = Sandbox.stop

    async def keeping_stop(self):
        log = getattr(self, "log_path", None)
        if log is not None and Path(log).exists():
            shutil.copyfile(log, keep / "execd.log")
        ws = getattr(self, "host_workspace", None) or getattr(self, "workspace", None)
        if ws is not None and Path(ws).is_dir():
            shutil.copytree(ws, keep / "workspace", symlinks=True, dirs_exist_ok=True)
        await stop(self)

    Sandbox.stop = keeping_stop
    sys.exit(main(sys.argv[2:]))
    """
)

BACKENDS = [
    pytest.param("process", id="process"),
    pytest.param(
        "bwrap",
        id="bwrap",
        marks=[
            pytest.mark.bwrap,
            pytest.mark.skipif(not bwrap_works(), reason="bubblewrap not installed or not usable"),
        ],
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sandboxctl_run_never_exposes_the_api_key(
    backend: str, tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    key = canary()
    workspace = "/workspace" if backend == "bwrap" else "."
    llm_server.script(*[tool_call(name, args) for name, args in probes(workspace)])
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_doc(limits={"maxSteps": 12})))
    keep = tmp_path / "kept"
    keep.mkdir()
    (tmp_path / "keeper.py").write_text(KEEPER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env |= {
        "PYTHONPATH": PYTHONPATH,
        "OPENAI_BASE_URL": llm_server.base_url,
        "OPENAI_API_KEY": key,
        "OPENAI_MODEL": "scripted-model",
    }
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "keeper.py"), str(keep),
         "run", "task.yaml", "--backend", backend, "--out", "out"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "exitReason:  submitted" in proc.stdout

    seen = observations(llm_server)
    assert len(seen) == len(probes(workspace)) - 1  # all but submit
    # The probes ran: they saw an environment, a process table, the end of the scans.
    assert "PATH=" in seen[0]
    assert "PID" in seen[4]
    assert "environ-scan-done" in seen[3]
    assert "grep-done" in seen[5]
    assert "OPENAI_API_KEY" not in seen[0] + seen[1] + seen[2]

    assert_model_saw_no_key(key, llm_server)
    assert_absent(key, "sandboxctl's stdout", proc.stdout)
    assert_absent(key, "sandboxctl's stderr (progress log)", proc.stderr)
    assert assert_tree_clean(key, tmp_path / "out") >= 3  # result, trajectory, output/probes.txt
    assert (tmp_path / "out" / "output" / "probes.txt").stat().st_size > 0
    assert (keep / "execd.log").exists(), "the exec server log was not captured"
    assert_absent(key, "the exec server log", (keep / "execd.log").read_bytes())
    assert (keep / "workspace" / "output" / "probes.txt").exists()
    assert_tree_clean(key, keep / "workspace")


def test_the_pod_agent_never_exposes_the_api_key(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    dirs = {n: tmp_path / n for n in ("bin", "run", "workspace", "artifacts")}
    for d in dirs.values():
        d.mkdir()
    key = canary()
    base_env = {"PATH": os.environ["PATH"], "PYTHONPATH": PYTHONPATH}
    install = subprocess.run(
        [sys.executable, "-m", "sandbox_agent.pod_entrypoint", "install",
         "--execd-dir", str(dirs["bin"]), "--run-dir", str(dirs["run"])],
        env=base_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    execd_log = tmp_path / "execd.log"
    with execd_log.open("wb") as log:
        sandbox = subprocess.Popen(
            [sys.executable, *execd_command(
                str(dirs["bin"] / "execd.py"), str(dirs["run"]), str(dirs["workspace"])
            )[1:]],
            env=base_env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        llm_server.script(*[tool_call(n, a) for n, a in probes(str(dirs["workspace"]))])
        config = {
            "name": "secret-hygiene",
            "prompt": "Look around.",
            "model": {"name": "scripted-model", "baseURL": llm_server.base_url},
            "limits": {"maxSteps": 12},
        }
        (tmp_path / "task.json").write_text(json.dumps(config))
        term = tmp_path / "termination-log"
        proc = subprocess.run(
            [sys.executable, "-m", "sandbox_agent.pod_entrypoint", "run", "--task", str(tmp_path / "task.json"),
             "--run-dir", str(dirs["run"]), "--termination-log", str(term),
             "--artifacts", str(dirs["artifacts"])],
            env=base_env | {"OPENAI_API_KEY": key}, capture_output=True, text=True,
            timeout=600, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert json.loads(term.read_text())["exitReason"] == "submitted"
        assert sandbox.wait(timeout=30) == 0
    finally:
        if sandbox.poll() is None:
            sandbox.kill()
            sandbox.wait()
    seen = observations(llm_server)
    assert "PATH=" in seen[0]
    assert "PID" in seen[4]
    assert_model_saw_no_key(key, llm_server)
    assert_absent(key, "the agent container's stdout (pod log)", proc.stdout)
    assert_absent(key, "the agent container's stderr (pod log)", proc.stderr)
    assert_absent(key, "the termination message", term.read_text())
    assert_absent(key, "the exec server's log", execd_log.read_bytes())
    assert assert_tree_clean(key, dirs["artifacts"]) >= 2  # trajectory, output/probes.txt
    assert_tree_clean(key, dirs["workspace"])
    assert_tree_clean(key, dirs["run"])


def test_the_pod_spec_gives_the_key_to_the_agent_container_only() -> None:
    pod = pod_for(make_task())
    spec = pod["spec"]
    # A shared PID namespace would let the sandbox read the agent's /proc/PID/environ.
    assert not spec.get("shareProcessNamespace")
    for c in spec["containers"] + spec["initContainers"]:
        names = [e["name"] for e in c.get("env", [])]
        if c["name"] == "agent":
            [entry] = [e for e in c["env"] if e["name"] == "OPENAI_API_KEY"]
            assert set(entry) == {"name", "valueFrom"}
            assert set(entry["valueFrom"]) == {"secretKeyRef"}
        else:
            assert "OPENAI_API_KEY" not in names, c["name"]
            assert "envFrom" not in c, c["name"]
    assert container(pod, "agent")["name"] == "agent"


# --------------------------------------------------------------------------- error echoes


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 503])
def test_an_endpoint_echoing_the_authorization_header_does_not_leak_the_key(
    status: int, tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    key = canary()
    llm_server.set_default(echo_request_headers(status))
    task_file = tmp_path / "task.yaml"
    task_file.write_text(yaml.safe_dump(task_doc(limits={"maxLlmRetries": 1})))
    events: list[Event] = []
    options = RunOptions(
        backend="process",
        base_url=llm_server.base_url,
        out_dir=tmp_path / "run",
        retry_backoff_seconds=0.01,
        env={"OPENAI_API_KEY": key},
    )
    outcome = asyncio.run(
        run_task(load_task_file(task_file), tmp_path, options, events.append, task_file)
    )
    result = outcome.result
    assert result.exit_reason is ExitReason.LLM_ERROR
    assert f"HTTP {status}" in result.message
    # The endpoint really did send the key back.
    assert llm_server.chat_requests[0].headers["authorization"] == f"Bearer {key}"
    if status in (400, 404, 422):
        # These messages quote the endpoint's error text; the key is cut out of it.
        assert "request headers:" in result.message
        assert "[redacted]" in result.message
    assert_absent(key, "the result message", result.message)
    # What the CLI prints and what the pod logs for these events.
    printed = io.StringIO()
    progress = ProgressPrinter(printed)
    for event in events:
        progress(event)
    assert_absent(key, "the progress log", printed.getvalue())
    logged = io.StringIO()
    real_stderr, sys.stderr = sys.stderr, logged
    try:
        for event in events:
            pod_log(event)
    finally:
        sys.stderr = real_stderr
    assert_absent(key, "the pod log", logged.getvalue())
    assert_absent(key, "result.json", (outcome.run_dir / "result.json").read_text())
    assert_absent(key, "trajectory.json", outcome.trajectory_path.read_text())
