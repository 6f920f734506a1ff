"""The artifact store for local runs (`sandboxctl run --artifacts-url`): a real S3 API (moto's
server) and a directory; the layout, the step-by-step journal while the run goes, and a store
that fails never costing the run its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import task_doc
from llmserver import ScriptedLLMServer, slow, tool_call
from s3server import S3Server, s3_server
from sandbox_agent.artifacts import (
    ArtifactStoreError,
    StoreOptions,
    StoreURL,
    one_line,
    parse_store_url,
    run_prefix,
)
from sandbox_agent.result import ExitReason, Phase
from sandbox_agent.runner import RunOutcome
from sandbox_agent.trajectory import StepRecord, Trajectory

__all__ = ["s3_server"]

WRITE_REPORT = tool_call(
    "execute_bash", {"command": "mkdir -p output/notes && echo 'all done' > output/notes/a.txt"}
)


def stored_under(outcome: RunOutcome, root: str, url: str) -> str:
    """The run's prefix below the store's `root` (s3://BUCKET, file://DIR); `url` was given."""
    where = outcome.result.artifacts_url
    assert where is not None
    assert where.startswith(url + "/local/test-task/"), where
    return where.removeprefix(root + "/")


def test_a_run_leaves_result_trajectory_and_outputs_in_s3(
    run_local: Callable[..., RunOutcome], llm_server: ScriptedLLMServer, s3_server: S3Server
) -> None:
    llm_server.script(WRITE_REPORT, tool_call("submit", {"answer": "42"}))
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/exp-1"
    outcome = run_local(task_doc("Go."), artifacts_url=url, env=s3_server.env)
    assert outcome.result.phase is Phase.SUCCEEDED
    assert outcome.result.artifacts_error is None
    prefix = stored_under(outcome, f"s3://{bucket}", url)
    stored = s3_server.objects(bucket, prefix + "/")
    assert sorted(k.removeprefix(prefix + "/") for k in stored) == [
        "output/notes/a.txt",
        "result.json",
        "trajectory.json",
    ]  # fmt: skip (the per-step objects go once trajectory.json holds every step)
    assert stored[f"{prefix}/output/notes/a.txt"] == b"all done\n"
    result = json.loads(stored[f"{prefix}/result.json"])
    assert result["answer"] == "42"
    assert result["artifactsURL"] == outcome.result.artifacts_url
    trajectory = json.loads(stored[f"{prefix}/trajectory.json"])
    assert [s["step"] for s in trajectory["steps"]] == [1, 2]
    # The local copy says where the store keeps the run.
    local = json.loads((outcome.run_dir / "result.json").read_text())
    assert local["artifactsURL"] == outcome.result.artifacts_url


def test_each_step_is_in_the_store_while_the_run_goes(
    run_local: Callable[..., RunOutcome], llm_server: ScriptedLLMServer, s3_server: S3Server
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "echo one"}),
        tool_call("execute_bash", {"command": "echo two"}),
        slow(4, tool_call("submit", {"answer": "done"})),
    )
    bucket = s3_server.new_bucket()
    done: list[RunOutcome] = []
    runner = threading.Thread(
        target=lambda: done.append(run_local(task_doc("Go."), artifacts_url=f"s3://{bucket}",
                                             env=s3_server.env))
    )  # fmt: skip
    runner.start()
    seen: dict[str, bytes] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline and runner.is_alive():
        seen = {k: v for k, v in s3_server.objects(bucket).items() if "/steps/" in k}
        time.sleep(0.1)
    runner.join(60)
    # While the third reply was on its way, the two finished steps were stored, in order; put
    # together they are the journal a run killed at that moment leaves.
    assert [k.rsplit("/", 1)[1] for k in sorted(seen)] == ["000001.jsonl", "000002.jsonl"]
    journal = Path(done[0].run_dir.parent / "from-store.jsonl")
    journal.write_bytes(b"".join(seen[k] for k in sorted(seen)))
    steps = Trajectory.from_journal(journal).steps
    assert [s.tool_calls[0].observation.splitlines()[-1] for s in steps] == ["one", "two"]
    assert done[0].result.answer == "done"


