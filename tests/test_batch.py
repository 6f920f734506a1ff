"""`sandboxctl batch` and the Python API on this machine: a set run against the scripted model,
its results, its resume after Ctrl-C, its verifier, and the one-line refusals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import bwrap_works
from llmserver import MODEL_ID, Reply, ScriptedLLMServer, slow, tool_call
from sandbox_agent.api import run, run_many, run_set
from sandbox_agent.batch import BatchRow
from sandbox_agent.errors import TaskSpecError
from sandbox_agent.runner import RunOptions
from sandbox_agent.scoring import EXPECTED_FILE_VAR

SANDBOXCTL = [sys.executable, "-m", "sandbox_agent.cli"]


def adder(request: dict[str, Any]) -> Reply:
    """Answers "What is A + B?" right, except when A is 3 (then one too many)."""
    user = next(m["content"] for m in request["messages"] if m["role"] == "user")
    a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)", user)[0])
    return tool_call("submit", {"answer": f"so it is {a + b + (a == 3)}"})


def write_set(tmp_path: Path, n: int, **spec: Any) -> Path:
    """A set whose items are a JSONL file in the paper's shape."""
    lines = [
        json.dumps({"id": f"q{i}", "problem_statement": f"What is {i} + 1?", "ground_truth": i + 1})
        for i in range(n)
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    doc = {
        "apiVersion": "llmsandbox.io/v1alpha1", "kind": "SandboxTaskSet",
        "metadata": {"name": "sums"},
        "spec": {"template": {"limits": {"maxSteps": 3}}, "itemsFrom": {"file": "items.jsonl"},
                 "grader": {"type": "numeric"}, **spec},
    }  # fmt: skip
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def batch_env(server: ScriptedLLMServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return {**env, "OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": MODEL_ID,
            "OPENAI_API_KEY": "test"}  # fmt: skip


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_set_runs_to_scored_results_a_summary_and_a_table(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(adder)
    path = write_set(tmp_path, 6, samplesPerItem=2)
    out = tmp_path / "out"
    proc = subprocess.run(
        [*SANDBOXCTL, "batch", str(path), "--out", str(out), "--parallel", "4",
         "--backend", "process"],
        env=batch_env(llm_server), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = rows(out)
    assert sorted((r["id"], r["sample"]) for r in found) == [
        (f"q{i}", s) for i in range(6) for s in (0, 1)
    ]
    wrong = {(r["id"], r["score"]) for r in found if r["score"] != 1.0}
    assert wrong == {("q3", 0.0)}
    q3 = next(r for r in found if r["id"] == "q3")
    assert (q3["answer"], q3["expected"], q3["gradeMessage"]) == (
        "so it is 5",
        "4",
        "expected 4, got 5",
    )
    assert (out / q3["trajectory"]).is_file()
    assert q3["trajectory"] == f"runs/{q3['task']}/trajectory.json"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["finished"], summary["graded"]) == (12, 12)
    assert summary["accuracy"] == pytest.approx(10 / 12, abs=1e-6)
    assert summary["passAtK"] == {
        "1": pytest.approx(5 / 6, abs=1e-6),
        "2": pytest.approx(5 / 6, abs=1e-6),
    }
    assert re.search(r"^accuracy\s+83\.3%$", proc.stdout, re.M)
    assert re.search(r"^pass@2\s+83\.3%$", proc.stdout, re.M)
    assert "12/12" in proc.stderr  # the progress bar's last line


def test_resume_after_ctrl_c_finishes_the_rest_without_redoing_any(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(lambda request: slow(0.3, adder(request)))
    path = write_set(tmp_path, 20)
    out = tmp_path / "out"
    command = [
        *SANDBOXCTL,
        "batch",
        str(path),
        "--out",
        str(out),
        "-j",
        "2",
        "--backend",
        "process",
    ]
    first = subprocess.Popen(command, env=batch_env(llm_server), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (out / "results.jsonl").is_file() and len(rows(out)) >= 5:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert "--resume goes on" in err
    before = {(r["id"], r["sample"]) for r in rows(out)}
    assert 5 <= len(before) < 20
    second = subprocess.run(
        [*command, "--resume"], env=batch_env(llm_server), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    counts = Counter((r["id"], r["sample"]) for r in rows(out))
    assert sorted(counts) == sorted((f"q{i}", 0) for i in range(20))
    assert set(counts.values()) == {1}, "an item-sample ran twice"
    assert f"resumed         {len(before)} finished before, not run again" in second.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["finished"], summary["accuracy"]) == (20, 0.95)


def test_a_batch_directory_is_never_shared_or_reused_by_accident(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(adder)
    path = write_set(tmp_path, 1)
    out = tmp_path / "out"
    env = batch_env(llm_server)
    command = [*SANDBOXCTL, "batch", str(path), "--out", str(out), "--backend", "process", "-q"]
    assert subprocess.run(command, env=env, capture_output=True, timeout=60).returncode == 0
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert (again.returncode, again.stderr) == (2, (
        f"sandboxctl batch: --out {out}: holds an earlier batch; --resume to finish it, or "
        "give a new directory\n"
    ))  # fmt: skip
    (tmp_path / "items.jsonl").write_text(
        '{"id": "other", "prompt": "What is 3 + 3?", "expected": "6"}\n'
    )
    changed = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=60
    )
    assert changed.returncode == 2
    assert "its batch ran a different set (spec or items changed)" in changed.stderr


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ('{"id": "a"}\n', "items[0] (a).prompt: the item has no prompt and the template none"),
        ('{"id": "a", "prompt": "p"}\n', "items[0].expected: the numeric grader needs one"),
        ("not json\n", "line 1: not JSON: Expecting value"),
    ],
)
def test_a_bad_item_is_one_line_before_anything_runs(
    tmp_path: Path, items: str, message: str
) -> None:
    path = write_set(tmp_path, 1)
    (tmp_path / "items.jsonl").write_text(items)
    proc = subprocess.run(
        [*SANDBOXCTL, "batch", str(path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_command_verifier_sees_the_expected_answer_only_after_the_model(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    # The model looks for the expected answer (it must not be there yet), then submits.
    llm_server.script(
        tool_call(
            "execute_bash",
            {"command": f"ls -a; echo ${EXPECTED_FILE_VAR}; cat .llmsandbox-grading/* 2>&1"},
        ),
        tool_call("submit", {"answer": "42"}),
        tool_call("submit", {"answer": "41"}),
    )
    taskset = tmp_path / "set.yaml"
    taskset.write_text(yaml.safe_dump({
        "kind": "SandboxTaskSet", "apiVersion": "llmsandbox.io/v1alpha1", "metadata": {"name": "v"},
        "spec": {"parallelism": 1,
                 "grader": {"type": "command", "command": 'test "$(cat "$LLMSANDBOX_ANSWER_FILE")" = "$(cat "$LLMSANDBOX_EXPECTED_FILE")"'},
                 "items": [{"id": "a", "prompt": "p", "expected": "42"}, {"id": "b", "prompt": "p", "expected": "42"}]},
    }))  # fmt: skip
    opts = RunOptions(backend="process", base_url=llm_server.base_url, model=MODEL_ID, api_key="k")
    outcome = asyncio.run(run_set(taskset, tmp_path / "out", opts, parallel=1))
    by_id = {r.id: r for r in outcome.rows}
    assert (by_id["a"].score, by_id["b"].score) == (1.0, 0.0)
    assert by_id["b"].grade_message == "the verifier exited with 1"
    observation = llm_server.chat_requests[1].json
    assert observation is not None
    seen = json.dumps(observation["messages"][-1])
    assert "42" not in seen
    assert "No such file" in seen


async def test_the_python_api_runs_one_task_and_many(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(adder)
    opts = RunOptions(backend="process", base_url=llm_server.base_url, model=MODEL_ID, api_key="k",
                      out_dir=tmp_path / "runs")  # fmt: skip
    one = await run("What is 1 + 1?", RunOptions(backend="process", base_url=llm_server.base_url,
                                                   model=MODEL_ID, api_key="k", out_dir=tmp_path / "one"))  # fmt: skip
    assert one.result.answer == "so it is 2"
    answers = {}
    async for index, outcome in run_many([f"What is {i} + 1?" for i in range(5)], opts, parallel=3):
        answers[index] = outcome.result.answer
    assert answers == {i: f"so it is {i + 1 + (i == 3)}" for i in range(5)}


async def test_run_set_streams_rows_as_they_finish(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(adder)
    path = write_set(tmp_path, 4)
    seen: list[BatchRow] = []
    opts = RunOptions(backend="process", base_url=llm_server.base_url, model=MODEL_ID, api_key="k")
    outcome = await run_set(path, tmp_path / "out", opts, parallel=2, on_row=seen.append)
    assert sorted(r.id for r in seen) == ["q0", "q1", "q2", "q3"]
    assert outcome.summary.accuracy == 0.75


async def test_run_set_refuses_a_parallelism_below_one(tmp_path: Path) -> None:
    with pytest.raises(TaskSpecError, match="--parallel: must be at least 1"):
        await run_set(
            write_set(tmp_path, 1), tmp_path / "out", RunOptions(base_url="http://x/v1"), parallel=0
        )


@pytest.mark.bwrap
@pytest.mark.skipif(not bwrap_works(), reason="bubblewrap not installed or not usable")
def test_the_python_api_example_runs(tmp_path: Path, llm_server: ScriptedLLMServer) -> None:
    def answer(request: dict[str, Any]) -> Reply:
        user = next(m["content"] for m in request["messages"] if m["role"] == "user")
        if found := re.search(r"What is (\d+) \* (\d+)", user):
            return tool_call("submit", {"answer": str(int(found[1]) * int(found[2]))})
        n = int(re.findall(r"What is (\d+) squared", user)[0])
        return tool_call("submit", {"answer": str(n * n)})

    llm_server.set_default(answer)
    example = Path(__file__).parents[1] / "examples" / "python_api.py"
    env = batch_env(llm_server)
    proc = subprocess.run(
        [sys.executable, str(example), str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("one: Succeeded 391 ")
    assert sorted(lines[1:5]) == [
        f"many[{i}]: {n * n} score 1.0" for i, n in enumerate(range(11, 15))
    ]
    assert lines[5] == "set: accuracy 1.0 pass@k {'1': 1.0, '2': 1.0}"


def test_the_batch_benchmark_runs_and_prints_its_table() -> None:
    bench = Path(__file__).parents[1] / "bench" / "batch_local.py"
    proc = subprocess.run(
        [sys.executable, str(bench), "--items", "4", "--parallel", "1,2", "--delay", "0.01",
         "--steps", "2", "--backend", "process"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "4 items, 2 model calls each at 10 ms, backend process" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s+[12]\s", line)]
    assert [(r[0], r[-1]) for r in rows] == [("1", "100.0%"), ("2", "100.0%")]


def test_validate_checks_a_set_file_and_counts_its_tasks(tmp_path: Path) -> None:
    path = write_set(tmp_path, 3, samplesPerItem=2)
    proc = subprocess.run(
        [*SANDBOXCTL, "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout) == (
        0,
        f"{path}: SandboxTaskSet sums: 3 items x 2 samples = 6 tasks, grader numeric\n",
    )
    (tmp_path / "items.jsonl").write_text('{"id": "a", "prompt": "p"}\n')
    proc = subprocess.run(
        [*SANDBOXCTL, "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stderr) == (
        2,
        f"sandboxctl validate: {path}: items[0].expected: the numeric grader needs one\n",
    )


async def test_a_math_grader_without_math_verify_is_refused_with_the_install_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sandbox_agent.math_grading

    monkeypatch.setattr(sandbox_agent.math_grading, "math_verify_installed", lambda: False)
    path = write_set(tmp_path, 1, grader={"type": "math"})
    with pytest.raises(TaskSpecError) as caught:
        await run_set(path, tmp_path / "out", RunOptions(base_url="http://127.0.0.1:9/v1"))
    assert str(caught.value) == (
        "spec.grader: the math grader needs math-verify: pip install 'llm-sandbox-operator[grading]'"
    )
    assert not (tmp_path / "out").exists()
