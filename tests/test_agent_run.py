"""Every ending of `sandboxctl run` leaves result.json and trajectory.json in its run directory:
an interrupted run and a sandbox that never starts as much as a finished task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from conftest import task_doc
from llmserver import ScriptedLLMServer, slow, tool_call


def start_sandboxctl(tmp_path: Path, doc: dict[str, Any], server: ScriptedLLMServer) -> Any:
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return subprocess.Popen(
        [sys.executable, "-m", "sandbox_agent.cli", "run", "task.yaml", "--backend", "process",
         "--out", "out", "--base-url", server.base_url, "--quiet"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def record_of(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """result.json and trajectory.json; the trajectory carries the same result."""
    result = json.loads((run_dir / "result.json").read_text())
    trajectory = json.loads((run_dir / "trajectory.json").read_text())
    assert trajectory["result"]["exitReason"] == result["exitReason"]
    return result, trajectory


def test_ctrl_c_leaves_a_cancelled_result_and_the_trajectory_so_far(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    # The model never answers in time: the run is interrupted while it waits.
    llm_server.set_default(slow(60, tool_call("submit", {"answer": "too late"})))
    proc = start_sandboxctl(tmp_path, task_doc("Wait."), llm_server)
    try:
        while not llm_server.chat_requests and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted; the sandbox was removed" in stderr
    result, trajectory = record_of(tmp_path / "out")
    assert (result["phase"], result["exitReason"]) == ("Cancelled", "cancelled")
    assert result["message"] == "interrupted before the task finished"
    assert [m["role"] for m in trajectory["messages"]] == ["system", "user"]


def test_a_sandbox_that_cannot_start_leaves_a_sandbox_error_and_an_empty_trajectory(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    # 1 MiB is too little for the exec server's interpreter (a cgroup kills it, or RLIMIT_AS).
    doc = task_doc(sandbox={"resources": {"limits": {"memory": "1Mi"}}})
    proc = start_sandboxctl(tmp_path, doc, llm_server)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    result, trajectory = record_of(tmp_path / "out")
    assert (result["phase"], result["exitReason"]) == ("Failed", "sandbox_error")
    assert result["message"].startswith("process sandbox: ")
    assert "before the exec server was ready" in result["message"]
    assert (trajectory["messages"], trajectory["steps"]) == ([], [])
    assert llm_server.chat_requests == []