def test_a_missing_bucket_costs_the_run_nothing_and_is_reported(
    run_local: Callable[..., RunOutcome], llm_server: ScriptedLLMServer, s3_server: S3Server
) -> None:
    llm_server.script(tool_call("submit", {"answer": "42"}))
    outcome = run_local(task_doc("Go."), artifacts_url="s3://no-such-bucket-here/x",
                        env=s3_server.env)  # fmt: skip
    assert outcome.result.phase is Phase.SUCCEEDED
    assert outcome.result.answer == "42"
    error = outcome.result.artifacts_error or ""
    assert "NoSuchBucket" in error
    assert "s3://no-such-bucket-here/x/local/test-task/" in error
    assert "\n" not in error
    assert "Debug" not in error
    local = json.loads((outcome.run_dir / "result.json").read_text())
    assert local["artifactsError"] == error
    assert (outcome.run_dir / "trajectory.json").is_file()


def test_credentials_the_store_refuses_cost_the_run_nothing_and_are_reported(
    run_local: Callable[..., RunOutcome],
    llm_server: ScriptedLLMServer,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import moto.settings

    bucket = s3_server.new_bucket()
    # From now on the server checks every request's key against its IAM users: ours is unknown.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    llm_server.script(tool_call("submit", {"answer": "42"}))
    outcome = run_local(task_doc("Go."), artifacts_url=f"s3://{bucket}/x", env=s3_server.env)
    assert (outcome.result.phase, outcome.result.answer) == (Phase.SUCCEEDED, "42")
    error = outcome.result.artifacts_error or ""
    assert "InvalidAccessKeyId" in error, error
    assert f"s3://{bucket}/x/local/test-task/" in error
    assert "\n" not in error
    assert s3_server.secret_key not in error
    local = json.loads((outcome.run_dir / "result.json").read_text())
    assert local["artifactsError"] == error
    assert (outcome.run_dir / "trajectory.json").is_file()
    monkeypatch.undo()
    assert s3_server.objects(bucket) == {}


def test_a_store_that_is_down_is_retried_then_given_up_on_within_its_time(
    run_local: Callable[..., RunOutcome], llm_server: ScriptedLLMServer, s3_server: S3Server
) -> None:
    llm_server.script(tool_call("submit", {"answer": "42"}))
    env = {**s3_server.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens there
    outcome = run_local(
        task_doc("Go."), artifacts_url="s3://runs/x", env=env,
        store_options=StoreOptions(retry_seconds=1.5),
    )  # fmt: skip
    assert outcome.result.exit_reason is ExitReason.SUBMITTED
    error = outcome.result.artifacts_error or ""
    # Retried (for store_options.retry_seconds each), then given up on: the run did not hang.
    assert "after" in error, error
    assert error.endswith("retries - HTTP error: error sending request (Connect)"), error


def test_a_file_url_keeps_the_same_layout_in_a_directory(
    run_local: Callable[..., RunOutcome], llm_server: ScriptedLLMServer, tmp_path: Path
) -> None:
    llm_server.script(WRITE_REPORT, tool_call("submit", {"answer": "42"}))
    store = tmp_path / "store"
    outcome = run_local(task_doc("Go."), artifacts_url=f"file://{store}")
    assert outcome.result.artifacts_error is None
    run = store / stored_under(outcome, f"file://{store}", f"file://{store}")
    found = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert found == ["output/notes/a.txt", "result.json", "trajectory.json"]
    assert json.loads((run / "result.json").read_text())["answer"] == "42"


def test_the_s3_secret_reaches_neither_the_sandbox_nor_the_record(
    run_local: Callable[..., RunOutcome], llm_server: ScriptedLLMServer, s3_server: S3Server
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "env; cat /proc/[0-9]*/environ 2>/dev/null"}),
        tool_call("submit", {"answer": "ok"}),
    )
    bucket = s3_server.new_bucket()
    outcome = run_local(task_doc("Look."), artifacts_url=f"s3://{bucket}", env=s3_server.env)
    stored = b"".join(s3_server.objects(bucket).values())
    assert outcome.result.artifacts_error is None
    assert s3_server.secret_key.encode() not in stored
    for path in outcome.run_dir.rglob("*"):
        if path.is_file():
            assert s3_server.secret_key.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://example.com/x", "is not a store URL (give one of s3://, gs://, az://, file://)"),
        ("s3:///prefix", "names no bucket"),
        ("az://", "names no container"),
        ("s3://b/x?versionId=1", "has a query or fragment"),
        ("s3://key:secret@bucket/x", "carries credentials"),
        ("s3://bucket/a/../b", "has a '.', '..' or control character"),
        ("file://host/dir", "names a host"),
        ("file:relative/dir", "is not an absolute path"),
    ],
)
def test_a_url_that_is_not_a_store_is_refused_naming_the_flag(url: str, says: str) -> None:
    with pytest.raises(ArtifactStoreError) as info:
        parse_store_url(url, "--artifacts-url")
    assert str(info.value).startswith(f"--artifacts-url: {url!r} {says}")


