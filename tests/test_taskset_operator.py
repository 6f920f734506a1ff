"""A SandboxTaskSet run by the real operator (a subprocess, SIGKILLed and restarted) on the
emulated API server: 50 items, 2 samples each, parallelism 5, right and wrong answers and one
infrastructure failure. Checked on the emulator's complete write history: never more than
parallelism unfinished tasks, every item-sample created and finished exactly once across the
kills, accuracy and pass@k exactly as taskset.summarise computes them, and the TTL takes the
set and its tasks. Plus a bad items list, failed with one line, and the cluster client."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from k8s.emulator import EmulatedApiServer, ResourceDef
from k8s.history import KillAfterWrites, TaskHistory
from k8s.kubelet import ImagePullFailure, TestKubelet
from k8s.process import OperatorProcess, free_port
from k8s.workload import api_key_secret
from sandbox_agent.result import ExitReason, Phase
from sandbox_agent.taskset import SampleResult, summarise

SET = "maths"
ITEMS = 50
SAMPLES = 2
PARALLELISM = 5
BROKEN = ("q13", 0)  # this item-sample's image cannot be pulled
KILL_AFTER_WRITES = (12, 60, 150)  # each operator process is killed after this many writes


def right(item: int, sample: int) -> bool:
    """The scripted answers: sample 0 is right unless the item is a multiple of 3, sample 1
    only for even items; so some items pass both, some one, some none."""
    return item % 3 != 0 if sample == 0 else item % 2 == 0


def item_id(i: int) -> str:
    return f"q{i:02d}"


def taskset(name: str = SET, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmsandbox.io/v1alpha1",
        "kind": "SandboxTaskSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "template": {
                "prompt": "What is {{ a }} times 7?",
                "limits": {"maxSteps": 4, "activeDeadlineSeconds": 600},
                "retries": 0,
            },
            "items": [{"id": item_id(i), "a": i, "expected": str(7 * i)} for i in range(ITEMS)],
            "samplesPerItem": SAMPLES,
            "parallelism": PARALLELISM,
            "grader": {"type": "numeric"},
            "ttlSecondsAfterFinished": 1,
            **spec,
        },
    }


def child_of(pod: dict[str, Any]) -> tuple[int, int]:
    """(item, sample) from a pod's task name, maths-qNN-S."""
    task = str(pod["metadata"]["labels"]["llmsandbox.io/task"])
    _, item, sample = task.rsplit("-", 2)
    return int(item[1:]), int(sample)


def report(pod: dict[str, Any]) -> dict[str, Any]:
    """What the agent container reports: the answer and the score the in-pod grader gave."""
    item, sample = child_of(pod)
    ok = right(item, sample)
    return {
        "phase": "Succeeded",
        "exitReason": "submitted",
        "answer": str(7 * item if ok else 7 * item + 1),
        "steps": 2,
        "usage": {"promptTokens": 100, "completionTokens": 10, "totalTokens": 110, "llmCalls": 2},
        "score": 1.0 if ok else 0.0,
        "grader": "numeric",
        **({} if ok else {"gradeMessage": f"{7 * item + 1} is not {7 * item}"}),
    }


def expected_summary() -> Any:
    results = []
    for i in range(ITEMS):
        for s in range(SAMPLES):
            if (item_id(i), s) == BROKEN:
                results.append(
                    SampleResult(item_id(i), s, Phase.FAILED, ExitReason.IMAGE_PULL_ERROR)
                )
                continue
            score = 1.0 if right(i, s) else 0.0
            results.append(
                SampleResult(item_id(i), s, Phase.SUCCEEDED, ExitReason.SUBMITTED, score, 100, 10)
            )
    return summarise(results, tasks=ITEMS * SAMPLES, samples=SAMPLES)


