"""One agent run (agent_run.py): every ending of `sandboxctl run` leaves result.json and
trajectory.json in its run directory, an interrupted run and a sandbox that never starts as much
as a finished task; and what a workspace that refuses output/ or the inputs does to a run."""

from __future__ import annotations

import asyncio
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
from fakeexecd import Handler, Reply, fake_execd, listing
from llmserver import ScriptedLLMServer, slow, tool_call
from sandbox_agent.agent_run import AgentTask, LLMEndpoint, RunRecord, run_agent
from sandbox_agent.errors import SandboxError
from sandbox_agent.events import Event, Notice
from sandbox_agent.execclient import ExecClient
from sandbox_agent.podconfig import PodModelConfig
from sandbox_agent.result import ExitReason, TaskResult
from sandbox_agent.task import Limits


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


def agent_for(server: ScriptedLLMServer) -> AgentTask:
    model = PodModelConfig.model_validate({"name": "scripted-model", "baseURL": server.base_url})
    endpoint = LLMEndpoint(server.base_url, "k", "scripted-model")
    return AgentTask("t", "Solve it.", endpoint, model, Limits(max_steps=3, max_llm_retries=0))


REFUSED = Reply({"error": {"code": "permission_denied", "message": "no"}}, status=403)
EMPTY_OUTPUT = listing()


def test_a_workspace_that_refuses_output_is_noted_and_the_run_goes_on(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(tool_call("submit", {"answer": "42"}))
    routes: dict[str, Handler] = {
        "/files/write": lambda _: REFUSED,
        "/files/list": lambda _: EMPTY_OUTPUT,
    }
    events: list[Event] = []

    async def inputs(_: ExecClient) -> list[str]:
        return ["doc.txt"]

    async def run() -> TaskResult:
        task = agent_for(llm_server)
        async with fake_execd(tmp_path, routes) as server:
            return await run_agent(
                task, server.endpoint, inputs, RunRecord(task, None), events.append
            )

    result = asyncio.run(run())
    assert (result.exit_reason, result.answer) == (ExitReason.SUBMITTED, "42")
    assert Notice("output/ could not be made in the workspace: permission_denied: no") in events
    prompt = (llm_server.chat_requests[0].json or {})["messages"][1]["content"]
    assert "/workspace/input/doc.txt" in prompt


def test_inputs_that_cannot_be_placed_end_the_run_before_the_model_is_asked(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    written = Reply({"path": "/workspace/output/.keep", "size": 0})
    routes: dict[str, Handler] = {"/files/write": lambda _: written}

    async def inputs(_: ExecClient) -> list[str]:
        raise SandboxError("uploading inputs failed: disk full")

    async def run() -> TaskResult:
        task = agent_for(llm_server)
        record = RunRecord(task, tmp_path / "run")
        async with fake_execd(tmp_path, routes) as server:
            result = await run_agent(task, server.endpoint, inputs, record)
        record.save(result)
        return result

    result = asyncio.run(run())
    assert (result.exit_reason, result.message) == (
        ExitReason.SANDBOX_ERROR,
        "uploading inputs failed: disk full",
    )
    assert llm_server.chat_requests == []
    saved = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert saved["result"]["message"] == "uploading inputs failed: disk full"