def test_store_urls_parse_into_root_and_prefix() -> None:
    assert parse_store_url("s3://runs/exp/1/", "x") == StoreURL("s3", "runs", "exp/1")
    assert parse_store_url("gs://b", "x") == StoreURL("gs", "b", "")
    assert parse_store_url("file:///srv/runs/", "x") == StoreURL("file", "/srv/runs", "")
    url = parse_store_url("s3://runs/exp", "x").joined(run_prefix("ns", "task-a", "2"))
    assert str(url) == "s3://runs/exp/ns/task-a/2"
    assert run_prefix("ns", "t", "1", "sweep/7") == "ns/sweep/7/t/1"


def test_a_store_error_is_one_line_with_the_servers_code_and_message() -> None:
    raw = (
        "Object at location a not found: Error performing PUT http://127.0.0.1:4/nob/a in "
        '27.1ms - Server returned non-2xx status code: 404 Not Found: <?xml version="1.0"?>\n'
        "<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message>"
        '<RequestId>X</RequestId></Error>\n\nDebug source:\nNotFound {\n path: "a" }'
    )
    line = one_line(RuntimeError(raw))
    assert line.startswith("NoSuchBucket The specified bucket does not exist (Object at location")
    assert "\n" not in line
    assert "RequestId" not in line
    assert "Debug" not in line


def test_a_bad_artifacts_url_is_one_line_naming_the_flag_and_runs_nothing(
    tmp_path: Path,
) -> None:
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_doc("Go.")))
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", "run", "task.yaml", "--backend", "process",
         "--base-url", "http://127.0.0.1:9/v1", "--artifacts-url", "ftp://host/x", "--out", "o"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "sandboxctl run: --artifacts-url: 'ftp://host/x' is not a store URL (give one of s3://, "
        "gs://, az://, file://)"
    )
    assert not (tmp_path / "o").exists()


