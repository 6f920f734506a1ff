"""Whole runs against a real model: the test model (Qwen2.5-Coder 0.5B) served by llama.cpp
on this machine's CPU, asked through `sandboxctl run` as a user would, at temperature 0, in the
bash format and in auto. What is held is the mechanics (commands really ran in the sandbox, the
run ends with a named exitReason, the trajectory is complete, the endpoint is gone afterwards)
and that an easy task that needs code is answered right; the built-in endpoint is run too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from realmodel import TEST_MODEL, port_open
from sandbox_agent.result import ExitReason

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(900)]
MODEL = TEST_MODEL
NAMED = {reason.value for reason in ExitReason}
# Easy, and each needs the computer: a product too long for the head, a count, a file's line.
EASY = [
    ("Use python3 to compute 48271 * 1103515245, then submit the product.", "53267784391395"),
    ("How many lines does the file /etc/passwd have in this sandbox? Count them with wc -l, "
     "then submit the number.", None),
    ("Use python3 to compute 2**64, then submit the number.", "18446744073709551616"),
]  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return env | extra


def run_task(
    where: Path, prompt: str, fmt: str, *args: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], dict[str, Any]]:
    """`sandboxctl run` of one task at temperature 0: the process, result.json, trajectory.json."""
    where.mkdir(parents=True, exist_ok=True)
    task = {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTask",
        "metadata": {"name": "real"},
        "spec": {
            "prompt": prompt,
            "model": {"temperature": 0, "maxTokensPerCall": 512, "toolCallFormat": fmt},
            "limits": {"maxSteps": 4, "maxTokens": 8192, "commandTimeoutSeconds": 30},
        },
    }
    (where / "task.yaml").write_text(json.dumps(task))
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", "run", "task.yaml", "--out", "out", *args],
        cwd=where, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = where / "out"
    assert (out / "result.json").is_file(), proc.stderr
    result = json.loads((out / "result.json").read_text())
    trajectory = json.loads((out / "trajectory.json").read_text())
    assert not (out / "trajectory.jsonl").exists()  # the journal goes once the whole is written
    return proc, result, trajectory


def assert_mechanics(result: dict[str, Any], trajectory: dict[str, Any], fmt: str) -> None:
    """A named ending, a trajectory that holds every step, and sandbox output for every command."""
    assert result["exitReason"] in NAMED, result
    assert len(trajectory["steps"]) == result["steps"] >= 1, result
    assert trajectory["result"]["exitReason"] == result["exitReason"]
    assert trajectory["tool_call_format"] == fmt
    for step in trajectory["steps"]:
        assert step["completion_tokens"] > 0, step
        for call in step["tool_calls"]:
            if call["name"] == "execute_bash" and call["ok"]:
                # Only the sandbox's exec server writes this line.
                assert call["observation"].startswith("[exit code "), call


def bash_calls(trajectory: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        call
        for step in trajectory["steps"]
        for call in step["tool_calls"]
        if call["name"] == "execute_bash"
    ]


def test_the_bash_format_runs_commands_and_answers_an_easy_task_right(
    served_test_model: str, tmp_path: Path
) -> None:
    env = clean_env(OPENAI_API_KEY="none")
    right = []
    for i, (prompt, expected) in enumerate(EASY):
        proc, result, trajectory = run_task(
            tmp_path / str(i), prompt, "bash", "--base-url", served_test_model, "--model", MODEL.name,
            env=env,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr
        assert_mechanics(result, trajectory, "bash")
        assert bash_calls(trajectory), "no command ran"
        if expected is None:  # the sandbox's own count: what wc printed
            printed = [c["observation"].split("\n")[1] for c in bash_calls(trajectory)
                       if c["observation"].startswith("[exit code 0]\n")]  # fmt: skip
            expected = next((p.split()[0] for p in printed if p.split()), "?")
        right.append(result["exitReason"] == "submitted" and result["answer"] == expected)
    assert any(right), right


def test_auto_runs_to_a_named_ending_with_a_complete_trajectory(
    served_test_model: str, tmp_path: Path
) -> None:
    proc, result, trajectory = run_task(
        tmp_path, EASY[0][0], "auto", "--base-url", served_test_model, "--model", MODEL.name,
        env=clean_env(OPENAI_API_KEY="none"),
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    assert_mechanics(result, trajectory, "auto")
    # The session's server, which the run only used: still there.
    assert port_open(served_test_model)


def test_with_no_endpoint_the_local_model_is_served_for_the_run_and_stopped(
    test_model_file: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", "run", "--prompt", EASY[0][0],
         "--model", MODEL.name, "--max-steps", "3", "--out", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        env=clean_env(LLMSANDBOX_MODELS_DIR=str(test_model_file.parent)),
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("  note: no endpoint configured"), proc.stderr
    endpoint = next(line for line in lines if line.startswith("endpoint: "))
    assert endpoint.endswith(f"model: {MODEL.name}  (the local model, stopped when the run ends)")
    url = endpoint.split()[1]
    assert urlsplit(url).hostname == "127.0.0.1"
    assert not port_open(url), "the local model server outlived the run"
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["exitReason"] in NAMED
    trajectory = json.loads((tmp_path / "out" / "trajectory.json").read_text())
    assert trajectory["model"] == MODEL.name
    assert trajectory["tool_call_format"] == MODEL.tool_call_format
    assert (tmp_path / "out" / "local-model.log").stat().st_size > 0


def test_a_batch_with_no_endpoint_serves_one_local_model_for_every_run(
    test_model_file: Path, tmp_path: Path
) -> None:
    items = [
        {"id": "product", "prompt": EASY[0][0], "expected": EASY[0][1]},
        {"id": "power", "prompt": EASY[2][0], "expected": EASY[2][1]},
    ]
    taskset = {
        "apiVersion": "llmsandbox.io/v1alpha1", "kind": "SandboxTaskSet",
        "metadata": {"name": "real"},
        "spec": {"template": {"model": {"temperature": 0, "maxTokensPerCall": 512},
                              "limits": {"maxSteps": 4, "maxTokens": 8192}},
                 "items": items, "grader": {"type": "numeric"}},
    }  # fmt: skip
    (tmp_path / "set.yaml").write_text(json.dumps(taskset))
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", "batch", "set.yaml", "--model", MODEL.name,
         "--out", "out", "--parallel", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=800, check=False,
        env=clean_env(LLMSANDBOX_MODELS_DIR=str(test_model_file.parent)),
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    assert "one qwen2.5-coder-0.5b-instruct-q4_k_m server answers every run" in proc.stderr
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    ]
    assert sorted(r["id"] for r in rows) == ["power", "product"]
    assert all(r["exitReason"] in NAMED for r in rows)
    # Graded whenever the model itself ended the run; the trajectory is the local model's.
    assert all(r["grader"] == "numeric" for r in rows if r["exitReason"] != "llm_error")
    trajectory = json.loads((tmp_path / "out" / rows[0]["trajectory"]).read_text())
    assert trajectory["tool_call_format"] == MODEL.tool_call_format
    assert (tmp_path / "out" / "local-model.log").stat().st_size > 0
