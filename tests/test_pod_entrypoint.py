"""The agent container's entry point, run as the pod runs it: init step, exec server, agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmserver import ScriptedLLMServer, slow, text, tool_call
from sandbox_agent.execd_cmdline import execd_command
from sandbox_agent.result import RESULT_LOG_PREFIX, TaskResult, termination_message


def pod_python(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox_agent.pod_entrypoint", *args],
        env={"PATH": os.environ["PATH"], **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_task(path: Path, server: ScriptedLLMServer, **limits: Any) -> Path:
    config = {
        "name": "t1",
        "prompt": "Compute 2**20.",
        "model": {"name": "scripted-model", "baseURL": server.base_url},
        "limits": {"maxSteps": 5, **limits},
    }
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def pod_dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = {n: tmp_path / n for n in ("bin", "run", "workspace")}
    for d in dirs.values():
        d.mkdir()
    return dirs


def start_sandbox(dirs: dict[str, Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            *execd_command(str(dirs["bin"] / "execd.py"), str(dirs["run"]), str(dirs["workspace"]))[1:],
        ],
        env={"PATH": os.environ["PATH"]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_install_copies_the_exec_server_and_writes_a_private_token(
    pod_dirs: dict[str, Path],
) -> None:
    proc = pod_python(
        "install", "--execd-dir", str(pod_dirs["bin"]), "--run-dir", str(pod_dirs["run"])
    )
    assert proc.returncode == 0, proc.stderr
    assert (pod_dirs["bin"] / "execd.py").read_text().startswith('"""')
    token = pod_dirs["run"] / "private" / "token"
    assert len(token.read_text()) >= 32
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.parent.stat().st_mode & 0o777 == 0o700


def test_the_agent_reports_through_the_termination_message_and_stops_the_sandbox(
    pod_dirs: dict[str, Path], tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    assert (
        pod_python(
            "install", "--execd-dir", str(pod_dirs["bin"]), "--run-dir", str(pod_dirs["run"])
        ).returncode
        == 0
    )
    sandbox = start_sandbox(pod_dirs)
    try:
        llm_server.script(
            tool_call(
                "execute_bash", {"command": "python3 -c 'print(2**20)' | tee output/answer.txt"}
            ),
            tool_call("submit", {"answer": "1048576"}),
        )
        task = write_task(tmp_path / "task.json", llm_server)
        term = tmp_path / "termination-log"
        proc = pod_python(
            "run", "--task", str(task), "--run-dir", str(pod_dirs["run"]),
            "--termination-log", str(term), "--artifacts", str(tmp_path / "artifacts"),
            env={"OPENAI_API_KEY": "sk-pod-secret"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        result = json.loads(term.read_text())
        assert result["phase"] == "Succeeded"
        assert result["answer"] == "1048576"
        assert result["outputs"] == [{"path": "answer.txt", "bytes": 8}]
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith(RESULT_LOG_PREFIX)
        assert json.loads(last.removeprefix(RESULT_LOG_PREFIX))["answer"] == "1048576"
        assert llm_server.chat_requests[0].headers["authorization"] == "Bearer sk-pod-secret"
        assert (tmp_path / "artifacts" / "output" / "answer.txt").read_text() == "1048576\n"
        assert "sk-pod-secret" not in (tmp_path / "artifacts" / "trajectory.json").read_text()
        # The agent told the exec server to exit, so the sandbox container ends too.
        assert sandbox.wait(timeout=10) == 0
    finally:
        sandbox.kill()


def test_a_sandbox_that_never_starts_is_a_sandbox_error(
    pod_dirs: dict[str, Path], tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    task = write_task(tmp_path / "task.json", llm_server)
    term = tmp_path / "termination-log"
    proc = pod_python(
        "run", "--task", str(task), "--run-dir", str(pod_dirs["run"]),
        "--termination-log", str(term), "--execd-timeout", "0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(term.read_text())
    assert result["exitReason"] == "sandbox_error"
    assert "not ready after 0s" in result["message"] or "not ready after 1s" in result["message"]
    assert llm_server.chat_requests == []


def test_an_invalid_task_config_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "task.json").write_text(json.dumps({"prompt": "", "model": {"name": "m"}}))
    proc = pod_python("run", "--task", str(tmp_path / "task.json"), "--run-dir", str(tmp_path))
    assert proc.returncode != 0
    assert "prompt: String should have at least 1 character" in proc.stderr
    assert "model.baseURL: Field required" in proc.stderr


def test_a_result_too_large_for_the_termination_message_is_cut_and_flagged() -> None:
    big = TaskResult.model_validate(
        {"phase": "Succeeded", "exitReason": "submitted", "answer": "é" * 10_000, "steps": 3}
    )
    message = termination_message(big, limit=4096)
    assert len(message.encode()) <= 4096
    data = json.loads(message)
    assert data["resultInLog"] is True
    assert data["answerTruncated"] is True
    assert data["answer"].startswith("é" * 100)
    assert data["steps"] == 3
    small = TaskResult.model_validate({"phase": "Failed", "exitReason": "max_steps", "answer": "x"})
    assert "resultInLog" not in json.loads(termination_message(small))


def test_a_sandbox_that_stops_mid_run_ends_the_run_at_once_with_what_it_spent(
    pod_dirs: dict[str, Path], tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    # The model thinks and never runs a command, so only the watch can notice the sandbox going.
    assert pod_python(
        "install", "--execd-dir", str(pod_dirs["bin"]), "--run-dir", str(pod_dirs["run"])
    ).returncode == 0  # fmt: skip
    sandbox = start_sandbox(pod_dirs)
    llm_server.script(text("let me think"))
    llm_server.set_default(slow(1, text("still thinking")))
    task = write_task(tmp_path / "task.json", llm_server, maxSteps=100)
    term = tmp_path / "termination-log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "sandbox_agent.pod_entrypoint", "run", "--task", str(task),
         "--run-dir", str(pod_dirs["run"]), "--termination-log", str(term)],
        env={"PATH": os.environ["PATH"]}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        for _ in range(600):
            if len(llm_server.chat_requests) >= 2:
                break
            time.sleep(0.05)
        assert len(llm_server.chat_requests) >= 2, "the run never got going"
        sandbox.kill()  # what the OOM killer does to the sandbox container's exec server
        sandbox.wait(timeout=10)
        _, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
        sandbox.kill()
    assert agent.returncode == 0, err
    result = json.loads(term.read_text())
    assert (result["exitReason"], result["cause"]) == ("sandbox_error", "SandboxStopped")
    assert result["message"].startswith("the sandbox container stopped during the run")
    assert result["steps"] >= 1  # what was spent up to then is reported, not lost
    assert result["usage"]["llmCalls"] >= 1
    asked = len(llm_server.chat_requests)
    time.sleep(1.5)
    assert len(llm_server.chat_requests) == asked  # the model is no longer asked