def fetch(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", "artifacts", *args],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_a_killed_runs_steps_are_fetched_as_its_journal(tmp_path: Path) -> None:
    # What a pod killed after two steps leaves: steps/, no trajectory.json, no result.json.
    run = tmp_path / "store" / "default" / "t" / "1"
    (run / "steps").mkdir(parents=True)
    journal = Trajectory(task_name="t")
    lines: list[str] = []
    journal.send_journal_to(lines.append)
    for n in (1, 2):
        journal.messages.append({"role": "assistant", "content": f"step {n}"})
        journal.step_done(StepRecord(
            step=n, started_at=0, llm_seconds=0, llm_retries=0, prompt_tokens=1,
            completion_tokens=1, usage_reported=True, finish_reason="stop", content=f"step {n}",
        ))  # fmt: skip
    for n, text in enumerate(lines, 1):
        (run / "steps" / f"{n:06d}.jsonl").write_text(text)
    got = fetch("--url", f"file://{run}", "-o", "got", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert "(no trajectory.json: the run's steps are joined in trajectory.jsonl)" in got.stdout
    back = Trajectory.from_journal(tmp_path / "got" / "trajectory.jsonl")
    assert [s.content for s in back.steps] == ["step 1", "step 2"]
    assert back.task_name == "t"


def test_fetching_refuses_a_full_directory_and_an_empty_prefix_in_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "store").mkdir()
    empty = fetch("--url", f"file://{tmp_path}/store", "-o", "got", cwd=tmp_path)
    assert empty.returncode == 1
    assert (
        empty.stderr.strip()
        == f"sandboxctl artifacts: file://{tmp_path}/store: nothing is stored there"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    full = fetch("--url", f"file://{tmp_path}/store", "-o", "full", cwd=tmp_path)
    assert full.returncode == 2
    assert full.stderr.strip().endswith(
        "-o full: exists and is not an empty directory; give a new one"
    )
    both = fetch("t1", "--url", "s3://b/x", cwd=tmp_path)
    assert both.returncode == 2
    assert both.stderr.strip().endswith("give a task name, or --url URL (not both)")
    assert (tmp_path / "full" / "x").read_text() == "mine"


STORE_ROUND_TRIP = """
import asyncio, sys
from sandbox_agent.artifacts import StoreOptions, open_store

async def main() -> None:
    store = open_store(sys.argv[1], "url", StoreOptions(), {})
    await store.put("a/b.txt", b"x")
    assert [o.key for o in await store.list_under("a")] == ["a/b.txt"]
    assert await store.get("a/b.txt") == b"x"
    await store.delete(["a/b.txt"])

asyncio.run(main())
sys.exit(7)
"""


def test_a_process_that_used_the_store_exits_with_its_own_code(tmp_path: Path) -> None:
    # obstore's asyncio calls made about one such process in eight abort at exit (SIGABRT).
    codes = [
        subprocess.run(
            [sys.executable, "-c", STORE_ROUND_TRIP, f"file://{tmp_path}/s{i}"],
            capture_output=True, timeout=60, check=False,
        ).returncode
        for i in range(12)
    ]  # fmt: skip
    assert codes == [7] * 12


def test_what_was_left_out_of_the_outputs_is_in_the_stored_result(
    run_local: Callable[..., RunOutcome], llm_server: ScriptedLLMServer, tmp_path: Path
) -> None:
    llm_server.script(
        tool_call(
            "execute_bash",
            {"command": "truncate -s 65M output/huge.bin && echo ok > output/small.txt"},
        ),
        tool_call("submit", {"answer": "done"}),
    )
    store = tmp_path / "store"
    outcome = run_local(task_doc("Go."), artifacts_url=f"file://{store}")
    run = store / stored_under(outcome, f"file://{store}", f"file://{store}")
    result = json.loads((run / "result.json").read_text())
    assert [o["path"] for o in result["outputs"]] == ["small.txt"]
    assert result["outputsNotCollected"] == [
        "output/huge.bin not collected: 68157440 bytes, over the 67108864-byte limit per file"
    ]
    assert not (run / "output" / "huge.bin").exists()


def test_a_store_that_never_answers_is_given_up_on_and_the_run_ends(
    run_local: Callable[..., RunOutcome], llm_server: ScriptedLLMServer, s3_server: S3Server
) -> None:
    import socket

    llm_server.script(tool_call("submit", {"answer": "42"}))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts (the kernel does), never reads or answers
    try:
        env = {**s3_server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        outcome = run_local(
            task_doc("Go."), artifacts_url="s3://runs/slow", env=env,
            store_options=StoreOptions(request_timeout_seconds=1, retry_seconds=2),
        )  # fmt: skip
    finally:
        silent.close()
    assert outcome.result.answer == "42"
    error = outcome.result.artifacts_error or ""
    assert error.startswith("writing s3://runs/slow/local/test-task/"), error
    assert error.endswith("error sending request (Timeout)"), error