class Unfinished:
    """Follows the set's tasks through every write: which exist and are not terminal yet."""

    def __init__(self, api: EmulatedApiServer) -> None:
        self.lock = threading.Lock()
        self.live: set[str] = set()
        self.most = 0
        self.created: dict[str, int] = {}
        self.scores: dict[str, Any] = {}
        self.set_status: dict[str, Any] = {}
        api.store.on_write.append(self)

    def __call__(self, res: ResourceDef, type_: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        with self.lock:
            if res.plural == "sandboxtasksets" and type_ != "DELETED":
                self.set_status = dict(obj.get("status") or {})
            if res.plural != "sandboxtasks":
                return
            phase = (obj.get("status") or {}).get("phase")
            if type_ == "ADDED":
                self.created[name] = self.created.get(name, 0) + 1
                self.live.add(name)
            elif type_ == "DELETED" or phase in ("Succeeded", "Failed", "Cancelled"):
                self.live.discard(name)
                if type_ != "DELETED":
                    self.scores[name] = (obj.get("status") or {}).get("score")
            self.most = max(self.most, len(self.live))


def set_status(k8s: EmulatedApiServer, name: str) -> dict[str, Any]:
    return dict((k8s.get("sandboxtasksets", name, "default") or {}).get("status") or {})


def operator_env(port: int) -> dict[str, str]:
    return {
        "LLMSANDBOX_DEFAULT_BASE_URL": "http://127.0.0.1:9/v1",
        "LLMSANDBOX_DEFAULT_MODEL": "set-model",
        "LLMSANDBOX_DEFAULT_API_KEY_SECRET": "llm-key",
        "LLMSANDBOX_MAX_RUNNING_TASKS": "8",
        "LLMSANDBOX_METRICS_PORT": str(port),
        "LLMSANDBOX_QUEUE_REFRESH_SECONDS": "1",
    }


def test_a_set_killed_and_restarted_runs_every_item_sample_once_and_scores_it_exactly(
    k8s: EmulatedApiServer, tmp_path: Path
) -> None:
    history = TaskHistory().attach(k8s)
    unfinished = Unfinished(k8s)
    kill = KillAfterWrites(history)
    k8s.create(api_key_secret("sk-test"))
    node = TestKubelet(k8s)
    node.instant_complete(report)
    node.inject(lambda pod: child_of(pod) == (13, 0), ImagePullFailure(container="sandbox"))
    log_path = tmp_path / "operator.log"
    with node, log_path.open("wb") as log:
        k8s.create(taskset())
        for writes in KILL_AFTER_WRITES:
            op = OperatorProcess(k8s, operator_env(free_port()), log).start()
            kill.arm(op.pid, history.operator_writes[op.pid] + writes)
            assert op.proc is not None
            assert op.proc.wait(timeout=60) == -9, "the operator was not killed"
        op = OperatorProcess(k8s, operator_env(free_port()), log).start()
        try:
            k8s.wait_for(lambda: unfinished.set_status.get("phase") == "Succeeded", timeout=60)
            # The TTL (1 s) deletes the set; the API server's garbage collector its tasks.
            k8s.wait_for(lambda: not k8s.list("sandboxtasksets", "default"), timeout=30)
            k8s.wait_for(lambda: not k8s.list("sandboxtasks", "default"), timeout=30)
        finally:
            op.stop()
    # No error of the operator's own (kopf may log one of its watch streams at SIGTERM).
    assert "sandbox_operator/" not in log_path.read_text(errors="replace")

    names = {f"{SET}-{item_id(i)}-{s}" for i in range(ITEMS) for s in range(SAMPLES)}
    assert set(unfinished.created) == names
    assert set(unfinished.created.values()) == {1}, "a task was created twice"
    assert unfinished.most <= PARALLELISM
    tasks = {r.name: r for r in history.tasks.values()}
    assert set(tasks) == names
    for name, record in tasks.items():
        assert record.terminal_writes == 1, (name, record)
    broken = tasks[f"{SET}-q13-0"].terminal
    assert broken is not None
    assert broken["exitReason"] == "image_pull_error"
    # Each graded task's status shows its score; the infrastructure failure has none.
    assert unfinished.scores[f"{SET}-q01-0"] == 1.0
    assert unfinished.scores[f"{SET}-q01-1"] == 0.0
    assert unfinished.scores[f"{SET}-q13-0"] is None

    status = unfinished.set_status
    want = expected_summary()
    assert status["items"] == ITEMS
    assert status["tasks"] == status["finished"] == ITEMS * SAMPLES
    assert status["phases"] == want.phases
    assert status["exitReasons"] == want.exit_reasons == {"submitted": 99, "image_pull_error": 1}
    assert status["infrastructureFailures"] == 1
    assert status["graded"] == want.graded == 99
    assert status["accuracy"] == want.accuracy
    assert status["passAtK"] == want.pass_at_k
    assert status["usage"]["totalTokens"] == want.usage.total_tokens
    assert status["progress"]["folded"] == f"0-{ITEMS * SAMPLES - 1}"
    assert status["progress"]["openItems"] == []


@pytest.fixture
def operator_process(k8s: EmulatedApiServer, tmp_path: Path) -> Any:
    k8s.create(api_key_secret("sk-test"))
    with (tmp_path / "operator.log").open("wb") as log:
        op = OperatorProcess(k8s, operator_env(free_port()), log).start()
        try:
            yield op
        finally:
            op.stop()


def test_a_set_with_a_bad_item_fails_with_one_line_naming_it_and_creates_nothing(
    k8s: EmulatedApiServer, operator_process: OperatorProcess
) -> None:
    bad = taskset("bad")
    bad["spec"]["items"][3] = {"id": "q03", "a": 3}  # no expected answer for the grader
    k8s.create(bad)
    k8s.wait_for(lambda: set_status(k8s, "bad").get("phase") == "Failed", timeout=30)
    status = set_status(k8s, "bad")
    assert status["message"] == "items[3].expected: the numeric grader needs one"
    assert status["conditions"][0]["reason"] == "InvalidSpec"
    assert k8s.list("sandboxtasks", "default") == []
    # The operator goes on: a good set after it runs.
    good = taskset("good", parallelism=2)
    good["spec"]["items"] = good["spec"]["items"][:2]
    good["spec"]["samplesPerItem"] = 1
    k8s.create(good)
    k8s.wait_for(lambda: len(k8s.list("sandboxtasks", "default")) == 2, timeout=30)


def test_the_cluster_client_submits_a_set_and_streams_each_finished_task(
    k8s: EmulatedApiServer, operator_process: OperatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_agent.taskset import parse_set
    from sandbox_operator.client import ClusterClient

    node = TestKubelet(k8s)
    node.instant_complete(report)
    body = taskset("streamed", parallelism=3, samplesPerItem=1, ttlSecondsAfterFinished=None)
    body["spec"]["items"] = body["spec"]["items"][:4]
    del body["spec"]["ttlSecondsAfterFinished"]

    async def run() -> tuple[list[Any], dict[str, Any]]:
        async with ClusterClient.connect() as client:
            name = await client.submit_set(parse_set(body), namespace="default")
            seen = [r async for r in client.stream_results(name, "default", poll_seconds=0.2)]
            done = await client.wait_set(name, "default", poll_seconds=0.2)
            task = await client.wait_task(seen[0].name, "default", poll_seconds=0.2)
            assert task["phase"] == "Succeeded"
            assert done == await client.set_status(name, "default")
            return seen, done

    for key, value in k8s.env().items():
        monkeypatch.setenv(key, value)
    with node:
        seen, status = asyncio.run(run())
    assert sorted((r.item_id, r.sample) for r in seen) == [(item_id(i), 0) for i in range(4)]
    by_item = {r.item_id: r for r in seen}
    assert by_item["q00"].score == 0.0
    assert by_item["q00"].answer == "1"
    assert by_item["q01"].score == 1.0
    assert by_item["q01"].answer == "7"
    assert {r.phase for r in seen} == {"Succeeded"}
    assert status["phase"] == "Succeeded"
    assert status["accuracy"] == 0.5
